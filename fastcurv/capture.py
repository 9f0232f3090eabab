"""Capture of layer inputs and outputs during a forward pass, and per-example gradient quantities
of a whole model computed from them (SCIENCE.md section 1).

    with fastcurv.capture(model) as cap:
        out = model(x)
    losses = F.cross_entropy(out, y, reduction="none")     # per-example losses [B]
    s = cap.per_example_sqnorms(losses)                     # [B]: ||grad_theta l_i||^2
    G = cap.per_example_gram(losses)                        # [B, B]: <grad l_i, grad l_j>

How it works: forward hooks record each supported module's input ``a`` and output ``z``; one
``torch.autograd.grad(sum_i l_i, [z, ...])`` gives ``delta_i = dl_i/dz_i`` (true because examples
do not interact), and each layer's per-example gradient quantities follow from (a, delta) without
ever forming the B x P Jacobian.

Supported modules (exact forward, not subclasses that override it): ``nn.Linear`` (any number of
leading dims), ``nn.Conv1d/2d/3d`` (stride, padding incl. 'same'/'valid', padding_mode, dilation,
groups), ``nn.Embedding`` (padding_idx), ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and
``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics.

Rules that keep the numbers right (each violation is an error, never a silent wrong number):

* dim 0 of every captured module's input is the batch dimension (sequence-first inputs are not
  detected if T happens to equal B: use batch-first layouts).
* a module holding parameters that require grad and is not supported must be listed in
  ``ignore`` (its parameters -- and those of its whole sub-tree -- are then simply not counted);
* BatchNorm in train mode (or without running stats) makes examples interact: refused;
* a trainable parameter owned by two modules (tied weights), a captured module called twice, an
  output or input modified in place after the layer ran, a captured module that was never called:
  refused. Parameters used *outside* their owner's forward (``F.linear(x, other.weight)``) cannot
  be detected: don't do that inside a capture.

Loss scaling: the methods take per-example losses and return quantities of ``grad l_i``. If you pass
``mean``-scaled losses (``l_i / B``) the norms come out multiplied by ``1 / B^2``.

Memory: after the ``with`` block the :class:`Capture` still holds the recorded tensors, and through
them the forward graph, so that the norms can be asked for after the block. Call
:meth:`Capture.clear` (or drop the object) to release them.
"""
from __future__ import annotations

import math
import sys
import types
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastcurv import ops

__all__ = ["capture", "Capture", "CapturedLayer", "SUPPORTED_MODULES"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RMSNORM = getattr(nn, "RMSNorm", None)  # torch >= 2.4
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm) + _BATCHNORM_TYPES + ((_RMSNORM,) if _RMSNORM else ())
SUPPORTED_MODULES = (nn.Linear,) + _CONV_TYPES + (nn.Embedding,) + _NORM_TYPES


def _describe(name: str, module: nn.Module) -> str:
    return f"module '{name}' ({type(module).__name__})" if name else f"the root module ({type(module).__name__})"


def _uses_stock_forward(module: nn.Module) -> bool:
    """A subclass that overrides forward() computes something else: we cannot trust our formulas."""
    for base in SUPPORTED_MODULES:
        if isinstance(module, base):
            return type(module).forward is base.forward
    return False


# ============================================================================ per-layer records
class CapturedLayer:
    """One captured module: its recorded input/output and its per-example gradient quantities.

    Attributes:
        name: qualified name in the captured model (``""`` for the root module).
        module: the module.
        params: ``[(qualified_name, Parameter)]`` of its parameters that require grad, in
            ``model.parameters()`` order. Only these count in every quantity below.
        input, output: the tensors recorded in the forward (``None`` before it / after ``clear``).

    Every method takes ``delta = dl_i/dz_i`` (shape of ``output``, from :meth:`Capture.deltas`) and
    is differentiable in the recorded input and in ``delta`` (pass ``create_graph=True`` deltas to
    differentiate through them).
    """

    def __init__(self, name: str, module: nn.Module, params: list):
        self.name = name
        self.module = module
        self.params = params
        self.input: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        self._versions: Optional[tuple[int, int]] = None

    def __repr__(self) -> str:
        return f"CapturedLayer({_describe(self.name, self.module)}, params={[n for n, _ in self.params]})"

    # -------------------------------------------------------------- recording
    def _record(self, args: tuple, kwargs: dict, output) -> None:
        if self.output is not None:
            raise RuntimeError(
                f"fastcurv.capture: {_describe(self.name, self.module)} was called twice inside one capture "
                "(a reused module, or a second forward in the same `with` block). Per-example gradients of a "
                "module applied twice are not supported: use one forward per capture, or separate modules."
            )
        if args:
            inp = args[0]
        elif kwargs:
            inp = next(iter(kwargs.values()))
        else:
            raise RuntimeError(f"fastcurv.capture: {_describe(self.name, self.module)} was called without an input")
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"fastcurv.capture: {_describe(self.name, self.module)} returned {type(output).__name__}, expected a Tensor"
            )
        self._check_input(inp)
        self.input, self.output = inp, output
        self._versions = (inp._version, output._version)

    def _check_input(self, inp: torch.Tensor) -> None:
        if not isinstance(inp, torch.Tensor) or inp.ndim < 2:
            shape = tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__
            raise ValueError(
                f"fastcurv.capture: {_describe(self.name, self.module)} got input {shape}; expected a batched "
                "input whose dim 0 is the batch"
            )

    def _clear(self) -> None:
        self.input = self.output = None
        self._versions = None
        self._cache_clear()

    def _cache_clear(self) -> None:
        pass

    def _check_unchanged(self) -> None:
        if self.input._version != self._versions[0] or self.output._version != self._versions[1]:
            which = "output" if self.output._version != self._versions[1] else "input"
            raise RuntimeError(
                f"fastcurv.capture: the {which} of {_describe(self.name, self.module)} was modified in place after "
                "the module ran (e.g. nn.ReLU(inplace=True) or `x += ...`); the recorded values are no longer the "
                "layer's. Use out-of-place operations inside a capture."
            )

    @property
    def batch_size(self) -> int:
        return self.input.shape[0]

    def _check_delta(self, delta: torch.Tensor) -> None:
        if self.output is None:
            raise RuntimeError(
                f"fastcurv.capture: {_describe(self.name, self.module)} has no recorded forward (none captured yet, "
                "or cleared)"
            )
        if not isinstance(delta, torch.Tensor) or delta.shape != self.output.shape:
            shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
            raise ValueError(
                f"fastcurv.capture: delta for {_describe(self.name, self.module)} has shape {shape}, expected the "
                f"output's shape {tuple(self.output.shape)}"
            )

    def _check_vectors(self, vectors: Sequence[torch.Tensor]) -> int:
        if len(vectors) != len(self.params):
            raise ValueError(
                f"fastcurv.capture: {_describe(self.name, self.module)} has {len(self.params)} trainable params "
                f"{[n for n, _ in self.params]} but got {len(vectors)} vectors"
            )
        K = vectors[0].shape[0]
        for (pname, p), v in zip(self.params, vectors):
            if tuple(v.shape) != (K, *p.shape):
                raise ValueError(
                    f"fastcurv.capture: vectors for '{pname}' must be [K, *param.shape] = {(K, *p.shape)}, "
                    f"got {tuple(v.shape)}"
                )
        return K

    def _check_coeffs(self, coeffs: torch.Tensor) -> int:
        if coeffs.ndim != 2 or coeffs.shape[0] != self.batch_size:
            raise ValueError(
                f"fastcurv.capture: coeffs for {_describe(self.name, self.module)} must be [B, K] with "
                f"B = {self.batch_size}, got {tuple(coeffs.shape)}"
            )
        return coeffs.shape[1]

    # -------------------------------------------------------------- quantities
    def per_example_grads(self, delta: torch.Tensor) -> list[torch.Tensor]:
        """The per-example gradients themselves, ``[B, *param.shape]`` per param (materialized:
        memory B x P; the other methods avoid that where they can)."""
        raise NotImplementedError

    def sqnorm(self, delta: torch.Tensor) -> torch.Tensor:
        """``[B]``: ``||g_i||^2`` over this layer's trainable params."""
        self._check_delta(delta)
        return sum(g.flatten(1).square().sum(1) for g in self.per_example_grads(delta))

    def gram(self, delta: torch.Tensor) -> torch.Tensor:
        """``[B, B]``: ``<g_i, g_j>`` over this layer's trainable params."""
        self._check_delta(delta)
        return sum(g.flatten(1) @ g.flatten(1).T for g in self.per_example_grads(delta))

    def dot(self, delta: torch.Tensor, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, K]``: ``g_i . v_k``; ``vectors`` is aligned with :attr:`params`, each ``[K, *param.shape]``."""
        self._check_delta(delta)
        self._check_vectors(vectors)
        return sum(g.flatten(1) @ v.flatten(1).to(g.dtype).T for g, v in zip(self.per_example_grads(delta), vectors))

    def weighted_grad_sum(self, delta: torch.Tensor, coeffs: torch.Tensor) -> list[torch.Tensor]:
        """``sum_i coeffs[i, k] g_i`` per param: a list of ``[K, *param.shape]`` aligned with :attr:`params`."""
        self._check_delta(delta)
        K = self._check_coeffs(coeffs)
        return [
            (coeffs.to(g.dtype).T @ g.flatten(1)).reshape(K, *p.shape)
            for g, (_, p) in zip(self.per_example_grads(delta), self.params)
        ]


def _common(a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Autocast can record an fp32 input and an fp16 output: compute in the wider dtype."""
    dtype = torch.promote_types(a.dtype, d.dtype)
    return a.to(dtype), d.to(dtype)


class _LinearMapLayer(CapturedLayer):
    """Linear and Conv: z = a W^T + b after unfolding, with groups as a [B, G, ...] axis.

    Operands are ``a [B, G, T, d_in]`` and ``delta [B, G, T, d_out]``; the weight viewed as
    ``[G, d_out, d_in]``. Squared norms and Gram matrices go through ``fastcurv.ops``."""

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        self.weight_trainable = module.weight.requires_grad
        self.bias_trainable = module.bias is not None and module.bias.requires_grad
        self._a: Optional[torch.Tensor] = None

    def _cache_clear(self) -> None:
        self._a = None

    def _unfolded_input(self) -> torch.Tensor:
        raise NotImplementedError

    def _operands(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._a is None:  # unfolding costs a copy of the input: do it once per forward
            self._a = self._unfolded_input()
        a = self._a
        B, G, T, _ = a.shape
        d = self._grouped_delta(delta, B, G, T)
        return _common(a, d)

    def _grouped_delta(self, delta, B, G, T):
        raise NotImplementedError

    def per_example_grads(self, delta):
        self._check_delta(delta)
        a, d = self._operands(delta)
        B = a.shape[0]
        grads = []
        if self.weight_trainable:
            grads.append(torch.einsum("bgto,bgti->bgoi", d, a).reshape(B, *self.module.weight.shape))
        if self.bias_trainable:
            grads.append(d.sum(2).reshape(B, -1))
        return grads

    def sqnorm(self, delta):
        self._check_delta(delta)
        a, d = self._operands(delta)
        B, G, T, d_in = a.shape
        if self.weight_trainable:
            s = ops.per_example_sqnorm(
                a.reshape(B * G, T, d_in), d.reshape(B * G, T, d.shape[-1]), bias=self.bias_trainable
            )
            return s.view(B, G).sum(1)
        return d.sum(2).square().sum((1, 2))  # bias only

    def gram(self, delta):
        self._check_delta(delta)
        a, d = self._operands(delta)
        B, G = a.shape[:2]
        if not self.weight_trainable:
            d_sum = d.sum(2).reshape(B, -1)
            return d_sum @ d_sum.T
        # groups: G_ij sums over groups only matching ones (never the (BG) x (BG) matrix)
        return sum(ops.per_example_gram(a[:, g], d[:, g], bias=self.bias_trainable) for g in range(G))

    def dot(self, delta, vectors):
        self._check_delta(delta)
        K = self._check_vectors(vectors)
        a, d = self._operands(delta)
        B, G, T, d_in = a.shape
        d_out = d.shape[-1]
        out = a.new_zeros(B, K)
        i = 0
        if self.weight_trainable:
            v = vectors[i].to(a.dtype).reshape(K, G, d_out, d_in)
            i += 1
            if T == 1:  # d_i^T V_k a_i without the B x P per-example gradients
                dv = torch.einsum("bgo,kgoi->bgki", d[:, :, 0], v)
                out = out + torch.einsum("bgki,bgi->bk", dv, a[:, :, 0])
            else:  # materializing g_i (one GEMM per group) is cheaper than T * K products
                g = torch.einsum("bgto,bgti->bgoi", d, a)
                out = out + g.reshape(B, -1) @ v.reshape(K, -1).T
        if self.bias_trainable:
            vb = vectors[i].to(a.dtype).reshape(K, G * d_out)
            out = out + d.sum(2).reshape(B, -1) @ vb.T
        return out

    def weighted_grad_sum(self, delta, coeffs):
        self._check_delta(delta)
        K = self._check_coeffs(coeffs)
        a, d = self._operands(delta)
        c = coeffs.to(a.dtype)
        result = []
        if self.weight_trainable:
            # (c-weighted deltas)^T a over (b, t): one batched GEMM over groups
            cd = c.T[:, :, None, None, None] * d[None]  # [K, B, G, T, d_out]
            w = torch.einsum("kbgto,bgti->kgoi", cd, a)
            result.append(w.reshape(K, *self.module.weight.shape))
        if self.bias_trainable:
            result.append((c.T @ d.sum(2).reshape(d.shape[0], -1)).reshape(K, -1))
        return result


class _LinearLayer(_LinearMapLayer):
    def _unfolded_input(self):
        x = self.input
        return x.reshape(x.shape[0], 1, math.prod(x.shape[1:-1]), x.shape[-1])  # explicit T: B may be 0

    def _grouped_delta(self, delta, B, G, T):
        return delta.reshape(B, 1, T, delta.shape[-1])


class _ConvLayer(_LinearMapLayer):
    def _check_input(self, inp):
        super()._check_input(inp)
        n = self.module.weight.ndim - 2
        if inp.ndim != n + 2:
            raise ValueError(
                f"fastcurv.capture: {_describe(self.name, self.module)} got input {tuple(inp.shape)}; expected a "
                f"batched [B, C, {n} spatial dims] input (unbatched inputs are not supported)"
            )

    def _unfolded_input(self):
        m = self.module
        x = self.input
        B, C = x.shape[:2]
        n = x.ndim - 2
        pad = list(m._reversed_padding_repeated_twice)  # set by _ConvNd for int, tuple, 'same', 'valid'
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        for i in range(n):
            k, dil, st = m.kernel_size[i], m.dilation[i], m.stride[i]
            x = x.unfold(2 + i, dil * (k - 1) + 1, st)  # appends the window as a trailing dim
            x = x[..., ::dil]
        # x: [B, C, o_1..o_n, k_1..k_n] -> [B, G, T, C/G * k_1...k_n] (weight's flattening order)
        G = m.groups
        out_sizes = x.shape[2 : 2 + n]
        x = x.reshape(B, G, C // G, *out_sizes, *m.kernel_size)
        perm = [0, 1] + list(range(3, 3 + n)) + [2] + list(range(3 + n, 3 + 2 * n))
        return x.permute(perm).reshape(B, G, math.prod(out_sizes), C // G * math.prod(m.kernel_size))

    def _grouped_delta(self, delta, B, G, T):
        if math.prod(delta.shape[2:]) != T:
            raise RuntimeError(
                f"fastcurv.capture: {_describe(self.name, self.module)}: unfolded input has {T} positions but the "
                f"output {tuple(delta.shape)} has {math.prod(delta.shape[2:])} (internal error, please report)"
            )
        return delta.reshape(B, G, delta.shape[1] // G, T).transpose(2, 3)


class _EmbeddingLayer(CapturedLayer):
    """Embedding rows: g_i[v] = sum_{t: tok_it = v} delta_it (padding_idx excluded).

    Per (example, token) sums ``S_u`` over the distinct pairs u of the batch (index_add, O(B T D)):
    ``s_i = sum_{u in i} ||S_u||^2``; the other quantities pair the u's with equal tokens."""

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        self._index = None

    def _cache_clear(self):
        self._index = None

    def _check_input(self, inp):
        if not isinstance(inp, torch.Tensor) or inp.ndim < 1 or inp.is_floating_point():
            shape = tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__
            raise ValueError(
                f"fastcurv.capture: {_describe(self.name, self.module)} got input {shape}; expected integer "
                "tokens [B, *] with dim 0 the batch"
            )

    def _indices(self):
        if self._index is None:  # tokens do not change: group them once per forward
            tok = self.input.reshape(self.input.shape[0], math.prod(self.input.shape[1:])).long()
            B, T = tok.shape
            V = self.module.num_embeddings
            keep = torch.ones_like(tok, dtype=torch.bool)
            if self.module.padding_idx is not None:
                keep = tok != self.module.padding_idx  # padding rows get no gradient
            keys = (torch.arange(B, device=tok.device)[:, None] * V + tok)[keep]
            uniq, inverse = torch.unique(keys, return_inverse=True)
            self._index = (keep, inverse, uniq // V, uniq % V, uniq.numel())
        return self._index

    def _sums(self, delta):
        keep, inverse, example, token, U = self._indices()
        B = delta.shape[0]
        d = delta.reshape(B, keep.shape[1], delta.shape[-1])[keep]
        sums = d.new_zeros(U, d.shape[-1]).index_add(0, inverse, d)
        return sums, example, token

    def per_example_grads(self, delta):
        self._check_delta(delta)
        sums, example, token = self._sums(delta)
        g = sums.new_zeros(delta.shape[0], *self.module.weight.shape)
        return [g.index_put((example, token), sums)]

    def sqnorm(self, delta):
        self._check_delta(delta)
        sums, example, _ = self._sums(delta)
        return sums.new_zeros(delta.shape[0]).index_add(0, example, sums.square().sum(1))

    def gram(self, delta):
        self._check_delta(delta)
        sums, example, token = self._sums(delta)
        same_token = (token[:, None] == token[None, :]).to(sums.dtype)
        onehot = (example[:, None] == torch.arange(delta.shape[0], device=example.device)).to(sums.dtype)  # [U, B]
        return onehot.T @ ((sums @ sums.T) * same_token) @ onehot

    def dot(self, delta, vectors):
        self._check_delta(delta)
        K = self._check_vectors(vectors)
        sums, example, token = self._sums(delta)
        picked = vectors[0].to(sums.dtype)[:, token]  # [K, U, D]: only the rows this batch touched
        per_pair = torch.einsum("ud,kud->uk", sums, picked)
        return sums.new_zeros(delta.shape[0], K).index_add(0, example, per_pair)

    def weighted_grad_sum(self, delta, coeffs):
        self._check_delta(delta)
        K = self._check_coeffs(coeffs)
        sums, example, token = self._sums(delta)
        contrib = torch.einsum("uk,ud->kud", coeffs.to(sums.dtype)[example], sums)
        out = sums.new_zeros(K, *self.module.weight.shape)
        return [out.index_add(1, token, contrib)]


class _NormLayer(CapturedLayer):
    """Affine params of LayerNorm / RMSNorm / GroupNorm / eval BatchNorm: g_i^gamma = sum delta * xhat,
    g_i^beta = sum delta over the non-parameter dims. Small per-example vectors: materialized."""

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        self._xhat = None
        m = module
        self.weight_trainable = getattr(m, "weight", None) is not None and m.weight.requires_grad
        self.bias_trainable = getattr(m, "bias", None) is not None and m.bias.requires_grad

    def _cache_clear(self):
        self._xhat = None

    def _check_input(self, inp):
        super()._check_input(inp)
        m = self.module
        if isinstance(m, (nn.LayerNorm,) + ((_RMSNORM,) if _RMSNORM else ())):
            if inp.ndim <= len(m.normalized_shape):
                raise ValueError(
                    f"fastcurv.capture: {_describe(self.name, self.module)} got input {tuple(inp.shape)} with no "
                    f"batch dim in front of normalized_shape {tuple(m.normalized_shape)}"
                )

    def _normalized(self) -> torch.Tensor:
        if self._xhat is None:  # recomputed from the recorded input, differentiably
            m, x = self.module, self.input
            if isinstance(m, nn.LayerNorm):
                self._xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
            elif _RMSNORM is not None and isinstance(m, _RMSNORM):
                self._xhat = F.rms_norm(x, m.normalized_shape, None, m.eps)
            elif isinstance(m, nn.GroupNorm):
                self._xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
            else:  # eval BatchNorm: running statistics (checked at record time)
                self._xhat = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        return self._xhat

    def _reduce_dims(self, ndim: int) -> tuple[int, ...]:
        """Dims summed over to get one example's gradient (everything but batch and param dims)."""
        m = self.module
        if isinstance(m, nn.LayerNorm) or (_RMSNORM is not None and isinstance(m, _RMSNORM)):
            return tuple(range(1, ndim - len(m.normalized_shape)))  # [B, *, *normalized_shape]
        return tuple(range(2, ndim))  # GroupNorm / BatchNorm: [B, C] or [B, C, *], param per channel

    def per_example_grads(self, delta):
        self._check_delta(delta)
        xhat = self._normalized()
        xhat, d = _common(xhat, delta)
        dims = self._reduce_dims(d.ndim)
        grads = []
        if self.weight_trainable:
            grads.append((d * xhat).sum(dims) if dims else d * xhat)
        if self.bias_trainable:
            grads.append(d.sum(dims) if dims else d)
        return grads


def _layer_class(module: nn.Module):
    if isinstance(module, nn.Linear):
        return _LinearLayer
    if isinstance(module, _CONV_TYPES):
        return _ConvLayer
    if isinstance(module, nn.Embedding):
        return _EmbeddingLayer
    return _NormLayer


# ============================================================================ the capture
class Capture:
    """Records activations of ``model``'s supported layers during a forward (use as a context
    manager) and computes per-example gradient quantities from per-example losses afterwards.

    Build it with :func:`capture`. Attributes after a forward: :attr:`layers` (list of
    :class:`CapturedLayer`, model order), :attr:`params` (all captured ``(name, Parameter)`` pairs
    in ``model.parameters()`` order), :attr:`batch_size`.

    The recorded tensors (and through them the forward graph) stay alive after the ``with`` block
    until :meth:`clear` is called or the object is dropped. Hooks are removed when the block
    exits, also on an exception.
    """

    def __init__(self, model: nn.Module, ignore: Iterable[Union[nn.Module, str]] = ()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastcurv.capture: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self._handles: list = []
        ignored = self._resolve_ignore(model, ignore)
        owners: dict[int, list[str]] = {}
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
        self.layers: list[CapturedLayer] = []
        self._batchnorms: list[tuple[str, nn.Module]] = []
        for mname, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                # checked even when ignored or frozen: batch statistics corrupt every other layer's delta
                self._batchnorms.append((mname, module))
            if mname in ignored:
                continue
            trainable = [
                (f"{mname}.{pname}" if mname else pname, p)
                for pname, p in module.named_parameters(recurse=False)
                if p.requires_grad
            ]
            if not trainable:
                continue
            if not _uses_stock_forward(module):
                raise TypeError(
                    f"fastcurv.capture: {_describe(mname, module)} holds parameters requiring grad "
                    f"{[n for n, _ in trainable]} but is not supported (supported: "
                    f"{', '.join(t.__name__ for t in SUPPORTED_MODULES)}, with their stock forward). Its per-example "
                    f"gradients would be missing from every result. Freeze its parameters or pass "
                    f"ignore=['{mname}'] to leave them out (then they are simply not counted)."
                )
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                raise ValueError(
                    f"fastcurv.capture: {_describe(mname, module)} has scale_grad_by_freq=True: its gradient is scaled "
                    "by token counts over the whole batch, so examples interact; per-example gradients are undefined"
                )
            for qname, p in trainable:
                if len(owners[id(p)]) > 1:
                    raise ValueError(
                        f"fastcurv.capture: parameter '{qname}' is shared by {owners[id(p)]} (tied weights). The "
                        "per-example gradient of a shared parameter sums contributions from several layers, which "
                        "these formulas do not handle. Untie the weights, or freeze / ignore the sharing modules."
                    )
            self.layers.append(_layer_class(module)(mname, module, trainable))
        order = {id(p): k for k, p in enumerate(model.parameters())}
        for layer in self.layers:
            layer.params.sort(key=lambda item: order[id(item[1])])

    @staticmethod
    def _resolve_ignore(model: nn.Module, ignore) -> set[str]:
        if isinstance(ignore, (str, nn.Module)):
            ignore = [ignore]
        names = dict(model.named_modules())
        by_id = {}
        for n, m in model.named_modules(remove_duplicate=False):
            by_id.setdefault(id(m), []).append(n)
        roots = []
        for item in ignore:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"fastcurv.capture: ignore={item!r} is not a module name of the model")
                roots.append(item)
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"fastcurv.capture: ignored module {type(item).__name__} is not part of the model")
                roots.extend(by_id[id(item)])
            else:
                raise TypeError(f"fastcurv.capture: ignore entries must be modules or names, got {type(item).__name__}")
        # an ignored module's whole sub-tree is ignored
        return {
            n for n in names for r in roots if r == "" or n == r or n.startswith(r + ".")
        }

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> "Capture":
        if self._handles:
            raise RuntimeError("fastcurv.capture: this Capture is already active (nested `with`)")
        self.clear()
        try:
            for layer in self.layers:
                self._handles.append(
                    layer.module.register_forward_hook(_RecordHook(layer, self), with_kwargs=True)
                )
            for name, bn in self._batchnorms:
                self._handles.append(bn.register_forward_pre_hook(_BatchNormCheck(name)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Release the recorded tensors (and with them the forward graph)."""
        for layer in self.layers:
            layer._clear()

    # ---------------------------------------------------------------- state
    @property
    def params(self) -> list[tuple[str, nn.Parameter]]:
        """All captured ``(qualified_name, Parameter)`` pairs, in ``model.parameters()`` order."""
        pairs = [pair for layer in self.layers for pair in layer.params]
        order = {id(p): k for k, p in enumerate(self.model.parameters())}
        return sorted(pairs, key=lambda item: order[id(item[1])])

    @property
    def batch_size(self) -> int:
        """Batch size of the captured forward (dim 0 of the captured modules' inputs)."""
        recorded = [layer for layer in self.layers if layer.output is not None]
        if not recorded:
            raise RuntimeError(self._nothing_captured())
        return recorded[0].batch_size

    def _nothing_captured(self) -> str:
        if not self.layers:
            return (
                "fastcurv.capture: the model has no supported module with parameters requiring grad; nothing to "
                "compute"
            )
        return (
            "fastcurv.capture: no forward was captured (run the model inside `with fastcurv.capture(model) as cap:`), "
            "or the recorded tensors were released by clear()"
        )

    def _on_record(self, layer: CapturedLayer) -> None:
        for other in self.layers:
            if other is not layer and other.output is not None and other.batch_size != layer.batch_size:
                raise RuntimeError(
                    f"fastcurv.capture: {_describe(other.name, other.module)} saw batch size {other.batch_size} but "
                    f"{_describe(layer.name, layer.module)} saw {layer.batch_size}; dim 0 of every captured module's "
                    "input must be the batch (one forward per capture)"
                )

    # ---------------------------------------------------------------- deltas and results
    def deltas(self, losses: torch.Tensor, create_graph: bool = False) -> list[torch.Tensor]:
        """``dl_i/dz_i`` for every layer in :attr:`layers` (same order, each shaped like its output).

        One ``torch.autograd.grad`` of ``losses.sum()`` w.r.t. the recorded outputs (valid because
        examples do not interact); the graph is retained so the caller can still backpropagate.
        ``create_graph=True`` makes the deltas differentiable (for penalties on the norms).
        """
        if not self.layers or all(layer.output is None for layer in self.layers):
            raise RuntimeError(self._nothing_captured())
        uncalled = [layer for layer in self.layers if layer.output is None]
        if uncalled:
            names = [_describe(layer.name, layer.module) for layer in uncalled]
            raise RuntimeError(
                f"fastcurv.capture: {', '.join(names)} hold parameters requiring grad but were not called in the "
                f"captured forward. If they are unused, freeze them or pass ignore=[{', '.join(repr(l.name) for l in uncalled)}]."
            )
        B = self.batch_size
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"fastcurv.capture: losses must be a Tensor of per-example losses [B], got {type(losses).__name__}")
        if losses.ndim != 1:
            hint = " (a scalar: use reduction='none' to get per-example losses)" if losses.ndim == 0 else ""
            raise ValueError(
                f"fastcurv.capture: losses must be per-example losses of shape [B] = [{B}], got shape "
                f"{tuple(losses.shape)}{hint}"
            )
        if losses.shape[0] != B:
            raise ValueError(
                f"fastcurv.capture: losses has {losses.shape[0]} entries but the captured forward had batch size {B}"
            )
        if not losses.is_floating_point():
            raise TypeError(f"fastcurv.capture: losses must be floating point, got {losses.dtype}")
        device = self.layers[0].output.device
        if losses.device != device:
            raise ValueError(f"fastcurv.capture: losses are on {losses.device} but the captured outputs on {device}")
        for layer in self.layers:
            layer._check_unchanged()
        not_grad = [layer for layer in self.layers if not layer.output.requires_grad]
        if not losses.requires_grad or len(not_grad) == len(self.layers):
            raise RuntimeError(
                "fastcurv.capture: losses are not connected to the captured outputs (no autograd graph: was the "
                "forward run under torch.no_grad(), or are the losses detached?)"
            )
        live = [layer for layer in self.layers if layer.output.requires_grad]
        grads = torch.autograd.grad(
            losses.sum(),
            [layer.output for layer in live],
            create_graph=create_graph,
            retain_graph=True,
            allow_unused=True,
        )
        if all(g is None for g in grads):
            raise RuntimeError(
                "fastcurv.capture: losses do not depend on any captured layer output (losses from another forward, "
                "or computed from detached outputs?)"
            )
        by_layer = {id(layer): g for layer, g in zip(live, grads)}
        # an output the losses do not depend on has delta exactly zero
        return [
            by_layer.get(id(layer)) if by_layer.get(id(layer)) is not None else torch.zeros_like(layer.output)
            for layer in self.layers
        ]

    def per_example_sqnorms_by_layer(self, losses: torch.Tensor, create_graph: bool = False) -> dict[str, torch.Tensor]:
        """``{module qualified name: [B]}`` squared norms of each layer's part of ``grad l_i``."""
        deltas = self.deltas(losses, create_graph=create_graph)
        return {layer.name: layer.sqnorm(d) for layer, d in zip(self.layers, deltas)}

    def per_example_sqnorms(self, losses: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """``[B]``: ``||grad_theta l_i||^2`` over every captured parameter requiring grad.

        ``losses`` are per-example losses ``[B]`` (``reduction="none"``); mean-scaled losses
        give results scaled by ``1/B^2``. ``create_graph=True``: differentiable w.r.t. the params."""
        return sum(self.per_example_sqnorms_by_layer(losses, create_graph=create_graph).values())

    def per_example_gram(self, losses: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """``[B, B]``: ``G_ij = <grad l_i, grad l_j>``; its diagonal is :meth:`per_example_sqnorms`."""
        deltas = self.deltas(losses, create_graph=create_graph)
        return sum(layer.gram(d) for layer, d in zip(self.layers, deltas))


class _RecordHook:
    """Forward hook of one captured layer. Holds the capture only while registered."""

    def __init__(self, layer: CapturedLayer, cap: Capture):
        self.layer, self.cap = layer, cap

    def __call__(self, module, args, kwargs, output):
        self.layer._record(args, kwargs, output)
        self.cap._on_record(self.layer)


class _BatchNormCheck:
    """Forward pre-hook on every BatchNorm: refuse batch statistics (examples would interact)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module, args):
        uses_batch_stats = module.training or module.running_mean is None or module.running_var is None
        if uses_batch_stats:
            why = "is in train mode" if module.training else "has no running statistics (track_running_stats=False)"
            raise RuntimeError(
                f"fastcurv.capture: {_describe(self.name, module)} {why}, so it normalizes with batch statistics and "
                "examples interact through them: dl_i/dz_i is no longer example i's gradient and every per-example "
                "quantity would be wrong. Call model.eval() on BatchNorm layers (with running stats) for the capture."
            )


def capture(model: nn.Module, ignore: Iterable[Union[nn.Module, str]] = ()) -> Capture:
    """Context manager recording ``model``'s supported layers during a forward.

    Args:
        model: any ``nn.Module``; every sub-module holding parameters that require grad must be
            supported (see ``SUPPORTED_MODULES``) or ignored.
        ignore: modules or qualified names whose sub-trees are left out: their parameters are not
            counted in any result (documented opt-out, e.g. for an unsupported layer).

    Returns a :class:`Capture`; see the module docstring for the rules and the loss scaling.
    ``fastcurv.capture(model)`` and ``fastcurv.capture.capture(model)`` are the same call.
    """
    return Capture(model, ignore)


class _CallableModule(types.ModuleType):
    """Lets ``fastcurv.capture(model)`` work while ``fastcurv.capture`` stays this module (so that
    ``fastcurv.capture.capture`` / ``fastcurv.capture.Capture`` keep working too)."""

    def __call__(self, model: nn.Module, ignore: Iterable[Union[nn.Module, str]] = ()) -> Capture:
        return capture(model, ignore)


sys.modules[__name__].__class__ = _CallableModule
