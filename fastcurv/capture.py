"""Capture of layer inputs and outputs during a forward pass, and per-example gradient quantities
of a whole model computed from them (docs/METHODS.md, section 1).

    with fastcurv.capture(model) as cap:
        out = model(x)
    losses = F.cross_entropy(out, y, reduction="none")     # per-example losses [B]
    s = cap.per_example_sqnorms(losses)                     # [B]: ||grad_theta l_i||^2
    G = cap.per_example_gram(losses)                        # [B, B]: <grad l_i, grad l_j>

How it works: forward hooks record each module's inputs and outputs; one
``torch.autograd.grad(sum_i l_i, [z, ...])`` gives ``delta_i = dl_i/dz_i`` (true because examples
do not interact), and each layer's rule (``fastcurv/layers``) turns (input, delta) into per-example
gradient quantities without forming the B x P Jacobian. This file holds only the orchestration:
which rule serves which module, the deltas, and the checks that keep the numbers right.

* Every module holding trainable parameters is served: by a fast rule where one is registered
  (``fastcurv.layers.registered_types()``), else by the exact generic rule (a vmapped per-example
  re-run of that module; reported once in :attr:`Capture.generic`). ``strict=True`` refuses instead.
* Parameters, not modules, are the unit: a parameter used by several modules (tied weights; T5's and
  BART's ``shared`` embedding, used by the encoder's and decoder's ``embed_tokens`` and the tied
  ``lm_head``) or by one module called several times counts once with all its uses summed:
  ``||sum of the uses' gradients||^2``, cross terms included. A module that is never called (``shared``
  itself) is no error: it adds nothing of its own.
* A module called without the batch dim (``wpe(torch.arange(T))``, GPT-2's ``position_ids`` [1, T])
  whose output is added onto a batched tensor, directly or after layout steps (T5's relative-position bias:
  ``rel(buckets).permute(2, 0, 1).unsqueeze(0)`` added to every layer's scores), gets its per-example deltas
  from those adds' output gradients, summed over the broadcast dims (no extra backward of the model; layout
  steps are mapped back by a small batched vector-Jacobian product). Used any other way, it takes a
  batched backward (B vector-Jacobian products of the graph above it; ``SharedInputWarning``, once). Inputs whose layout is ambiguous (a sequence dim equal to B) are checked with one
  extra random-weighted backward, never guessed.
* BatchNorm normalizing with batch statistics makes examples interact: refused by default;
  ``batchnorm="frozen_stats"`` gives per-example gradients with the batch statistics held constant,
  ``batchnorm="exact"`` the true per-example gradients including the coupling (B backward passes).
* In-place ops after a layer (``nn.ReLU(inplace=True)``, ``out += identity``: torchvision CNNs as built)
  are exact: each delta is taken at the output's autograd edge recorded in the forward, no copy made.
* Refused with a clear error: an input modified in place after the layer ran (or the output of a
  generic/functional-rule module, whose re-run reads it), losses that reach captured parameters through a path that
  bypasses the recorded outputs (a parameter used outside its module, or part of the loss from a
  forward outside the capture).

Loss scaling: the methods take per-example losses and return quantities of ``grad l_i``. If you pass
``mean``-scaled losses (``l_i / B``) the norms come out multiplied by ``1 / B^2``.

Memory: after the ``with`` block the :class:`Capture` still holds the recorded tensors, and through
them the forward graph, so that the norms can be asked for after the block. Call
:meth:`Capture.clear` (or drop the object) to release them.
"""
from __future__ import annotations

import contextlib
import sys
import types
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.autograd.graph import GradientEdge
from torch.utils._pytree import tree_leaves

from fastcurv.layers import FunctionalLayer, GenericLayer, registered_types, rule_for
from fastcurv.layers.base import CapturedLayer, Record, describe, rows
from fastcurv.layers.embedding import EmbeddingLayer
from fastcurv.layers.functional import active_calls, walk_graph
from fastcurv.layers.linear import LinearLayer
from fastcurv.layers.generic import replaying
from fastcurv.layers.reparam import ReparamLayer, check_plain_weights, parametrization_prefixes, reparametrized
from fastcurv.layers.norm import frozen_batch_norm_calls, frozen_stats_forward, stats_gate_closed, uses_batch_stats

__all__ = ["capture", "Capture", "CapturedLayer", "GenericRuleWarning", "SharedInputWarning", "SUPPORTED_MODULES", "BATCHNORM_MODES"]

SUPPORTED_MODULES = registered_types()  # modules with a fast rule (at import time of this module)
BATCHNORM_MODES = ("refuse", "frozen_stats", "exact")


# ============================================================================ the capture
class Capture:
    """Records activations of ``model``'s trainable modules during a forward (use as a context
    manager) and computes per-example gradient quantities from per-example losses afterwards.

    Build it with :func:`capture`. Attributes after a forward: :attr:`layers` (list of
    :class:`CapturedLayer`, model order), :attr:`params` (all captured ``(name, Parameter)`` pairs
    in ``model.parameters()`` order), :attr:`batch_size`, :attr:`generic` (``{module name: why}``
    for the modules served by the generic rule).

    The recorded tensors (and through them the forward graph) stay alive after the ``with`` block
    until :meth:`clear` is called or the object is dropped. Hooks are removed when the block
    exits, also on an exception.
    """

    def __init__(
        self,
        model: nn.Module,
        ignore: Iterable[Union[nn.Module, str]] = (),
        strict: bool = False,
        batchnorm: str = "refuse",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastcurv.capture: expected an nn.Module, got {type(model).__name__}")
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            raise TypeError(
                "fastcurv.capture: got a torch.compile() wrapper, which hides the model's layers from the capture's "
                "hooks. Capture the uncompiled model (compiled = torch.compile(model); capture(model)), or compile in "
                "place with model.compile() and capture the model itself."
            )
        from fastcurv.curvature._operator import refuse_wrappers

        refuse_wrappers(model, "fastcurv.capture")  # FSDP: the penalty's double backward fails on its shards
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"fastcurv.capture: batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
        self.model = model
        self.strict = bool(strict)
        self.batchnorm = batchnorm
        self._handles: list = []
        self._patched: list = []
        self._batch: Optional[int] = None
        self._batch_source = None
        self._rows_verdicts: dict = {}  # regrouped [B*T, ...] calls whose layout check passed (kept across forwards)
        self._generic_batch = None
        self._coupled: list[str] = []  # BatchNorms that normalized with batch statistics (mode "exact")
        self._ignore = ignore
        self._leaves = None
        self._build_layers()

    def _build_layers(self) -> None:
        """Which rule serves which trainable module, from the current ``requires_grad`` flags (rebuilt
        at ``__enter__`` when they changed since: gradual unfreezing, freezing a head)."""
        model = self.model
        ignored = self._resolve_ignore(model, self._ignore)
        self._flags = _trainable_flags(model)
        self._layers: list[CapturedLayer] = []
        self.generic: dict[str, str] = {}
        self._batchnorms: list[tuple[str, nn.Module]] = []
        claimed: set[str] = set()
        inside_parametrizations = parametrization_prefixes(model)  # served with their parametrized module
        for mname, module in model.named_modules():
            if any(mname == c or mname.startswith(c + ".") for c in inside_parametrizations):
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                # checked even when ignored or frozen: batch statistics corrupt every other layer's delta
                self._batchnorms.append((mname, module))
            if mname in ignored or any(mname.startswith(c + ".") for c in claimed):
                continue
            if isinstance(module, torch.jit.ScriptModule):
                _refuse_scripted(mname, module)
                claimed.add(mname)  # frozen: its scripted sub-modules cannot be hooked either, and need not be
                continue
            rule, why = rule_for(module)
            recurse = bool(rule is not None and getattr(rule, "claims_subtree", False))
            kinds = reparametrized(module)
            check_plain_weights(mname, module, rule, kinds)
            named = list(module.named_parameters(recurse=recurse))
            if not recurse:  # aliases of a child's parameters (Opacus' DPLSTM.weight_ih_l0) are served by the child
                held_below = {id(p) for child in module.children() for p in child.parameters()}
                named = [(n, p) for n, p in named if id(p) not in held_below]
            named += [(n, p) for stored in kinds.values() for n, p in stored if all(p is not q for _, q in named)]
            trainable = [(f"{mname}.{pname}" if mname else pname, p) for pname, p in named if p.requires_grad]
            if recurse:
                claimed.add(mname)
            if not trainable:
                continue
            if kinds and (rule is not None or any(p.requires_grad for s in kinds.values() for _, p in s)):
                layer = ReparamLayer(mname, module, trainable, rule, kinds)  # refuses rules it cannot serve
                self._layers.append(layer)
                continue
            if rule is None:
                if self.strict:
                    raise TypeError(
                        f"fastcurv.capture: {describe(mname, module)} holds parameters requiring grad "
                        f"{[n for n, _ in trainable]} but has no fast rule ({why}); strict=True refuses the generic "
                        f"(materialized) rule. Freeze it, pass ignore=['{mname}'], or drop strict=True."
                    )
                rule = FunctionalLayer  # fast rules for what its forward calls, the generic rule for the rest
                self.generic[mname] = why
            layer = rule(mname, module, trainable)
            if isinstance(layer, (GenericLayer, FunctionalLayer)):
                layer.reason = why
            self._layers.append(layer)
        order = {id(p): k for k, p in enumerate(model.parameters())}
        for layer in self._layers:
            layer.params.sort(key=lambda item: order[id(item[1])])

    @property
    def layers(self) -> list[CapturedLayer]:
        """The captured layers (model order). After a forward: the ones that were called. A module never
        called in it (T5's and BART's ``shared`` embedding, whose weight the encoder's and decoder's
        ``embed_tokens`` and the tied ``lm_head`` use) contributes nothing of its own; its parameters are
        counted through the modules that use them (or are exactly zero, when nothing does)."""
        called = [layer for layer in self._layers if layer.records] + list(self._leaves or ())
        return called if called else list(self._layers)

    @property
    def _shared(self) -> dict[int, list[tuple[CapturedLayer, int]]]:
        """``{id(param): [(layer, index in layer.params)]}`` for parameters held by several called layers."""
        uses: dict[int, list] = {}
        for layer in self.layers:
            for k, (_, p) in enumerate(layer.params):
                uses.setdefault(id(p), []).append((layer, k))
        return {pid: u for pid, u in uses.items() if len(u) > 1}

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
        return {n for n in names for r in roots if r == "" or n == r or n.startswith(r + ".")}

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> "Capture":
        if self._handles:
            raise RuntimeError("fastcurv.capture: this Capture is already active (nested `with`)")
        if _trainable_flags(self.model) != self._flags:
            self._build_layers()  # requires_grad changed since this Capture was built: serve the current flags
        self.clear()
        try:
            for layer in self._layers:
                # prepend: record what the layer's parameters produced, before a user hook replaces the output
                self._handles.append(layer.module.register_forward_hook(_RecordHook(layer, self), with_kwargs=True,
                                                                        prepend=True))
                self._handles.extend(layer.install())  # after the record hook: a rule's own hooks go around it
                self._handles.append(layer.module.register_forward_pre_hook(_push_active))
                self._handles.append(layer.module.register_forward_hook(_pop_active, always_call=True))
            for name, bn in self._batchnorms:
                if self.batchnorm == "frozen_stats":
                    self._patch_forward(bn, _FrozenStatsForward(bn))
                else:
                    self._handles.append(bn.register_forward_pre_hook(_BatchNormCheck(name, self)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def _patch_forward(self, module: nn.Module, forward) -> None:
        had = "forward" in module.__dict__
        self._patched.append((module, had, module.__dict__.get("forward")))
        module.forward = forward

    def __exit__(self, *exc) -> None:
        self._remove_hooks()
        if exc[0] is None:
            self._report_generic()

    def _report_generic(self) -> None:
        """After a forward: :attr:`generic` keeps the modules some of whose parameters the functional
        rules could not serve (said once, with the operation), and drops the others."""
        if any(layer.records for layer in self._layers):
            for layer in self._layers:
                if not layer.records:  # never called (T5/BART's shared): it serves nothing, by no rule
                    self.generic.pop(layer.name, None)
        for layer in self._layers:
            if isinstance(layer, FunctionalLayer) and layer.records:
                slow = layer.generic_params
                if slow:
                    self.generic[layer.name] = f"{layer.reason}; {'; '.join(slow.values())}"
                else:
                    self.generic.pop(layer.name, None)
        names = [f"'{layer.name}' ({self.generic[layer.name]})" for layer in self._layers if layer.name in self.generic
                 and (not isinstance(layer, FunctionalLayer) or layer.generic_params)]
        if names:
            _report_once(f"fastcurv.capture: exact but materialized generic rule for {', '.join(names)}")

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, had, old in reversed(self._patched):
            if had:
                module.forward = old
            else:
                del module.forward
        self._patched = []

    def clear(self) -> None:
        """Release the recorded tensors (and with them the forward graph)."""
        for layer in self._layers:
            layer.clear()
        self._batch = None
        self._batch_source = None
        self._generic_batch = None  # (size, module, input shape) from a generic module's input, used when no fast rule ran
        self._coupled = []
        self._leaves = None  # parameters read directly, outside any called module of theirs (see _find_leaves)

    # ---------------------------------------------------------------- state
    @property
    def params(self) -> list[tuple[str, nn.Parameter]]:
        """All captured ``(qualified_name, Parameter)`` pairs (a shared one once), in ``model.parameters()`` order."""
        seen, pairs = set(), []
        for layer in self._layers:
            for name, p in layer.params:
                if id(p) not in seen:
                    seen.add(id(p))
                    pairs.append((name, p))
        order = {id(p): k for k, p in enumerate(self.model.parameters())}
        return sorted(pairs, key=lambda item: order[id(item[1])])

    @property
    def batch_size(self) -> int:
        """Batch size of the captured forward (dim 0 of the captured modules' batched inputs)."""
        if self._batch is None:
            if self._generic_batch is not None:
                return self._generic_batch[0]
            raise RuntimeError(self._nothing_captured())
        return self._batch

    def _batch_origin(self) -> str:
        """Which module's input set the batch size (for messages)."""
        if self._batch is not None:
            (who, shape) = self._batch_source
        elif self._generic_batch is not None:
            _, who, shape = self._generic_batch
        else:
            return ""
        return f" (dim 0 of the input {shape} of {who}, the first captured module, was taken as the batch)"

    def _nothing_captured(self) -> str:
        if not self._layers:
            return "fastcurv.capture: the model has no module with parameters requiring grad; nothing to compute"
        return (
            "fastcurv.capture: no forward was captured (run the model inside `with fastcurv.capture(model) as cap:`), "
            "the recorded tensors were released by clear(), or none of the modules holding parameters was called (a "
            "forward that reads their parameters directly, F.linear(x, layer.weight), is not served)"
        )

    def _on_record(self, layer: CapturedLayer, inp) -> bool:
        """Called before a call is recorded; returns True when its input is shared by the batch."""
        n = inp.shape[0] if isinstance(inp, torch.Tensor) and inp.ndim >= 1 else None
        if isinstance(layer, GenericLayer) or n is None:
            if n is not None and self._generic_batch is None:
                # a model whose only trainable modules have no fast rule (a hand-written LoRA on a frozen base)
                self._generic_batch = (n, describe(layer.name, layer.module), tuple(inp.shape))
            return False
        if inp.ndim < layer.min_batched_ndim:
            if self._batch is None or not layer.supports_shared_input:
                raise ValueError(
                    f"fastcurv.capture: {describe(layer.name, layer.module)} got input {tuple(inp.shape)}; expected a "
                    "batched input whose dim 0 is the batch (an unbatched input is only accepted after a batched "
                    "module has set the batch size)"
                )
            return True
        if isinstance(inp, nn.Parameter) and (layer.supports_shared_input or getattr(layer, "accepts_parameter_input", False)):
            return True  # a parameter fed to a module (DeBERTa's LayerNorm(rel_embeddings.weight)): shared, whatever its size
        if self._batch is None:
            self._batch = n
            self._batch_source = (describe(layer.name, layer.module), tuple(inp.shape))
            return False
        if n == self._batch:
            return False
        # wpe(torch.arange(T)) with T a multiple of B: a 1-D index tensor that is no view of a batched one is a
        # shared position vector, not flattened token rows
        could_be_shared = (layer.supports_shared_input and inp.ndim == 1 and not inp.is_floating_point()
                           and inp._base is None)
        if layer.regroups_rows and n > self._batch and n % self._batch == 0 and not could_be_shared:
            return ("rows", n // self._batch)  # [B*T, ...] rows (OPT's flattened MLP): regrouped, layout checked
        if layer.supports_shared_input:
            return True  # e.g. wpe(torch.arange(T)): one input for every example
        raise RuntimeError(
            f"fastcurv.capture: {describe(layer.name, layer.module)} got input {tuple(inp.shape)} whose dim 0 is not "
            f"the batch size {self._batch} seen by the modules before it. dim 0 of every captured module's input must "
            "be the batch (one forward per capture; use batch_first=True layouts, and don't flatten the batch into "
            "other dims before a layer)."
        )

    # ---------------------------------------------------------------- deltas
    def deltas(self, losses: torch.Tensor, create_graph: bool = False) -> list:
        """``dl_i/dz_i`` for every layer in :attr:`layers` (same order): a tensor shaped like its
        output for a module called once, a list (one per call) for a module called several times;
        ``[B, *output]`` for a call whose input had no batch dim.

        One ``torch.autograd.grad`` of ``losses.sum()`` w.r.t. the recorded outputs (valid because
        examples do not interact); the graph is retained so the caller can still backpropagate.
        ``create_graph=True`` makes the deltas differentiable (for penalties on the norms).
        """
        return self._deltas(losses, create_graph)[0]

    def _deltas(self, losses: torch.Tensor, create_graph: bool, wrt=()) -> tuple[list, list]:
        """:meth:`deltas`, and the gradient of ``losses.sum()`` w.r.t. the tensors ``wrt`` (None where unused)
        from the same backward: with ``wrt`` = the parameters, the whole data gradient for the cost of one."""
        wrt = list(wrt)
        extra: list = [None] * len(wrt)
        self._check_losses(losses)
        if self._coupled:
            raise RuntimeError(
                f"fastcurv.capture: {', '.join(self._coupled)} normalized with batch statistics and batchnorm='exact': "
                "examples interact, so there are no per-layer deltas; use the Capture's per_example_* methods"
            )
        if self._leaves is None:
            self._leaves = self._find_leaves(losses)
        records = [(layer, r) for layer in self.layers for r in layer.records]
        batched = [(layer, r) for layer, r in records if not r.shared]
        shared = [(layer, r) for layer, r in records if r.shared]
        gate = stats_gate_closed() if self.batchnorm == "frozen_stats" else contextlib.nullcontext()
        found: dict[int, torch.Tensor] = {}
        with gate, _explain_second_backward(), torch.enable_grad():
            probes = self._broadcast_probes(losses, [r for _, r in shared if r.edge is not None])
            live = [r for _, r in batched if r.edge is not None] + [r for r, _ in probes]
            if live:
                try:
                    grads = torch.autograd.grad(
                        losses.sum(), [r.edge for r in live] + wrt, create_graph=create_graph, retain_graph=True,
                        allow_unused=True,
                    )
                finally:
                    for _, probe in probes:
                        probe.remove()
                grads, extra = grads[:len(live)], list(grads[len(live):])
            elif wrt:
                extra = list(torch.autograd.grad(losses.sum(), wrt, create_graph=create_graph, retain_graph=True,
                                                 allow_unused=True))
            if live:
                found.update({id(r): g for r, g in zip(live, grads) if g is not None and not r.shared})
            for r, probe in probes:
                delta = probe.per_example(self.batch_size, create_graph)
                if delta is not None:
                    found[id(r)] = delta
                    shared = [(layer, rr) for layer, rr in shared if rr is not r]
            # each record's layout is a property of the forward: checked once per capture, not per call
            suspects = [r for layer, r in batched if id(r) in found and not r.layout_checked and self._ambiguous(layer, r)]
            suspects += [r for layer, r in batched if id(r) in found and r.rows_per_example > 1 and not self._rows_proven(layer, r)]
            for r in suspects:
                r.layout_checked = True
            for r in self._interacting(losses, suspects, found):
                layer = next(layer for layer, rr in batched if rr is r)
                if r.rows_per_example > 1:
                    self._rows_verdicts.pop(self._rows_key(layer, r), None)
                    fallback = getattr(layer, "rows_fallback", None)
                    if fallback is not None and fallback(r):  # a functional layer's tentative rows: the generic rule
                        self._report_generic()
                        continue
                    raise RuntimeError(
                        f"fastcurv.capture: {describe(layer.name, layer.module)} got [B*T, ...] rows "
                        f"{(r.input.shape[0] * r.input.shape[1],) + tuple(r.input.shape[2:])} with batch size "
                        f"{self.batch_size}{self._batch_origin()}, but its rows are not T consecutive rows per example "
                        "(the random-weighted check of the deltas failed): flattened from a sequence-first [T, B, ...] "
                        "tensor, or the batch is not what that module's dim 0 says. Flatten batch-first "
                        "(x.reshape(B * T, -1) of a [B, T, ...] tensor) or keep the [B, T, ...] layout for the layer."
                    )
                if not layer.supports_shared_input:
                    raise RuntimeError(
                        f"fastcurv.capture: dim 0 of the input {tuple(r.input.shape)} of {describe(layer.name, layer.module)} "
                        f"is not the batch although its size is the batch size {self.batch_size} (a sequence-first "
                        "[T, B, ...] layout with T == B?): its rows mix examples and every per-example quantity would be "
                        "wrong. Use batch-first layouts (batch_first=True) for the captured modules."
                    )
                r.shared = True  # its output is shared by the examples: per-example deltas below
                shared.append((layer, r))
            if shared and probes:
                done = self._resolve_upstream(losses, [r for _, r in shared], [r for r, _ in probes], found, create_graph)
                shared = [(layer, r) for layer, r in shared if id(r) not in done]
            if shared:
                self._say_shared([(layer, r) for layer, r in shared if r.edge is not None
                                  and not isinstance(layer, _ParameterLeaf)])
                leaves = [layer for layer, _ in shared if isinstance(layer, _ParameterLeaf)]
                if leaves:
                    _report_once(
                        f"fastcurv.capture: parameter(s) {', '.join(repr(l.name) for l in leaves)} are read directly by "
                        "a forward that is not their module's (none of their modules was called); their per-example "
                        "gradients take a batched backward of the graph above them (B vector-Jacobian products; exact).",
                        SharedInputWarning)
                found.update(self._per_example_deltas(losses, [r for _, r in shared], create_graph))
        if not found:
            raise RuntimeError(
                "fastcurv.capture: losses do not depend on any captured layer output (losses from another forward, "
                "or computed from detached outputs?)"
            )
        self._check_bypass(losses)
        out = []
        B = self.batch_size
        for layer in self.layers:
            ds = []
            for r in layer.records:
                d = found.get(id(r))
                if d is None:  # an output the losses do not depend on has delta exactly zero
                    d = torch.zeros((B,) + tuple(r.output.shape) if r.shared else r.output.shape,
                                    dtype=r.output.dtype, device=r.output.device)
                if r.rows_per_example > 1:
                    d = d.reshape(B, r.rows_per_example, *d.shape[1:])
                ds.append(d)
            out.append(ds[0] if len(ds) == 1 else ds)
        return out, extra

    def _find_leaves(self, losses) -> list:
        """Parameters the losses reach although none of their modules was called: read directly by another
        module's forward (DeBERTa-v2's encoder reads ``rel_embeddings.weight`` and feeds it to its LayerNorm and,
        through it, to every attention's query/key projections). Each is served as its own shared record: its
        per-example gradients are the per-example deltas at the parameter, from the batched backward that shared
        outputs take (a small batched vector-Jacobian product when its uses lead only into shared records already
        resolved, else B vector-Jacobian products of the graph above it, said once; exact either way)."""
        called = {id(p) for layer in self._layers if layer.records for _, p in layer.params}
        names = {id(p): n for layer in self._layers if not layer.records for n, p in layer.params}
        owner = {id(p): layer for layer in self._layers if not layer.records for _, p in layer.params}
        leaves, seen = [], set()
        for _, fn in _graph_edges(losses):
            var = getattr(fn, "variable", None)
            if var is not None and id(var) in names and id(var) not in called and id(var) not in seen:
                seen.add(id(var))
                leaves.append(_ParameterLeaf(names[id(var)], owner[id(var)].module, [(names[id(var)], var)]))
        order = {id(p): k for k, p in enumerate(self.model.parameters())}
        leaves.sort(key=lambda leaf: order[id(leaf.params[0][1])])
        return leaves

    def _check_losses(self, losses) -> None:
        if _trainable_flags(self.model) != self._flags:
            raise RuntimeError(
                "fastcurv.capture: requires_grad of some parameters changed after this forward was captured; the "
                "captured layers follow the flags at the start of the `with` block. Change requires_grad before "
                "entering the capture (a Capture re-reads the flags at each `with`)."
            )
        if not self._layers or all(not layer.records for layer in self._layers):
            raise RuntimeError(self._nothing_captured())
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
                f"{self._batch_origin()}. Per-example losses need one entry per example; a module whose input has the "
                "batch flattened into dim 0 (x.view(B * T, E)) gets a batch of B * T: keep the batch in dim 0."
            )
        if not losses.is_floating_point():
            raise TypeError(f"fastcurv.capture: losses must be floating point, got {losses.dtype}")
        device = next(r.output.device for layer in self.layers for r in layer.records)
        if losses.device != device:
            raise ValueError(f"fastcurv.capture: losses are on {losses.device} but the captured outputs on {device}")
        for layer in self.layers:
            layer.check_unchanged()
        if not losses.requires_grad or not any(r.edge is not None for l in self.layers for r in l.records):
            raise RuntimeError(
                "fastcurv.capture: losses are not connected to the captured outputs (no autograd graph: was the "
                "forward run under torch.no_grad(), or are the losses detached?)"
            )

    def _rows_of(self, layer: CapturedLayer, r) -> int:
        return r.input.shape[0] // self._batch

    @staticmethod
    def _rows_key(layer, r) -> tuple:
        return (layer.name, next(k for k, rr in enumerate(layer.records) if rr is r), tuple(r.input.shape),
                layer.module.training)

    def _rows_proven(self, layer: CapturedLayer, r) -> bool:
        """A regrouped record's layout is proven when its input is a contiguous flattening of a [B, ...]
        tensor (OPT's x.reshape(-1, d) before final_layer_norm), or when the random-weighted check passed
        on an earlier forward of this Capture with the same call, shape and train/eval mode (the check costs
        one backward: done once, not every step)."""
        base = r.input._base
        if base is not None and base.shape[:1] == (self.batch_size,) and base.numel() == r.input.numel() \
                and base.is_contiguous() and r.input.is_contiguous() and base.data_ptr() == r.input.data_ptr():
            return True
        key = self._rows_key(layer, r)
        if key in self._rows_verdicts:
            return True
        self._rows_verdicts[key] = True  # popped again if the check below fails
        return False

    def _ambiguous(self, layer: CapturedLayer, r) -> bool:
        return isinstance(r.input, torch.Tensor) and layer.layout_is_ambiguous(r.input, self.batch_size)

    def _interacting(self, losses, suspects, found) -> list:
        """Records among ``suspects`` whose delta rows are not per example: with weights w,
        d(sum_i w_i l_i)/dz must equal w_i * delta row i when row i belongs to example i only."""
        if not suspects:
            return []
        # powers of two: scaling an example's loss by 2^k scales its own deltas exactly (binary rounding is
        # scale-invariant), so per-example rows match to the last bit however ill-conditioned the graph is
        # (a tolerance on random weights refused HF ViT at B = 3 channels), and rows mixing examples with
        # different weights do not; distinct exponents for up to 8 examples, a random order beyond
        gen = torch.Generator(device="cpu").manual_seed(1234)
        B = losses.shape[0]
        exponents = (torch.arange(B) % 8 - 4)[torch.randperm(B, generator=gen)]
        w = torch.pow(2.0, exponents.to(torch.float64)).to(losses.device, losses.dtype)
        weighted = torch.autograd.grad((losses.detach().new_zeros(()) + (w * losses).sum()), [r.edge for r in suspects],
                                       retain_graph=True, allow_unused=True)
        bad = []
        for r, v in zip(suspects, weighted):
            d = found[id(r)].detach()
            v = torch.zeros_like(d) if v is None else v
            w_rows = w.repeat_interleave(r.rows_per_example)  # regrouped rows: T consecutive rows per example
            expect = w_rows.view(-1, *([1] * (d.ndim - 1))).to(d.dtype) * d
            tol = 1e-4 if d.dtype != torch.float64 else 1e-10
            if not torch.allclose(v, expect, rtol=tol, atol=tol * float(d.abs().max().clamp_min(1e-30))):
                bad.append(r)
        return bad

    def _broadcast_probes(self, losses, records) -> list:
        """Shared outputs whose only uses are ``batched + shared`` (nanoGPT's ``wte(idx) + wpe(pos)``), possibly
        after layout steps (T5's relative-position bias ``rel(buckets).permute(2, 0, 1).unsqueeze(0)``, added to
        every layer's scores): each add's output gradient, ``[B, ...]``, summed over the dims the shared tensor was
        broadcast along, is its per-example delta there; hooks on those add nodes give them during the ordinary
        backward, and a small batched vector-Jacobian product maps them back through the layout steps, with no
        batched backward of the model."""
        if not records:
            return []
        consumers: dict = {}
        for node, fn in _graph_edges(losses):
            if fn is not None:
                consumers.setdefault(fn, set()).add(node)
        probes = []
        for r in records:
            end, steps = r.edge.node, 0
            while True:
                users = consumers.get(end, set())
                if users and all(type(u).__name__ == "AddBackward0" and getattr(u, "_saved_alpha", None) == 1
                                 and sum(fn is end for fn, _ in u.next_functions) == 1 for u in users):
                    break
                if len(users) == 1 and _batch_repeat(next(iter(users)), self.batch_size):
                    break  # DeBERTa's pos_key_layer.repeat(B, 1, 1): example b's rows of the output
                if len(users) == 1 and steps < 8:
                    (user,) = users
                    if type(user).__name__ in _LAYOUT_NODES and len(user.next_functions) == 1:
                        end, steps = user, steps + 1
                        continue
                end = None
                break
            if end is not None:
                probes.append((r, _BroadcastProbe(r, end, steps, sorted(users, key=id))))
        return probes

    def _resolve_upstream(self, losses, pending, resolved, found, create_graph) -> set:
        """Shared records whose every use leads, through layout steps, only into the calls of shared records
        already resolved (DeBERTa-v2: ``LayerNorm(rel_embeddings.weight)`` feeds only the query/key projections of
        the relative positions, whose outputs meet the batch at ``.repeat(B, 1, 1)``; the table itself feeds only
        that LayerNorm): their per-example deltas are one small batched vector-Jacobian product from those
        records' per-example deltas, with no batched backward of the model. Returns the ids resolved."""
        consumers: dict = {}
        for node, fn in _graph_edges(losses):
            if fn is not None:
                consumers.setdefault(fn, set()).add(node)
        inside: dict = {}

        def nodes_of(r):
            if id(r) not in inside:
                inside[id(r)] = _record_nodes(r)
            return inside[id(r)]

        resolved = [r for r in resolved if id(r) in found]
        done: set = set()
        progress = True
        while progress:
            progress = False
            for r in pending:
                if id(r) in found or r.edge is None:
                    continue
                terminals, todo, seen, ok = [], [r.edge.node], set(), True
                while todo and ok:
                    node = todo.pop()
                    for user in consumers.get(node, ()):
                        if user in seen:
                            continue
                        seen.add(user)
                        hit = [rr for rr in resolved if rr is not r and user in nodes_of(rr)]
                        if hit:
                            terminals.extend(rr for rr in hit if all(rr is not t for t in terminals))
                        elif type(user).__name__ in _LAYOUT_NODES and len(user.next_functions) == 1:
                            todo.append(user)
                        else:
                            ok = False
                            break
                if not ok or not terminals:
                    continue
                grads = torch.autograd.grad([t.edge for t in terminals], [r.edge], [found[id(t)] for t in terminals],
                                            is_grads_batched=True, retain_graph=True, create_graph=create_graph,
                                            allow_unused=True)
                if grads[0] is None:
                    continue
                found[id(r)] = grads[0]
                resolved.append(r)
                done.add(id(r))
                progress = True
        return done

    @staticmethod
    def _say_shared(shared) -> None:
        if shared:
            names = ", ".join(f"{describe(layer.name, layer.module)} (input {tuple(r.input.shape)})" for layer, r in shared)
            _report_once(
                f"fastcurv.capture: {names} got an input without the batch dim, so its output is shared by the batch and "
                "its per-example deltas take a batched backward of the graph above it (B vector-Jacobian products, "
                "about B backward passes: GPT-2's position_ids [1, T] cost ~4x the whole step). Fix: give it the batch "
                "dim (position_ids.expand(B, -1)), or add its output straight onto a batched tensor (x + wpe(pos)), "
                "which is served without that backward.", SharedInputWarning)

    def _per_example_deltas(self, losses, records, create_graph) -> dict[int, torch.Tensor]:
        """``[B, *output]`` deltas of outputs shared by the examples: B vector-Jacobian products in one
        batched backward (``is_grads_batched``)."""
        B = losses.shape[0]
        eye = torch.eye(B, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(
            losses, [r.edge for r in records], grad_outputs=eye, is_grads_batched=True,
            create_graph=create_graph, retain_graph=True, allow_unused=True,
        )
        return {id(r): g for r, g in zip(records, grads) if g is not None}

    def _check_bypass(self, losses) -> None:
        """Refuse losses that reach a captured parameter other than through its own module's recorded
        forward (a parameter used outside its module, or part of the loss from a forward outside the
        capture): that contribution would be missing from every result. Two walks of the autograd
        graph: the nodes inside each recorded call (from its output down to its inputs), then every
        edge from the losses into a captured parameter must leave from a node of its own module."""
        owners: dict[int, list[CapturedLayer]] = {}
        names: dict[int, str] = {}
        for layer in self._layers:  # an uncalled module's parameters too: their uses must be some called module's
            for name, p in layer.params:
                owners.setdefault(id(p), []).append(layer)
                names[id(p)] = name
        inside: dict[int, set] = {}  # id(layer) -> autograd nodes created by its recorded calls
        for layer in self._layers:
            nodes = inside.setdefault(id(layer), set())
            for r in layer.records:  # one walk per record: a functional site's nodes lie inside its module's call
                nodes |= _record_nodes(r)
        leaves = {id(leaf.params[0][1]) for leaf in self._leaves or ()}  # every use counted by the batched backward
        for node, fn in _graph_edges(losses):
            var = getattr(fn, "variable", None)
            if var is not None and id(var) in owners and id(var) not in leaves:
                if not any(node in inside[id(layer)] for layer in owners[id(var)]):
                    raise RuntimeError(
                        f"fastcurv.capture: the losses depend on parameter '{names[id(var)]}' through a path that "
                        "does not go through its module's recorded forward: the parameter is used outside its "
                        "module (e.g. F.linear(x, other.weight)), or part of the loss comes from a forward outside "
                        "the capture. Its per-example gradient would be incomplete. Run the whole forward inside "
                        "the capture and use parameters only through their modules."
                    )

    # ---------------------------------------------------------------- results
    def _exact_per_example_grads(self, losses, create_graph) -> list[torch.Tensor]:
        """batchnorm="exact": true per-example gradients (examples coupled through batch statistics),
        one batched backward of the B losses w.r.t. the parameters."""
        self._check_losses(losses)
        params = [p for _, p in self.params]
        eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
        with _explain_second_backward(), torch.enable_grad():
            grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True,
                                        create_graph=create_graph, retain_graph=True, allow_unused=True)
        return [torch.zeros(eye.shape[0], *p.shape, dtype=p.dtype, device=p.device) if g is None else g
                for g, p in zip(grads, params)]

    def per_example_sqnorms_by_layer(self, losses: torch.Tensor, create_graph: bool = False) -> dict[str, torch.Tensor]:
        """``{module qualified name: [B]}`` squared norms of each layer's part of ``grad l_i``. A
        parameter shared by several layers adds an entry ``"shared:<param name>"`` holding the cross
        terms ``2 sum_{l<m} <g_l, g_m>``, so the values always sum to the total."""
        with _results_context(create_graph):
            if self._coupled:
                grads = dict(zip((id(p) for _, p in self.params), self._exact_per_example_grads(losses, create_graph)))
                return {
                    layer.name: sum(rows(grads[id(p)]).square().sum(1) for _, p in layer.params)
                    for layer in self.layers
                }
            return self._sqnorms_by_layer(self.deltas(losses, create_graph=create_graph))

    def _sqnorms_by_layer(self, deltas) -> dict[str, torch.Tensor]:
        result = {layer.name: layer.sqnorm(d) for layer, d in zip(self.layers, deltas)}
        for uses in self._shared.values():
            name = uses[0][0].params[uses[0][1]][0]
            result[f"shared:{name}"] = self._cross_terms(uses, deltas, gram=False)
        return result

    def per_example_sqnorms_and_gradient(self, losses: torch.Tensor, params) -> tuple[dict[str, torch.Tensor], list]:
        """:meth:`per_example_sqnorms_by_layer` (detached) and the gradient of ``losses.sum()`` w.r.t. ``params``
        (None where unused) from one backward, the one a training step makes anyway: per-example statistics of
        a step at almost no extra cost. The graph is retained (a penalty can still be backpropagated)."""
        params = list(params)
        with torch.no_grad():
            if self._coupled:
                per_example = self._exact_per_example_grads(losses, False)
                by_id = dict(zip((id(p) for _, p in self.params), per_example))
                by_layer = {layer.name: sum(rows(by_id[id(p)]).square().sum(1) for _, p in layer.params)
                            for layer in self.layers}
                return by_layer, [by_id[id(p)].sum(0) if id(p) in by_id else None for p in params]
            deltas, grads = self._deltas(losses, False, params)
            return self._sqnorms_by_layer(deltas), [g if g is None else g.detach() for g in grads]

    def per_example_sqnorms(self, losses: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """``[B]``: ``||grad_theta l_i||^2`` over every captured parameter requiring grad.

        ``losses`` are per-example losses ``[B]`` (``reduction="none"``); mean-scaled losses
        give results scaled by ``1/B^2``. ``create_graph=True``: differentiable w.r.t. the params
        (without it the result is detached: it has no gradient to give)."""
        return sum(self.per_example_sqnorms_by_layer(losses, create_graph=create_graph).values())

    def per_example_gram(self, losses: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """``[B, B]``: ``G_ij = <grad l_i, grad l_j>``; its diagonal is :meth:`per_example_sqnorms`."""
        with _results_context(create_graph):
            if self._coupled:
                flat = torch.cat([rows(g) for g in self._exact_per_example_grads(losses, create_graph)], 1)
                return flat @ flat.T
            deltas = self.deltas(losses, create_graph=create_graph)
            G = sum(layer.gram(d) for layer, d in zip(self.layers, deltas))
            for uses in self._shared.values():
                G = G + self._cross_terms(uses, deltas, gram=True)
            return G

    def per_example_grads(self, losses: torch.Tensor, create_graph: bool = False) -> dict[str, torch.Tensor]:
        """``{param name: [B, *param.shape]}``: the per-example gradients themselves (materialized,
        memory B x P: for checks and small models; the other methods avoid it)."""
        with _results_context(create_graph):
            if self._coupled:
                grads = self._exact_per_example_grads(losses, create_graph)
                return {name: g for (name, _), g in zip(self.params, grads)}
            deltas = self.deltas(losses, create_graph=create_graph)
            out: dict[int, torch.Tensor] = {}
            for layer, d in zip(self.layers, deltas):
                for (_, p), g in zip(layer.params, layer.per_example_grads(d)):
                    out[id(p)] = g if id(p) not in out else out[id(p)] + g
            B = self.batch_size
            # a parameter whose modules were never called has gradient exactly zero
            return {name: out[id(p)] if id(p) in out else torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device)
                    for name, p in self.params}

    def _cross_terms(self, uses, deltas, gram: bool) -> torch.Tensor:
        """``sum_{l != m} <g_l, g_m>`` over the uses of one shared parameter ([B] or [B, B])."""
        index = {id(layer): k for k, layer in enumerate(self.layers)}
        total = 0
        for a in range(len(uses)):
            for b in range(a + 1, len(uses)):
                (la, ka), (lb, kb) = uses[a], uses[b]
                da, db = deltas[index[id(la)]], deltas[index[id(lb)]]
                total = total + _pair_cross(la, ka, da, lb, kb, db, gram)
        return total


def _pair_cross(la, ka, da, lb, kb, db, gram: bool) -> torch.Tensor:
    """Cross term of one parameter used by layers la and lb: ``2 <g_a, g_b>`` per example ([B]) or
    ``<g_a,i, g_b,j> + <g_b,i, g_a,j>`` ([B, B]). A ghost form for the tied Embedding/Linear pair
    (GPT's wte / lm_head), else the two per-example gradients of that parameter."""
    # exact type: EmbeddingBagLayer subclasses EmbeddingLayer, but its rows come from bags
    if isinstance(la, LinearLayer) and type(lb) is EmbeddingLayer:
        la, ka, da, lb, kb, db = lb, kb, db, la, ka, da
    if type(la) is EmbeddingLayer and isinstance(lb, LinearLayer) and lb.params[kb][0].endswith("weight"):
        cross = _embedding_linear_cross(la, da, lb, db, gram)
        return cross + cross.T if gram else 2 * cross
    ga = rows(la.per_example_grads(da)[ka])
    gb = rows(lb.per_example_grads(db)[kb])
    if gram:
        return ga @ gb.T + gb @ ga.T
    return 2 * (ga * gb).sum(1)


def _embedding_linear_cross(emb, d_emb, lin, d_lin, gram: bool = False) -> torch.Tensor:
    """``<g_emb,i, g_lin,i>`` ([B]; or ``<g_emb,i, g_lin,j>``, [B, B]) for an Embedding weight tied to
    a Linear weight ``[V, D]``, without the [B, V, D] gradients:
    ``sum_{t in i, s in j} d_lin[j, s, tok_it] (delta_emb[i, t] . a_lin[j, s])``."""
    tok, de = emb._tokens_and_deltas(d_emb if isinstance(d_emb, list) else [d_emb])
    a, dl = lin.operands(d_lin if isinstance(d_lin, list) else [d_lin])  # [B, 1, S, D], [B, 1, S, V]
    a, dl = a[:, 0], dl[:, 0]
    tok = tok.long()
    keep = torch.ones_like(tok, dtype=torch.bool)
    if emb.module.padding_idx is not None:
        keep = tok != emb.module.padding_idx
    if not gram:
        picked = dl.gather(2, tok[:, None, :].expand(-1, dl.shape[1], -1))  # [B, S, T]: d_lin[s, tok_t]
        dots = a.to(de.dtype) @ de.transpose(1, 2)  # [B, S, T]: a_s . delta_t
        return (picked.to(dots.dtype) * dots * keep[:, None, :]).sum((1, 2))
    B, T = tok.shape
    picked = dl.index_select(2, tok.flatten()).view(B, dl.shape[1], B, T)  # [j, s, i, t]: d_lin[j, s, tok_it]
    dots = torch.einsum("jsd,itd->jsit", a.to(de.dtype), de)
    return torch.einsum("jsit,jsit,it->ij", picked.to(dots.dtype), dots, keep.to(dots.dtype))


def _trainable_flags(model: nn.Module) -> tuple:
    """``requires_grad`` of every parameter: the Capture's layers were chosen from these flags."""
    return tuple((id(p), p.requires_grad) for p in model.parameters())


def _graph_edges(losses: torch.Tensor):
    """Every edge ``(node, next node)`` of the autograd graph reachable from ``losses``, once per node."""
    seen, todo = set(), [losses.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for fn, _ in node.next_functions:
            yield node, fn
            if fn is not None:
                todo.append(fn)


# autograd nodes of layout steps (linear, one input, no data of their own): a shared tensor's per-example deltas map
# back through them exactly
_LAYOUT_NODES = {"PermuteBackward0", "UnsqueezeBackward0", "UnsqueezeBackward1", "ViewBackward0", "UnsafeViewBackward0",
                 "TransposeBackward0", "TransposeBackward1", "CloneBackward0", "SqueezeBackward0", "SqueezeBackward1",
                 "SqueezeBackward2", "ReshapeAliasBackward0", "ToCopyBackward0", "AliasBackward0", "SliceBackward0"}


class _BroadcastProbe:
    """The add nodes a shared output reaches (through ``steps`` layout nodes ending at ``end``) and, for the
    shape of ``end``'s output, a hook on ``end`` itself (see :meth:`Capture._broadcast_probes`)."""

    def __init__(self, record, end, steps, adds):
        self.record, self.end, self.steps = record, end, steps
        self.adds = [_GradProbe(a) for a in adds]
        self.shape_probe = _GradProbe(end) if steps else None

    def per_example(self, B: int, create_graph: bool):
        r = self.record
        shape = r.output.shape if self.shape_probe is None else getattr(self.shape_probe.delta, "shape", None)
        if shape is None:
            return None
        like = torch.empty(shape, device="meta")
        if len(self.adds) == 1 and type(self.adds[0].node).__name__ == "RepeatBackward0":
            g = self.adds[0].delta
            parts = [None if g is None or g.shape[0] != B * shape[0] else g.reshape(B, *shape)]
        else:
            parts = [_broadcast_delta(p.delta, like, B) for p in self.adds]
        if any(d is None for d in parts):
            return None
        delta = sum(parts)
        if self.steps:
            delta = torch.autograd.grad([GradientEdge(self.end, 0)], [r.edge], [delta], is_grads_batched=True,
                                        retain_graph=True, create_graph=create_graph)[0]
        return delta

    def remove(self):
        for p in self.adds + ([self.shape_probe] if self.shape_probe is not None else []):
            p.remove()


def _batch_repeat(node, B: int) -> bool:
    """``x.repeat(B, 1, ...)``: the output is B copies of x stacked in dim 0, copy b being example b's."""
    repeats = getattr(node, "_saved_repeats", None) if type(node).__name__ == "RepeatBackward0" else None
    return bool(repeats) and B > 1 and repeats[0] == B and all(r == 1 for r in repeats[1:])


class _GradProbe:
    """Keeps the gradient arriving at an autograd node's output during one backward."""

    def __init__(self, node):
        self.node = node
        self.delta = None
        self.handle = node.register_prehook(self)

    def __call__(self, grad_outputs):
        self.delta = grad_outputs[0]

    def remove(self):
        self.handle.remove()


def _push_active(module, args):
    active_calls().append(module)


def _pop_active(module, args, output):
    calls = active_calls()
    if calls and calls[-1] is module:
        calls.pop()


def _record_nodes(r) -> set:
    """The autograd nodes a recorded call created: from its output's edge down to its inputs."""
    stop = {t.grad_fn for t in _tensors(r.args, r.kwargs, r.input) if t.grad_fn is not None}
    return walk_graph([r.edge.node if r.edge is not None else None], stop)


def _tensors(args, kwargs, first) -> list[torch.Tensor]:
    items = list(args) + list(kwargs.values()) + [first]
    return [t for t in items if isinstance(t, torch.Tensor)]


class _FrozenStatsForward:
    """batchnorm="frozen_stats": the BatchNorm's forward while captured (see layers/norm.py)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.original = type(module).forward

    def __call__(self, x):
        if not uses_batch_stats(self.module):
            return self.original(self.module, x)
        if self.original not in _STOCK_BATCHNORM_FORWARDS:  # its own forward (BatchNormAct2d): keep what else it does
            with frozen_batch_norm_calls():
                return self.original(self.module, x)
        return frozen_stats_forward(self.module, x)


_STOCK_BATCHNORM_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.BatchNorm1d.forward, nn.BatchNorm2d.forward,
                             nn.BatchNorm3d.forward}


@contextlib.contextmanager
def _results_context(create_graph: bool):
    """Results without create_graph are detached: backpropagating them would give partial gradients."""
    if create_graph:
        yield
    else:
        with torch.no_grad():
            yield


@contextlib.contextmanager
def _explain_second_backward():
    try:
        yield
    except RuntimeError as exc:
        if "backward through the graph a second time" in str(exc):
            raise RuntimeError(
                "fastcurv.capture: the forward graph was already freed by a backward() (e.g. loss.backward() before "
                "cap.per_example_sqnorms(losses)). Ask for the per-example quantities first, or call "
                "backward(retain_graph=True)."
            ) from exc
        raise


def _broadcast_delta(grad, shared_output, B: int):
    """Per-example deltas ``[B, *shared_output.shape]`` of an output shared by the batch and added to a
    batched tensor, from the add's output gradient ``grad`` ``[B, ...]`` (row i is example i's: the rows of
    a batched sum): example i's delta is row i summed over the dims the shared output was broadcast
    along (``[1, T, D]`` or ``[T, D]`` onto ``[B, T, D]``). None when the shapes do not say so unambiguously
    (a non-batch dim of size B: then the batched backward decides)."""
    if grad is None or grad.ndim < 1 or grad.shape[0] != B or B in tuple(grad.shape[1:]):
        return None
    shape = tuple(shared_output.shape)
    if len(shape) > grad.ndim:
        return None
    padded = (1,) * (grad.ndim - len(shape)) + shape
    if padded[0] != 1 or any(p not in (1, g) for p, g in zip(padded[1:], grad.shape[1:])):
        return None
    dims = tuple(k for k in range(1, grad.ndim) if padded[k] == 1 and grad.shape[k] != 1)
    summed = grad.sum(dims, keepdim=True) if dims else grad
    return summed.reshape((B,) + shape)


class _ParameterLeaf(CapturedLayer):
    """A parameter read directly, outside any called module of its own (see :meth:`Capture._find_leaves`): one
    shared record whose "output" is the parameter, so its per-example delta ``[B, *shape]`` is the per-example
    gradient."""

    supports_shared_input = True

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        p = params[0][1]
        self.records.append(Record(p, p, shared=True, versions=(p._version, p._version)))

    def clear(self) -> None:
        pass  # built per forward by the capture

    def _per_example_grads(self, deltas):
        return [sum(deltas)]


class SharedInputWarning(UserWarning):
    """A module got an input without the batch dim and its per-example deltas take a batched backward (said once)."""


class GenericRuleWarning(UserWarning):
    """Some modules go through the exact but materialized generic rule (said once per set of modules)."""


_reported: set[str] = set()


def _report_once(message: str, category: type = GenericRuleWarning) -> None:
    if message not in _reported:
        _reported.add(message)
        warnings.warn(message, category, stacklevel=3)


def _refuse_scripted(name: str, module: nn.Module) -> None:
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise TypeError(
            f"fastcurv.capture: {describe(name, module)} is a torch.jit.script-ed module holding parameters requiring "
            f"grad {trainable}; a ScriptModule cannot be hooked, so its per-example gradients cannot be captured. "
            f"Capture the module before scripting it, freeze it, or pass ignore=['{name}']."
        )


class _RecordHook:
    """Forward hook of one captured layer. Holds the capture only while registered."""

    def __init__(self, layer: CapturedLayer, cap: Capture):
        self.layer, self.cap = layer, cap

    def __call__(self, module, args, kwargs, output):
        if replaying():
            return None
        if any(t.is_inference() for t in tree_leaves(output) if isinstance(t, torch.Tensor)):
            raise RuntimeError(
                f"fastcurv.capture: {describe(self.layer.name, module)} ran under torch.inference_mode() inside the "
                "captured forward: its output is an inference tensor, outside autograd, so no loss can depend on its "
                "parameters through it. Use torch.no_grad() there (its parameters then get zero gradient), freeze "
                f"it, or pass ignore=['{self.layer.name}']."
            )
        inp = self.layer.batch_witness(args, kwargs, output)
        shared = self.cap._on_record(self.layer, inp)
        replacement = self.layer.record(args, kwargs, output)
        if isinstance(shared, tuple):  # [B*T, ...] rows: regrouped to [B, T, ...] (the deltas too, in deltas())
            rec, shared = self.layer.records[-1], False
            rec.rows_per_example = shared_rows = self.cap._rows_of(self.layer, rec)
            rec.input = rec.input.reshape(rec.input.shape[0] // shared_rows, shared_rows, *rec.input.shape[1:])
        if shared:
            self.layer.records[-1].shared = True
        return replacement


class _BatchNormCheck:
    """Forward pre-hook on every BatchNorm: refuse batch statistics (examples would interact), or
    note them for batchnorm="exact"."""

    def __init__(self, name: str, cap: Capture):
        self.name, self.cap = name, cap

    def __call__(self, module, args):
        if replaying() or not uses_batch_stats(module):
            return
        if self.cap.batchnorm == "exact":
            self.cap._coupled.append(describe(self.name, module))
            return
        why = "is in train mode" if module.training else "has no running statistics (track_running_stats=False)"
        raise RuntimeError(
            f"fastcurv.capture: {describe(self.name, module)} {why}, so it normalizes with batch statistics and "
            "examples interact through them: dl_i/dz_i is no longer example i's gradient. Choose: "
            "capture(model, batchnorm='frozen_stats') (per-example gradients with the batch statistics held constant; "
            "cheap), batchnorm='exact' (true per-example gradients including the coupling; B backward passes), or "
            "model.eval() (running statistics)."
        )


def capture(
    model: nn.Module,
    ignore: Iterable[Union[nn.Module, str]] = (),
    strict: bool = False,
    batchnorm: str = "refuse",
) -> Capture:
    """Context manager recording ``model``'s trainable modules during a forward.

    Args:
        model: any ``nn.Module`` (not a ``torch.compile`` wrapper).
        ignore: modules or qualified names whose sub-trees are left out: their parameters are not
            counted in any result.
        strict: refuse modules without a fast rule instead of serving them with the generic rule.
        batchnorm: what to do with BatchNorms that normalize with batch statistics: ``"refuse"``
            (default), ``"frozen_stats"`` or ``"exact"`` (see the module docstring).

    Returns a :class:`Capture`; see the module docstring for the rules and the loss scaling.
    ``fastcurv.capture(model)`` and ``fastcurv.capture.capture(model)`` are the same call.
    """
    return Capture(model, ignore, strict=strict, batchnorm=batchnorm)


class _CallableModule(types.ModuleType):
    """Lets ``fastcurv.capture(model)`` work while ``fastcurv.capture`` stays this module (so that
    ``fastcurv.capture.capture`` / ``fastcurv.capture.Capture`` keep working too)."""

    def __call__(self, model, ignore=(), strict=False, batchnorm="refuse") -> Capture:
        return capture(model, ignore, strict=strict, batchnorm=batchnorm)


sys.modules[__name__].__class__ = _CallableModule
