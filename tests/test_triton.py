"""Triton kernels (fastcurv/triton) against the float64 reference ops.

Without a GPU they run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.pytest_configure),
which is slow: shapes stay small, and the tests that need several tiles per dimension lower the
tile cap (``_common.MAX_TILE = 16``) instead of growing the shapes.
"""
import os
import re

import pytest
import torch

pytest.importorskip("triton")

from fastcurv import ops, reference  # noqa: E402
from fastcurv.reference import use_ghost  # noqa: E402
from fastcurv.triton import _common  # noqa: E402
from fastcurv.triton import per_example_gram as triton_gram  # noqa: E402
from fastcurv.triton import per_example_sqnorm as triton_sqnorm  # noqa: E402

pytestmark = pytest.mark.triton

LAUNCHERS = {"sqnorm": triton_sqnorm, "gram": triton_gram}
REFERENCE_FORWARD = {"sqnorm": reference.per_example_sqnorm, "gram": reference.per_example_gram}
REFERENCE_BACKWARD = {"sqnorm": reference.per_example_sqnorm_backward, "gram": reference.per_example_gram_backward}
OPS = {"sqnorm": ops.per_example_sqnorm, "gram": ops.per_example_gram}

# (B, T, d_in, d_out) with the path each one must take; no size is a multiple of 16 except where
# the ghost/materialized boundary needs it, so every tile is masked.
SHAPES = {
    "T1": (5, 1, 17, 9),
    "T1_many_rows": (20, 1, 7, 5),  # B > 16: several row blocks / Gram tiles
    "ghost": (4, 3, 17, 20),
    "ghost_T20": (3, 20, 30, 29),  # 2 T^2 = 800 <= 870: ghost with 2 row tiles at tile 16
    "materialized": (3, 20, 5, 7),
    "materialized_wide": (2, 20, 33, 20),  # 800 > 660: several d_in / d_out / t tiles at tile 16
}


def _path(T, d_in, d_out):
    return "T1" if T == 1 else ("ghost" if use_ghost(T, d_in, d_out) else "materialized")


def test_shapes_cover_both_sides_of_the_ghost_rule():
    paths = {name: _path(*shape[1:]) for name, shape in SHAPES.items()}
    assert {paths[n] for n in SHAPES} == {"T1", "ghost", "materialized"}
    assert paths["ghost_T20"] == "ghost" and paths["materialized_wide"] == "materialized"


@pytest.fixture
def tdevice(device):
    """The device fixture, skipping CPU when Triton cannot run on it."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    return device


@pytest.fixture(params=[128, 16], ids=["default_tiles", "tiles16"])
def max_tile(request, monkeypatch):
    monkeypatch.setattr(_common, "MAX_TILE", request.param)
    return request.param


def _inputs(shape, dtype, device, seed=0):
    B, T, d_in, d_out = shape
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d_in, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    delta = torch.randn(B, T, d_out, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return a, delta


def _cotangent(op, B, dtype, device):
    shape = (B,) if op == "sqnorm" else (B, B)
    return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)


def _magnitude(fn, *tensors, bias):
    """The same computation on |inputs| in float64: a bound on the sum of |terms| that rounding
    errors are proportional to (every result is a sum of products of input entries)."""
    return fn(*[t.detach().abs().double() for t in tensors], bias).abs()


# ---------------------------------------------------------------- float64: exact to rounding
@pytest.mark.parametrize("op", ["sqnorm", "gram"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(SHAPES))
def test_float64_forward_and_backward_match_reference(tdevice, max_tile, op, bias, name):
    a, delta = _inputs(SHAPES[name], torch.float64, tdevice)
    out = LAUNCHERS[op].forward(a, delta, bias)
    expected = REFERENCE_FORWARD[op](a, delta, bias)
    assert out.dtype == torch.float64 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())

    grad = _cotangent(op, a.shape[0], torch.float64, tdevice)
    grad_a, grad_d = LAUNCHERS[op].backward(grad, a, delta, bias)
    exp_a, exp_d = REFERENCE_BACKWARD[op](grad, a, delta, bias)
    assert grad_a.dtype == grad_d.dtype == torch.float64
    for got, exp in ((grad_a, exp_a), (grad_d, exp_d)):
        assert got.shape == exp.shape
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12 * exp.abs().max().item())


@pytest.mark.parametrize("op", ["sqnorm", "gram"])
@pytest.mark.parametrize("name", ["T1", "ghost_T20", "materialized_wide"])
def test_float64_elementwise_fallback_matches_reference(tdevice, monkeypatch, op, name):
    """FASTCURV_TRITON_FP64_DOT=0: float64 tiles contracted without tl.dot."""
    monkeypatch.setattr(_common, "FP64_USE_DOT", False)
    assert _common.dot_mode(torch.float64) == _common.DOT_ELEMENTWISE
    a, delta = _inputs(SHAPES[name], torch.float64, tdevice)
    out = LAUNCHERS[op].forward(a, delta, True)
    expected = REFERENCE_FORWARD[op](a, delta, True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())
    grad = _cotangent(op, a.shape[0], torch.float64, tdevice)
    for got, exp in zip(LAUNCHERS[op].backward(grad, a, delta, True), REFERENCE_BACKWARD[op](grad, a, delta, True)):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12 * exp.abs().max().item())


@pytest.mark.parametrize("op", ["sqnorm", "gram"])
@pytest.mark.parametrize("name", ["T1", "ghost", "materialized"])
def test_noncontiguous_inputs(tdevice, op, name):
    B, T, d_in, d_out = SHAPES[name]
    gen = torch.Generator().manual_seed(1)
    # a: transposed storage with a spare t slot (so it is non-contiguous even for T == 1);
    # delta: every other column of a wider tensor
    a = torch.randn(B, d_in, T + 1, generator=gen, dtype=torch.float64).to(tdevice).transpose(1, 2)[:, :T]
    delta = torch.randn(B, T, 2 * d_out, generator=gen, dtype=torch.float64).to(tdevice)[..., ::2]
    assert not a.is_contiguous() and not delta.is_contiguous()
    out = LAUNCHERS[op].forward(a, delta, True)
    expected = REFERENCE_FORWARD[op](a.contiguous(), delta.contiguous(), True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())
    grad = _cotangent(op, B, torch.float64, tdevice)
    if op == "gram":
        grad = grad.T  # a non-contiguous cotangent too
    got = LAUNCHERS[op].backward(grad, a, delta, True)
    exp = REFERENCE_BACKWARD[op](grad.contiguous(), a.contiguous(), delta.contiguous(), True)
    for g, e in zip(got, exp):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12 * e.abs().max().item())


# ---------------------------------------------------------------- float32 and half precision
def _check_low_precision(got, inputs32, fn, args64, bias, what):
    """Tolerance rule (flash-attention's): the kernel's error against float64 is at most twice the
    error PyTorch's own float32 computation (the reference op) makes, plus a floor of
    8 eps_fp32 * (sum of |terms|) for entries where the fp32 reference happens to be exact."""
    exact = fn(*args64, bias)
    torch_fp32 = fn(*inputs32, bias)
    exact, torch_fp32 = (exact,) if isinstance(exact, torch.Tensor) else exact, (torch_fp32,) if isinstance(torch_fp32, torch.Tensor) else torch_fp32
    got = (got,) if isinstance(got, torch.Tensor) else got
    magnitude = _magnitude(fn, *args64, bias=bias)
    magnitude = (magnitude,) if isinstance(magnitude, torch.Tensor) else magnitude
    eps = torch.finfo(torch.float32).eps
    for g, e, t, m in zip(got, exact, torch_fp32, magnitude):
        err = (g.double() - e).abs()
        allowed = 2 * (t.double() - e).abs() + 8 * eps * m
        assert (err <= allowed).all(), f"{what}: max excess {(err - allowed).max().item():.3e}"


def _backward_magnitude_fn(op):
    ref = REFERENCE_BACKWARD[op]
    return lambda grad, a, delta, bias: tuple(x.abs() for x in ref(grad.abs(), a.abs(), delta.abs(), bias))


@pytest.mark.parametrize("op", ["sqnorm", "gram"])
@pytest.mark.parametrize("name", ["T1", "ghost_T20", "materialized_wide"])
def test_float32_within_twice_torch_fp32_error(tdevice, max_tile, op, name):
    a, delta = _inputs(SHAPES[name], torch.float32, tdevice)
    a64, d64 = a.double(), delta.double()
    out = LAUNCHERS[op].forward(a, delta, True)
    assert out.dtype == torch.float32
    _check_low_precision(out, (a, delta), REFERENCE_FORWARD[op], (a64, d64), True, f"{op} forward")

    grad = _cotangent(op, a.shape[0], torch.float32, tdevice)
    got = LAUNCHERS[op].backward(grad, a, delta, True)
    assert got[0].dtype == got[1].dtype == torch.float32
    exact = REFERENCE_BACKWARD[op](grad.double(), a64, d64, True)
    torch32 = REFERENCE_BACKWARD[op](grad, a, delta, True)
    magnitude = _backward_magnitude_fn(op)(grad.double(), a64, d64, True)
    eps = torch.finfo(torch.float32).eps
    for g, e, t, m in zip(got, exact, torch32, magnitude):
        err = (g.double() - e).abs()
        allowed = 2 * (t.double() - e).abs() + 8 * eps * m
        assert (err <= allowed).all(), f"{op} backward: max excess {(err - allowed).max().item():.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["sqnorm", "gram"])
@pytest.mark.parametrize("name", ["T1", "ghost", "materialized"])
def test_half_inputs_give_fp32_results_and_half_gradients(tdevice, dtype, op, name):
    a, delta = _inputs(SHAPES[name], dtype, tdevice)
    a64, d64 = a.double(), delta.double()  # the exact values the kernel sees
    out = LAUNCHERS[op].forward(a, delta, True)
    assert out.dtype == torch.float32
    # products of half values are exact in fp32, so the fp32 rule applies to the upcast inputs
    _check_low_precision(out, (a.float(), delta.float()), REFERENCE_FORWARD[op], (a64, d64), True, f"{op} forward {dtype}")

    grad = _cotangent(op, a.shape[0], torch.float32, tdevice)
    grad_a, grad_d = LAUNCHERS[op].backward(grad, a, delta, True)
    assert grad_a.dtype == grad_d.dtype == dtype
    exact = REFERENCE_BACKWARD[op](grad.double(), a64, d64, True)
    magnitude = _backward_magnitude_fn(op)(grad.double(), a64, d64, True)
    # fp32 result rounded once to `dtype`: one unit in the last place (2^-8 relative for bf16,
    # 2^-11 for fp16) plus the fp32 accumulation floor
    rel = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    eps = torch.finfo(torch.float32).eps
    for g, e, m in zip((grad_a, grad_d), exact, magnitude):
        err = (g.double() - e).abs()
        assert (err <= rel * e.abs() + 8 * eps * m).all(), f"{op} backward {dtype}: max err {err.max().item():.3e}"


# ---------------------------------------------------------------- through fastcurv.ops
@pytest.mark.parametrize("op", ["sqnorm", "gram"])
@pytest.mark.parametrize("name", ["T1", "ghost", "materialized"])
def test_ops_backend_triton_matches_reference(tdevice, op, name):
    a, delta = _inputs(SHAPES[name], torch.float64, tdevice)
    a.requires_grad_()
    delta.requires_grad_()
    out = OPS[op](a, delta, True, backend="triton")
    expected = REFERENCE_FORWARD[op](a, delta, True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())
    cot = _cotangent(op, a.shape[0], torch.float64, tdevice)
    got = torch.autograd.grad(out, (a, delta), cot)
    exp = torch.autograd.grad(expected, (a, delta), cot)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12 * e.abs().max().item())


@pytest.mark.parametrize("op", ["sqnorm", "gram"])
def test_ops_backend_triton_accepts_2d_inputs(tdevice, op):
    a, delta = _inputs((6, 1, 11, 3), torch.float64, tdevice)
    out = OPS[op](a[:, 0], delta[:, 0], False, backend="triton")
    torch.testing.assert_close(out, REFERENCE_FORWARD[op](a, delta, False), rtol=1e-12, atol=1e-12)


# small shapes: every gradcheck evaluation launches the (interpreted) kernels
GRADCHECK_SHAPES = {"T1": (3, 1, 4, 3), "ghost": (2, 2, 3, 3), "materialized": (2, 3, 3, 2)}


@pytest.mark.parametrize("op", ["sqnorm", "gram"])
@pytest.mark.parametrize("name", list(GRADCHECK_SHAPES))
def test_gradcheck_and_gradgradcheck_through_ops(tdevice, op, name):
    shape = GRADCHECK_SHAPES[name]
    assert _path(*shape[1:]) == name
    a, delta = _inputs(shape, torch.float64, tdevice)
    a.requires_grad_()
    delta.requires_grad_()
    bias = name != "ghost"  # one case without the bias term

    def fn(a_, d_):
        return OPS[op](a_, d_, bias, backend="triton")

    assert torch.autograd.gradcheck(fn, (a, delta))
    # fast_mode for T > 1: second order checked along random directions (the full Jacobian of
    # the backward op costs ~100 interpreted launches per case)
    assert torch.autograd.gradgradcheck(fn, (a, delta), fast_mode=name != "T1")


@pytest.mark.parametrize("op", ["sqnorm", "gram"])
def test_opcheck(tdevice, op):
    forward_op = getattr(torch.ops.fastcurv, f"per_example_{op}_triton").default
    for name in ("T1", "ghost", "materialized"):
        a, delta = _inputs(GRADCHECK_SHAPES[name], torch.float64, tdevice)
        torch.library.opcheck(forward_op, (a, delta, True))
        torch.library.opcheck(forward_op, (a.requires_grad_(), delta.requires_grad_(), False))


# ---------------------------------------------------------------- edges and errors
@pytest.mark.parametrize("op", ["sqnorm", "gram"])
@pytest.mark.parametrize("shape", [(3, 0, 4, 5), (3, 4, 0, 5), (3, 1, 0, 5), (0, 2, 3, 4)], ids=str)
def test_degenerate_shapes(tdevice, op, shape):
    a, delta = _inputs(shape, torch.float64, tdevice)
    out = LAUNCHERS[op].forward(a, delta, True)
    expected = REFERENCE_FORWARD[op](a, delta, True)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = _cotangent(op, shape[0], torch.float64, tdevice)
    for g, e in zip(LAUNCHERS[op].backward(grad, a, delta, True), REFERENCE_BACKWARD[op](grad, a, delta, True)):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["sqnorm", "gram"])
def test_outputs_are_fresh_tensors(tdevice, op):
    a, delta = _inputs(SHAPES["T1"], torch.float64, tdevice)
    a_before, d_before = a.clone(), delta.clone()
    out = LAUNCHERS[op].forward(a, delta, True)
    grad = _cotangent(op, a.shape[0], torch.float64, tdevice)
    grad_a, grad_d = LAUNCHERS[op].backward(grad, a, delta, True)
    inputs = {a.data_ptr(), delta.data_ptr(), grad.data_ptr()}
    assert not inputs & {out.data_ptr(), grad_a.data_ptr(), grad_d.data_ptr()}
    assert torch.equal(a, a_before) and torch.equal(delta, d_before)


@pytest.mark.parametrize("op", ["sqnorm", "gram"])
def test_bad_inputs_raise_clear_errors(tdevice, op):
    launcher = LAUNCHERS[op]
    a, delta = _inputs((3, 2, 4, 5), torch.float64, tdevice)
    with pytest.raises(ValueError, match=rf"per_example_{op}.*\[B, T, d\].*\(3, 4\)"):
        launcher.forward(a[:, 0], delta, True)
    with pytest.raises(ValueError, match=rf"per_example_{op}.*\(3, 2, 4\).*\(2, 2, 5\).*\[B, T\]"):
        launcher.forward(a, delta[:2], True)
    with pytest.raises(TypeError, match=rf"per_example_{op}.*float64.*float32"):
        launcher.forward(a, delta.float(), True)
    with pytest.raises(TypeError, match=rf"per_example_{op}.*torch.int64"):
        launcher.forward(a.long(), delta.long(), True)
    bad_grad = torch.ones(4, dtype=torch.float64, device=tdevice)
    expected = "(3,)" if op == "sqnorm" else "(3, 3)"
    with pytest.raises(ValueError, match=rf"per_example_{op}.*\(4,\).*expected {re.escape(expected)}"):
        launcher.backward(bad_grad, a, delta, True)
