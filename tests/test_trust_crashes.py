"""Cases that crashed (issue 17): each is now exact (against a float64 per-example loop) or a clean error."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv.curvature import EmpiricalFisher

DT = torch.float64


class RecurrentHead(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class ReusedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.att(x, x, x)[0].mean(1))


MULTI_RECORD = {"lstm": lambda: RecurrentHead(nn.LSTM), "gru": lambda: RecurrentHead(nn.GRU),
                "reused_linear": ReusedLinear, "attention": Attention}


def _inputs(name, B=5):
    g = torch.Generator().manual_seed(3)
    shape = (B, 4) if name == "reused_linear" else (B, 3, 4)
    return torch.randn(*shape, generator=g, dtype=DT), torch.randint(0, 3, (B,), generator=g)


def _per_example_grad_rows(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", sorted(MULTI_RECORD))
def test_empirical_fisher_on_layers_recorded_more_than_once(name):
    torch.manual_seed(0)
    model = MULTI_RECORD[name]().to(DT).eval()
    x, y = _inputs(name)
    G = _per_example_grad_rows(model, x, y)
    dense = G.T @ G / x.shape[0]
    V = torch.randn(dense.shape[0], 3, dtype=DT)
    torch.testing.assert_close(EmpiricalFisher(model, F.cross_entropy, (x, y)) @ V, dense @ V, rtol=1e-10, atol=1e-12)


class PytreeBlock(nn.Module):
    """A custom block returning a dict holding a tuple, an integer tensor and a batch-in-dim-1 tensor."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, dtype=DT))

    def forward(self, x):
        h = torch.tanh(x @ self.w)
        return {"out": (h, h.sum(-1)), "count": torch.tensor(3), "seq_first": h.transpose(0, 1)}


class PytreeHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = PytreeBlock()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        o = self.block(x)
        (h, s), t = o["out"], o["seq_first"]
        return self.fc(h[:, -1] * s[:, :1, None].mean(1) + t[-1] * o["count"])


def _opacus_recurrent(cls_name):
    layers = pytest.importorskip("opacus.layers")
    cell = getattr(layers, cls_name)
    return lambda: RecurrentHead(lambda *a, **k: cell(*a, **k))


@pytest.mark.parametrize("name", ["DPLSTM", "DPGRU", "DPRNN", "custom_pytree"])
def test_generic_rule_on_modules_returning_a_pytree(name):
    torch.manual_seed(0)
    model = (PytreeHead if name == "custom_pytree" else _opacus_recurrent(name))().to(DT).eval()
    x, y = _inputs("lstm")
    with fastcurv.capture(model) as cap:
        out = model(x)
    # Opacus' DP recurrent modules alias their cells' Linear parameters: served once, by the Linear rule
    assert set(cap.generic) == ({"block"} if name == "custom_pytree" else set())
    losses = F.cross_entropy(out, y, reduction="none")
    G = _per_example_grad_rows(model, x, y)
    torch.testing.assert_close(cap.per_example_sqnorms(losses), G.square().sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cap.per_example_gram(losses), G @ G.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out, model(x))  # the module's outputs are unchanged by the packing
