"""Layers whose weights are rebuilt from other stored parameters before each forward:
``torch.nn.utils.prune`` (``weight = weight_orig * weight_mask``), the old ``torch.nn.utils.weight_norm``
(``weight_g``, ``weight_v``) and ``spectral_norm`` (``weight_orig``) forward pre-hooks, and
``torch.nn.utils.parametrizations`` / ``parametrize.register_parametrization`` (``weight_norm``,
``spectral_norm``, ``orthogonal``, user parametrizations: ``parametrizations.weight.original[0/1]``).

The trainable parameters are the *stored* ones, so the per-example gradients are taken w.r.t. them:
the layer's fast rule gives the per-example gradients ``[B, *W.shape]`` of the effective tensor ``W``
the forward used (recorded at each call), and one batched vector-Jacobian product of the recorded
``W = f(stored)`` graph (``autograd.grad(W, stored, grads, is_grads_batched=True)``) maps them to the
stored parameters: exact (a mask is elementwise, spectral_norm's power iteration is treated as autograd
treats it: ``u``, ``v`` held constant), differentiable with ``create_graph`` (the penalties), and
materialized (memory B x P for this layer).

A parametrized tensor is evaluated once per call while captured (``parametrize`` caching, opened by a
pre-hook and closed by a post-hook), so the recorded ``W`` is the one the forward used and a
spectral_norm power iteration runs exactly as often as without the capture.

Only rules that read their weights as module attributes (``module.weight`` / ``module.bias``) can be
served this way; any other rule, or the generic rule, on a reparametrized layer is refused."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from fastcurv.layers.base import CapturedLayer, describe

__all__ = ["reparametrized", "ReparamLayer", "parametrization_prefixes", "check_plain_weights",
           "effective_tensor"]


def reparametrized(module: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{effective tensor name: [(stored local name, Parameter)]}`` for every tensor of ``module`` that a
    forward pre-hook or a parametrization rebuilds from stored parameters (empty when there is none)."""
    found: dict[str, list] = {}
    if parametrize.is_parametrized(module):
        for name, plist in module.parametrizations.items():
            found[name] = [(f"parametrizations.{name}.{n}", p) for n, p in plist.named_parameters()]
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):  # a PruningContainer also holds _tensor_name
            found[hook._tensor_name] = [(hook._tensor_name + "_orig", getattr(module, hook._tensor_name + "_orig"))]
        elif isinstance(hook, WeightNorm):
            found[hook.name] = [(hook.name + s, getattr(module, hook.name + s)) for s in ("_g", "_v")]
        elif isinstance(hook, SpectralNorm):
            found[hook.name] = [(hook.name + "_orig", getattr(module, hook.name + "_orig"))]
    return found


def effective_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as the forward would use it now, freshly computed from the stored parameters (so a
    penalty on it differentiates through the reparametrization at every step), without advancing a
    spectral_norm power iteration; the parameter itself when ``name`` is not reparametrized."""
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        modes = [m.training for m in plist.modules()]
        plist.eval()  # spectral_norm: no power iteration, the u, v the last forward left
        try:
            return getattr(module, name)
        finally:
            for m, mode in zip(plist.modules(), modes):
                m.training = mode
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return hook.apply_mask(module)
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook.compute_weight(module)
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return hook.compute_weight(module, do_power_iteration=False)
    return getattr(module, name)


def check_plain_weights(name: str, module: nn.Module, rule, kinds: dict) -> None:
    """An attribute rule reads ``module.weight`` / ``module.bias``: refuse one that is not a Parameter of the
    module and not a known reparametrization (a custom pre-hook rebuilding it from other tensors), since
    its gradient would be reported under the wrong parameters."""
    if rule is None or not issubclass(rule, _attribute_rules()):
        return
    for attr in ("weight", "bias"):
        if attr in module._parameters or attr in kinds:
            continue  # (a parametrized attribute is not read here: spectral_norm would run a power iteration)
        value = getattr(module, attr, None)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise TypeError(
                f"fastcurv.capture: {describe(name, module)}.{attr} is not one of its parameters but a tensor rebuilt "
                f"from others (a custom forward pre-hook?); only torch.nn.utils.prune, weight_norm, spectral_norm and "
                "parametrize are understood, so per-example gradients w.r.t. the stored parameters would be wrong. "
                "Use torch.nn.utils.parametrize.register_parametrization, or pass ignore=[...]."
            )


def parametrization_prefixes(model: nn.Module) -> list[str]:
    """Qualified names of the ``parametrizations`` containers in ``model``: their sub-trees are part of
    the parametrized module (served with it), not modules of their own."""
    return [f"{n}.parametrizations" if n else "parametrizations"
            for n, m in model.named_modules() if parametrize.is_parametrized(m)]


def _attribute_rules() -> tuple:
    """Rules that read the module's weights as attributes and return their gradients as [weight, bias]."""
    from fastcurv.layers.embedding import EmbeddingLayer
    from fastcurv.layers.linear import LinearMapLayer
    from fastcurv.layers.norm import NormLayer

    return (LinearMapLayer, EmbeddingLayer, NormLayer)


class ReparamLayer(CapturedLayer):
    """A fast rule (``inner``) for the effective tensors, mapped to the stored parameters; see the module
    docstring. ``params`` are the stored parameters; ``inner.params`` the effective tensors."""

    def __init__(self, name: str, module: nn.Module, params: list, rule: type, kinds: dict):
        if rule is None or not issubclass(rule, _attribute_rules()):
            stored = [f"{name}.{n}" if name else n for stored in kinds.values() for n, _ in stored]
            raise TypeError(
                f"fastcurv.capture: {describe(name, module)} has reparametrized tensors {sorted(kinds)} (stored as "
                f"{stored}: pruning, weight_norm, spectral_norm or a parametrization), but its rule "
                f"{'(generic)' if rule is None else rule.__name__} reads its parameters directly, so per-example "
                "gradients w.r.t. the stored parameters would be wrong. Supported: Linear, Conv*, ConvTranspose*, "
                "Embedding*, LayerNorm/GroupNorm/RMSNorm. Remove the reparametrization "
                "(prune.remove / parametrize.remove_parametrizations), freeze it, or pass ignore=[...]."
            )
        super().__init__(name, module, params)
        self.kinds = kinds
        prefix = f"{name}." if name else ""
        stored_ids = {id(p) for _, p in params}
        # effective tensors in the order the attribute rules return them: weight, then bias
        effective = []
        for attr in ("weight", "bias"):
            if attr in kinds:
                if any(id(p) in stored_ids for _, p in kinds[attr]):
                    effective.append((prefix + attr, self._shape_proxy(attr)))
            elif getattr(module, attr, None) is not None and any(p is getattr(module, attr) for _, p in params):
                effective.append((prefix + attr, getattr(module, attr)))
        others = sorted(set(kinds) - {"weight", "bias"})
        if others:
            raise TypeError(
                f"fastcurv.capture: {describe(name, module)} has reparametrized tensors {others}; only 'weight' and "
                "'bias' can be served. Remove those reparametrizations or pass ignore=[...]."
            )
        with self._effective_view():
            self.inner = rule(name, module, effective)
        names = {n for n, _ in effective}
        for attr in ("weight", "bias"):  # the rule read requires_grad from module attributes: set it from the stored
            if hasattr(self.inner, f"{attr}_trainable"):
                setattr(self.inner, f"{attr}_trainable", prefix + attr in names)
        self._prefix = prefix
        # how each stored parameter is reached: (effective index, stored local names) per effective tensor
        self.inner_index = {n: k for k, (n, _) in enumerate(effective)}

    # the rule's records are the capture's records
    @property
    def records(self):
        return self.inner.records

    @records.setter
    def records(self, value):
        if hasattr(self, "inner"):
            self.inner.records = value

    supports_shared_input = property(lambda self: self.inner.supports_shared_input)
    min_batched_ndim = property(lambda self: self.inner.min_batched_ndim)

    def _shape_proxy(self, attr: str) -> torch.Tensor:
        w = self._current(attr)
        return torch.empty(w.shape, dtype=w.dtype, device="meta")

    def _current(self, attr: str) -> torch.Tensor:
        """The effective tensor without evaluating a parametrization (which may have side effects, e.g.
        spectral_norm's power iteration): the cached value in a capture, else one evaluation with the
        parametrization's buffers restored afterwards."""
        if attr in getattr(self.module, "parametrizations", {}):
            key = (id(self.module), attr)
            if key in parametrize._cache:
                return parametrize._cache[key]
            with _restored_buffers(self.module.parametrizations[attr]), torch.no_grad():
                return getattr(self.module, attr).detach()
        return getattr(self.module, attr)

    @contextlib.contextmanager
    def _effective_view(self, values: dict | None = None):
        """While the rule runs, ``module.<attr>`` of a parametrized tensor resolves to a given value (the
        recorded one), never to a fresh evaluation."""
        names = [a for a in self.kinds if a in getattr(self.module, "parametrizations", {})]
        if not names:
            yield
            return
        with parametrize.cached():
            saved = {}
            for a in names:
                key = (id(self.module), a)
                saved[key] = parametrize._cache.get(key)
                parametrize._cache[key] = values[a] if values and a in values else self._current(a)
            try:
                yield
            finally:
                for key, old in saved.items():
                    if old is None:
                        parametrize._cache.pop(key, None)
                    else:
                        parametrize._cache[key] = old

    # ------------------------------------------------------------------ forward
    def install(self) -> list:
        """Hooks that make a parametrized tensor evaluate once per call (caching) while captured."""
        if not parametrize.is_parametrized(self.module):
            return []
        state = {"opened": [], "keys": []}

        def open_cache(module, args):
            parametrize._cache_enabled += 1
            state["opened"].append([(id(module), a) for a in module.parametrizations
                                    if (id(module), a) not in parametrize._cache])

        def close_cache(module, args, output):
            if not state["opened"]:
                return None
            for key in state["opened"].pop():
                parametrize._cache.pop(key, None)
            parametrize._cache_enabled -= 1
            return None

        return [self.module.register_forward_pre_hook(open_cache),
                self.module.register_forward_hook(close_cache, always_call=True)]

    def record(self, args, kwargs, output):
        replacement = self.inner.record(args, kwargs, output)
        rec = self.inner.records[-1]
        rec.effective = {}
        for attr in self.kinds:
            if self._prefix + attr not in self.inner_index:
                continue
            w = self._current(attr)
            if not isinstance(w, torch.Tensor) or w.grad_fn is None and not w.requires_grad:
                raise RuntimeError(
                    f"fastcurv.capture: the effective '{attr}' of {describe(self.name, self.module)} is not in the "
                    "autograd graph of its stored parameters during the captured forward (built under no_grad?)"
                )
            rec.effective[attr] = w
        return replacement

    def batch_witness(self, args, kwargs, output):
        return self.inner.batch_witness(args, kwargs, output)

    def layout_is_ambiguous(self, inp, batch_size):
        return self.inner.layout_is_ambiguous(inp, batch_size)

    def check_input(self, inp):
        self.inner.check_input(inp)

    def check_unchanged(self):
        self.inner.check_unchanged()

    def clear(self):
        self.inner.clear()

    # ------------------------------------------------------------------ per-example gradients
    def _per_example_grads(self, deltas):
        totals: dict[int, torch.Tensor] = {}
        stored_of = {attr: [p for _, p in stored] for attr, stored in self.kinds.items()}
        trainable = {id(p) for _, p in self.params}
        records = self.inner.records
        try:
            for rec, delta in zip(records, deltas):
                self.inner.records = [rec]
                self.inner._cache_clear()
                with self._effective_view(rec.effective):
                    grads = self.inner._per_example_grads([delta])
                create_graph = delta.requires_grad
                for (ename, _), g in zip(self.inner.params, grads):
                    attr = ename[len(self._prefix):]
                    if attr not in rec.effective:  # a plain parameter (the bias of a pruned weight)
                        target = getattr(self.module, attr)
                        totals[id(target)] = g if id(target) not in totals else totals[id(target)] + g
                        continue
                    targets = [p for p in stored_of[attr] if id(p) in trainable]
                    for p, gp in zip(targets, _batched_vjp(rec.effective[attr], targets, g, create_graph)):
                        totals[id(p)] = gp if id(p) not in totals else totals[id(p)] + gp
        finally:
            self.inner.records = records
            self.inner._cache_clear()
        B = deltas[0].shape[0]
        return [totals.get(id(p), None) if id(p) in totals else torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device)
                for _, p in self.params]


def _batched_vjp(w: torch.Tensor, targets: list, grads: torch.Tensor, create_graph: bool) -> list:
    """``[B, *target.shape]`` per target: ``J^T g_i`` of ``w = f(targets)`` for each row ``g_i`` of ``grads``."""
    grads = grads.to(w.dtype)
    with torch.enable_grad():
        try:
            out = torch.autograd.grad(w, targets, grad_outputs=grads, is_grads_batched=True, retain_graph=True,
                                      create_graph=create_graph, allow_unused=True)
        except RuntimeError as exc:
            if "second time" in str(exc):
                raise
            # no batching rule for some op of the reparametrization: one vector-Jacobian product per example
            rows = [torch.autograd.grad(w, targets, grad_outputs=g, retain_graph=True, create_graph=create_graph,
                                        allow_unused=True) for g in grads]
            out = [None if rows[0][k] is None else torch.stack([r[k] for r in rows]) for k in range(len(targets))]
    B = grads.shape[0]
    return [torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device) if g is None else g for g, p in zip(out, targets)]


@contextlib.contextmanager
def _restored_buffers(module: nn.Module):
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
