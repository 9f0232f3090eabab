// Input checks and rules shared by the CPU and CUDA kernels of every fastcurv op.
// The semantics (and the Python-side checks, fastcurv/ops/_register.py:check_pair) are those of
// fastcurv/reference.py; these checks guard direct calls of torch.ops.fastcurv.* from C++/Python.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastcurv {

// The per-layer cost rule for T > 1, identical to reference.use_ghost: the ghost form costs
// O(T^2 (d_in + d_out)) per example, the materialized per-example gradient O(T d_in d_out).
inline bool use_ghost(int64_t T, int64_t d_in, int64_t d_out) {
  return 2 * T * T <= d_in * d_out;
}

// Accumulation (and forward result) dtype: fp32 for fp16/bf16, the dtype itself otherwise.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// a [B, T, d_in] and delta [B, T, d_out] on `device_type`, same dtype (fp16/bf16/fp32/fp64),
// same device.
inline void check_pair(const char* op, const at::Tensor& a, const at::Tensor& delta, c10::DeviceType device_type) {
  TORCH_CHECK(a.dim() == 3 && delta.dim() == 3, "fastcurv::", op,
              ": expected a [B, T, d_in] and delta [B, T, d_out] (3-D), got a ", a.sizes(), " and delta ",
              delta.sizes());
  TORCH_CHECK(a.size(0) == delta.size(0) && a.size(1) == delta.size(1), "fastcurv::", op,
              ": a ", a.sizes(), " and delta ", delta.sizes(), " must agree in B and T (dims 0 and 1)");
  TORCH_CHECK(a.scalar_type() == delta.scalar_type(), "fastcurv::", op, ": a is ", a.scalar_type(),
              " but delta is ", delta.scalar_type(), "; both must have the same dtype");
  TORCH_CHECK(is_supported_dtype(a.scalar_type()), "fastcurv::", op,
              ": expected float16, bfloat16, float32 or float64 inputs, got ", a.scalar_type());
  TORCH_CHECK(a.device().type() == device_type && delta.device() == a.device(), "fastcurv::", op,
              ": this kernel needs a and delta on one ", c10::DeviceTypeName(device_type),
              " device, got a on ", a.device(), " and delta on ", delta.device());
}

// The incoming gradient of a forward output: shape `expected` (e.g. [B] or [B, B]), floating, on a's device.
inline void check_grad(const char* op, const at::Tensor& grad, at::IntArrayRef expected, const at::Tensor& a) {
  TORCH_CHECK(grad.sizes() == expected, "fastcurv::", op, ": grad must have the forward output's shape ",
              expected, " (a is ", a.sizes(), "), got ", grad.sizes());
  TORCH_CHECK(is_supported_dtype(grad.scalar_type()), "fastcurv::", op,
              ": expected a floating-point grad, got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == a.device(), "fastcurv::", op, ": grad is on ", grad.device(),
              " but a is on ", a.device());
}

// The GEMM part of the T > 1 sqnorm backward, shared by the CPU and CUDA kernels (ATen calls BLAS or
// cuBLAS): grad_a / grad_delta before the factor 2 g_i and the bias term. ac, dc: [B, T, d] in the
// compute dtype.
inline std::tuple<at::Tensor, at::Tensor> sqnorm_sequence_backward_gemms(const at::Tensor& ac, const at::Tensor& dc) {
  const int64_t T = ac.size(1), d_in = ac.size(2), d_out = dc.size(2);
  if (use_ghost(T, d_in, d_out)) {
    return {at::bmm(at::bmm(dc, dc.transpose(1, 2)), ac), at::bmm(at::bmm(ac, ac.transpose(1, 2)), dc)};
  }
  const at::Tensor J = at::bmm(dc.transpose(1, 2), ac);  // [B, d_out, d_in]
  return {at::bmm(dc, J), at::bmm(ac, J.transpose(1, 2))};
}

}  // namespace fastcurv
