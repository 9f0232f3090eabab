// CUDA kernels of fastcurv::per_example_gram and its backward (semantics: fastcurv/reference.py).
//   G_ij = sum_{t,s} (a_it . a_js)(delta_it . delta_js) (+ (sum_t delta_it).(sum_s delta_js))
// T == 1: two cuBLAS GEMMs (at::mm) and one fused elementwise kernel G = (A A^T + bias) * (D D^T).
// T > 1, ghost: two [BT, BT] GEMMs and a warp-per-(i, j) kernel reducing each T x T block of their
// Hadamard product, computing the upper triangle only (G is symmetric). T > 1, materialized:
// J [B, d_out*d_in] by at::bmm, G = J J^T. fp32 accumulation (fp64 for fp64), int64 indexing.
//
// NOTE: compiled (nvcc, sm_90) but never run on a GPU: the machine it was written on has none.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "cuda_utils.cuh"

namespace fastcurv {
namespace {

using cuda::kThreads;
using cuda::kWarp;

// g[k] = (g[k] + shift) * gd[k] over n entries.
template <typename acc_t>
__global__ void shifted_hadamard_kernel(acc_t* __restrict__ g, const acc_t* __restrict__ gd, int64_t n, acc_t shift) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x)
    g[k] = (g[k] + shift) * gd[k];
}

// One warp per pair (i, j), j >= i: G[i, j] = G[j, i] = sum of the T x T block (i, j) of GA * GD,
// GA / GD [B*T, B*T] contiguous. Lanes walk the block row by row, so reads are coalesced for T >= 32.
template <typename acc_t>
__global__ void gram_block_reduce_kernel(const acc_t* __restrict__ GA, const acc_t* __restrict__ GD, int64_t B,
                                         int64_t T, acc_t* __restrict__ G) {
  const int64_t N = B * T, lane = threadIdx.x % kWarp;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t pair = first; pair < B * B; pair += step) {  // uniform over the warp
    const int64_t i = pair / B, j = pair % B;
    if (j < i) continue;  // whole warp skips together
    acc_t s = 0;
    for (int64_t k = lane; k < T * T; k += kWarp) {
      const int64_t t = k / T, u = k % T;
      const int64_t idx = (i * T + t) * N + j * T + u;
      s += GA[idx] * GD[idx];
    }
    s = cuda::warp_allreduce_sum(s);
    if (lane == 0) {
      G[i * B + j] = s;
      G[j * B + i] = s;
    }
  }
}

// In place on GA, GD [B*T, B*T]: GA[p, q] = W[p/T, q/T] (GA[p, q] + shift), GD[p, q] = W[p/T, q/T] GD[p, q].
template <typename acc_t>
__global__ void weight_gram_blocks_kernel(acc_t* __restrict__ GA, acc_t* __restrict__ GD, const acc_t* __restrict__ W,
                                          int64_t B, int64_t T, acc_t shift) {
  const int64_t N = B * T, total = N * N;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = k / N, q = k % N;
    const acc_t w = W[(p / T) * B + q / T];
    GA[k] = w * (GA[k] + shift);
    GD[k] = w * GD[k];
  }
}

at::Tensor gram_forward(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  const int64_t B = a.size(0), T = a.size(1), d_in = a.size(2), d_out = delta.size(2);
  const at::ScalarType cdt = compute_dtype(a.scalar_type());
  const at::Tensor ac = a.to(cdt), dc = delta.to(cdt);
  const cudaStream_t stream = cuda::current_stream();
  if (T == 1) {
    const at::Tensor A = ac.select(1, 0), D = dc.select(1, 0);
    at::Tensor G = at::mm(A, A.t());
    const at::Tensor GD = at::mm(D, D.t());
    if (B > 0) {
      AT_DISPATCH_FLOATING_TYPES(cdt, "per_example_gram_cuda", [&] {
        shifted_hadamard_kernel<scalar_t><<<cuda::grid_for(cuda::ceil_div(B * B, kThreads)), kThreads, 0, stream>>>(
            G.mutable_data_ptr<scalar_t>(), GD.const_data_ptr<scalar_t>(), B * B, bias ? scalar_t(1) : scalar_t(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    return G;
  }
  at::Tensor G;
  if (use_ghost(T, d_in, d_out)) {
    const at::Tensor A = ac.reshape({B * T, d_in}), D = dc.reshape({B * T, d_out});
    const at::Tensor GA = at::mm(A, A.t()), GD = at::mm(D, D.t());
    G = at::empty({B, B}, ac.options());
    if (B > 0) {
      AT_DISPATCH_FLOATING_TYPES(cdt, "per_example_gram_cuda", [&] {
        gram_block_reduce_kernel<scalar_t>
            <<<cuda::grid_for(cuda::ceil_div(B * B, kThreads / kWarp)), kThreads, 0, stream>>>(
                GA.const_data_ptr<scalar_t>(), GD.const_data_ptr<scalar_t>(), B, T, G.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
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
    const int64_t N = B * T;
    if (N > 0) {
      AT_DISPATCH_FLOATING_TYPES(cdt, "per_example_gram_backward_cuda", [&] {
        weight_gram_blocks_kernel<scalar_t><<<cuda::grid_for(cuda::ceil_div(N * N, kThreads)), kThreads, 0,
                                              cuda::current_stream()>>>(
            GA.mutable_data_ptr<scalar_t>(), GD.mutable_data_ptr<scalar_t>(), W.const_data_ptr<scalar_t>(), B, T,
            bias_in_gram ? scalar_t(1) : scalar_t(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_example_gram_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::write_rows<scalar_t, acc_t>(grad_a, raw_a, nullptr, nullptr);
    cuda::write_rows<scalar_t, acc_t>(grad_d, raw_d, nullptr,
                                      bias_rows.defined() ? bias_rows.const_data_ptr<acc_t>() : nullptr);
  });
  return {grad_a, grad_d};
}

at::Tensor per_example_gram_cuda(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  check_pair("per_example_gram", a, delta, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(a.device());
  return gram_forward(a, delta, bias);
}

std::tuple<at::Tensor, at::Tensor> per_example_gram_backward_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                                  const at::Tensor& delta, bool bias) {
  check_pair("per_example_gram_backward", a, delta, c10::DeviceType::CUDA);
  check_grad("per_example_gram_backward", grad, {a.size(0), a.size(0)}, a);
  const c10::cuda::CUDAGuard guard(a.device());
  return gram_backward(grad, a, delta, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CUDA, m) {
  m.impl("per_example_gram", &per_example_gram_cuda);
  m.impl("per_example_gram_backward", &per_example_gram_backward_cuda);
}

}  // namespace fastcurv
