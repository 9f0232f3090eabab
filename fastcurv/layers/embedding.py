"""nn.Embedding rows: ``g_i[v] = sum_{t: tok_it = v} delta_it`` (padding_idx excluded).

Per (example, token) sums ``S_u`` over the distinct pairs u of the batch (index_add, O(B T D)):
``s_i = sum_{u in i} ||S_u||^2``; the other quantities pair the u's with equal tokens. Several
calls of one module concatenate their tokens, so repeated uses of a row add up before squaring."""
from __future__ import annotations

import math

import torch
from torch import nn

from fastcurv.layers.base import CapturedLayer, batched_pairs, describe
from fastcurv.layers.registry import register

__all__ = ["EmbeddingLayer"]


@register(nn.Embedding)
class EmbeddingLayer(CapturedLayer):
    supports_shared_input = True
    regroups_rows = True

    def __init__(self, name, module, params):
        if module.scale_grad_by_freq:  # refused outright: the generic rule could not see it either
            raise ValueError(
                f"fastcurv.capture: {describe(name, module)} has scale_grad_by_freq=True: its gradient is scaled by "
                "token counts over the whole batch, so examples interact; per-example gradients are undefined"
            )
        super().__init__(name, module, params)
        self._index = None

    def _cache_clear(self):
        self._index = None

    def check_input(self, inp):
        if not isinstance(inp, torch.Tensor) or inp.ndim < 1 or inp.is_floating_point():
            shape = tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} got input {shape}; expected integer "
                "tokens [B, *] with dim 0 the batch"
            )

    def _tokens_and_deltas(self, deltas):
        pairs = batched_pairs(self, deltas)
        B = pairs[0][1].shape[0]
        D = self.module.embedding_dim
        toks = [tok.reshape(B, math.prod(tok.shape[1:])) for tok, _ in pairs]
        ds = [d.reshape(B, t.shape[1], D) for t, (_, d) in zip(toks, pairs)]
        if len(toks) == 1:
            return toks[0], ds[0]
        return torch.cat(toks, 1), torch.cat(ds, 1)

    def _indices(self, tok):
        if self._index is None:  # tokens do not change: group once per forward
            B, T = tok.shape
            V = self.module.num_embeddings
            tok = tok.long()
            keep = torch.ones_like(tok, dtype=torch.bool)
            if self.module.padding_idx is not None:
                keep = tok != self.module.padding_idx  # padding rows get no gradient
            keys = (torch.arange(B, device=tok.device)[:, None] * V + tok)[keep]
            uniq, inverse = torch.unique(keys, return_inverse=True)
            self._index = (keep, inverse, uniq // V, uniq % V, uniq.numel())
        return self._index

    def sums(self, deltas):
        """``(S [U, D], example [U], token [U])``: per (example, token) summed deltas."""
        tok, d = self._tokens_and_deltas(deltas)
        keep, inverse, example, token, U = self._indices(tok)
        d = d[keep]
        sums = d.new_zeros(U, d.shape[-1]).index_add(0, inverse, d)
        return sums, example, token

    def _per_example_grads(self, deltas):
        sums, example, token = self.sums(deltas)
        B = self.batch_size_hint(deltas)
        g = sums.new_zeros(B, *self.module.weight.shape)
        return [g.index_put((example, token), sums)]

    def _sqnorm(self, deltas):
        sums, example, _ = self.sums(deltas)
        return sums.new_zeros(self.batch_size_hint(deltas)).index_add(0, example, sums.square().sum(1))

    def _gram(self, deltas):
        sums, example, token = self.sums(deltas)
        B = self.batch_size_hint(deltas)
        same_token = (token[:, None] == token[None, :]).to(sums.dtype)
        onehot = (example[:, None] == torch.arange(B, device=example.device)).to(sums.dtype)  # [U, B]
        return onehot.T @ ((sums @ sums.T) * same_token) @ onehot

    def _dot(self, deltas, vectors):
        K = vectors[0].shape[0]
        sums, example, token = self.sums(deltas)
        picked = vectors[0].to(sums.dtype)[:, token]  # [K, U, D]: only the rows this batch touched
        per_pair = torch.einsum("ud,kud->uk", sums, picked)
        return sums.new_zeros(self.batch_size_hint(deltas), K).index_add(0, example, per_pair)

    def _weighted_grad_sum(self, deltas, coeffs):
        K = coeffs.shape[1]
        sums, example, token = self.sums(deltas)
        contrib = torch.einsum("uk,ud->kud", coeffs.to(sums.dtype)[example], sums)
        out = sums.new_zeros(K, *self.module.weight.shape)
        return [out.index_add(1, token, contrib)]
