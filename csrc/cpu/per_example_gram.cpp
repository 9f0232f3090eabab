// CPU kernels of fastcurv::per_example_gram and its backward (semantics: fastcurv/reference.py).
//   G_ij = <g_i, g_j> = sum_{t,s} (a_it . a_js)(delta_it . delta_js) (+ (sum_t delta_it).(sum_s delta_js))
// T == 1: two GEMMs and one fused pass G = (A A^T + bias) * (D D^T). T > 1: ghost form (two
// [BT, BT] GEMMs, then a fused T x T block reduction exploiting G's symmetry) or the materialized
// per-example gradients J [B, d_out*d_in] and G = J J^T, by the same cost rule as the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "cpu_utils.h"

namespace fastcurv {
namespace {

// G[i, j] = sum of the T x T block (i, j) of GA * GD, for j >= i, mirrored to G[j, i].
template <typename acc_t>
void reduce_gram_blocks(const at::Tensor& GA, const at::Tensor& GD, int64_t T, at::Tensor& G) {
  const int64_t B = G.size(0), N = B * T;
  const acc_t* ga = GA.const_data_ptr<acc_t>();
  const acc_t* gd = GD.const_data_ptr<acc_t>();
  acc_t* g = G.mutable_data_ptr<acc_t>();
  // Row i writes G[i, j>=i] and G[j>i, i]: no two chunks write the same entry.
  at::parallel_for(0, B, cpu::row_grain(N * T), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = i; j < B; ++j) {
        acc_t part[cpu::kLanes] = {};
        for (int64_t t = 0; t < T; ++t) {
          const int64_t offset = (i * T + t) * N + j * T;
          cpu::dot_accumulate<acc_t>(part, ga + offset, gd + offset, T);
        }
        const acc_t s = cpu::combine_lanes(part);
        g[i * B + j] = s;
        g[j * B + i] = s;
      }
    }
  });
}

at::Tensor gram_forward(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  const int64_t B = a.size(0), T = a.size(1), d_in = a.size(2), d_out = delta.size(2);
  const at::ScalarType cdt = compute_dtype(a.scalar_type());
  const at::Tensor ac = a.to(cdt), dc = delta.to(cdt);
  if (T == 1) {
    const at::Tensor A = ac.select(1, 0), D = dc.select(1, 0);
    at::Tensor G = at::mm(A, A.t());
    const at::Tensor GD = at::mm(D, D.t());
    AT_DISPATCH_FLOATING_TYPES(cdt, "per_example_gram_cpu", [&] {
      scalar_t* g = G.mutable_data_ptr<scalar_t>();
      const scalar_t* gd = GD.const_data_ptr<scalar_t>();
      const scalar_t shift = bias ? scalar_t(1) : scalar_t(0);
      at::parallel_for(0, B * B, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) g[k] = (g[k] + shift) * gd[k];
      });
    });
    return G;
  }
  at::Tensor G;
  if (use_ghost(T, d_in, d_out)) {
    const at::Tensor A = ac.reshape({B * T, d_in}), D = dc.reshape({B * T, d_out});
    const at::Tensor GA = at::mm(A, A.t()), GD = at::mm(D, D.t());
    G = at::empty({B, B}, ac.options());
    AT_DISPATCH_FLOATING_TYPES(cdt, "per_example_gram_cpu", [&] { reduce_gram_blocks<scalar_t>(GA, GD, T, G); });
  } else {
    const at::Tensor J = at::bmm(dc.transpose(1, 2), ac).view({B, d_out * d_in});
    G = at::mm(J, J.t());
  }
  if (bias) {
    const at::Tensor delta_sum = dc.sum(1);
    G.addmm_(delta_sum, delta_sum.t());
  }
  return G;
}

std::tuple<at::Tensor, at::Tensor> gram_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& delta,
                                                 bool bias) {
  const int64_t B = a.size(0), T = a.size(1), d_in = a.size(2), d_out = delta.size(2);
  const at::ScalarType cdt = compute_dtype(a.scalar_type());
  const at::Tensor ac = a.to(cdt), dc = delta.to(cdt);
  const at::Tensor g = grad.to(cdt);
  const at::Tensor W = (g + g.t()).contiguous();  // G is symmetric in (i, j): both slots see the gradient
  at::Tensor raw_a, raw_d, bias_rows;             // grad_a / grad_delta before the bias term, [B, T, d]
  if (T == 1 || use_ghost(T, d_in, d_out)) {
    const at::Tensor A = ac.reshape({B * T, d_in}), D = dc.reshape({B * T, d_out});
    at::Tensor GA = at::mm(A, A.t()), GD = at::mm(D, D.t());
    // T == 1 carries the bias inside the Gram of a ((A A^T + 1) * D D^T); T > 1 adds it below.
    const bool bias_in_gram = bias && T == 1;
    AT_DISPATCH_FLOATING_TYPES(cdt, "per_example_gram_backward_cpu", [&] {
      cpu::weight_gram_blocks<scalar_t>(GA, GD, W, T, bias_in_gram ? scalar_t(1) : scalar_t(0));
    });
    raw_a = at::mm(GD, A).view({B, T, d_in});
    raw_d = at::mm(GA, D).view({B, T, d_out});
  } else {
    const at::Tensor J = at::bmm(dc.transpose(1, 2), ac).view({B, d_out * d_in});
    const at::Tensor dJ = at::mm(W, J).view({B, d_out, d_in});
    raw_a = at::bmm(dc, dJ);
    raw_d = at::bmm(ac, dJ.transpose(1, 2));
  }
  if (bias && T > 1) bias_rows = at::mm(W, dc.sum(1)).contiguous();  // [B, d_out]
  at::Tensor grad_a = at::empty_like(a), grad_d = at::empty_like(delta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_example_gram_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::write_rows<scalar_t, acc_t>(grad_a, raw_a.contiguous(), nullptr, nullptr);
    cpu::write_rows<scalar_t, acc_t>(grad_d, raw_d.contiguous(), nullptr,
                                     bias_rows.defined() ? bias_rows.const_data_ptr<acc_t>() : nullptr);
  });
  return {grad_a, grad_d};
}

at::Tensor per_example_gram_cpu(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  check_pair("per_example_gram", a, delta, c10::DeviceType::CPU);
  return gram_forward(a, delta, bias);
}

std::tuple<at::Tensor, at::Tensor> per_example_gram_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                                 const at::Tensor& delta, bool bias) {
  check_pair("per_example_gram_backward", a, delta, c10::DeviceType::CPU);
  check_grad("per_example_gram_backward", grad, {a.size(0), a.size(0)}, a);
  return gram_backward(grad, a, delta, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CPU, m) {
  m.impl("per_example_gram", &per_example_gram_cpu);
  m.impl("per_example_gram_backward", &per_example_gram_backward_cpu);
}

}  // namespace fastcurv
