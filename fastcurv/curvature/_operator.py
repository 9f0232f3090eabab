"""The linear-operator interface shared by :class:`Hessian`, :class:`EmpiricalFisher` and the solvers,
and the argument handling (parameters, data batches, train-mode checks) both operators need."""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["CurvatureOperator", "ModelOperator", "as_operator", "resolve_params", "BatchSource", "check_fixed_function",
           "ParameterSnapshot", "refuse_wrappers", "scalar_loss", "backward_columns"]


class CurvatureOperator:
    """A symmetric ``P x P`` matrix known only through products ``A @ V``.

    Subclasses implement ``_matmat(V)`` for ``V`` of shape ``[P, K]`` (already validated: right
    shape, dtype and device). ``A @ v`` with ``v`` of shape ``[P]`` returns ``[P]``; ``A @ V`` with
    ``V`` of shape ``[P, K]`` returns ``[P, K]`` from one batched evaluation of all K columns.
    """

    name = "operator"

    def __init__(self, num_params: int, dtype: torch.dtype, device: torch.device):
        self.num_params = int(num_params)
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``[P, K]`` (or ``[P]``); see the class docstring."""
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"{self.name} @ V: V must be a torch.Tensor, got {type(V).__name__}")
        P = self.num_params
        if V.dim() not in (1, 2) or V.shape[0] != P:
            raise ValueError(
                f"{self.name} @ V: expected V of shape [{P}] or [{P}, K] (P = number of parameters that "
                f"require grad), got {tuple(V.shape)}"
            )
        if V.dim() == 2 and V.shape[1] == 0:
            raise ValueError(f"{self.name} @ V: V has K = 0 columns, shape {tuple(V.shape)}")
        if V.dtype != self.dtype:
            raise TypeError(f"{self.name} @ V: V has dtype {V.dtype}, the parameters have {self.dtype}")
        if V.device != self.device:
            raise ValueError(f"{self.name} @ V: V is on {V.device}, the parameters are on {self.device}")
        if V.dim() == 1:
            return self._matmat(V[:, None])[:, 0]
        return self._matmat(V)

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.matmat(V)

    def to_dense(self) -> torch.Tensor:
        """The explicit ``[P, P]`` matrix, from ``P`` products with the identity. For small models only."""
        return self.matmat(torch.eye(self.num_params, dtype=self.dtype, device=self.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_params={self.num_params}, dtype={self.dtype}, device={self.device})"


class _DenseOperator(CurvatureOperator):
    name = "matrix"

    def __init__(self, matrix: torch.Tensor):
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V):
        return self.matrix @ V


class _DuckOperator(CurvatureOperator):
    """Adapts any object with ``matmat`` or ``@``, ``num_params``, ``dtype`` and ``device``."""

    def __init__(self, op):
        missing = [a for a in ("num_params", "dtype", "device") if not hasattr(op, a)]
        if missing or not (hasattr(op, "matmat") or hasattr(op, "__matmul__")):
            raise TypeError(
                f"expected a curvature operator (with matmat or @, num_params, dtype, device) or a square "
                f"2-D tensor; {type(op).__name__} lacks {missing or ['matmat/@']}"
            )
        super().__init__(op.num_params, op.dtype, op.device)
        self.op = op
        self.name = type(op).__name__

    def _matmat(self, V):
        out = self.op.matmat(V) if hasattr(self.op, "matmat") else self.op @ V
        if out.shape != V.shape:
            raise ValueError(f"{self.name}.matmat returned shape {tuple(out.shape)} for V of shape {tuple(V.shape)}")
        return out


def as_operator(op) -> CurvatureOperator:
    """Accept a :class:`CurvatureOperator`, any duck-typed operator, or a square (symmetric) 2-D tensor."""
    if isinstance(op, CurvatureOperator):
        return op
    if isinstance(op, torch.Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"a matrix operator must be square 2-D, got shape {tuple(op.shape)}")
        return _DenseOperator(op)
    return _DuckOperator(op)


# ------------------------------------------------------------------------------------ parameters
def resolve_params(model: nn.Module, params) -> tuple[list[str], list[nn.Parameter]]:
    """The parameters an operator acts on, with their qualified names.

    ``params=None``: every parameter of ``model`` that requires grad, in ``model.parameters()`` order.
    Otherwise an iterable of parameters of ``model`` (or ``(name, parameter)`` pairs), kept in the given order.
    """
    named = list(model.named_parameters())
    name_of = {id(p): n for n, p in named}
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        chosen = []
        for item in params:
            p = item[1] if isinstance(item, tuple) else item
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must hold parameters of the model, got {type(p).__name__}")
            if id(p) not in name_of:
                raise ValueError(f"params: a tensor of shape {tuple(p.shape)} is not a parameter of the model")
            if not p.requires_grad:
                raise ValueError(f"params: parameter {name_of[id(p)]!r} does not require grad")
            chosen.append((name_of[id(p)], p))
        if len({id(p) for _, p in chosen}) != len(chosen):
            raise ValueError("params: the same parameter is listed twice")
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no parameters that require grad (P = 0)")
    dtypes = {p.dtype for _, p in chosen}
    devices = {p.device for _, p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"all parameters must share one dtype and device, got dtypes {sorted(map(str, dtypes))} and "
            f"devices {sorted(map(str, devices))}"
        )
    return [n for n, _ in chosen], [p for _, p in chosen]


# -------------------------------------------------------------------------------------- modes
_STOCHASTIC_IN_TRAIN = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCH_STATISTICS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def check_fixed_function(model: nn.Module, allow_train_mode: bool, what: str, *, can_allow: bool = True) -> None:
    """Refuse modules whose output in train mode is not a fixed function of the parameters.

    Dropout draws a new mask on every call, and BatchNorm in train mode normalizes with the batch's
    statistics (examples interact) and updates its running statistics on every product, so the
    "matrix" would change between products. ``allow_train_mode=True`` accepts that knowingly.
    ``can_allow=False``: the caller has no ``allow_train_mode`` argument, so the message does not offer it.
    """
    refuse_wrappers(model, what)
    if allow_train_mode:
        return
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, _STOCHASTIC_IN_TRAIN) and module.p > 0:
            kind = "draws a new random mask on every product"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            kind = "normalizes with batch statistics and updates its running statistics on every product"
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            kind = "updates its running statistics on every product"
        else:
            continue
        remedy = ", or pass allow_train_mode=True to accept this knowingly" if can_allow else ""
        raise RuntimeError(
            f"{what}: module {name or '<root>'!r} ({type(module).__name__}) is in train mode and {kind}, so "
            f"the result would not be a fixed function of the parameters. Call model.eval() first{remedy}."
        )


def _fsdp_classes() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return ()
    try:
        from torch.distributed.fsdp import FSDPModule  # fully_shard (FSDP2), torch >= 2.6
    except ImportError:
        return (FullyShardedDataParallel,)
    return (FullyShardedDataParallel, FSDPModule)


def refuse_wrappers(model: nn.Module, what: str) -> None:
    """Refuse, with a clear error instead of one from deep inside autograd, the wrappers curvature code
    cannot run through:

    * a ``torch.compile(model)`` wrapper: its compiled backward has no double backward (Hessian products
      fail on "donated buffers") and it hides the layers from the capture hooks. ``model.compile()``,
      which compiles in place, works: dynamo runs the hooked and double-backward parts eagerly.
    * FSDP (``FullyShardedDataParallel`` or ``fully_shard``): the double backward fails on FSDP's
      unsharded parameters (checked with torch 2.13, gloo, CPU). DDP works.
    """
    compiled = getattr(torch, "_dynamo", None) and getattr(torch._dynamo.eval_frame, "OptimizedModule", None)
    if compiled is not None and isinstance(model, compiled):
        raise ValueError(
            f"{what}: the model is a torch.compile wrapper ({type(model).__name__}); its compiled backward "
            f"cannot be differentiated twice and it hides the layers from fastcurv's hooks. Call model.compile() "
            f"instead (compiles in place and works), or pass the uncompiled model (model._orig_mod)."
        )
    classes = _fsdp_classes()
    for name, module in model.named_modules():
        if classes and isinstance(module, classes):
            raise ValueError(
                f"{what}: module {name or '<root>'!r} is wrapped by FSDP ({type(module).__name__}); FSDP is not "
                f"supported (the double backward of curvature terms fails on FSDP's sharded parameters). Use "
                f"DistributedDataParallel (see the README's 'Multi-GPU (DDP/FSDP)' section)."
            )


# ------------------------------------------------------------------------------ staleness
class ParameterSnapshot:
    """Tells whether parameters changed in any way since the snapshot was taken.

    Version counters catch ``optimizer.step()``, ``p.add_``, ``copy_`` and ``load_state_dict``, but not
    ``p.data = t`` or ``p.data.add_(...)`` (``.data`` has its own version counter), so the snapshot also
    keeps each parameter's storage address and a copy of its values. Comparing the copy costs one
    read of the ``P`` parameters, far less than the product whose cached state it guards.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self._state = self._identity(params)
        self._values = [p.detach().clone() for p in params]

    @staticmethod
    def _identity(params):
        return [(p._version, p.data_ptr(), p.shape, p.dtype, p.device) for p in params]

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        if len(params) != len(self._values) or self._identity(params) != self._state:
            return False
        with torch.no_grad():
            return all(torch.equal(p.detach(), v) for p, v in zip(params, self._values))


# -------------------------------------------------------------------------------------- data
def _is_single_batch(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def batch_size(x) -> int:
    """Number of examples in a batch's inputs: the leading dimension of ``x`` (or of its first tensor)."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise ValueError("a batch's inputs must have a leading batch dimension, got a 0-d tensor")
        return x.shape[0]
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0].shape[0]
    raise TypeError(f"cannot tell the batch size of inputs of type {type(x).__name__}; expected a tensor")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


class BatchSource:
    """``data`` as a re-iterable sequence of ``(x, y)`` batches.

    Accepts one ``(x, y)`` batch or an iterable of them (a list, a DataLoader...). A one-shot
    iterator (e.g. a generator) is read into a list once, since every product passes over all data.
    """

    def __init__(self, data, device: torch.device, what: str):
        self.what = what
        self.device = device
        if _is_single_batch(data):
            self._batches: Iterable = [tuple(data)]
        elif isinstance(data, Iterator):
            self._batches = list(data)
        elif isinstance(data, Iterable) and not isinstance(data, torch.Tensor):
            self._batches = data
        else:
            raise TypeError(f"{what}: data must be an (x, y) batch or an iterable of (x, y) batches, got {type(data).__name__}")
        if hasattr(self._batches, "__len__") and len(self._batches) == 0:
            raise ValueError(f"{what}: data is empty (no batches)")

    def num_batches(self) -> int | None:
        """How many batches, when known without iterating (None for e.g. an iterable dataset)."""
        return len(self._batches) if hasattr(self._batches, "__len__") else None

    def __iter__(self) -> Iterator[tuple[object, object, int]]:
        """Yields ``(x, y, n)`` on the operator's device, skipping empty batches; raises if all are empty."""
        total = 0
        for i, batch in enumerate(self._batches):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"{self.what}: batch {i} must be an (x, y) pair, got "
                    f"{type(batch).__name__}{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}"
                )
            x, y = batch
            n = batch_size(x)
            if n == 0:
                continue
            total += n
            yield _to(x, self.device), _to(y, self.device), n
        if total == 0:
            raise ValueError(f"{self.what}: data holds no examples")


class ModelOperator(CurvatureOperator):
    """The curvature of ``loss_fn(model(x), y)`` over ``data``: the constructor arguments and checks that
    :class:`~fastcurv.curvature.Hessian`, :class:`~fastcurv.curvature.GGN` and
    :class:`~fastcurv.curvature.EmpiricalFisher` share, a per-batch graph cache and the weighted sum over batches.

    ``loss_reduction``: ``"mean"`` or ``"sum"`` (how ``loss_fn`` reduces a batch), or ``None`` for an operator
    that builds its own per-example losses. ``cache_graph``: keep per-batch state between products (default: on
    for a single batch, off for several); it is dropped when a parameter changed in any way
    (:class:`ParameterSnapshot`).
    """

    def __init__(self, model: nn.Module, loss_fn, data, params, *, allow_train_mode: bool,
                 loss_reduction: str | None = None, cache_graph: bool | None = None):
        if loss_reduction is not None and loss_reduction not in ("mean", "sum"):
            raise ValueError(f"{self.name}: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        check_fixed_function(model, allow_train_mode, self.name)
        self.param_names, self.params = resolve_params(model, params)
        super().__init__(sum(p.numel() for p in self.params), self.params[0].dtype, self.params[0].device)
        self.model, self.loss_fn, self.loss_reduction = model, loss_fn, loss_reduction
        self.data = BatchSource(data, self.device, self.name)
        self.cache_graph = (self.data.num_batches() == 1) if cache_graph is None else bool(cache_graph)
        self._graphs: dict[int, object] = {}  # batch index -> what build() returned for it
        self._graphs_snapshot: ParameterSnapshot | None = None  # the parameters the graphs were built at

    def _cached(self, index: int, build):
        """``build()``'s result for batch ``index``, kept between products when ``cache_graph``."""
        if index in self._graphs:
            return self._graphs[index]
        item = build()
        if self.cache_graph:
            if not self._graphs:
                self._graphs_snapshot = ParameterSnapshot(self.params)
            self._graphs[index] = item
        return item

    def _sum_over_batches(self, V: torch.Tensor, product) -> torch.Tensor:
        """``sum_b w_b product(index, x_b, y_b, blocks)`` over the batches, ``w_b = n_b / N`` for a mean-reduced
        loss (the curvature of the mean over all ``N`` examples, whatever the batch sizes) and ``1 / N`` for
        a summed one; ``product`` returns one ``[K, *p.shape]`` block per parameter (None = zero)."""
        if self._graphs and not self._graphs_snapshot.matches(self.params):
            self._graphs.clear()  # parameters changed since the graphs were built: they are stale
        K = V.shape[1]
        blocks = split_columns(V, self.params)
        total, first_weight, batches, count = None, 1.0, 0, 0
        for index, (x, y, n) in enumerate(self.data):
            weight = float(n) if self.loss_reduction == "mean" else 1.0
            # In place on join_columns' fresh output: no [P, K] temporaries per product.
            part = join_columns(product(index, x, y, blocks), self.params, K)
            if total is None:
                total, first_weight = part, weight
            else:
                if batches == 1:
                    total.mul_(first_weight)
                total.add_(part, alpha=weight)
            batches += 1
            count += n
        if batches == 1 and self.loss_reduction == "mean":
            return total  # weight n / N = 1: no two passes over [P, K] (and no rounding) per product
        return total.div_(count)


def scalar_loss(loss_fn, output, y, what: str) -> torch.Tensor:
    """``loss_fn(output, y)`` as a 0-d tensor; a clear error when it is not the scalar loss of a batch."""
    loss = loss_fn(output, y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{what}: loss_fn must return the scalar loss of a batch, got {shape}")
    return loss.reshape(())


def backward_columns(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], columns: Sequence[torch.Tensor],
                     keep_graph: bool) -> list[torch.Tensor | None]:
    """``sum_o (d outputs[o] / d inputs)^T columns[o][k]`` for every ``k``: one ``[K, *input.shape]`` block per
    input (None where no output depends on it), ``columns[o]`` of shape ``[K, *outputs[o].shape]``.

    On the CPU, K plain backwards through the graph beat one ``is_grads_batched`` backward, whose vmap costs
    ~25% more per column (gradient-equivalents per vector at K = 8, quiet 2-core CPU, torch 2.13: MLP 1.42 vs
    1.78, CNN 2.10 vs 2.73); on accelerators the batched backward is one launch. ``keep_graph``: the graph
    survives the last column (for a cached graph)."""
    K = columns[0].shape[0]
    device = outputs[0].device
    steps = range(K) if K == 1 or device.type == "cpu" else [None]
    out = []
    with torch.enable_grad():
        for j in steps:
            last = j is None or j == K - 1
            products = torch.autograd.grad(
                list(outputs),
                list(inputs),
                grad_outputs=[c if j is None else c[j] for c in columns],
                is_grads_batched=j is None,
                allow_unused=True,
                retain_graph=keep_graph or not last,
            )
            out.append(products if j is None else [p if p is None else p[None] for p in products])
    if len(out) == 1:
        return list(out[0])
    return [None if parts[0] is None else torch.cat(parts) for parts in zip(*out)]


def split_columns(V: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``V [P, K]`` -> one ``[K, *p.shape]`` block per parameter, in order."""
    K = V.shape[1]
    # Contiguous rows: each block (and each column j of it) is then a dense tensor; strided grad
    # outputs make the backward's GEMMs copy or take slow paths (~30% per HVP on the CPU at K = 8).
    Vt = V.T.contiguous() if K > 1 else V.T
    blocks, offset = [], 0
    for p in params:
        n = p.numel()
        blocks.append(Vt[:, offset : offset + n].reshape(K, *p.shape))
        offset += n
    return blocks


def join_columns(blocks: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor], K: int) -> torch.Tensor:
    """Inverse of :func:`split_columns`: ``[K, *p.shape]`` blocks (None = zero) -> ``[P, K]``."""
    flat = [
        (b.reshape(K, -1) if b is not None else torch.zeros(K, p.numel(), dtype=p.dtype, device=p.device))
        for b, p in zip(blocks, params)
    ]
    return torch.cat(flat, 1).T
