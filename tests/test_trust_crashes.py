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
