"""nn.RNN / nn.LSTM / nn.GRU: exact per-example gradients from an unrolled forward.

The fused RNN kernels hide the per-step gate pre-activations, so while captured the module's
output is replaced by an unrolled Python forward with the module's own parameters (the same math
as PyTorch's: RNN tanh/relu; LSTM gates i, f, g, o, optional ``proj_size``; GRU gates r, z, n
with ``b_hn`` inside ``r * (W_hn h + b_hn)``). The fused forward still runs first (the capture's
hook sees its result) and is discarded.

Per layer and direction every weight is a linear map applied once per step, so its per-example
gradient is ``sum_t delta_t^T a_t`` and the Linear machinery computes its norms and Gram matrices
(one :class:`~fastcurv.layers.linear.LinearLayer` per site, T = sequence length):

* ``ih``: ``gi = x W_ih^T + b_ih``, computed for all steps at once; its delta is ``dl/dgi``.
* ``hh``: ``gh_t = h_{t-1} W_hh^T + b_hh``, one per step. RNN and LSTM add ``gi_t + gh_t``, so
  its delta is ``dl/dgi`` again (input: the states ``h_{t-1}`` stacked by time). GRU's n gate
  uses ``r * gh_n``: a zero "probe" ``[B, T, 3H]`` is added to the ``gh_t`` so that ``dl/dprobe``
  is exactly ``dl/dgh`` (the factor ``r`` included, so ``b_hn`` comes out exact).
* ``hr`` (LSTM with ``proj_size``): ``h_t = m_t W_hr^T`` with ``m_t = o * tanh(c_t)``, probed the same way.

Records per call: first the call itself (input batch-first, output the returned output; its delta
is not used, but its graph covers every use of the parameters, which the capture's bypass check
walks), then per layer and direction ``gi`` and the probes; each serves one or two sites.

Dropout between layers (``dropout > 0`` in train mode): the captured forward draws its own masks,
so its output differs from an uncaptured forward's; the per-example quantities are those of the
captured forward's losses. PackedSequence inputs are refused (pad them; masking the padded steps
in the loss gives the same per-example gradients for a unidirectional RNN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from fastcurv.layers.base import CapturedLayer, Record, _versions, describe
from fastcurv.layers.linear import LinearLayer
from fastcurv.layers.registry import register

__all__ = ["RecurrentLayer"]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


class _LinearSite:
    """One weight (and bias) of the RNN seen as an nn.Linear: what LinearLayer reads."""

    def __init__(self, weight: nn.Parameter, bias):
        self.weight, self.bias = weight, bias


@register(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentLayer(CapturedLayer):
    """Unrolled forward while captured; per-site Linear rules (see the module docstring)."""

    min_batched_ndim = 3

    def layout_is_ambiguous(self, inp, batch_size):
        return False  # the rule reads the batch from the module's own batch_first flag

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        qualified = {id(p): n for n, p in params}
        self.directions = 2 if module.bidirectional else 1
        #: (kind, layer, direction) -> Linear rule over that site's records; trainable sites only
        self.sites: dict[tuple, LinearLayer] = {}
        for k in range(module.num_layers):
            for d in range(self.directions):
                for kind in ("ih", "hh", "hr"):
                    w = getattr(module, f"weight_{kind}{self._suffix(k, d)}", None)
                    b = getattr(module, f"bias_{kind}{self._suffix(k, d)}", None)
                    used = [p for p in (w, b) if p is not None and p.requires_grad]
                    if w is None or not used:
                        continue
                    site_params = [(qualified[id(p)], p) for p in used]
                    self.sites[(kind, k, d)] = LinearLayer(site_params[0][0], _LinearSite(w, b), site_params)
        self._slots: list = []  # per record: the keys of the sites its delta serves (none for a call record)

    @staticmethod
    def _suffix(k: int, d: int) -> str:
        return f"_l{k}" + ("_reverse" if d else "")

    def clear(self) -> None:
        super().clear()
        self._slots = []
        for site in self.sites.values():
            site.clear()

    # ------------------------------------------------------------------ recording
    def batch_witness(self, args, kwargs, output):
        x = self._sequence_input(args, kwargs)
        return x if self.module.batch_first else x.transpose(0, 1)

    def _sequence_input(self, args, kwargs) -> torch.Tensor:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, PackedSequence):
            raise TypeError(
                f"fastcurv.capture: {describe(self.name, self.module)} got a PackedSequence; the capture's unrolled "
                "forward needs a padded tensor [B, T, *] (batch_first) or [T, B, *]. Pad it "
                "(torch.nn.utils.rnn.pad_packed_sequence) and mask the padded steps in the loss (for a bidirectional "
                "RNN the reverse direction then also reads the padding)."
            )
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            layout = "[B, T, input_size]" if self.module.batch_first else "[T, B, input_size]"
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} got input {shape}; expected a batched sequence "
                f"{layout} (an unbatched [T, input_size] sequence has no batch dim: add one with unsqueeze)"
            )
        return x

    def record(self, args, kwargs, output):
        m = self.module
        x = self._sequence_input(args, kwargs)
        x_bf = x if m.batch_first else x.transpose(0, 1)
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        h0, c0 = (hx if isinstance(hx, (tuple, list)) else (hx, None)) if hx is not None else (None, None)
        out_bf, h_n, c_n, recorded = self._unrolled(x_bf, h0, c0)
        out = out_bf if m.batch_first else out_bf.transpose(0, 1).contiguous()
        # the call record first: the capture's bypass check walks records in order and stops at
        # nodes already seen, so the widest walk (all of this call's graph) must come first
        given = tuple(t for t in (x, h0, c0) if isinstance(t, torch.Tensor))
        self.records.append(Record(x_bf, out, args=given, versions=_versions(x_bf, out)))
        self._slots.append(())
        for rec, site_records in recorded:
            self.records.append(rec)
            self._slots.append(tuple(key for key, _ in site_records))
            for key, site_record in site_records:
                self.sites[key].records.append(site_record)
        return (out, (h_n, c_n)) if m.mode == "LSTM" else (out, h_n)

    def _initial_state(self, given, size: int, B: int, like: torch.Tensor) -> torch.Tensor:
        """``[num_layers * directions, B, size]``; a given state's shape was checked by the fused forward."""
        if given is not None:
            return given
        return like.new_zeros(self.module.num_layers * self.directions, B, size)

    def _unrolled(self, x, h0, c0):
        """``x [B, T, in]`` -> (output [B, T, D*H_out], h_n, c_n or None, recorded), recorded as in :meth:`_direction`."""
        m = self.module
        B = x.shape[0]
        h_size = m.proj_size if getattr(m, "proj_size", 0) else m.hidden_size
        h0 = self._initial_state(h0, h_size, B, x)
        if m.mode == "LSTM":
            c0 = self._initial_state(c0, m.hidden_size, B, x)
        records, h_last, c_last = [], [], []
        for k in range(m.num_layers):
            if k > 0 and m.dropout > 0 and m.training:
                x = F.dropout(x, m.dropout, training=True)  # own masks: see the module docstring
            outs = []
            for d in range(self.directions):
                s = k * self.directions + d
                o, h, c, recs = self._direction(k, d, x, h0[s], c0[s] if c0 is not None else None)
                outs.append(o)
                h_last.append(h)
                c_last.append(c)
                records.extend(recs)
            x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        c_n = torch.stack(c_last) if m.mode == "LSTM" else None
        return x, torch.stack(h_last), c_n, records

    def _probe(self, kind, k, d, shape, like):
        """Zeros added to a per-step linear output: d loss / d probe is that output's delta."""
        if (kind, k, d) not in self.sites:
            return None
        return torch.zeros(shape, dtype=like.dtype, device=like.device, requires_grad=torch.is_grad_enabled())

    def _direction(self, k, d, x, h, c):
        m = self.module
        sfx = self._suffix(k, d)
        w_ih, w_hh = getattr(m, f"weight_ih{sfx}"), getattr(m, f"weight_hh{sfx}")
        b_ih, b_hh = getattr(m, f"bias_ih{sfx}", None), getattr(m, f"bias_hh{sfx}", None)
        w_hr = getattr(m, f"weight_hr{sfx}", None)
        B, T, _ = x.shape
        gi = F.linear(x, w_ih, b_ih)  # all steps at once: [B, T, gates * hidden]
        # RNN / LSTM: gh_t's delta is gi_t's; GRU needs its own (see the module docstring)
        probe_hh = self._probe("hh", k, d, (B, T, w_hh.shape[0]), x) if m.mode == "GRU" else None
        probe_hr = self._probe("hr", k, d, (B, T, w_hr.shape[0]), x) if w_hr is not None else None
        h_before, m_steps, outs = [None] * T, [None] * T, [None] * T  # all indexed by time
        for t in range(T - 1, -1, -1) if d else range(T):
            h_before[t] = h
            gh = F.linear(h, w_hh, b_hh)
            if probe_hh is not None:
                gh = gh + probe_hh[:, t]
            if m.mode == "LSTM":
                i, f, g, o = (gi[:, t] + gh).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if w_hr is not None:
                    m_steps[t] = h
                    h = F.linear(h, w_hr)
                    if probe_hr is not None:
                        h = h + probe_hr[:, t]
            elif m.mode == "GRU":
                i_r, i_z, i_n = gi[:, t].chunk(3, 1)
                h_r, h_z, h_n = gh.chunk(3, 1)
                r = torch.sigmoid(i_r + h_r)
                z = torch.sigmoid(i_z + h_z)
                n = torch.tanh(i_n + r * h_n)
                h = (1 - z) * n + z * h
            else:
                pre = gi[:, t] + gh
                h = torch.tanh(pre) if m.mode == "RNN_TANH" else torch.relu(pre)
            outs[t] = h
        # [(record for the capture, [(site key, that site's record)])]: a site record has the site's
        # input and the output whose delta is the site's delta
        ih, hh, hr = ("ih", k, d), ("hh", k, d), ("hr", k, d)
        recorded, on_gi = [], []
        gi_record = Record(x, gi, versions=_versions(x, gi))
        if ih in self.sites:
            on_gi.append((ih, gi_record))
        if hh in self.sites:
            a = torch.stack(h_before, dim=1)
            output = probe_hh if probe_hh is not None else gi
            site_record = Record(a, output, versions=_versions(a, output))
            if probe_hh is not None:
                recorded.append((site_record, [(hh, site_record)]))
            else:
                on_gi.append((hh, site_record))
        if on_gi:
            recorded.insert(0, (gi_record, on_gi))
        if probe_hr is not None:
            a = torch.stack(m_steps, dim=1)
            site_record = Record(a, probe_hr, versions=_versions(a, probe_hr))
            recorded.append((site_record, [(hr, site_record)]))
        return torch.stack(outs, dim=1), h, c, recorded

    # ------------------------------------------------------------------ quantities: sums over the sites
    def _per_site(self, deltas):
        """[(site, its deltas)] for the sites recorded so far, deltas in record order."""
        grouped: dict[tuple, list] = {}
        for keys, delta in zip(self._slots, deltas):
            for key in keys:
                grouped.setdefault(key, []).append(delta)
        return [(self.sites[key], ds) for key, ds in grouped.items()]

    def _per_example_grads(self, deltas):
        by_param = {}
        for site, ds in self._per_site(deltas):
            for (_, p), g in zip(site.params, site.per_example_grads(ds)):
                by_param[id(p)] = g
        return [by_param[id(p)] for _, p in self.params]

    def _sqnorm(self, deltas):
        return sum(site.sqnorm(ds) for site, ds in self._per_site(deltas))

    def _gram(self, deltas):
        return sum(site.gram(ds) for site, ds in self._per_site(deltas))

    def _dot(self, deltas, vectors):
        by_param = {id(p): v for (_, p), v in zip(self.params, vectors)}
        return sum(site.dot(ds, [by_param[id(p)] for _, p in site.params]) for site, ds in self._per_site(deltas))

    def _weighted_grad_sum(self, deltas, coeffs):
        by_param = {}
        for site, ds in self._per_site(deltas):
            for (_, p), w in zip(site.params, site.weighted_grad_sum(ds, coeffs)):
                by_param[id(p)] = w
        return [by_param[id(p)] for _, p in self.params]
