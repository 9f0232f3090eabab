// CPU kernels of fastcurv::per_example_sqnorm and its backward (semantics: fastcurv/reference.py).
//   s_i = ||sum_t delta_it a_it^T||_F^2 (+ ||sum_t delta_it||^2 if bias)
// T == 1: one fused pass over the rows (s_i = ||delta_i||^2 (||a_i||^2 + bias)), reading the
// inputs in their own dtype and strides. T > 1: ATen batched GEMMs (MKL/OpenBLAS) for the ghost
// Gram matrices or the materialized per-example gradient, then one fused reduction per example.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "cpu_utils.h"

namespace fastcurv {
namespace {

at::Tensor sqnorm_rows(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  const int64_t B = a.size(0), d_in = a.size(2), d_out = delta.size(2);
  at::Tensor out = at::empty({B}, a.options().dtype(compute_dtype(a.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_example_sqnorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
    const scalar_t* d_ptr = delta.const_data_ptr<scalar_t>();
    const int64_t as0 = a.stride(0), as2 = a.stride(2), ds0 = delta.stride(0), ds2 = delta.stride(2);
    const acc_t bias_term = bias ? acc_t(1) : acc_t(0);
    acc_t* o = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, cpu::row_grain(d_in + d_out), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t aa = cpu::sum_of_squares<acc_t>(a_ptr + i * as0, d_in, as2);
        const acc_t dd = cpu::sum_of_squares<acc_t>(d_ptr + i * ds0, d_out, ds2);
        o[i] = dd * (aa + bias_term);
      }
    });
  });
  return out;
}

// out[j * out_stride] = c * x[j * x_stride]; the unit-stride case is a separate loop so that it vectorizes.
template <typename scalar_t, typename acc_t>
inline void scale_row(scalar_t* out, int64_t out_stride, const scalar_t* x, int64_t x_stride, int64_t n, acc_t c) {
  if (out_stride == 1 && x_stride == 1) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(c * static_cast<acc_t>(x[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) out[j * out_stride] = static_cast<scalar_t>(c * static_cast<acc_t>(x[j * x_stride]));
  }
}

std::tuple<at::Tensor, at::Tensor> sqnorm_rows_backward(const at::Tensor& grad, const at::Tensor& a,
                                                        const at::Tensor& delta, bool bias) {
  const int64_t B = a.size(0), d_in = a.size(2), d_out = delta.size(2);
  // empty_like keeps the inputs' strides, as the fake kernel (torch.empty_like) does.
  at::Tensor grad_a = at::empty_like(a), grad_d = at::empty_like(delta);
  const at::Tensor g = grad.to(compute_dtype(a.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_example_sqnorm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
    const scalar_t* d_ptr = delta.const_data_ptr<scalar_t>();
    scalar_t* ga_ptr = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* gd_ptr = grad_d.mutable_data_ptr<scalar_t>();
    const int64_t as0 = a.stride(0), as2 = a.stride(2), ds0 = delta.stride(0), ds2 = delta.stride(2);
    const int64_t gas0 = grad_a.stride(0), gas2 = grad_a.stride(2);
    const int64_t gds0 = grad_d.stride(0), gds2 = grad_d.stride(2);
    const acc_t bias_term = bias ? acc_t(1) : acc_t(0);
    const acc_t* g_ptr = g.const_data_ptr<acc_t>();
    at::parallel_for(0, B, cpu::row_grain(2 * (d_in + d_out)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* a_row = a_ptr + i * as0;
        const scalar_t* d_row = d_ptr + i * ds0;
        const acc_t aa = cpu::sum_of_squares<acc_t>(a_row, d_in, as2);
        const acc_t dd = cpu::sum_of_squares<acc_t>(d_row, d_out, ds2);
        const acc_t g2 = acc_t(2) * g_ptr[i];
        const acc_t scale_a = g2 * dd, scale_d = g2 * (aa + bias_term);
        scalar_t* ga_row = ga_ptr + i * gas0;
        scalar_t* gd_row = gd_ptr + i * gds0;
        scale_row<scalar_t, acc_t>(ga_row, gas2, a_row, as2, d_in, scale_a);
        scale_row<scalar_t, acc_t>(gd_row, gds2, d_row, ds2, d_out, scale_d);
      }
    });
  });
  return {grad_a, grad_d};
}

at::Tensor sqnorm_sequence(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  const int64_t B = a.size(0), T = a.size(1), d_in = a.size(2), d_out = delta.size(2);
  const at::ScalarType cdt = compute_dtype(a.scalar_type());
  const at::Tensor ac = a.to(cdt), dc = delta.to(cdt);
  at::Tensor X, Y;
  if (use_ghost(T, d_in, d_out)) {  // sum_{t,s} (a_t . a_s)(delta_t . delta_s)
    X = at::bmm(ac, ac.transpose(1, 2)).view({B, T * T});
    Y = at::bmm(dc, dc.transpose(1, 2)).view({B, T * T});
  } else {  // ||delta^T a||_F^2, the per-example weight gradient materialized
    X = at::bmm(dc.transpose(1, 2), ac).view({B, d_out * d_in});
    Y = X;
  }
  const at::Tensor delta_sum = bias ? dc.sum(1).contiguous() : at::Tensor();
  at::Tensor out = at::empty({B}, ac.options());
  AT_DISPATCH_FLOATING_TYPES(cdt, "per_example_sqnorm_cpu", [&] { cpu::rowwise_dot<scalar_t>(X, Y, delta_sum, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sqnorm_sequence_backward(const at::Tensor& grad, const at::Tensor& a,
                                                            const at::Tensor& delta, bool bias) {
  const at::ScalarType cdt = compute_dtype(a.scalar_type());
  const at::Tensor ac = a.to(cdt), dc = delta.to(cdt);
  at::Tensor raw_a, raw_d;  // grad_a / grad_delta before the factor 2 g_i and the bias term
  std::tie(raw_a, raw_d) = sqnorm_sequence_backward_gemms(ac, dc);
  const at::Tensor g2 = grad.to(cdt).mul(2).contiguous();
  const at::Tensor delta_sum = bias ? dc.sum(1).contiguous() : at::Tensor();
  at::Tensor grad_a = at::empty_like(a), grad_d = at::empty_like(delta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_example_sqnorm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* scale = g2.const_data_ptr<acc_t>();
    cpu::write_rows<scalar_t, acc_t>(grad_a, raw_a.contiguous(), scale, nullptr);
    cpu::write_rows<scalar_t, acc_t>(grad_d, raw_d.contiguous(), scale,
                                     bias ? delta_sum.const_data_ptr<acc_t>() : nullptr);
  });
  return {grad_a, grad_d};
}

at::Tensor per_example_sqnorm_cpu(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  check_pair("per_example_sqnorm", a, delta, c10::DeviceType::CPU);
  return a.size(1) == 1 ? sqnorm_rows(a, delta, bias) : sqnorm_sequence(a, delta, bias);
}

std::tuple<at::Tensor, at::Tensor> per_example_sqnorm_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                                   const at::Tensor& delta, bool bias) {
  check_pair("per_example_sqnorm_backward", a, delta, c10::DeviceType::CPU);
  check_grad("per_example_sqnorm_backward", grad, {a.size(0)}, a);
  return a.size(1) == 1 ? sqnorm_rows_backward(grad, a, delta, bias) : sqnorm_sequence_backward(grad, a, delta, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) {
  m.impl("per_example_sqnorm", &per_example_sqnorm_cpu);
  m.impl("per_example_sqnorm_backward", &per_example_sqnorm_backward_cpu);
}

}  // namespace fastcurv
