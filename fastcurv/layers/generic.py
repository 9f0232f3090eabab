"""The exact fallback for any module holding parameters that has no fast rule (a custom module
with its own ``nn.Parameter``, ``nn.PReLU``, ``nn.Bilinear``, a subclass overriding ``forward``,
a third-party layer).

Per-example gradients of the module's *own* parameters come from re-running its recorded calls
once with a per-example copy of each parameter (``torch.func.vmap`` over the batch, each example
as a batch of one), then one ``autograd.grad`` of ``sum_i <delta_i, z_i>`` w.r.t. those copies:
``[B, *param.shape]`` per parameter, materialized for this module only, differentiable (the
copies are expanded views of the real parameters, so a penalty's gradient flows back to them).

The re-run must reproduce the recorded output: a module whose examples interact (it mixes the
batch) or that is random (dropout inside it) gives a different output, and is refused rather than
silently mis-counted."""
from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastcurv.layers.base import CapturedLayer, describe

__all__ = ["GenericLayer", "replaying", "replaying_context"]

_replay = {"active": False}


def replaying() -> bool:
    """True while a generic rule re-runs a module (the capture's hooks must not record then)."""
    return _replay["active"]


@contextlib.contextmanager
def replaying_context():
    """Runs a module's forward with the capture's hooks standing aside (they record nothing)."""
    was = _replay["active"]
    _replay["active"] = True
    try:
        yield
    finally:
        _replay["active"] = was


class GenericLayer(CapturedLayer):
    """Materialized per-example gradients by a vmapped re-run; see the module docstring."""

    #: why this module took the generic path (set by the capture, reported once)
    reason: str = ""
    reads_output_values = True  # the re-run is checked against the recorded output

    def record(self, args, kwargs, output):
        if isinstance(output, torch.Tensor):
            return super().record(args, kwargs, output)
        # a tuple / dict / any pytree (Opacus' DPLSTM returns (output, (h, c))): its differentiable leaves are
        # packed into one [B, N] tensor, which is recorded, and the module returns views of it instead
        leaves, spec = tree_flatten(output)
        B = _batch_of(args, kwargs)
        layout = _pytree_layout(leaves, B)
        if B is None or not any(layout):
            raise TypeError(
                f"fastcurv.capture: {describe(self.name, self.module)} returned {type(output).__name__} with no "
                "floating-point tensor that has the batch of its input in one of its dims; the generic rule cannot "
                "tell which output is per example. Give it a fast rule (fastcurv.layers.register) or ignore it."
            )
        packed = torch.cat([leaf.movedim(dim, 0).reshape(B, -1) for leaf, dim in zip(leaves, layout) if dim is not None], 1)
        super().record(args, kwargs, packed)
        self.records[-1].pytree = (spec, layout, [tuple(leaf.shape) for leaf in leaves])
        return tree_unflatten(_unpacked(packed, leaves, layout), spec)

    def check_input(self, inp):
        pass  # any call signature: the batch is found per argument in _per_example_grads

    def _per_example_grads(self, deltas):
        B = self.batch_size_hint(deltas)
        names = [qname.rsplit(".", 1)[-1] for qname, _ in self.params]
        totals = [None] * len(names)
        for rec, delta in zip(self.records, deltas):
            grads = self._one_call(rec, delta, names, B)
            totals = [g if t is None else t + g for t, g in zip(totals, grads)]
        return totals

    def _one_call(self, rec, delta, names, B):
        with torch.enable_grad():  # the capture computes results without create_graph under no_grad
            return self._one_call_with_grad(rec, delta, names, B)

    def replay(self, rec, copies: dict, B: int) -> torch.Tensor:
        """The recorded call re-run one example at a time (vmapped), with ``copies`` ``{param name:
        [B, *shape]}`` in place of the module's own; refused when it does not reproduce the recorded output
        (examples interact, or the module is random)."""
        module = self.module
        flat_args = list(rec.args) + list(rec.kwargs.values())
        batched = [isinstance(a, torch.Tensor) and a.ndim >= 1 and a.shape[0] == B for a in flat_args]
        n_args = len(rec.args)
        keys = list(rec.kwargs)

        pytree = getattr(rec, "pytree", None)

        def one_example(params, *values):
            values = [v.unsqueeze(0) if b else v for v, b in zip(values, batched)]
            out = functional_call(module, params, tuple(values[:n_args]), dict(zip(keys, values[n_args:])))
            if pytree is None:
                return out.squeeze(0)
            leaves = tree_flatten(out)[0]  # each per-example leaf has size 1 in the recorded batch dim
            return torch.cat([leaf.movedim(dim, 0).reshape(-1) for leaf, dim in zip(leaves, pytree[1]) if dim is not None])

        in_dims = (0 if copies else None,) + tuple(0 if b else None for b in batched)
        try:
            # SDPA's math backend: the fused kernels have no double backward (penalties need one) nor a vmap rule
            with replaying_context(), sdpa_kernel(SDPBackend.MATH):
                out = vmap(one_example, in_dims=in_dims, randomness="different")(copies, *flat_args)
        except Exception as exc:  # vmap cannot batch some modules (in-place buffer updates, data-dependent control)
            raise RuntimeError(
                f"fastcurv.capture: the generic rule could not re-run {describe(self.name, self.module)} per example "
                f"({type(exc).__name__}: {exc}). Give it a fast rule (fastcurv.layers.register), freeze it, or pass "
                f"ignore=['{self.name}']."
            ) from exc
        ref = rec.output
        if out.shape != ref.shape or not torch.allclose(out.to(ref.dtype), ref.detach(), rtol=_rtol(ref), atol=_rtol(ref) * ref.detach().abs().max().clamp_min(1e-30).item()):
            raise RuntimeError(
                f"fastcurv.capture: re-running {describe(self.name, self.module)} one example at a time does not "
                "reproduce its batched output: its examples interact (it mixes the batch, e.g. batch statistics) or it "
                "is random (e.g. dropout inside it). Per-example gradients of its parameters would be wrong. "
                "Put it in eval mode, freeze it, or pass ignore=[...]."
            )
        return out

    def _one_call_with_grad(self, rec, delta, names, B):
        copies = {n: p.unsqueeze(0).expand(B, *p.shape) for n, (_, p) in zip(names, self.params)}
        out = self.replay(rec, copies, B)
        create_graph = delta.requires_grad
        grads = torch.autograd.grad(
            (out * delta.to(out.dtype)).sum(), list(copies.values()), create_graph=create_graph, allow_unused=True
        )
        return [torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device) if g is None else g for g, (_, p) in zip(grads, self.params)]


def _batch_of(args, kwargs):
    first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim >= 1), None)
    return None if first is None else first.shape[0]


def _pytree_layout(leaves, B) -> list:
    """Per leaf: the dim holding the batch (the first of size B) for a floating-point tensor in the
    graph, else None (an integer tensor, a constant: returned unchanged, not per example)."""
    out = []
    for leaf in leaves:
        dim = None
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad and B is not None:
            dim = next((d for d, n in enumerate(leaf.shape) if n == B), None)
        out.append(dim)
    return out


def _unpacked(packed, leaves, layout) -> list:
    """The leaves again, the packed ones as views of ``packed`` (so the losses depend on the recorded tensor)."""
    out, start = [], 0
    for leaf, dim in zip(leaves, layout):
        if dim is None:
            out.append(leaf)
            continue
        moved = leaf.movedim(dim, 0).shape
        n = leaf.numel() // max(1, moved[0])
        out.append(packed[:, start:start + n].reshape(moved).movedim(0, dim))
        start += n
    return out


def _rtol(t: torch.Tensor) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(t.dtype, 1e-2)
