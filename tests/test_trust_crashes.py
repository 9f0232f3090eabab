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
        h = torch.tanh(torch.einsum("btd,de->bte", x, self.w))  # einsum: no fast rule intercepts it
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


class HandLoRA(nn.Module):
    """A hand-written LoRA on a frozen base: the only trainable parameters have no fast rule."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(4, 3).to(DT).requires_grad_(False)
        self.A = nn.Parameter(torch.randn(2, 4, dtype=DT))
        self.B = nn.Parameter(torch.randn(3, 2, dtype=DT))

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


def _lone_prelu():
    m = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 3)).to(DT)
    m[0].requires_grad_(False)
    m[2].requires_grad_(False)
    return m


@pytest.mark.parametrize("make", [HandLoRA, _lone_prelu], ids=["hand_lora", "lone_prelu"])
def test_only_generic_modules_trainable(make):
    """The generic rule's input sets the batch size when no fast rule ran (was: 'no forward was captured')."""
    torch.manual_seed(0)
    model = make()
    x, y = _inputs("reused_linear")
    with fastcurv.capture(model) as cap:
        out = model(x)
    s = cap.per_example_sqnorms(F.cross_entropy(out, y, reduction="none"))
    torch.testing.assert_close(s, _per_example_grad_rows(model, x, y).square().sum(1), rtol=1e-9, atol=1e-12)


class FlattenedFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        B, T, E = x.shape
        return self.fc(self.proj(x.reshape(B * T, E)).view(B, T, E).mean(1))


def test_flattened_batch_message_names_the_module():
    model = FlattenedFirst().to(DT)
    x, y = _inputs("lstm")
    with fastcurv.capture(model) as cap:
        out = model(x)
    with pytest.raises(ValueError, match=r"batch size 15 \(dim 0 of the input \(15, 4\) of module 'proj' \(Linear\)"):
        cap.per_example_sqnorms(F.cross_entropy(out, y, reduction="none"))


class InferenceInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        with torch.inference_mode():
            h = self.a(x)
        return self.fc(h.clone())


def test_inference_mode_inside_the_captured_forward_is_refused():
    model = InferenceInside().to(DT)
    x, _ = _inputs("reused_linear")
    with pytest.raises(RuntimeError, match=r"module 'a' \(Linear\) ran under torch.inference_mode\(\)"):
        with fastcurv.capture(model):
            model(x)


class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.jit.script(nn.Linear(4, 4).to(DT))
        self.fc = nn.Linear(4, 3).to(DT)

    def forward(self, x):
        return self.fc(torch.tanh(self.a(x)))


def test_jit_scripted_submodule():
    model = Scripted()
    with pytest.raises(TypeError, match=r"module 'a' \(RecursiveScriptModule\) is a torch.jit.script-ed module"):
        fastcurv.capture(model)
    for p in model.a.parameters():  # frozen: the rest is captured, exact
        p.requires_grad_(False)
    x, y = _inputs("reused_linear")
    with fastcurv.capture(model) as cap:
        out = model(x)
    s = cap.per_example_sqnorms(F.cross_entropy(out, y, reduction="none"))
    torch.testing.assert_close(s, _per_example_grad_rows(model, x, y).square().sum(1), rtol=1e-9, atol=1e-12)


class CastingForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.a(x.float())))


def test_fisher_logdet_on_a_forward_that_casts():
    from fastcurv.metrics import fisher_logdet

    torch.manual_seed(0)
    model = CastingForward().eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    with pytest.warns(RuntimeWarning, match="does not run in float64"):
        got = fisher_logdet(model, x, y, subset_size=4, trials=2)
    plain = nn.Sequential(model.a, nn.Tanh(), model.fc)  # the same function without the cast: G in float64
    torch.testing.assert_close(got, fisher_logdet(plain, x, y, subset_size=4, trials=2), rtol=1e-4, atol=1e-4)


class DPAttentionHead(nn.Module):
    """Opacus' DPMultiheadAttention with add_bias_kv: its SequenceBias modules (generic rule) run on the
    sequence-first [T, B, E] tensors inside a batch-first model."""

    def __init__(self):
        super().__init__()
        layers = pytest.importorskip("opacus.layers")
        self.inp = nn.Linear(4, 4)
        self.att = layers.DPMultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.fc(self.att(h, h, h)[0].mean(1))


def test_opacus_multihead_attention_with_bias_kv_is_a_clean_error():
    """Its SequenceBias modules run on sequence-first [T, B, E] tensors inside a batch-first model: refused
    naming the module (was: a raw 'size of tensor a (3) must match the size of tensor b (6)')."""
    torch.manual_seed(0)
    model = DPAttentionHead().to(DT).eval()
    x, _ = _inputs("lstm")
    with pytest.raises(RuntimeError, match=r"module 'att.seq_bias_k' \(SequenceBias\) got input \(3, 5, 4\)"):
        with fastcurv.capture(model):
            model(x)
