"""nn.RNN / nn.LSTM / nn.GRU (fastcurv/layers/recurrent.py): the captured (unrolled) forward gives
the module's own outputs, and norms, Gram matrices and the penalty gradient match the float64
per-example autograd loop of tests/zoo.py (the loop runs the uncaptured, fused module)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastcurv
from fastcurv.layers import rule_for
from fastcurv.layers.recurrent import RecurrentLayer
from zoo import check_against_loop, loop_grads, trainable


@pytest.fixture(autouse=True)
def _f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def ce(y):
    return lambda out: F.cross_entropy(out, y, reduction="none")


class Classifier(nn.Module):
    """tokens [B, T] -> embedding -> RNN -> last step or mean over steps -> Linear."""

    def __init__(self, rnn: nn.Module, vocab=11, classes=3, pool="last"):
        super().__init__()
        self.emb = nn.Embedding(vocab, rnn.input_size)
        self.rnn = rnn
        width = (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(width, classes)
        self.pool = pool

    def forward(self, tokens, hx=None):
        x = self.emb(tokens)
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x, hx)
        if not self.rnn.batch_first:
            out = out.transpose(0, 1)
        return self.head(out[:, -1] if self.pool == "last" else out.mean(1))


def assert_same_outputs(rnn, *inputs):
    """The captured forward returns the module's own output, h_n (and c_n) in float64."""
    want = rnn(*inputs)
    with fastcurv.capture(rnn) as cap:
        got = rnn(*inputs)
    assert isinstance(cap.layers[0], RecurrentLayer)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
    if isinstance(rnn, nn.LSTM):
        torch.testing.assert_close(got[1][0], want[1][0], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(got[1][1], want[1][1], atol=1e-12, rtol=1e-10)
    else:
        torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=1e-10)
    assert got[0].shape == want[0].shape and got[0].is_contiguous()


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("pool", ["last", "mean"])
def test_two_layer_bidirectional_classifier(kind, batch_first, pool):
    B, T = 4, 6
    model = Classifier(kind(5, 4, num_layers=2, bidirectional=True, batch_first=batch_first), pool=pool)
    tokens, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    check_against_loop(model, lambda m: m(tokens), ce(y))
    x = torch.randn(B, T, 5) if batch_first else torch.randn(T, B, 5)
    assert_same_outputs(model.rnn, x)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_elman_rnn(nonlinearity, batch_first):
    B, T = 5, 4
    model = Classifier(nn.RNN(3, 6, num_layers=2, nonlinearity=nonlinearity, batch_first=batch_first), pool="mean")
    tokens, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    check_against_loop(model, lambda m: m(tokens), ce(y))
    assert_same_outputs(model.rnn, torch.randn(B, T, 3) if batch_first else torch.randn(T, B, 3))


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_initial_states_given_and_computed_from_the_input(kind):
    """h0 (and c0) from a Linear of per-example features: gradients flow through them too."""
    B, T, H, L, D = 3, 5, 4, 2, 2

    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.init = nn.Linear(2, L * D * H)
            self.net = Classifier(kind(5, H, num_layers=L, bidirectional=True, batch_first=True))

        def forward(self, tokens, feats):
            h0 = torch.tanh(self.init(feats)).view(B, L * D, H).transpose(0, 1).contiguous()
            return self.net(tokens, (h0, torch.sin(h0)) if kind is nn.LSTM else h0)

    model = WithState()
    tokens, feats, y = torch.randint(0, 11, (B, T)), torch.randn(B, 2), torch.randint(0, 3, (B,))
    check_against_loop(model, lambda m: m(tokens, feats), ce(y))
    x, h0 = torch.randn(B, T, 5), torch.randn(L * D, B, H)
    assert_same_outputs(model.net.rnn, x, (h0, torch.randn(L * D, B, H)) if kind is nn.LSTM else h0)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_sequence_length_equal_to_batch_seq_first(kind):
    B = T = 4
    model = Classifier(kind(3, 5, num_layers=2, batch_first=False), pool="mean")
    tokens, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    check_against_loop(model, lambda m: m(tokens), ce(y))


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("B,T", [(1, 5), (4, 1), (1, 1)])
def test_odd_sizes(kind, B, T):
    model = Classifier(kind(2, 3, num_layers=2, bidirectional=True, batch_first=True))
    tokens, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    check_against_loop(model, lambda m: m(tokens), ce(y))
    assert_same_outputs(model.rnn, torch.randn(B, T, 2))


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_loss_through_final_states_only(kind):
    """A loss on h_n (and c_n) only, not on the output sequence."""
    B, T = 4, 5
    rnn = kind(3, 4, num_layers=2, bidirectional=True, batch_first=True)

    class Final(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(4, 2)

        def forward(self, x):
            _, state = self.rnn(x)
            h_n = state[0] + state[1] if kind is nn.LSTM else state
            return self.head(h_n.sum(0))

    x, y = torch.randn(B, T, 3), torch.randint(0, 2, (B,))
    check_against_loop(Final(), lambda m: m(x), ce(y))


def test_lstm_with_projection():
    B, T = 3, 4
    model = Classifier(nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True), pool="mean")
    tokens, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    check_against_loop(model, lambda m: m(tokens), ce(y))
    assert_same_outputs(model.rnn, torch.randn(B, T, 5), (torch.randn(4, B, 3), torch.randn(4, B, 6)))


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_no_bias_and_partly_frozen(kind):
    model = Classifier(kind(3, 4, num_layers=2, bias=False, batch_first=True))
    model.rnn.weight_hh_l0.requires_grad_(False)
    model.rnn.weight_ih_l1.requires_grad_(False)
    tokens, y = torch.randint(0, 11, (3, 5)), torch.randint(0, 3, (3,))
    check_against_loop(model, lambda m: m(tokens), ce(y))

    model = Classifier(kind(3, 4, batch_first=True))
    model.rnn.weight_hh_l0.requires_grad_(False)  # its bias_hh_l0 alone stays trainable
    check_against_loop(model, lambda m: m(tokens), ce(y))


def test_module_called_twice_sums_both_uses():
    """A shared encoder over two sequences (siamese): gradients of both calls summed, cross terms included."""
    B, T = 4, 3
    enc = nn.GRU(3, 4, batch_first=True, bidirectional=True)

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = enc, nn.Linear(8, 2)

        def forward(self, a, b):
            return self.head(self.enc(a)[0][:, -1] * self.enc(b)[0].mean(1))

    a, b, y = torch.randn(B, T, 3), torch.randn(B, T + 2, 3), torch.randint(0, 2, (B,))
    check_against_loop(Siamese(), lambda m: m(a, b), ce(y))


def test_per_example_grads_dot_and_weighted_sum_match_the_loop():
    B, T = 4, 5
    model = Classifier(nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True))
    tokens, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    with fastcurv.capture(model) as cap:
        losses = ce(y)(model(tokens))
    params = [p for _, p in trainable(model)]
    want = loop_grads(losses, params)
    grads = cap.per_example_grads(losses)
    got = torch.cat([grads[n].reshape(B, -1) for n, _ in trainable(model)], 1)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)

    layer = next(layer for layer in cap.layers if isinstance(layer, RecurrentLayer))
    delta = cap.deltas(losses)[cap.layers.index(layer)]
    mine = torch.cat([g.reshape(B, -1) for g in layer.per_example_grads(delta)], 1)
    vectors = [torch.randn(3, *p.shape) for _, p in layer.params]
    flat_v = torch.cat([v.reshape(3, -1) for v in vectors], 1)
    torch.testing.assert_close(layer.dot(delta, vectors), mine @ flat_v.T, atol=1e-10, rtol=1e-8)
    coeffs = torch.randn(B, 2)
    summed = torch.cat([w.reshape(2, -1) for w in layer.weighted_grad_sum(delta, coeffs)], 1)
    torch.testing.assert_close(summed, coeffs.T @ mine, atol=1e-10, rtol=1e-8)


def test_dropout_between_layers_uses_the_captured_forwards_own_masks():
    """With dropout the captured forward draws its own masks; the quantities are those of the
    captured losses (checked against a loop over the captured forward's own graph)."""
    B, T = 4, 5
    model = Classifier(nn.LSTM(3, 4, num_layers=3, dropout=0.5, batch_first=True)).train()
    tokens, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    with fastcurv.capture(model) as cap:
        losses = ce(y)(model(tokens))
    G = loop_grads(losses, [p for _, p in trainable(model)])
    torch.testing.assert_close(cap.per_example_sqnorms(losses), G.square().sum(1), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(cap.per_example_gram(losses), G @ G.T, atol=1e-9, rtol=1e-7)
    model.eval()  # no dropout in eval mode: the captured forward is the module's again
    check_against_loop(model, lambda m: m(tokens), ce(y))
    assert_same_outputs(model.rnn, torch.randn(B, T, 3))


def test_input_and_state_passed_by_keyword():
    rnn = nn.LSTM(3, 4, num_layers=2)
    x, h0, c0 = torch.randn(5, 2, 3), torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    want = rnn(input=x, hx=(h0, c0))
    with fastcurv.capture(rnn) as cap:
        got = rnn(input=x, hx=(h0, c0))
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got[1][1], want[1][1], atol=1e-12, rtol=1e-10)
    assert cap.batch_size == 2


def test_refusals_name_the_module_and_the_fix():
    rnn = nn.LSTM(3, 4, batch_first=True)
    packed = pack_padded_sequence(torch.randn(2, 5, 3), torch.tensor([5, 3]), batch_first=True)
    with pytest.raises(TypeError, match=r"root module \(LSTM\).*PackedSequence.*[Pp]ad"):
        with fastcurv.capture(rnn):
            rnn(packed)
    with pytest.raises(ValueError, match=r"LSTM.*\(5, 3\).*unbatched"):
        with fastcurv.capture(rnn):
            rnn(torch.randn(5, 3))


def test_registered_for_the_three_modules():
    for module in (nn.RNN(2, 3), nn.LSTM(2, 3), nn.GRU(2, 3)):
        assert rule_for(module)[0] is RecurrentLayer


def test_sequence_first_rnn_as_the_first_captured_module():
    """No batch-first module before it: the capture must still read B (not T) from its input."""
    B, T = 3, 7

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(2, 4, num_layers=2), nn.Linear(4, 3)

        def forward(self, x):  # x [T, B, 2]
            return self.head(self.rnn(x)[0].mean(0))

    x, y = torch.randn(T, B, 2), torch.randint(0, 3, (B,))
    check_against_loop(Tagger(), lambda m: m(x), ce(y))


def test_parameter_used_outside_the_module_is_refused():
    rnn, head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)
    x = torch.randn(2, 5, 3)
    model = nn.ModuleList([rnn, head])
    with fastcurv.capture(model) as cap:
        out = head(rnn(x)[0][:, -1]) + F.linear(x[:, 0], rnn.weight_ih_l0)[:, :2]
    with pytest.raises(RuntimeError, match="weight_ih_l0.*outside its module"):
        cap.per_example_sqnorms(out.sum(1))
