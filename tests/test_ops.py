"""The compiled kernels (C++ CPU, CUDA) and the reference backend of fastcurv.ops, against an
independent float64 oracle that materializes every per-example gradient (no ghost trick).

Backends: "cpu" (fastcurv._C CPU kernels; skipped when _C is not built), "cuda" (fastcurv._C
CUDA kernels, through the device fixture; skipped without a GPU) and "reference" (plain PyTorch,
on every device).
"""
import pytest
import torch

import fastcurv
from fastcurv import _backend
from fastcurv.reference import use_ghost

OPS = ("per_example_sqnorm", "per_example_gram")


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["compiled", "reference"])
def backend(request, device):
    """The backend name: the compiled kernels of the device's type ("cpu"/"cuda"), or "reference"."""
    if request.param == "reference":
        return "reference"
    if not _backend.has_extension():
        pytest.skip(f"fastcurv._C is not built: {_backend._C_ERROR}")
    if device.type == "cuda" and not _backend.has_cuda_kernels():
        pytest.skip("fastcurv._C was built without CUDA kernels")
    return device.type


@pytest.fixture
def compiled_device(device):
    """A device whose compiled kernels exist (for direct torch.ops.fastcurv.* calls)."""
    if not _backend.has_extension():
        pytest.skip(f"fastcurv._C is not built: {_backend._C_ERROR}")
    if device.type == "cuda" and not _backend.has_cuda_kernels():
        pytest.skip("fastcurv._C was built without CUDA kernels")
    return device


# ------------------------------------------------------------------------------------- the oracle
def oracle_per_example_grads(a, delta, bias):
    """[B, P]: every per-example gradient of z = a W^T + b, built explicitly."""
    J = torch.einsum("bti,bto->boi", a, delta).reshape(a.shape[0], a.shape[2] * delta.shape[2])
    return torch.cat([J, delta.sum(1)], 1) if bias else J


def oracle(op, a, delta, bias):
    J = oracle_per_example_grads(a, delta, bias)
    return J.square().sum(1) if op == "per_example_sqnorm" else J @ J.T


def run_op(op, a, delta, bias, backend, cotangent):
    """(forward, grad_a, grad_delta) of fastcurv.ops.<op>, backward with `cotangent`."""
    a = a.detach().requires_grad_()
    delta = delta.detach().requires_grad_()
    out = getattr(fastcurv.ops, op)(a, delta, bias, backend=backend)
    grad_a, grad_delta = torch.autograd.grad(out, (a, delta), cotangent.to(out.dtype))
    return out.detach(), grad_a, grad_delta


def run_oracle(op, a, delta, bias, cotangent):
    a = a.detach().requires_grad_()
    delta = delta.detach().requires_grad_()
    out = oracle(op, a, delta, bias)
    grad_a, grad_delta = torch.autograd.grad(out, (a, delta), cotangent.to(out.dtype))
    return out.detach(), grad_a, grad_delta


def magnitudes(op, a, delta, bias, cotangent):
    """Bounds on the sums of |terms| behind each output (oracle on |inputs|): the scale of the
    rounding error any summation order can make (the classic dot-product error bound)."""
    return run_oracle(op, a.abs().double(), delta.abs().double(), bias, cotangent.abs().double())


# Tolerances. float64: 64 eps64 times the magnitude bound above (any summation order stays within
# a few eps of it). float32 / bfloat16, the flash-attention rule: the error against the float64
# oracle may be at most 2x the error of PyTorch's own computation in that dtype (the oracle run in
# float32 / bfloat16), plus 8 eps32 times the magnitude bound, because the kernels accumulate in
# fp32 and a lucky PyTorch result (e.g. d = 1, exact) must not demand better than fp32 rounding.
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def assert_matches(name, actual, expected64, magnitude, eps_factor, torch_own=None):
    err = (actual.double() - expected64).abs().max().item() if actual.numel() else 0.0
    scale = magnitude.abs().max().item() if magnitude.numel() else 0.0
    allowed = eps_factor * scale
    if torch_own is not None and torch_own.numel():
        allowed += 2 * (torch_own.double() - expected64).abs().max().item()
    assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e} (magnitude {scale:.3e})"


# ------------------------------------------------------------------------------------- shapes
# (T, d_in, d_out): T = 1, and T > 1 on both sides of the ghost rule 2 T^2 <= d_in d_out.
SHAPES = [
    (1, 1, 3),
    (1, 127, 3),
    (1, 3, 127),
    (3, 127, 3),  # ghost (18 <= 381)
    (3, 3, 6),  # ghost, exactly on the boundary (18 <= 18)
    (3, 1, 3),  # materialized (18 > 3)
    (20, 3, 127),  # materialized (800 > 381)
]
assert [use_ghost(*s) for s in SHAPES[3:]] == [True, True, False, False]


def inputs(B, T, d_in, d_out, device, dtype=torch.float64):
    a = torch.randn(B, T, d_in, dtype=torch.float64).to(device=device, dtype=dtype)
    delta = torch.randn(B, T, d_out, dtype=torch.float64).to(device=device, dtype=dtype)
    return a, delta


def cotangent_for(op, B, device):
    shape = (B,) if op == "per_example_sqnorm" else (B, B)
    return torch.randn(shape, dtype=torch.float64, device=device)


# ------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-{}x{}".format(*s))
@pytest.mark.parametrize("B", [1, 3, 127])
@pytest.mark.parametrize("op", OPS)
def test_float64_matches_oracle(op, B, shape, bias, backend, device):
    a, delta = inputs(B, *shape, device)
    cot = cotangent_for(op, B, device)
    got = run_op(op, a, delta, bias, backend, cot)
    want = run_oracle(op, a, delta, bias, cot)
    mags = magnitudes(op, a, delta, bias, cot)
    for name, g, w, m in zip(("forward", "grad_a", "grad_delta"), got, want, mags):
        assert g.shape == w.shape and g.dtype == torch.float64, (name, g.shape, g.dtype)
        assert_matches(f"{op} {name}", g, w, m, 64 * EPS64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-{}x{}".format(*s))
@pytest.mark.parametrize("B", [3, 127])
@pytest.mark.parametrize("op", OPS)
def test_low_precision_matches_oracle(op, B, shape, dtype, backend, device):
    bias = True
    a, delta = inputs(B, *shape, device, dtype)
    cot = cotangent_for(op, B, device).float()
    got = run_op(op, a, delta, bias, backend, cot)
    # the float64 oracle on exactly the rounded inputs the kernel saw
    want = run_oracle(op, a.double(), delta.double(), bias, cot.double())
    torch_own = run_oracle(op, a, delta, bias, cot.to(dtype))  # PyTorch computing in `dtype`
    mags = magnitudes(op, a, delta, bias, cot)
    assert got[0].dtype == torch.float32, "forward is fp32 for fp16/bf16/fp32 inputs"
    assert got[1].dtype == dtype and got[2].dtype == dtype, "gradients come back in the input dtype"
    for name, g, w, t, m in zip(("forward", "grad_a", "grad_delta"), got, want, torch_own, mags):
        assert_matches(f"{op} {dtype} {name}", g, w, m, 8 * EPS32, torch_own=t)


@pytest.mark.parametrize("op", OPS)
def test_float16_dtype_rules(op, backend, device):
    """fp16 in: fp32 result (squared norms overflow fp16 easily), fp16 gradients."""
    a, delta = inputs(5, 1, 7, 4, device, torch.float16)
    a = a * 60  # ||a||^2 ~ 7 * 3600, ||delta||^2 ~ 4: squared norms ~1e5, beyond fp16's max 65504
    cot = cotangent_for(op, 5, device).float() * 0.01  # keeps the gradients themselves inside fp16 range
    out, grad_a, grad_d = run_op(op, a, delta, True, backend, cot)
    want = run_oracle(op, a.double(), delta.double(), True, cot.double())
    assert out.dtype == torch.float32 and grad_a.dtype == grad_d.dtype == torch.float16
    assert want[0].abs().max() > torch.finfo(torch.float16).max, "the case must overflow fp16"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want[0], rtol=1e-5, atol=0)
    for g, w in zip((grad_a, grad_d), want[1:]):
        torch.testing.assert_close(g.double(), w, rtol=2 ** -10, atol=2 ** -10 * w.abs().max().item())


# ------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("shape", [(1, 5, 7), (4, 9, 6), (6, 2, 3)], ids=["T1", "ghost", "materialized"])
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op, shape, backend, device):
    B, (T, d_in, d_out) = 5, shape
    # [B, T, d] views of [d, T, B] storage: every stride differs from the contiguous one
    a = torch.randn(d_in, T, B, dtype=torch.float64, device=device).permute(2, 1, 0)
    delta = torch.randn(d_out, T, B, dtype=torch.float64, device=device).permute(2, 1, 0)
    assert not a.is_contiguous() and not delta.is_contiguous()
    cot = cotangent_for(op, B, device)
    got = run_op(op, a, delta, True, backend, cot)
    want = run_oracle(op, a, delta, True, cot)
    mags = magnitudes(op, a, delta, True, cot)
    for name, g, w, m in zip(("forward", "grad_a", "grad_delta"), got, want, mags):
        assert_matches(f"{op} {name}", g, w, m, 64 * EPS64)


@pytest.mark.parametrize("op", OPS)
def test_two_dim_transposed_inputs(op, backend, device):
    """[B, d] inputs (T = 1 implied) given as transposed views."""
    a = torch.randn(7, 4, dtype=torch.float64, device=device).t()
    delta = torch.randn(3, 4, dtype=torch.float64, device=device).t()
    cot = cotangent_for(op, 4, device)
    got = run_op(op, a, delta, True, backend, cot)
    want = run_oracle(op, a[:, None], delta[:, None], True, cot)
    assert got[1].shape == a.shape and got[2].shape == delta.shape
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1][:, 0])
    torch.testing.assert_close(got[2], want[2][:, 0])


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op, T, backend, device):
    a, delta = inputs(0, T, 5, 3, device)
    cot = cotangent_for(op, 0, device)
    out, grad_a, grad_d = run_op(op, a, delta, True, backend, cot)
    assert out.shape == ((0,) if op == "per_example_sqnorm" else (0, 0))
    assert grad_a.shape == a.shape and grad_d.shape == delta.shape


@pytest.mark.parametrize("shape", [(0, 1, 0, 3), (0, 3, 4, 5), (3, 1, 0, 4), (3, 2, 4, 0), (3, 0, 4, 5)],
                         ids=["B0-T1", "B0-T3", "d_in0", "d_out0", "T0"])
@pytest.mark.parametrize("op", OPS)
def test_compiled_kernels_on_empty_sizes(op, shape, compiled_device):
    """fastcurv.ops routes empty inputs to the reference; the kernels must handle them too."""
    B = shape[0]
    a, delta = inputs(*shape, compiled_device)
    fwd = getattr(torch.ops.fastcurv, op)(a, delta, True)
    torch.testing.assert_close(fwd, oracle(op, a, delta, True))
    cot = cotangent_for(op, B, compiled_device)
    grad_a, grad_d = getattr(torch.ops.fastcurv, op + "_backward")(cot, a, delta, True)
    want = run_oracle(op, a, delta, True, cot)
    torch.testing.assert_close(grad_a, want[1])
    torch.testing.assert_close(grad_d, want[2])


# ------------------------------------------------------------------------------------- op checks
OPCHECK_SHAPES = [(3, 1, 4, 5), (3, 3, 6, 5), (3, 4, 2, 3)]  # T = 1, ghost, materialized


@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=["T1", "ghost", "materialized"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, shape, compiled_device):
    """Schema, fake kernel, autograd registration and AOT dispatch of the forward and backward ops
    (with requires_grad inputs, so the autograd paths are checked too)."""
    B, T, d_in, d_out = shape
    a, delta = inputs(*shape, compiled_device)
    cot = cotangent_for(op, B, compiled_device)
    forward = getattr(torch.ops.fastcurv, op).default
    backward = getattr(torch.ops.fastcurv, op + "_backward").default
    torch.library.opcheck(forward, (a.requires_grad_(), delta.requires_grad_(), True))
    torch.library.opcheck(backward, (cot.requires_grad_(), a, delta, False))
    if T > 1 and use_ghost(T, d_in, d_out):
        # non-contiguous inputs: the backward's outputs keep the inputs' strides, like its fake kernel
        a_t = torch.randn(d_in, T, B, dtype=torch.float64, device=compiled_device).permute(2, 1, 0)
        delta_t = torch.randn(B, T, 2 * d_out, dtype=torch.float64, device=compiled_device)[..., ::2]
        torch.library.opcheck(forward, (a_t, delta_t, False))
        torch.library.opcheck(backward, (cot.detach(), a_t, delta_t, True))


GRADCHECK_SHAPES = [(3, 1, 4, 2), (2, 3, 5, 4), (2, 3, 2, 3)]  # T = 1, ghost, materialized


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=["T1", "ghost", "materialized"])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_and_gradgradcheck(op, shape, bias, backend, device):
    a, delta = inputs(*shape, device)
    a.requires_grad_()
    delta.requires_grad_()
    fn = getattr(fastcurv.ops, op)

    def f(a, delta):
        return fn(a, delta, bias, backend=backend)

    assert torch.autograd.gradcheck(f, (a, delta))
    assert torch.autograd.gradgradcheck(f, (a, delta))


# ------------------------------------------------------------------------------------- bad input
def _bad_inputs(device):
    f64 = dict(dtype=torch.float64, device=device)
    return [
        (torch.randn(4, **f64), torch.randn(4, 3, **f64), ValueError, r"`a` must be \[B, d\] or \[B, T, d\], got shape \(4,\)"),
        (torch.randn(2, 3, 4, 5, **f64), torch.randn(2, 3, 4, **f64), ValueError, r"got shape \(2, 3, 4, 5\)"),
        (torch.randn(4, 3, **f64), torch.randn(4, 2, 3, **f64), ValueError, "must both be 2-D or both 3-D"),
        (torch.randn(4, 3, **f64), torch.randn(5, 3, **f64), ValueError, r"leading dims of `a` \(4, 3\) and `delta` \(5, 3\)"),
        (torch.randn(4, 2, 3, **f64), torch.randn(4, 3, 3, **f64), ValueError, r"\(4, 2, 3\) and `delta` \(4, 3, 3\)"),
        (torch.randn(4, 3, **f64), torch.randn(4, 3, dtype=torch.float32, device=device), TypeError, "cast one of them"),
        (torch.ones(4, 3, dtype=torch.int64, device=device), torch.ones(4, 3, dtype=torch.int64, device=device), TypeError, "must be floating point, got torch.int64"),
    ]


@pytest.mark.parametrize("op", OPS)
def test_bad_input_errors_name_the_op_and_shapes(op, backend, device):
    for a, delta, err, pattern in _bad_inputs(device):
        with pytest.raises(err, match=rf"fastcurv\.ops\.{op}: .*{pattern}"):
            getattr(fastcurv.ops, op)(a, delta, backend=backend)


@pytest.mark.parametrize("bias", ["no", 0, 1, None, torch.tensor(True)], ids=repr)
@pytest.mark.parametrize("op", OPS)
def test_bias_must_be_a_bool_for_every_backend(op, bias, backend, device):
    """The C++ op rejected bias="no" while the reference took it as True: one check for all backends."""
    a, delta = inputs(3, 1, 4, 2, device)
    with pytest.raises(TypeError, match=rf"fastcurv\.ops\.{op}: `bias` must be True or False, got "):
        getattr(fastcurv.ops, op)(a, delta, bias, backend=backend)


@pytest.mark.parametrize("op", OPS)
def test_compiled_op_checks_direct_calls(op, compiled_device):
    """torch.ops.fastcurv.* called directly (bypassing check_pair) still fails clearly."""
    f64 = dict(dtype=torch.float64, device=compiled_device)
    fwd = getattr(torch.ops.fastcurv, op)
    bwd = getattr(torch.ops.fastcurv, op + "_backward")
    with pytest.raises(RuntimeError, match=rf"fastcurv::{op}: expected a \[B, T, d_in\] and delta \[B, T, d_out\] \(3-D\), got a \[4, 3\]"):
        fwd(torch.randn(4, 3, **f64), torch.randn(4, 3, **f64), True)
    with pytest.raises(RuntimeError, match=rf"fastcurv::{op}: a \[4, 2, 3\] and delta \[4, 1, 3\] must agree in B and T"):
        fwd(torch.randn(4, 2, 3, **f64), torch.randn(4, 1, 3, **f64), True)
    with pytest.raises(RuntimeError, match=rf"fastcurv::{op}: a is Double but delta is Float"):
        fwd(torch.randn(4, 1, 3, **f64), torch.randn(4, 1, 3, dtype=torch.float32, device=compiled_device), True)
    ints = torch.ones(4, 1, 3, dtype=torch.int32, device=compiled_device)
    with pytest.raises(RuntimeError, match=rf"fastcurv::{op}: expected float16, bfloat16, float32 or float64 inputs, got Int"):
        fwd(ints, ints, True)
    bad_grad = torch.randn(5, **f64)
    with pytest.raises(RuntimeError, match=rf"fastcurv::{op}_backward: grad must have the forward output's shape"):
        bwd(bad_grad, torch.randn(4, 1, 3, **f64), torch.randn(4, 1, 3, **f64), True)


def test_cuda_backend_with_cpu_tensors_is_unavailable():
    a = torch.randn(3, 4)
    for op in OPS:
        with pytest.raises(fastcurv.BackendUnavailable, match="backend 'cuda'"):
            getattr(fastcurv.ops, op)(a, a, backend="cuda")
