"""nn.EmbeddingBag: one example per bag, rows ``[B, L]`` of a 2-D input or the bags that 1-D tokens
and ``offsets`` define (``include_last_offset`` too).

Bag ``b``'s gradient touches the rows of its tokens: ``g_b[v] = sum_{t in b, tok_t = v} w_t delta_b``
with ``w_t = 1`` (sum), ``per_sample_weights[t]`` (sum) or ``1 / (non-padding tokens in b)``
(mean); padding_idx entries are left out. In max mode each embedding dim ``d`` takes its gradient
only at the row of the token that won the max: ``g_b[v, d] = delta_b[d] [argmax_b[d] = v]``.
Either way the gradient is a set of per-(bag, token) row vectors, so the Embedding rule's
quantities (norms, Gram, dot, weighted sums from per-(example, token) sums) serve it unchanged;
only :meth:`sums` differs. A token repeated in a bag adds up before squaring.

Penalties (``create_graph=True``) through *trainable* ``per_sample_weights`` (a gate computed by
layers before the bag) cannot be differentiated: those layers' deltas pass through embedding_bag's
per_sample_weights backward, which PyTorch cannot differentiate (it raises). Norms and Gram
matrices are exact there; for the penalty, write the bag as
``(weights[..., None] * embedding(tokens)).sum(1)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastcurv.layers.embedding import EmbeddingLayer
from fastcurv.layers.registry import register

__all__ = ["EmbeddingBagLayer"]

_MODE_MAX = 2  # torch.embedding_bag's mode code


@dataclass
class BagEntries:
    """One call's contributions: entry k adds ``scale[k] * delta[bag[k]]`` (restricted to dim
    ``column[k]`` in max mode) to the row ``token[k]`` of bag ``bag[k]``'s gradient."""

    bag: torch.Tensor
    token: torch.Tensor
    scale: Optional[torch.Tensor] = None  # None: 1
    column: Optional[torch.Tensor] = None  # max mode only


@register(nn.EmbeddingBag)
class EmbeddingBagLayer(EmbeddingLayer):
    regroups_rows = False  # its examples are bags
    supports_shared_input = False  # every call is batched: [B, L], or 1-D tokens with B bags

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        self._calls: list[BagEntries] = []

    def clear(self):
        super().clear()
        self._calls = []  # one per record, made when the call was recorded

    @staticmethod
    def _call_args(args, kwargs) -> tuple:
        bound = dict(zip(("input", "offsets", "per_sample_weights"), args))
        bound.update(kwargs)
        return bound.get("input"), bound.get("offsets"), bound.get("per_sample_weights")

    def batch_witness(self, args, kwargs, output):
        return output  # the bags are the examples: 1-D tokens have one row per token, not per bag

    @property
    def batch_size(self) -> int:
        return self.records[0].output.shape[0]

    def batch_size_hint(self, deltas) -> int:
        return self.records[0].output.shape[0]

    def record(self, args, kwargs, output):
        super().record(args, kwargs, output)
        tokens, offsets, weights = self._call_args(args, kwargs)  # validated by the forward that just ran
        self._calls.append(self._entries(tokens, offsets, weights, output.shape[0]))
        return None

    def _entries(self, tokens, offsets, weights, n_bags) -> BagEntries:
        m = self.module
        device = tokens.device
        tokens = tokens.long()
        if tokens.ndim == 2:  # [B, L]: bag b is row b
            B, L = tokens.shape
            flat = tokens.reshape(-1)
            offsets = torch.arange(0, B * L, L, device=device)
            include_last = False
            bag = torch.arange(B, device=device).repeat_interleave(L)
            in_a_bag = torch.ones_like(flat, dtype=torch.bool)
        else:  # 1-D tokens, bag b = tokens[offsets[b] : offsets[b + 1]]
            flat, offsets, include_last = tokens, offsets.long(), m.include_last_offset
            position = torch.arange(flat.numel(), device=device)
            bag = torch.bucketize(position, offsets[1:n_bags], right=True)
            end = offsets[n_bags] if include_last else flat.numel()
            in_a_bag = position < end  # (offsets[0] == 0 is enforced by the forward)
        keep = in_a_bag if m.padding_idx is None else in_a_bag & (flat != m.padding_idx)
        counts = torch.zeros(n_bags, dtype=torch.long, device=device).index_add(0, bag[keep], torch.ones_like(bag[keep]))
        if m.mode == "max":
            with torch.no_grad():  # the row that won each (bag, dim), as the forward chose it
                winners = torch.embedding_bag(m.weight, flat, offsets, False, _MODE_MAX, False, None, include_last,
                                              m.padding_idx)[3]
            bag, column = (counts > 0)[:, None].expand_as(winners).nonzero(as_tuple=True)  # empty bags: no gradient
            return BagEntries(bag, winners[bag, column].long(), column=column)
        bag, token = bag[keep], flat[keep]
        if weights is not None:  # sum mode only (PyTorch refuses them otherwise)
            return BagEntries(bag, token, scale=weights.reshape(-1)[keep])
        if m.mode == "mean":
            return BagEntries(bag, token, scale=counts[bag].to(m.weight.dtype).reciprocal())
        return BagEntries(bag, token)

    def _tokens_and_deltas(self, deltas):
        # the Embedding rule's one-delta-per-token layout does not hold for bags: fail loudly, never reshape
        raise NotImplementedError(
            "fastcurv.capture: EmbeddingBagLayer has no per-token deltas (one delta per bag); use sums() (internal error, "
            "please report)"
        )

    def _bag_index(self):
        if self._index is None:  # tokens do not change: group once per forward
            V = self.module.num_embeddings
            keys = torch.cat([c.bag * V + c.token for c in self._calls])
            uniq, inverse = torch.unique(keys, return_inverse=True)
            self._index = (inverse.split([c.bag.numel() for c in self._calls]), uniq // V, uniq % V, uniq.numel())
        return self._index

    def sums(self, deltas):
        """``(S [U, D], bag [U], token [U])``: per (bag, token) gradient rows, all calls summed."""
        inverses, example, token, U = self._bag_index()
        dtype = torch.promote_types(deltas[0].dtype, self.module.weight.dtype)
        sums = deltas[0].new_zeros(U, self.module.embedding_dim, dtype=dtype)
        for call, inverse, delta in zip(self._calls, inverses, deltas):
            delta = delta.to(dtype)
            if call.column is not None:  # max: one dim of the bag's delta to the winning row
                sums = sums.index_put((inverse, call.column), delta[call.bag, call.column], accumulate=True)
                continue
            rows = delta[call.bag]
            if call.scale is not None:
                rows = rows * call.scale.to(dtype)[:, None]
            sums = sums.index_add(0, inverse, rows)
        return sums, example, token
