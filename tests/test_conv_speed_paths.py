"""The two exact forms of the Conv rule (fastcurv/layers/conv.py), each forced on every conv
configuration and checked in float64 against the per-example autograd loop (tests/zoo.py): norms,
Gram, penalty gradient (double backward through the weight-gradient kernel), per-example
gradients, dot products and weighted gradient sums; plus the cost model's choices, the batch
chunking of the kernel path, and that the kernel path never unfolds the input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.capture import capture
from fastcurv.layers import base as layer_base
from fastcurv.layers.conv import ConvLayer
from zoo import check_against_loop, loop_grads, trainable

pytestmark = pytest.mark.usefixtures("float64_default")

B = 5  # odd on purpose


class ConvHead(nn.Module):
    """conv (called ``calls`` times when channels allow: a shared module) -> tanh -> linear head."""

    def __init__(self, conv, in_shape, calls=1):
        super().__init__()
        self.conv, self.calls = conv, calls
        with torch.no_grad():
            n = self.features(torch.zeros(1, *in_shape)).numel()
        self.head = nn.Linear(n, 3)

    def features(self, x):
        for _ in range(self.calls):
            x = torch.tanh(self.conv(x))
        return x.flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


CONFIGS = {
    "1d_stride_dilation_groups": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (4, 11)),
    "1d_same_circular_even_kernel": (lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="circular", dilation=2), (2, 9)),
    "2d_same_zeros_even_kernel": (lambda: nn.Conv2d(3, 4, (2, 4), padding="same"), (3, 5, 7)),
    "2d_same_reflect": (lambda: nn.Conv2d(2, 4, (3, 2), padding="same", padding_mode="reflect"), (2, 5, 6)),
    "2d_replicate_stride": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=(2, 1), padding_mode="replicate"), (2, 7, 6)),
    "2d_valid_grouped_no_bias": (lambda: nn.Conv2d(6, 3, 2, stride=(2, 1), padding="valid", groups=3, bias=False), (6, 5, 4)),
    "2d_circular_stride_dilation_groups": (
        lambda: nn.Conv2d(2, 4, 3, stride=2, padding=(1, 2), dilation=(1, 2), padding_mode="circular", groups=2), (2, 6, 7)),
    "2d_depthwise": (lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), (3, 5, 5)),
    "3d_stride_dilation": (lambda: nn.Conv3d(2, 2, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)), (2, 4, 5, 3)),
}


def make(config, calls=1):
    build, in_shape = CONFIGS[config]
    model = ConvHead(build(), in_shape, calls)
    x = torch.randn(B, *in_shape)
    y = torch.randint(0, 3, (B,))
    return model, x, y


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.fixture(params=["kernel", "unfold", "auto"])
def path(request, monkeypatch):
    monkeypatch.setattr(ConvLayer, "path", request.param)
    return request.param


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_norms_gram_penalty_match_loop(config, path):
    model, x, y = make(config)
    check_against_loop(model, lambda m: m(x), lambda out: ce(out, y))


def test_shared_conv_called_twice_matches_loop(path):
    model = ConvHead(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), (3, 4, 5), calls=2)
    x, y = torch.randn(B, 3, 4, 5), torch.randint(0, 3, (B,))
    check_against_loop(model, lambda m: m(x), lambda out: ce(out, y))


def test_frozen_weight_bias_only_matches_loop(path):
    model, x, y = make("2d_depthwise")
    model.conv.weight.requires_grad_(False)
    check_against_loop(model, lambda m: m(x), lambda out: ce(out, y))


@pytest.mark.parametrize("config", ["1d_stride_dilation_groups", "2d_same_reflect", "2d_valid_grouped_no_bias", "3d_stride_dilation"])
def test_grads_dot_weighted_sum_match_loop(config):
    """These three never unfold (kernel or forward-conv forms whatever the path), so no path to force."""
    model, x, y = make(config, calls=1)
    with capture(model) as cap:
        out = model(x)
    losses = ce(out, y)
    layer = next(layer for layer in cap.layers if isinstance(layer, ConvLayer))
    delta = cap.deltas(losses)[cap.layers.index(layer)]
    params = [p for _, p in layer.params]
    ref = loop_grads(ce(model(x), y), params)  # [B, P_conv]
    for got, (_, p), want in zip(layer.per_example_grads(delta), layer.params, ref.split([p.numel() for p in params], 1)):
        torch.testing.assert_close(got, want.reshape(B, *p.shape), rtol=1e-10, atol=1e-12)
    K = 3
    vectors = [torch.randn(K, *p.shape) for p in params]
    V = torch.cat([v.flatten(1) for v in vectors], 1)
    torch.testing.assert_close(layer.dot(delta, vectors), ref @ V.T, rtol=1e-10, atol=1e-12)
    coeffs = torch.randn(B, K)
    got = torch.cat([g.flatten(1) for g in layer.weighted_grad_sum(delta, coeffs)], 1)
    torch.testing.assert_close(got, coeffs.T @ ref, rtol=1e-10, atol=1e-12)


def test_kernel_path_never_unfolds(monkeypatch):
    """The point of the kernel path: no [B, T, C k^2] patch copy, in the norms nor in the penalty."""
    monkeypatch.setattr(ConvLayer, "path", "kernel")

    def refuse(self, x):
        raise AssertionError("the kernel path unfolded the input")

    monkeypatch.setattr(ConvLayer, "unfold", refuse)
    model, x, y = make("2d_circular_stride_dilation_groups")
    check_against_loop(model, lambda m: m(x), lambda out: ce(out, y))
    with capture(model) as cap:
        out = model(x)
    losses = ce(out, y)
    layer = cap.layers[0]
    delta = cap.deltas(losses)[0]
    layer.dot(delta, [torch.randn(2, *p.shape) for _, p in layer.params])
    layer.weighted_grad_sum(delta, torch.randn(B, 2))


def test_kernel_path_chunks_the_batch(monkeypatch):
    """A small materialization budget forces one example per chunk: results unchanged."""
    monkeypatch.setattr(ConvLayer, "path", "kernel")
    monkeypatch.setattr(layer_base, "MAX_INTERMEDIATE_ELEMENTS", 1)
    model, x, y = make("2d_same_reflect")
    layer = ConvLayer("conv", model.conv, trainable(model.conv))
    assert len(layer._chunks(B)) == B
    check_against_loop(model, lambda m: m(x), lambda out: ce(out, y))


def _chosen(conv, in_shape, quantity, batch=64):
    layer = ConvLayer("conv", conv, trainable(conv))
    with torch.no_grad():
        delta = conv(torch.zeros(1, *in_shape)).expand(batch, -1, *([-1] * len(in_shape[1:])))
    return layer.choose_path([delta], quantity)


def test_cost_model_choices():
    # high resolution, few channels (a CNN's early layers): the kernel, no patch copy
    assert _chosen(nn.Conv2d(3, 32, 3, padding=1), (3, 32, 32), "sqnorm") == "kernel"
    assert _chosen(nn.Conv2d(32, 32, 3, padding=1), (32, 16, 16), "sqnorm") == "kernel"
    assert _chosen(nn.Conv2d(32, 32, 3, padding=1, groups=32), (32, 32, 32), "sqnorm") == "kernel"  # depthwise
    # tiny maps, wide channels (a ResNet's last stage): the ghost form over unfolded patches
    assert _chosen(nn.Conv2d(256, 256, 3, padding=1), (256, 4, 4), "sqnorm") == "unfold"
    assert _chosen(nn.Conv2d(512, 512, 3, padding=1), (512, 2, 2), "gram", batch=8) == "unfold"
    # the Gram matrix's ghost form pays every pair of examples: the kernel wins sooner
    assert _chosen(nn.Conv2d(64, 64, 3, padding=1), (64, 8, 8), "gram") == "kernel"


def test_unknown_path_is_refused(monkeypatch):
    monkeypatch.setattr(ConvLayer, "path", "fused")
    model, x, y = make("2d_depthwise")
    with capture(model) as cap:
        out = model(x)
    with pytest.raises(ValueError, match=r"module 'conv' \(Conv2d\).*path must be one of"):
        cap.per_example_sqnorms(ce(out, y))


def test_channels_last_input_matches_loop(path):
    """A channels_last input is not viewable as [1, B*C, ...]: the kernel path reshapes (copies) it."""
    model, x, y = make("2d_same_zeros_even_kernel")
    x = x.contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    check_against_loop(model, lambda m: m(x), lambda out: ce(out, y))


def test_linear_and_unfold_norms_split_the_batch(monkeypatch):
    """A tiny intermediate budget splits the squared-norm op into one row per call and assembles the
    Gram matrix from one-example blocks: same numbers (norms, Gram, penalty gradient against the loop),
    for sequence Linears (materialized and ghost forms) and an unfolded grouped conv."""
    monkeypatch.setattr(layer_base, "MAX_INTERMEDIATE_ELEMENTS", 1)
    monkeypatch.setattr(ConvLayer, "path", "unfold")
    model, x, y = make("2d_circular_stride_dilation_groups")
    check_against_loop(model, lambda m: m(x), lambda out: ce(out, y))
    seq = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 3))  # materialized form
    xs = torch.randn(B, 6, 5)
    check_against_loop(seq, lambda m: m(xs), lambda out: ce(out, y))
    ghost = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 3, 3))  # 2 T^2 <= d_in d_out
    xg = torch.randn(B, 3, 16)
    check_against_loop(ghost, lambda m: m(xg), lambda out: ce(out, y))
