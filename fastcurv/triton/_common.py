"""Pieces shared by the Triton ops: input checks, tile sizing, the tile-contraction helper and the
two kernels both ops use (the fused ghost kernel and the scaled Gram kernel).

Precision rules (they match :mod:`fastcurv.reference`):

* accumulation is float32 for fp16/bf16/fp32 inputs and float64 for float64 inputs;
* fp32 tiles go through ``tl.dot(..., input_precision="ieee")``: TF32 would keep ~10 mantissa bits
  and lose about 3 decimal digits in a squared norm;
* fp16/bf16 tiles go to ``tl.dot`` in their own dtype with fp32 accumulation: the products of two
  half-precision numbers are exact in fp32, so this equals upcasting first, and uses tensor cores;
* float64 tiles use ``tl.dot`` too unless ``FASTCURV_TRITON_FP64_DOT=0`` (module flag
  :data:`FP64_USE_DOT`), which switches to an elementwise multiply + ``tl.sum`` contraction for
  targets whose Triton cannot lower a float64 dot;
* under ``TRITON_INTERPRET=1`` bf16 tiles are upcast to fp32 (exact) before ``tl.dot``: the
  interpreter (triton 3.x) multiplies bf16 tiles as their raw uint16 bit patterns, giving garbage.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from fastcurv.reference import compute_dtype

#: float64 contractions via ``tl.dot`` (True) or the elementwise fallback (False); see module doc.
FP64_USE_DOT = os.environ.get("FASTCURV_TRITON_FP64_DOT", "1") not in ("0", "", "false", "False")

#: upper bound on every tile size; tests lower it to 16 so small shapes span several tiles
MAX_TILE = 128

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- launcher-side helpers
def check_inputs(op: str, a: torch.Tensor, delta: torch.Tensor) -> None:
    """Raise a clear error unless a [B, T, d_in] and delta [B, T, d_out] are a valid pair."""
    where = f"fastcurv.triton.{op}"
    for name, t in (("a", a), ("delta", delta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: `{name}` must be a Tensor, got {type(t).__name__}")
        if t.ndim != 3:
            raise ValueError(f"{where}: `{name}` must be [B, T, d], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: `{name}` has dtype {t.dtype}; expected one of {SUPPORTED_DTYPES}")
    if a.shape[:2] != delta.shape[:2]:
        raise ValueError(
            f"{where}: `a` {tuple(a.shape)} and `delta` {tuple(delta.shape)} must agree in [B, T]"
        )
    if a.dtype != delta.dtype:
        raise TypeError(f"{where}: `a` is {a.dtype} but `delta` is {delta.dtype}; expected the same dtype")
    if a.device != delta.device:
        raise ValueError(f"{where}: `a` is on {a.device} but `delta` is on {delta.device}")


def check_grad(op: str, grad: torch.Tensor, shape: tuple, device: torch.device) -> None:
    """Raise a clear error unless `grad` is a floating tensor of `shape` on `device`."""
    where = f"fastcurv.triton.{op}"
    if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
        raise TypeError(f"{where}: `grad` must be a floating-point Tensor, got {type(grad).__name__}")
    if tuple(grad.shape) != tuple(shape):
        raise ValueError(f"{where}: `grad` has shape {tuple(grad.shape)}, expected {tuple(shape)}")
    if grad.device != device:
        raise ValueError(f"{where}: `grad` is on {grad.device} but the inputs are on {device}")


def acc_tl_dtype(dtype: torch.dtype):
    """Triton accumulation dtype for inputs of torch `dtype`."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


#: how :func:`mm_acc` contracts tiles
DOT_ELEMENTWISE = 0  # multiply + tl.sum in the accumulation dtype (float64 fallback)
DOT_NATIVE = 1  # tl.dot on the tiles as loaded (ieee for fp32; fp32 accumulation for fp16/bf16)
DOT_UPCAST = 2  # tl.dot after an exact upcast to fp32 (bf16 under the interpreter)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter (the version beside torch 2.11) turns each int kernel argument into a
    1-element array and indexes it with ``int(array)``, which numpy 2 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"), so every ``for k in range(0, n, BLOCK)`` over a runtime ``n``
    fails under TRITON_INTERPRET=1. Triton 3.9's interpreter squeezes first; do the same on older ones.
    Only the interpreter's tensor patching is touched: compiled kernels on a GPU never go through it."""
    import inspect

    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a triton without the interpreter
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fastcurv_fixed", False):
        return
    try:
        if "squeeze" in inspect.getsource(original):
            return  # already fixed upstream
    except (OSError, TypeError):  # pragma: no cover - no source to read
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]) if self.handle.data.size == 1
                       else int(self.handle.data))

    patched._fastcurv_fixed = True
    interpreter._patch_lang_tensor = patched


_fix_interpreter_scalar_index()


def dot_mode(dtype: torch.dtype) -> int:
    """The tile contraction used for inputs of `dtype` (see the module doc)."""
    if dtype == torch.float64 and not FP64_USE_DOT:
        return DOT_ELEMENTWISE
    if dtype == torch.bfloat16 and _interpreting():
        return DOT_UPCAST
    return DOT_NATIVE


def tile(n: int, largest: int = 64) -> int:
    """Power-of-two tile covering up to `n`, between 16 (tl.dot's minimum) and `largest`
    (itself capped by :data:`MAX_TILE`)."""
    return max(16, min(largest, MAX_TILE, triton.next_power_of_2(max(n, 1))))


def dot_tile(n: int, dot: int, largest: int = 64) -> int:
    """Tile size for a contraction of mode `dot`: the elementwise fallback materializes a
    BLOCK^3 product in registers, so it stays at 16."""
    return 16 if dot == DOT_ELEMENTWISE else tile(n, largest)


def device_guard(t: torch.Tensor):
    """Launch on `t`'s GPU even when it is not the current device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------- device-side helpers
@triton.jit
def mm_acc(x, y, acc, DOT_MODE: tl.constexpr):
    """acc + x @ y for tiles x [M, K], y [K, N] (any input dtype, accumulated in acc's dtype).
    DOT_MODE: 0 elementwise, 1 tl.dot as loaded, 2 tl.dot after upcasting to fp32."""
    if DOT_MODE == 2:
        acc = tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    elif DOT_MODE == 1:
        if x.dtype == tl.float64:
            # out_dtype named: Triton 3.6 (torch 2.11's) defaults it to float32 and asserts that a float64
            # accumulator matches it; Triton 3.9 infers it
            acc = tl.dot(x, y, acc, out_dtype=tl.float64)
        elif x.dtype == tl.float32:
            acc = tl.dot(x, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
    else:
        xa = x.to(acc.dtype)
        ya = y.to(acc.dtype)
        acc += tl.sum(xa[:, :, None] * ya[None, :, :], axis=1)
    return acc


@triton.jit
def cast_for_store(x, OUT_DTYPE: tl.constexpr):
    """x (fp32/fp64) rounded to OUT_DTYPE to nearest-even, like torch's ``.to``.

    bf16 is rounded by hand on the fp32 bits: the Triton interpreter's plain fp32 -> bf16 cast
    truncates (and its "rtne" mode drops the mantissa carry), and the integer form is the same
    rounding the GPU does, so the tested code is the code that runs on the GPU. NaN stays NaN."""
    if OUT_DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), y)
    else:
        return x.to(OUT_DTYPE)


@triton.jit
def _ghost_rowtile_sum(
    a_i, a_j, d_i, d_j, t0, s_begin, T, d_in, d_out,
    sa_t, sa_k, sd_t, sd_k,
    BIAS: tl.constexpr, DIAGONAL: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """sum over s >= s_begin, t in [t0, t0 + BLOCK_T) of (a_it . a_js + BIAS) (d_it . d_js).

    The two T x T Gram tiles live only in registers. DIAGONAL (i == j, the squared norm): the plane
    is symmetric, so the caller starts at s_begin = t0 and tiles off the diagonal count twice."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    total = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC_DTYPE)
    for s0 in range(s_begin, T, BLOCK_T):
        offs_s = s0 + tl.arange(0, BLOCK_T)
        s_ok = offs_s < T
        gram_a = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC_DTYPE)
        for k0 in range(0, d_in, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < d_in
            x = tl.load(a_i + offs_t[:, None] * sa_t + kk[None, :] * sa_k, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(a_j + offs_s[:, None] * sa_t + kk[None, :] * sa_k, mask=s_ok[:, None] & k_ok[None, :], other=0.0)
            gram_a = mm_acc(x, tl.trans(y), gram_a, DOT_MODE)
        gram_d = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC_DTYPE)
        for k0 in range(0, d_out, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < d_out
            x = tl.load(d_i + offs_t[:, None] * sd_t + kk[None, :] * sd_k, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(d_j + offs_s[:, None] * sd_t + kk[None, :] * sd_k, mask=s_ok[:, None] & k_ok[None, :], other=0.0)
            gram_d = mm_acc(x, tl.trans(y), gram_d, DOT_MODE)
        if BIAS:
            # the bias gradient sum_t d_it contributes sum_{t,s} d_it . d_js: fold it in as "+1";
            # rows/cols outside [0, T) have gram_d == 0, so they still add nothing
            gram_a += 1.0
        contrib = gram_a * gram_d
        if DIAGONAL:
            contrib = contrib * (2.0 - (s0 == t0).to(ACC_DTYPE))
        total += contrib
    return tl.sum(tl.sum(total, axis=1), axis=0)


@triton.jit
def ghost_kernel(
    a_ptr, d_ptr, out_ptr, T, d_in, d_out,
    sa_b, sa_t, sa_k, sd_b, sd_t, sd_k, so_0, so_1,
    BIAS: tl.constexpr, DIAGONAL: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Fused ghost contraction sum_{t,s} (a_it . a_js + BIAS)(d_it . d_js).

    DIAGONAL (per_example_sqnorm): grid (B, cdiv(T, BLOCK_T)); program (i, r) writes row tile r's
    share of example i's sum to out[i, r] (the caller sums over r: deterministic, no atomics).
    Otherwise (per_example_gram): grid (B, B); program (i, j >= i) writes out[i, j] and out[j, i]."""
    i = tl.program_id(0).to(tl.int64)
    if DIAGONAL:
        r = tl.program_id(1)
        t0 = r * BLOCK_T
        value = _ghost_rowtile_sum(
            a_ptr + i * sa_b, a_ptr + i * sa_b, d_ptr + i * sd_b, d_ptr + i * sd_b, t0, t0, T, d_in, d_out,
            sa_t, sa_k, sd_t, sd_k, BIAS, True, DOT_MODE, BLOCK_T, BLOCK_K, ACC_DTYPE,
        )
        tl.store(out_ptr + i * so_0 + r * so_1, value)
    else:
        j = tl.program_id(1).to(tl.int64)
        if j >= i:
            value = tl.zeros([], dtype=ACC_DTYPE)
            for t0 in range(0, T, BLOCK_T):
                value += _ghost_rowtile_sum(
                    a_ptr + i * sa_b, a_ptr + j * sa_b, d_ptr + i * sd_b, d_ptr + j * sd_b, t0, 0, T, d_in, d_out,
                    sa_t, sa_k, sd_t, sd_k, BIAS, False, DOT_MODE, BLOCK_T, BLOCK_K, ACC_DTYPE,
                )
            tl.store(out_ptr + i * so_0 + j * so_1, value)
            tl.store(out_ptr + j * so_0 + i * so_1, value)


@triton.jit
def scaled_gram_kernel(
    x_ptr, y_ptr, w_ptr, out_ptr, N, R, k_x, k_y,
    sx_batch, sx_outer, sx_inner, sx_k, sy_batch, sy_outer, sy_inner, sy_k,
    sw_0, sw_1, so_batch, so_0, so_1,
    PLUS_ONE: tl.constexpr, HAS_Y: tl.constexpr, W_MODE: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """out[b, p, q] = w * (X_p . X_q + PLUS_ONE) * (Y_p . Y_q if HAS_Y), a symmetric [N, N] per batch b.

    Row p of batch b lives at x_ptr + b*sx_batch + (p // R)*sx_outer + (p % R)*sx_inner, so a
    [B, T, d] tensor of any strides is read either as B*T rows (R = T) or per example (batch = B).
    W_MODE 0: w = 1. 1: w = g[p//R, q//R] + g[q//R, p//R] (the cotangent of a symmetric output,
    g = w_ptr). 2: w = 2 g[b] (the cotangent of a squared norm). Grid (n_tiles, n_tiles, batch):
    only tiles with column tile >= row tile compute; each stores its tile and the transpose."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if pn >= pm:
        rows_m = (pm * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rows_n = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_ok = rows_m < N
        n_ok = rows_n < N
        offs_k = tl.arange(0, BLOCK_K)
        xm = x_ptr + b * sx_batch + (rows_m // R) * sx_outer + (rows_m % R) * sx_inner
        xn = x_ptr + b * sx_batch + (rows_n // R) * sx_outer + (rows_n % R) * sx_inner
        acc = tl.zeros([BLOCK_N, BLOCK_N], dtype=ACC_DTYPE)
        for k0 in range(0, k_x, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k_x
            u = tl.load(xm[:, None] + kk[None, :] * sx_k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            v = tl.load(xn[:, None] + kk[None, :] * sx_k, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = mm_acc(u, tl.trans(v), acc, DOT_MODE)
        if PLUS_ONE:
            acc += 1.0
        if HAS_Y:
            ym = y_ptr + b * sy_batch + (rows_m // R) * sy_outer + (rows_m % R) * sy_inner
            yn = y_ptr + b * sy_batch + (rows_n // R) * sy_outer + (rows_n % R) * sy_inner
            acc_y = tl.zeros([BLOCK_N, BLOCK_N], dtype=ACC_DTYPE)
            for k0 in range(0, k_y, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < k_y
                u = tl.load(ym[:, None] + kk[None, :] * sy_k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                v = tl.load(yn[:, None] + kk[None, :] * sy_k, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc_y = mm_acc(u, tl.trans(v), acc_y, DOT_MODE)
            acc = acc * acc_y
        both_ok = m_ok[:, None] & n_ok[None, :]
        if W_MODE == 1:
            gm = rows_m // R
            gn = rows_n // R
            w = tl.load(w_ptr + gm[:, None] * sw_0 + gn[None, :] * sw_1, mask=both_ok, other=0.0).to(ACC_DTYPE)
            w += tl.load(w_ptr + gn[None, :] * sw_0 + gm[:, None] * sw_1, mask=both_ok, other=0.0).to(ACC_DTYPE)
            acc = acc * w
        if W_MODE == 2:
            acc = acc * (2.0 * tl.load(w_ptr + b * sw_0).to(ACC_DTYPE))
        out_b = out_ptr + b * so_batch
        tl.store(out_b + rows_m[:, None] * so_0 + rows_n[None, :] * so_1, acc, mask=both_ok)
        tl.store(out_b + rows_n[None, :] * so_0 + rows_m[:, None] * so_1, acc, mask=both_ok)


def scaled_gram(x: torch.Tensor, *, rows_per_group: int, batched: bool, plus_one: bool,
                y: torch.Tensor | None = None, w: torch.Tensor | None = None, w_mode: int = 0) -> torch.Tensor:
    """Launch :func:`scaled_gram_kernel` on a [B, T, k] tensor x (and y of the same [B, T]).

    batched=False: one [B*T, B*T] matrix over all rows (rows_per_group = T); batched=True: one
    [T, T] matrix per example (rows_per_group = T, batch = B). Returns it in the accumulation dtype."""
    B, T, k_x = x.shape
    acc = compute_dtype(x.dtype)
    dot = dot_mode(x.dtype)
    n_batch, N = (B, T) if batched else (1, B * T)
    out = torch.empty(n_batch, N, N, device=x.device, dtype=acc)
    if N == 0 or n_batch == 0:
        return out
    k_y = y.shape[2] if y is not None else 0
    block_n = dot_tile(N, dot)
    block_k = dot_tile(max(k_x, k_y), dot)
    y_ = y if y is not None else x  # not read when HAS_Y is False
    w_ = w if w is not None else out  # not read when W_MODE == 0
    sw = (w.stride(0), w.stride(1) if w.ndim > 1 else 0) if w is not None else (0, 0)
    n_tiles = triton.cdiv(N, block_n)
    with device_guard(x):
        scaled_gram_kernel[(n_tiles, n_tiles, n_batch)](
            x, y_, w_, out, N, rows_per_group, k_x, k_y,
            x.stride(0) if batched else 0, x.stride(0), x.stride(1), x.stride(2),
            y_.stride(0) if batched else 0, y_.stride(0), y_.stride(1), y_.stride(2),
            sw[0], sw[1], out.stride(0), out.stride(1), out.stride(2),
            PLUS_ONE=plus_one, HAS_Y=y is not None, W_MODE=w_mode, DOT_MODE=dot,
            BLOCK_N=block_n, BLOCK_K=block_k, ACC_DTYPE=acc_tl_dtype(x.dtype),
        )
    return out
