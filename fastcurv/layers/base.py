"""The base of every layer rule: what a captured module recorded, and the per-example gradient
quantities a rule must provide from it.

A rule serves one module. During the capture's forward it records one :class:`Record` per call
(``input``, ``output``); the capture then hands it one delta ``dl_i/d output`` per record, and the
rule turns (records, deltas) into per-example quantities of the module's own trainable parameters.
A module called several times (a shared block, a siamese tower) has several records; the rules
combine them so that every quantity is of the *summed* gradient, cross terms included.

A new rule implements :meth:`CapturedLayer._per_example_grads` (exact, materialized) and, where a
faster form exists, overrides ``_sqnorm`` / ``_gram`` / ``_dot`` / ``_weighted_grad_sum``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

__all__ = ["CapturedLayer", "Record", "describe", "common_dtype"]


def describe(name: str, module: nn.Module) -> str:
    return f"module '{name}' ({type(module).__name__})" if name else f"the root module ({type(module).__name__})"


def common_dtype(a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Autocast can record an fp32 input and an fp16 output: compute in the wider dtype."""
    dtype = torch.promote_types(a.dtype, d.dtype)
    return a.to(dtype), d.to(dtype)


@dataclass
class Record:
    """One call of a captured module.

    ``input``: the module's first input, with the batch in dim 0 (rules that broadcast an unbatched
    input have already expanded it). ``output``: the tensor whose per-example delta the rule needs.
    ``args`` / ``kwargs``: the whole call (the generic rule re-runs it). ``shared``: the input has no
    batch dim and the output is shared by all examples (deltas then come per example, ``[B, *output]``)."""

    input: Any
    output: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    shared: bool = False
    versions: tuple = ()
    layout_checked: bool = False  # the capture's random-weighted check of an ambiguous layout ran
    rows_per_example: int = 1  # > 1: the call got [B*T, ...] rows; ``input`` and the deltas are regrouped [B, T, ...]
    # autograd edge of ``output`` when recorded (in the forward, before anything can modify it): the
    # deltas are taken there, so an in-place op on the output after the module ran (nn.ReLU(inplace=True),
    # `out += identity`, which give the tensor a new grad_fn) does not change them; no copy is made
    edge: Any = None

    def __post_init__(self):
        if self.edge is None and isinstance(self.output, torch.Tensor) and self.output.requires_grad:
            self.edge = get_gradient_edge(self.output)


Deltas = Union[torch.Tensor, Sequence[torch.Tensor]]


class CapturedLayer:
    """One captured module: its recorded calls and its per-example gradient quantities.

    Attributes:
        name: qualified name in the captured model (``""`` for the root module).
        module: the module.
        params: ``[(qualified_name, Parameter)]`` of its own trainable parameters (model order);
            only these count in every quantity below.
        records: one :class:`Record` per call in the captured forward.

    Every method takes the deltas of :meth:`Capture.deltas` for this layer: one tensor shaped like
    the output (a single call) or a sequence of them (one per record). All quantities are
    differentiable in the recorded inputs and in the deltas (pass ``create_graph=True`` deltas to
    differentiate through them).
    """

    #: the module types the rule is exact for; set by :func:`fastcurv.layers.register`
    module_types: tuple = ()
    #: True when the rule can treat an input without a batch dim (output shared by all examples)
    supports_shared_input: bool = False
    #: inputs with fewer dims have no batch dim (a Linear's [d_in] vector)
    min_batched_ndim: int = 1
    #: True when the rule acts on each row of its input alone, so [B*T, ...] rows can be regrouped [B, T, ...]
    regroups_rows: bool = False
    #: True when the rule reads the recorded output's values (the generic rule compares its re-run with
    #: them): an output modified in place after the module ran is then refused. Rules reading only the
    #: input and the delta (taken at the output's autograd edge) accept it.
    reads_output_values: bool = False

    def __init__(self, name: str, module: nn.Module, params: list):
        self.name = name
        self.module = module
        self.params = params
        self.records: list[Record] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({describe(self.name, self.module)}, params={[n for n, _ in self.params]})"

    # ------------------------------------------------------------------ recording
    def install(self) -> list:
        """Extra hooks a rule needs on its module while captured (registered after the capture's record
        hook, which is prepended; returns their handles): the reparametrized rule's cache, the functional
        rule's call recorder."""
        return []

    def record(self, args: tuple, kwargs: dict, output) -> Optional[torch.Tensor]:
        """Called by the capture's forward hook. Returns a replacement output or None."""
        inp = first_input(args, kwargs)
        if inp is None:
            raise RuntimeError(f"fastcurv.capture: {describe(self.name, self.module)} was called without an input")
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"fastcurv.capture: {describe(self.name, self.module)} returned {type(output).__name__}, expected a "
                "Tensor (this rule needs one output tensor)"
            )
        self.check_input(inp)
        self.records.append(Record(inp, output, args, kwargs, versions=_versions(inp, output)))
        return None

    def batch_witness(self, args: tuple, kwargs: dict, output) -> Any:
        """The tensor whose dim 0 is this call's batch, checked by the capture against the batch size:
        the first input. A rule whose examples are not the rows of its first input overrides it
        (EmbeddingBag with 1-D tokens and offsets: the examples are the bags, the output's rows; a
        sequence-first RNN: a batch-first view of its input)."""
        return first_input(args, kwargs)

    def layout_is_ambiguous(self, inp: torch.Tensor, batch_size: int) -> bool:
        """True when dim 0 of this input, of size B, might still not be the batch: a 1-D input (B
        tokens, or T = B positions shared by the batch) or a middle dim of size B (sequence-first
        with T = B). The capture then checks the deltas with one random-weighted backward. Rules whose
        operation fixes dim 0 as the batch (convolutions, per-channel norms) return False."""
        B = batch_size
        return B > 1 and (inp.ndim == 1 or B in tuple(inp.shape[1:-1]))

    def check_input(self, inp) -> None:
        if not isinstance(inp, torch.Tensor) or inp.ndim < 1:
            shape = tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} got input {shape}; expected a batched "
                "input whose dim 0 is the batch"
            )

    def clear(self) -> None:
        self.records = []
        self._cache_clear()

    def _cache_clear(self) -> None:
        """Rules that cache something derived from the records (an unfolded input) drop it here."""

    # backward-compatible views of a single call
    @property
    def input(self):
        return self.records[0].input if self.records else None

    @property
    def output(self) -> Optional[torch.Tensor]:
        return self.records[0].output if self.records else None

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [r.output for r in self.records]

    @property
    def batch_size(self) -> int:
        for r in self.records:
            if not r.shared:
                return r.input.shape[0]
        raise RuntimeError(f"fastcurv.capture: {describe(self.name, self.module)} saw no batched input")

    def check_unchanged(self) -> None:
        for r in self.records:
            self._check_unchanged(r, self.reads_output_values)

    def _check_unchanged(self, r: Record, output_too: bool) -> None:
        """Refuses a record whose input (and, when ``output_too``, output) was modified in place since."""
        inp_version, out_version = _versions(r.input, r.output)
        if inp_version != r.versions[0] or (output_too and out_version != r.versions[1]):
            which = "input" if inp_version != r.versions[0] else "output"
            raise RuntimeError(
                f"fastcurv.capture: the {which} of {describe(self.name, self.module)} was modified in place after "
                f"the module ran (e.g. `x.relu_()` or `x += ...` on its {which}); its rule needs the recorded "
                f"values, which are no longer the layer's. Make that operation out of place."
            )

    # ------------------------------------------------------------------ argument checks
    def _deltas(self, deltas: Deltas) -> list[torch.Tensor]:
        if not self.records:
            raise RuntimeError(
                f"fastcurv.capture: {describe(self.name, self.module)} has no recorded forward (none captured yet, "
                "or cleared)"
            )
        if isinstance(deltas, torch.Tensor):
            deltas = [deltas]
        deltas = list(deltas)
        if len(deltas) != len(self.records):
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} was called {len(self.records)} time(s) but got "
                f"{len(deltas)} delta(s)"
            )
        for r, d in zip(self.records, deltas):
            expected = tuple(r.output.shape)
            if r.rows_per_example > 1:
                expected = (expected[0] // r.rows_per_example, r.rows_per_example) + expected[1:]
            if r.shared:
                expected = (self.batch_size_hint(deltas),) + expected
            if not isinstance(d, torch.Tensor) or tuple(d.shape) != expected:
                shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                what = "[B, *output] (per-example deltas of a shared output)" if r.shared else "the output's shape"
                raise ValueError(
                    f"fastcurv.capture: delta for {describe(self.name, self.module)} has shape {shape}, expected "
                    f"{what} {expected}"
                )
        return deltas

    def batch_size_hint(self, deltas: Sequence[torch.Tensor]) -> int:
        for r, d in zip(self.records, deltas):
            if not r.shared:
                return r.input.shape[0]
        return deltas[0].shape[0]

    def _check_vectors(self, vectors: Sequence[torch.Tensor]) -> int:
        if len(vectors) != len(self.params):
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} has {len(self.params)} trainable params "
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

    def _check_coeffs(self, coeffs: torch.Tensor, B: int) -> int:
        if coeffs.ndim != 2 or coeffs.shape[0] != B:
            raise ValueError(
                f"fastcurv.capture: coeffs for {describe(self.name, self.module)} must be [B, K] with B = {B}, got "
                f"{tuple(coeffs.shape)}"
            )
        return coeffs.shape[1]

    # ------------------------------------------------------------------ public quantities
    def per_example_grads(self, deltas: Deltas) -> list[torch.Tensor]:
        """The per-example gradients themselves, ``[B, *param.shape]`` per param (materialized:
        memory B x P; the other methods avoid that where they can)."""
        return self._per_example_grads(self._deltas(deltas))

    def sqnorm(self, deltas: Deltas) -> torch.Tensor:
        """``[B]``: ``||g_i||^2`` over this layer's trainable params (all calls summed)."""
        return self._sqnorm(self._deltas(deltas))

    def gram(self, deltas: Deltas) -> torch.Tensor:
        """``[B, B]``: ``<g_i, g_j>`` over this layer's trainable params."""
        return self._gram(self._deltas(deltas))

    def dot(self, deltas: Deltas, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, K]``: ``g_i . v_k``; ``vectors`` is aligned with :attr:`params`, each ``[K, *param.shape]``."""
        deltas = self._deltas(deltas)
        self._check_vectors(vectors)
        return self._dot(deltas, vectors)

    def weighted_grad_sum(self, deltas: Deltas, coeffs: torch.Tensor) -> list[torch.Tensor]:
        """``sum_i coeffs[i, k] g_i`` per param: a list of ``[K, *param.shape]`` aligned with :attr:`params`."""
        deltas = self._deltas(deltas)
        self._check_coeffs(coeffs, self.batch_size_hint(deltas))
        return self._weighted_grad_sum(deltas, coeffs)

    # ------------------------------------------------------------------ what a rule implements
    def _per_example_grads(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _sqnorm(self, deltas):
        return sum(rows(g).square().sum(1) for g in self._per_example_grads(deltas))

    def _gram(self, deltas):
        return sum(rows(g) @ rows(g).T for g in self._per_example_grads(deltas))

    def _dot(self, deltas, vectors):
        return sum(rows(g) @ rows(v).to(g.dtype).T for g, v in zip(self._per_example_grads(deltas), vectors))

    def _weighted_grad_sum(self, deltas, coeffs):
        K = coeffs.shape[1]
        return [
            (coeffs.to(g.dtype).T @ rows(g)).reshape(K, *p.shape)
            for g, (_, p) in zip(self._per_example_grads(deltas), self.params)
        ]


def first_input(args: tuple, kwargs: dict) -> Any:
    """A call's first input, positional or keyword (None for a call without inputs)."""
    return args[0] if args else next(iter(kwargs.values()), None)


def rows(g: torch.Tensor) -> torch.Tensor:
    """``[B, *shape]`` -> ``[B, prod(shape)]`` (also for scalar parameters, whose gradients are ``[B]``)."""
    return g.reshape(g.shape[0], math.prod(g.shape[1:]))  # explicit: B may be 0


# Per-example intermediates (materialized per-example gradients, ghost T x T Gram pairs) above this many
# elements in all are computed for chunks of the batch, so a large layer or a long sequence never holds
# them for the whole batch at once. Read at call time (tests lower it).
MAX_INTERMEDIATE_ELEMENTS = 1 << 24


def within_budget(elements: int) -> bool:
    return elements <= MAX_INTERMEDIATE_ELEMENTS


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of at most ``size`` (>= 1) items covering ``range(n)`` (one empty range for n = 0)."""
    size = max(1, size)
    return [(s, min(n, s + size)) for s in range(0, n, size)] or [(0, 0)]


def budget_chunks(n: int, per_item: int) -> list[tuple[int, int]]:
    """Chunks of ``n`` items that each hold at most the budget when one item holds ``per_item`` elements."""
    return chunk_ranges(n, MAX_INTERMEDIATE_ELEMENTS // max(1, per_item))


def symmetric_from_blocks(chunks: list[tuple[int, int]], block) -> torch.Tensor:
    """The symmetric matrix whose block ``(I, J)`` over index ranges ``chunks`` is ``block(I, J)``, built
    from the blocks with ``I <= J`` only (the others are their transposes)."""
    grid = [[None] * len(chunks) for _ in chunks]
    for i, I in enumerate(chunks):
        for j in range(i, len(chunks)):
            grid[i][j] = block(I, chunks[j])
            if j != i:
                grid[j][i] = grid[i][j].T
    return torch.cat([torch.cat(row, 1) for row in grid], 0)


def gram_from_rows(chunks: list[tuple[int, int]], rows_of) -> torch.Tensor:
    """``F F^T`` for ``F`` = the rows ``rows_of(start, stop)`` of every chunk, with at most two chunks of
    rows alive: a row chunk is formed once, the column chunks are formed again for each row chunk."""
    current: dict = {}

    def block(I, J):
        if I not in current:
            current.clear()
            current[I] = rows_of(*I)
        f_i = current[I]
        return f_i @ (f_i if J == I else rows_of(*J)).T

    return symmetric_from_blocks(chunks, block)


def _versions(inp, out) -> tuple:
    return (inp._version if isinstance(inp, torch.Tensor) else None, out._version)


def batched_pairs(layer: CapturedLayer, deltas: list[torch.Tensor]) -> list[tuple[Any, torch.Tensor]]:
    """``(input, delta)`` per record with the batch in dim 0 of both: a shared (unbatched) input is
    expanded over the batch (a view), since its per-example deltas are ``[B, *output]`` already."""
    B = layer.batch_size_hint(deltas)
    return [
        (r.input.expand(B, *r.input.shape) if r.shared else r.input, d) for r, d in zip(layer.records, deltas)
    ]
