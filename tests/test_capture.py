"""fastcurv.capture against per-sample gradients from torch.func (vmap(grad) + functional_call),
in float64, plus every refused input."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import fastcurv
from fastcurv.capture import Capture, CapturedLayer, capture
from zoo import check_against_loop

pytestmark = pytest.mark.filterwarnings("ignore:fastcurv._C is not available")

B = 5


# ---------------------------------------------------------------- helpers
def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def squared_error(out, y):
    return 0.5 * (out - y).square().flatten(1).sum(1)


def per_sample_grads(model, x, y, loss_fn):
    """{param name: [B, *shape]} for params requiring grad, via torch.func."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def loss_one(params, xi, yi):
        out = functional_call(model, {**params, **fixed}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(trainable, x, y)


def flat(grads, names):
    return torch.cat([grads[n].flatten(1) for n in names], 1)


# ---------------------------------------------------------------- models
def mlp():
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))
    return model, torch.randn(B, 4), torch.randint(0, 3, (B,)), ce


def seq_linear_ghost():
    # T=3, d_in*d_out = 30 >= 2 T^2: ghost form
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    return model, torch.randn(B, 3, 6), torch.randn(B, 3, 2), squared_error


def seq_linear_materialized():
    # T=8, d_in*d_out = 6 < 2 T^2: materialized form; two leading dims [B, 2, 4, d]
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2))
    return model, torch.randn(B, 2, 4, 3), torch.randn(B, 2, 4, 2), squared_error


class ConvHead(nn.Module):
    def __init__(self, conv, n_features):
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(n_features, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def _conv_case(conv, in_shape):
    x = torch.randn(B, *in_shape)
    with torch.no_grad():
        n_features = conv(x[:1]).numel()
    return ConvHead(conv, n_features), x, torch.randint(0, 3, (B,)), ce


def conv1d_strided_dilated_grouped():
    return _conv_case(nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (4, 11))


def conv1d_same_circular():
    return _conv_case(nn.Conv1d(2, 3, 4, padding="same", padding_mode="circular", dilation=2), (2, 9))


def conv2d_same_reflect():
    return _conv_case(nn.Conv2d(2, 4, (3, 2), padding="same", padding_mode="reflect"), (2, 5, 6))


def conv2d_valid_grouped_strided():
    return _conv_case(nn.Conv2d(6, 3, 2, stride=(2, 1), padding="valid", groups=3, bias=False), (6, 5, 4))


def conv2d_circular_stride_dilation():
    return _conv_case(nn.Conv2d(2, 4, 3, stride=2, padding=(1, 2), dilation=(1, 2), padding_mode="circular", groups=2), (2, 6, 7))


def conv3d():
    return _conv_case(nn.Conv3d(2, 2, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)), (2, 4, 5, 3))


def cnn_eval_batchnorm():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3),
    )
    for m in model:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    model.eval()
    return model, torch.randn(B, 2, 4, 4), torch.randint(0, 3, (B,)), ce


class EmbedSeq(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.proj = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.proj(torch.tanh(self.embed(tokens)))


def embedding_padding_seq_linear():
    tokens = torch.tensor([[1, 2, 2, 0, 3], [0, 0, 4, 4, 4], [6, 5, 1, 1, 0], [2, 2, 2, 2, 2], [3, 0, 6, 1, 5]])
    return EmbedSeq(), tokens, torch.randn(B, 5, 3), squared_error


def layernorm_model():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2), nn.LayerNorm([3, 2]))
    for m in model:
        if isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    return model, torch.randn(B, 3, 4), torch.randn(B, 3, 2), squared_error


def rmsnorm_model():
    model = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 3))
    nn.init.uniform_(model[1].weight, 0.5, 1.5)
    return model, torch.randn(B, 4), torch.randint(0, 3, (B,)), ce


def groupnorm_model():
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4))
    nn.init.uniform_(conv[1].weight, 0.5, 1.5)
    nn.init.uniform_(conv[1].bias, -0.3, 0.3)
    return _conv_case(conv, (2, 3, 3))


def frozen_weight_trainable_bias():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 3))
    model[0].weight.requires_grad_(False)  # bias only
    model[2].bias.requires_grad_(False)  # weight only
    return model, torch.randn(B, 4), torch.randint(0, 3, (B,)), ce


def frozen_conv_weight_seq():
    conv = nn.Conv1d(2, 4, 3, groups=2)
    conv.weight.requires_grad_(False)
    return _conv_case(conv, (2, 6))


CASES = [
    mlp, seq_linear_ghost, seq_linear_materialized, conv1d_strided_dilated_grouped, conv1d_same_circular,
    conv2d_same_reflect, conv2d_valid_grouped_strided, conv2d_circular_stride_dilation, conv3d,
    cnn_eval_batchnorm, embedding_padding_seq_linear, layernorm_model, rmsnorm_model, groupnorm_model,
    frozen_weight_trainable_bias, frozen_conv_weight_seq,
]




# ---------------------------------------------------------------- correctness
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_matches_per_sample_gradients(case, float64_default, device):
    model, x, y, loss_fn = case()
    model, x, y = model.to(device), x.to(device), y.to(device)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = per_sample_grads(model, x, y, loss_fn)
    J = flat(ref, names)

    with capture(model) as cap:
        out = model(x)
    losses = loss_fn(out, y)
    assert cap.batch_size == B
    assert [n for n, _ in cap.params] == names

    s = cap.per_example_sqnorms(losses)
    torch.testing.assert_close(s, J.square().sum(1), rtol=1e-10, atol=1e-12)

    by_layer = cap.per_example_sqnorms_by_layer(losses)
    assert set(by_layer) == {layer.name for layer in cap.layers}
    for layer in cap.layers:
        expected = flat(ref, [n for n, _ in layer.params]).square().sum(1)
        torch.testing.assert_close(by_layer[layer.name], expected, rtol=1e-10, atol=1e-12)

    G = cap.per_example_gram(losses)
    torch.testing.assert_close(G, J @ J.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(G), s, rtol=1e-10, atol=1e-12)

    K = 3
    coeffs = torch.randn(B, K, device=device)
    for layer, delta in zip(cap.layers, cap.deltas(losses)):
        vectors = [torch.randn(K, *p.shape, device=device) for _, p in layer.params]
        Jl = flat(ref, [n for n, _ in layer.params])
        Vl = torch.cat([v.flatten(1) for v in vectors], 1)
        torch.testing.assert_close(layer.dot(delta, vectors), Jl @ Vl.T, rtol=1e-10, atol=1e-12)
        sums = layer.weighted_grad_sum(delta, coeffs)
        for (pname, p), got in zip(layer.params, sums):
            expected = torch.einsum("bk,bp->kp", coeffs, ref[pname].flatten(1)).reshape(K, *p.shape)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        for (pname, _), got in zip(layer.params, layer.per_example_grads(delta)):
            torch.testing.assert_close(got, ref[pname], rtol=1e-10, atol=1e-12)


def test_callable_module_and_top_level_export():
    model = nn.Linear(3, 2)
    assert isinstance(fastcurv.capture(model), Capture)
    assert isinstance(fastcurv.capture.capture(model), Capture)
    assert fastcurv.capture.Capture is Capture


def test_mean_scaled_losses_scale_by_inverse_batch_squared(float64_default):
    model, x, y, loss_fn = mlp()
    with capture(model) as cap:
        out = model(x)
    losses = loss_fn(out, y)
    torch.testing.assert_close(cap.per_example_sqnorms(losses / B), cap.per_example_sqnorms(losses) / B**2)


def test_create_graph_gives_differentiable_norms(float64_default):
    model, x, y, loss_fn = mlp()
    with capture(model) as cap:
        out = model(x)
    s = cap.per_example_sqnorms(loss_fn(out, y), create_graph=True)
    assert s.requires_grad
    grads = torch.autograd.grad(s.sum(), list(model.parameters()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_output_unused_by_loss_counts_zero(float64_default):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.used, self.unused = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.used(h), self.unused(h)

    model = TwoHeads()
    x, y = torch.randn(B, 3), torch.randint(0, 2, (B,))
    with capture(model) as cap:
        out, _ = model(x)
    by_layer = cap.per_example_sqnorms_by_layer(ce(out, y))
    assert torch.equal(by_layer["unused"], torch.zeros(B))
    ref = per_sample_grads(nn.Sequential(model.body, nn.Tanh(), model.used), x, y, ce)
    torch.testing.assert_close(by_layer["used"], flat(ref, ["2.weight", "2.bias"]).square().sum(1))


def test_ignore_leaves_params_out(float64_default):
    class WithScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Linear(3, 4), WithScale(), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(B, 3), torch.randint(0, 2, (B,))
    with pytest.raises(TypeError, match=r"module '1' \(WithScale\).*'1.scale'.*no fast rule.*ignore=\['1'\]"):
        capture(model, strict=True)
    for ignore in (["1"], [model[1]]):
        with capture(model, ignore=ignore) as cap:
            out = model(x)
        ref = per_sample_grads(model, x, y, ce)
        names = ["0.weight", "0.bias", "3.weight", "3.bias"]
        assert [n for n, _ in cap.params] == names
        torch.testing.assert_close(cap.per_example_sqnorms(ce(out, y)), flat(ref, names).square().sum(1))


def test_hooks_removed_and_graph_released():
    model, x, y, loss_fn = mlp()
    cap = capture(model)
    with cap:
        out = model(x)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="boom"):
        with capture(model):
            model(x)
            raise ValueError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    out_ref = weakref.ref(cap.layers[0].output)
    losses = loss_fn(out, y)
    cap.per_example_sqnorms(losses)
    del out, losses
    gc.collect()
    assert out_ref() is not None  # documented: kept until clear()
    cap.clear()
    gc.collect()
    assert out_ref() is None
    with pytest.raises(RuntimeError, match="no forward was captured"):
        cap.per_example_sqnorms(torch.zeros(B))

    # after exit the capture is collectable: hooks hold no reference to it
    cap_ref = weakref.ref(cap)
    del cap
    gc.collect()
    assert cap_ref() is None


def test_forward_after_exit_is_not_recorded():
    model, x, y, loss_fn = mlp()
    with capture(model) as cap:
        model(x)
    out2 = model(x[:2])  # outside the block: hooks are gone, so no "called twice" and no batch clash
    assert cap.batch_size == B and out2.shape[0] == 2


# ---------------------------------------------------------------- refused inputs
@pytest.mark.parametrize("module", [nn.PReLU(3), nn.Bilinear(3, 3, 2)], ids=lambda m: type(m).__name__)
def test_strict_refuses_modules_without_fast_rule(module):
    model = nn.Sequential(nn.Linear(3, 3), module)
    with pytest.raises(TypeError, match=type(module).__name__ + r".*no fast rule.*strict=True"):
        capture(model, strict=True)
    capture(model, strict=True, ignore=["1"])  # opt-out works
    for p in module.parameters():
        p.requires_grad_(False)
    capture(model, strict=True)  # frozen: nothing to miss


def test_strict_refuses_subclass_overriding_forward():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match=r"MyLinear overrides the forward of Linear"):
        capture(nn.Sequential(MyLinear(2, 2)), strict=True)
    assert "0" in capture(nn.Sequential(MyLinear(2, 2))).generic


@pytest.mark.parametrize("mode", ["train", "no_running_stats"])
def test_batchnorm_with_batch_statistics_refused(mode):
    bn = nn.BatchNorm1d(3) if mode == "train" else nn.BatchNorm1d(3, track_running_stats=False).eval()
    model = nn.Sequential(nn.Linear(2, 3), bn)
    with pytest.raises(RuntimeError, match=r"module '1' \(BatchNorm1d\).*examples interact"):
        with capture(model):
            model(torch.randn(B, 2))
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="examples interact"):  # frozen BN still mixes examples
        with capture(model):
            model(torch.randn(B, 2))


class _InplaceAfterLayers(nn.Module):
    """torchvision's pattern: an in-place activation and ``out += identity`` on captured outputs."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu_(self.a(x))  # modifies a's output in place
        out = self.b(self.norm(h))
        out += h  # modifies b's output in place
        return torch.tanh_(out)


def test_inplace_ops_after_a_layer_are_exact(float64_default):
    model = _InplaceAfterLayers()
    x = torch.randn(B, 3)
    check_against_loop(model, lambda m: m(x), lambda out: out.square().sum(1))


def test_inplace_ops_make_no_copy_of_the_activation():
    model = _InplaceAfterLayers()
    seen = {}
    model.a.register_forward_hook(lambda m, args, out: seen.setdefault("a", out))
    with capture(model) as cap:
        model(torch.randn(B, 3))
    recorded = cap.layers[0].records[0].output
    assert recorded is seen["a"] and recorded._version > 0  # the model's own (mutated) tensor, not a copy


def test_input_modified_in_place_is_refused():
    lin = nn.Linear(3, 2)
    x = torch.randn(B, 3)
    with capture(lin) as cap:
        out = lin(x)
    x.mul_(2)  # the Linear rule needs its input's values
    with pytest.raises(RuntimeError, match=r"input of the root module \(Linear\) was modified in place"):
        cap.per_example_sqnorms(out.sum(1))


def test_generic_rule_output_modified_in_place_is_refused():
    model = nn.Sequential(nn.PReLU(), nn.Linear(3, 2))
    with capture(model) as cap:
        h = model[0](torch.randn(B, 3))
        h.mul_(2)  # the generic rule compares its re-run with the recorded output
        out = model[1](h)
    with pytest.raises(RuntimeError, match=r"output of module '0' \(PReLU\) was modified in place"):
        cap.per_example_sqnorms(out.sum(1))


def test_uncalled_module_adds_nothing():
    """Parameters, not modules, are the unit: a module never called adds nothing of its own (its
    parameters' gradients are exactly zero), and ignore= is not needed."""
    model = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)})
    x = torch.randn(B, 3)
    with capture(model) as cap:
        out = model["a"](x)
    losses = out.square().sum(1)
    assert [layer.name for layer in cap.layers] == ["a"]
    grads = cap.per_example_grads(losses)
    assert set(grads) == {"a.weight", "a.bias", "b.weight", "b.bias"} and not grads["b.weight"].any()
    want = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, list(model["a"].parameters()),
                                                                          retain_graph=True)]) for l in losses])
    torch.testing.assert_close(cap.per_example_sqnorms(losses), want.square().sum(1))
    with capture(model, ignore="b") as cap:
        out = model["a"](x)
    assert cap.per_example_sqnorms(out.sum(1)).shape == (B,)


class _SharedOwner(nn.Module):
    """T5's layout: ``shared`` holds the embedding and is never called; two modules tied to its weight use it."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(7, 4)
        self.enc, self.dec = nn.Embedding(7, 4), nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.enc.weight = self.dec.weight = self.head.weight = self.shared.weight

    def forward(self, a, b):
        return self.head(torch.tanh(self.enc(a) + self.dec(b).flip(1)))


def test_uncalled_owner_of_a_shared_parameter():
    torch.manual_seed(0)
    model = _SharedOwner().double()
    a, b = torch.randint(0, 7, (B, 3)), torch.randint(0, 7, (B, 3))
    with capture(model) as cap:
        out = model(a, b)
    losses = out.square().sum((1, 2))
    sq = cap.per_example_sqnorms(losses)
    gram = cap.per_example_gram(losses)
    G = torch.stack([torch.autograd.grad(model(a[i:i + 1], b[i:i + 1]).square().sum(), model.shared.weight)[0].flatten()
                     for i in range(B)])
    torch.testing.assert_close(sq, G.square().sum(1))
    torch.testing.assert_close(gram, G @ G.T)
    assert [n for n, _ in cap.params] == ["shared.weight"]


def test_parameter_read_directly_by_another_forward():
    """A parameter none of whose modules is called, read by another module's forward (DeBERTa's encoder reads
    rel_embeddings.weight): served exactly by the batched backward at the parameter. One whose module is also
    called keeps the refusal of a use outside its recorded calls."""
    class Reader(nn.Module):
        def __init__(self, call_inner=False):
            super().__init__()
            self.first, self.inner = nn.Linear(3, 3), nn.Linear(3, 2)
            self.call_inner = call_inner

        def forward(self, x):
            h = self.first(x)
            out = h @ self.inner.weight.T.exp()
            return out + self.inner(h) if self.call_inner else out

    torch.manual_seed(0)
    model = Reader().double()
    x = torch.randn(B, 3, dtype=torch.float64)
    with pytest.warns(fastcurv.capture.SharedInputWarning, match="'inner.weight' are read directly"):
        with capture(model) as cap:
            out = model(x)
        losses = out.square().sum(1)
        sq = cap.per_example_sqnorms(losses)
    params = [p for p in model.parameters()]
    G = torch.stack([torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(
        torch.autograd.grad(model(x[i:i + 1]).square().sum(), params, allow_unused=True), params)]) for i in range(B)])
    torch.testing.assert_close(sq, G.square().sum(1))
    torch.testing.assert_close(cap.per_example_gram(losses), G @ G.T)
    model = Reader(call_inner=True)
    with capture(model) as cap:
        out = model(torch.randn(B, 3))
    with pytest.raises(RuntimeError, match="inner.weight.*does not go through its module"):
        cap.per_example_sqnorms(out.sum(1))


def test_embedding_scale_grad_by_freq_refused():
    with pytest.raises(ValueError, match="scale_grad_by_freq.*examples interact"):
        capture(nn.Embedding(4, 2, scale_grad_by_freq=True))


def test_bad_losses_refused():
    model, x, y, loss_fn = mlp()
    with capture(model) as cap:
        out = model(x)
    losses = loss_fn(out, y)
    with pytest.raises(ValueError, match=r"shape \[B\] = \[5\], got shape \(\).*reduction='none'"):
        cap.per_example_sqnorms(losses.mean())
    with pytest.raises(ValueError, match=r"got shape \(5, 1\)"):
        cap.per_example_sqnorms(losses[:, None])
    with pytest.raises(ValueError, match="has 3 entries but the captured forward had batch size 5"):
        cap.per_example_sqnorms(losses[:3])
    with pytest.raises(TypeError, match="floating point"):
        cap.per_example_sqnorms(torch.ones(B, dtype=torch.long))
    with pytest.raises(ValueError, match="losses are on meta"):
        cap.per_example_sqnorms(torch.ones(B, device="meta"))
    with pytest.raises(RuntimeError, match="not connected"):
        cap.per_example_sqnorms(losses.detach())
    other = torch.randn(B, requires_grad=True) * 2
    with pytest.raises(RuntimeError, match="do not depend on any captured layer output"):
        cap.per_example_sqnorms(other)
    with pytest.raises(TypeError, match="must be a Tensor"):
        cap.per_example_sqnorms([1.0] * B)


def test_norms_before_forward_refused():
    cap = capture(mlp()[0])
    with pytest.raises(RuntimeError, match="no forward was captured"):
        cap.per_example_sqnorms(torch.zeros(B))
    with pytest.raises(RuntimeError, match="no forward was captured"):
        cap.batch_size


def test_forward_under_no_grad_refused():
    model, x, y, loss_fn = mlp()
    with capture(model) as cap, torch.no_grad():
        out = model(x)
    with pytest.raises(RuntimeError, match="not connected.*no_grad"):
        cap.per_example_sqnorms(loss_fn(out, y))


def test_unbatched_inputs_refused_before_the_batch_is_known():
    with pytest.raises(ValueError, match=r"got input \(3,\); expected a batched input"):
        with capture(nn.Linear(3, 2)) as cap:
            cap.model(torch.randn(3))
    conv = nn.Conv2d(1, 1, 2)
    with pytest.raises(ValueError, match=r"expected a batched \[B, C, 2 spatial dims\]"):
        with capture(conv):
            conv(torch.randn(1, 4, 4))


def test_bad_vectors_and_coeffs_refused():
    model, x, y, loss_fn = mlp()
    with capture(model) as cap:
        out = model(x)
    layer, delta = cap.layers[0], cap.deltas(loss_fn(out, y))[0]
    assert isinstance(layer, CapturedLayer)
    with pytest.raises(ValueError, match=r"vectors for '0.weight' must be \[K, \*param.shape\]"):
        layer.dot(delta, [torch.randn(2, 4, 7), torch.randn(2, 7)])
    with pytest.raises(ValueError, match="has 2 trainable params"):
        layer.dot(delta, [torch.randn(2, 7, 4)])
    with pytest.raises(ValueError, match=r"coeffs .* must be \[B, K\] with B = 5"):
        layer.weighted_grad_sum(delta, torch.randn(4, 2))
    with pytest.raises(ValueError, match="expected the output's shape"):
        layer.sqnorm(delta[:, :3])


@pytest.mark.parametrize("case", [conv2d_valid_grouped_strided, embedding_padding_seq_linear, layernorm_model], ids=lambda c: c.__name__)
def test_empty_batch(case):
    model, x, y, loss_fn = case()
    with capture(model) as cap:
        out = model(x[:0])
    losses = loss_fn(out, y[:0])
    assert cap.per_example_sqnorms(losses).shape == (0,)
    assert cap.per_example_gram(losses).shape == (0, 0)


@pytest.mark.parametrize("case", [mlp, seq_linear_materialized, conv2d_circular_stride_dilation, embedding_padding_seq_linear], ids=lambda c: c.__name__)
def test_float32_close_to_float64(case):
    """float32 against the float64 per-sample gradients of the same model: relative error of a sum
    of squares of O(1e2) fp32 products is a few 1e-6, so 1e-4 leaves margin without hiding bugs."""
    model, x, y, loss_fn = case()
    with capture(model) as cap:
        out = model(x)
    s32 = cap.per_example_sqnorms(loss_fn(out, y))
    assert s32.dtype == torch.float32
    model64 = model.double()
    x64 = x.double() if x.is_floating_point() else x
    y64 = y.double() if y.is_floating_point() else y
    ref = per_sample_grads(model64, x64, y64, loss_fn)
    expected = flat(ref, [n for n, _ in cap.params]).square().sum(1)
    torch.testing.assert_close(s32.double(), expected, rtol=1e-4, atol=1e-6)


def test_position_embedding_of_arange_t_with_t_a_multiple_of_b_is_shared_not_flattened_rows():
    """wpe(torch.arange(T)) with T = 8 B was taken for [B*T] flattened rows and refused (found by the GPU
    dry run's GPT benchmark); it is a shared input, exact against the per-example loop."""
    class TinyGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe, self.head = nn.Embedding(11, 4), nn.Embedding(16, 4), nn.Linear(4, 11)

        def forward(self, x):
            return self.head(self.wte(x) + self.wpe(torch.arange(x.shape[1])))

    model = TinyGPT().double()
    x = torch.randint(0, 11, (2, 16))

    def losses_of(xb):
        out = model(xb)
        return F.cross_entropy(out.transpose(1, 2), xb, reduction="none").mean(1)

    with fastcurv.capture(model) as cap:
        losses = losses_of(x)
    got = cap.per_example_sqnorms(losses)
    want = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(losses_of(x[i:i + 1]).sum(), list(model.parameters())))
                        for i in range(2)])
    torch.testing.assert_close(got, want)


class _RelativeBias(nn.Module):
    """T5's relative-position bias: an Embedding of [T, T] buckets (no batch dim), permuted and unsqueezed, added
    in place to the scores of two attention layers."""

    def __init__(self, D=6, H=2, T=5):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)
        self.rel = nn.Embedding(2 * T - 1, H)
        self.H, self.T = H, T

    def forward(self, x):
        B, T, D = x.shape
        buckets = torch.arange(T)[None, :] - torch.arange(T)[:, None] + T - 1
        bias = None
        for _ in range(2):
            q = self.q(x).view(B, T, self.H, -1).transpose(1, 2)
            k = self.k(x).view(B, T, self.H, -1).transpose(1, 2)
            if bias is None:  # after a batched module has set the batch size, as in T5
                bias = self.rel(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
            scores = q @ k.transpose(-1, -2)
            scores += bias
            x = x + (scores.softmax(-1) @ k).transpose(1, 2).reshape(B, T, D).tanh()
        return self.out(x).sum(1)


def test_shared_output_through_layout_steps_to_adds_takes_no_batched_backward():
    import warnings

    torch.manual_seed(0)
    model = _RelativeBias().double()
    x, y = torch.randn(3, 5, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastcurv.capture.SharedInputWarning)  # served without the batched backward
        check_against_loop(model, lambda m: m(x), lambda out: F.cross_entropy(out, y, reduction="none"))


class _RelativeTable(nn.Module):
    """DeBERTa-v2's relative positions: the encoder reads a table's weight (its Embedding never called) into a
    LayerNorm, projects it unbatched, and the projection meets the batch at ``.repeat(B, 1, 1)``."""

    def __init__(self, D=6, H=2, P=4):
        super().__init__()
        self.table, self.norm = nn.Embedding(P, D), nn.LayerNorm(D)
        self.q, self.key, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)
        self.H = H

    def forward(self, x):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.H, -1).transpose(1, 2).reshape(B * self.H, T, -1)
        rel = self.norm(self.table.weight)[None]  # [1, P, D], no batch dim
        k = self.key(rel).view(1, -1, self.H, D // self.H).permute(0, 2, 1, 3).contiguous().view(self.H, -1, D // self.H)
        scores = torch.bmm(q, k.repeat(B, 1, 1).transpose(-1, -2))  # [B * H, T, P]
        return self.out(scores.softmax(-1).sum(-1).view(B, self.H, T).transpose(1, 2).repeat(1, 1, 3)).sum(1)


def test_parameter_read_directly_resolved_through_shared_records_takes_no_batched_backward():
    import warnings

    torch.manual_seed(0)
    model = _RelativeTable().double()
    x, y = torch.randn(3, 5, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastcurv.capture.SharedInputWarning)
        check_against_loop(model, lambda m: m(x), lambda out: F.cross_entropy(out, y, reduction="none"))
