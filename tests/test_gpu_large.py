"""Large shapes whose element offsets pass 2^31 (int64 indexing in the CUDA and Triton kernels), on a GPU,
against float64 computed in chunks. Without a GPU the same checks run at tiny sizes on the CPU backends
(and Triton under the interpreter), so the checking code itself is exercised wherever the suite runs.

Shapes (GPU): T = 1 rows a [2^21 + 3, 1030] in bf16 and fp32 (4.3 / 8.6 GB; the last rows start past
2^31 elements); in bf16, a Gram over d_in = 2^25 + 1 columns of 64 rows; a ghost-form T > 1 input [8, 4096, 65537].

Tolerance: every result is a sum of non-negative terms for the norms (fp32 accumulation: relative error
at most (n - 1) u per sum, u = 2^-24, plus u per product), so rows are checked at (d_in + d_out + T + 2) u
relative. Gram entries and the ghost sums have terms of both signs: checked relative to the same sums of
|terms| (the magnitude bound), with n u where n is the number of terms.
"""
import pytest
import torch

import fastcurv
from fastcurv import _backend

U = 2.0**-24  # unit roundoff of fp32 accumulation

GPU_SIZES = {"rows": (2**21 + 3, 1030, 8), "gram": (64, 2**25 + 1, 16), "ghost": (8, 4096, 65537, 1024)}
CPU_SIZES = {"rows": (37, 19, 5), "gram": (6, 33, 4), "ghost": (3, 5, 40, 7)}


def backends(device):
    if device.type == "cuda":
        names = ["triton"]
        if _backend.has_cuda_kernels():
            names.append("cuda")
        return names
    names = ["reference"] + (["cpu"] if _backend.has_extension() else [])
    return names + (["triton"] if _backend.has_triton() and _backend.triton_interpret() else [])


@pytest.fixture
def sizes(device):
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if free < 24 * 2**30:
            pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
        return GPU_SIZES
    return CPU_SIZES


def randn(shape, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, device=device, dtype=torch.float32, generator=gen).to(dtype)


def chunked_rows_sumsq(x, chunk=65536):
    return torch.cat([x[i : i + chunk].double().square().sum(-1) for i in range(0, x.shape[0], chunk)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_t1_rows_past_int32_offsets(device, sizes, dtype):
    B, d_in, d_out = sizes["rows"]
    a, delta = randn((B, d_in), device, dtype, 1), randn((B, d_out), device, dtype, 2)
    aa, dd = chunked_rows_sumsq(a), chunked_rows_sumsq(delta)
    want = (aa + 1) * dd
    tol = (d_in + d_out + 3) * U
    cot = torch.rand(B, device=device)
    tail = slice(B - 4, B)  # the rows whose offsets are the largest
    for backend in backends(device):
        ar, dr = a.detach().requires_grad_(), delta.detach().requires_grad_()
        got = fastcurv.ops.per_example_sqnorm(ar, dr, True, backend=backend)
        rel = ((got.double() - want).abs() / want).max().item()
        assert rel <= tol, f"{backend}: forward max relative row error {rel:.2e} > {tol:.2e} (B={B}, d_in={d_in}, {dtype})"
        ga, gd = torch.autograd.grad(got, (ar, dr), cot)
        # grad_a_i = 2 g_i ||d_i||^2 a_i, grad_d_i = 2 g_i (||a_i||^2 + 1) d_i: each a scaled copy
        want_ga = 2 * cot[tail, None].double() * dd[tail, None] * a[tail].double()
        want_gd = 2 * cot[tail, None].double() * (aa[tail, None] + 1) * delta[tail].double()
        eps = torch.finfo(dtype).eps
        for name, g, w in (("grad_a", ga[tail], want_ga), ("grad_delta", gd[tail], want_gd)):
            err = ((g.double() - w).abs() / w.abs().clamp_min(1e-30)).max().item()
            assert err <= eps + tol, f"{backend}: {name} in the last rows: relative error {err:.2e}"
        del got, ga, gd, ar, dr


def test_gram_over_wide_rows(device, sizes):
    B, d_in, d_out = sizes["gram"]
    a, delta = randn((B, d_in), device, torch.bfloat16, 3), randn((B, d_out), device, torch.bfloat16, 4)
    AA = torch.zeros(B, B, dtype=torch.float64, device=device)
    AA_abs = torch.zeros_like(AA)
    block = 2**22 if device.type == "cuda" else 8  # float64 column blocks of at most 2 GB (several on the CPU too)
    for j in range(0, d_in, block):
        A = a[:, j : j + block].double()
        AA += A @ A.T
        AA_abs += A.abs() @ A.abs().T
    D = delta.double()
    want = (AA + 1) * (D @ D.T)
    magnitude = (AA_abs + 1) * (D.abs() @ D.abs().T)
    tol = (d_in + d_out + 3) * U
    for backend in backends(device):
        got = fastcurv.ops.per_example_gram(a, delta, True, backend=backend).double()
        err = ((got - want).abs() / magnitude).max().item()
        assert err <= tol, f"{backend}: Gram error {err:.2e} of the |terms| bound > {tol:.2e} (d_in={d_in})"


def test_ghost_sqnorm_past_int32_offsets(device, sizes):
    B, T, d_in, d_out = sizes["ghost"]
    assert fastcurv.reference.use_ghost(T, d_in, d_out)
    a, delta = randn((B, T, d_in), device, torch.bfloat16, 5), randn((B, T, d_out), device, torch.bfloat16, 6)
    want, magnitude = [], []
    for i in range(B):  # one example at a time in float64
        A, D = a[i].double(), delta[i].double()
        want.append(((A @ A.T + 1) * (D @ D.T)).sum())
        magnitude.append(((A.abs() @ A.abs().T + 1) * (D.abs() @ D.abs().T)).sum())
    want, magnitude = torch.stack(want), torch.stack(magnitude)
    tol = (d_in + d_out + T * T + 3) * U
    for backend in backends(device):
        got = fastcurv.ops.per_example_sqnorm(a, delta, True, backend=backend).double()
        err = ((got - want).abs() / magnitude).max().item()
        assert err <= tol, f"{backend}: ghost sqnorm error {err:.2e} of the |terms| bound > {tol:.2e}"
