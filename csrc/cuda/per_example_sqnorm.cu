// CUDA kernels of fastcurv::per_example_sqnorm and its backward (semantics: fastcurv/reference.py).
// T == 1: one fused kernel reads each row of a and delta once, computing ||a_i||^2 and
// ||delta_i||^2 together (warp per row for narrow rows, block per row for wide ones); the backward
// is the same reduction followed by the elementwise scaling in the same kernel. T > 1: cuBLAS
// (at::bmm) for the ghost Gram matrices or the materialized per-example gradient, then a fused
// Hadamard-and-reduce kernel. fp32 accumulation (fp64 for fp64), int64 indexing, current stream.
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

// Rows wider than this get a whole block each; narrower rows a warp each.
constexpr int64_t kBlockPerRowWidth = 1024;

// The row group (one warp, or the whole block) that handles row `row` and its lane in it.
template <bool kBlockPerRow>
struct RowGroup {
  __device__ __forceinline__ static int64_t lane() { return kBlockPerRow ? threadIdx.x : threadIdx.x % kWarp; }
  __device__ __forceinline__ static int64_t size() { return kBlockPerRow ? blockDim.x : kWarp; }
  __device__ __forceinline__ static int64_t first_row() {
    return kBlockPerRow ? blockIdx.x : blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
  }
  __device__ __forceinline__ static int64_t row_step() {
    return kBlockPerRow ? gridDim.x : static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  }
  template <typename T>
  __device__ __forceinline__ static T allreduce(T v, T* scratch) {
    return kBlockPerRow ? cuda::block_allreduce_sum(v, scratch) : cuda::warp_allreduce_sum(v);
  }
};

// (||a_row||^2, ||delta_row||^2) for the calling row group; every lane gets both.
template <bool kBlockPerRow, typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_sqnorms(const scalar_t* a_row, int64_t a_stride, int64_t d_in,
                                            const scalar_t* d_row, int64_t d_stride, int64_t d_out, acc_t* scratch,
                                            acc_t& aa, acc_t& dd) {
  using G = RowGroup<kBlockPerRow>;
  aa = 0;
  dd = 0;
  for (int64_t j = G::lane(); j < d_in; j += G::size()) {
    const acc_t v = static_cast<acc_t>(a_row[j * a_stride]);
    aa += v * v;
  }
  for (int64_t j = G::lane(); j < d_out; j += G::size()) {
    const acc_t v = static_cast<acc_t>(d_row[j * d_stride]);
    dd += v * v;
  }
  aa = G::allreduce(aa, scratch);
  dd = G::allreduce(dd, scratch);
}

template <bool kBlockPerRow, typename scalar_t, typename acc_t>
__global__ void sqnorm_rows_kernel(const scalar_t* __restrict__ a, int64_t as0, int64_t as2,
                                   const scalar_t* __restrict__ delta, int64_t ds0, int64_t ds2, int64_t B,
                                   int64_t d_in, int64_t d_out, acc_t bias_term, acc_t* __restrict__ out) {
  using G = RowGroup<kBlockPerRow>;
  __shared__ acc_t scratch[kThreads / kWarp];
  // The loop bound is uniform over each row group, so its shuffles / barriers are all reached.
  for (int64_t row = G::first_row(); row < B; row += G::row_step()) {
    acc_t aa, dd;
    row_sqnorms<kBlockPerRow>(a + row * as0, as2, d_in, delta + row * ds0, ds2, d_out, scratch, aa, dd);
    if (G::lane() == 0) out[row] = dd * (aa + bias_term);
  }
}

template <bool kBlockPerRow, typename scalar_t, typename acc_t>
__global__ void sqnorm_rows_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ a,
                                            int64_t as0, int64_t as2, const scalar_t* __restrict__ delta, int64_t ds0,
                                            int64_t ds2, scalar_t* __restrict__ grad_a, int64_t gas0, int64_t gas2,
                                            scalar_t* __restrict__ grad_d, int64_t gds0, int64_t gds2, int64_t B,
                                            int64_t d_in, int64_t d_out, acc_t bias_term) {
  using G = RowGroup<kBlockPerRow>;
  __shared__ acc_t scratch[kThreads / kWarp];
  for (int64_t row = G::first_row(); row < B; row += G::row_step()) {
    const scalar_t* a_row = a + row * as0;
    const scalar_t* d_row = delta + row * ds0;
    acc_t aa, dd;
    row_sqnorms<kBlockPerRow>(a_row, as2, d_in, d_row, ds2, d_out, scratch, aa, dd);
    const acc_t g2 = acc_t(2) * grad[row];
    const acc_t scale_a = g2 * dd, scale_d = g2 * (aa + bias_term);
    for (int64_t j = G::lane(); j < d_in; j += G::size())
      grad_a[row * gas0 + j * gas2] = static_cast<scalar_t>(scale_a * static_cast<acc_t>(a_row[j * as2]));
    for (int64_t j = G::lane(); j < d_out; j += G::size())
      grad_d[row * gds0 + j * gds2] = static_cast<scalar_t>(scale_d * static_cast<acc_t>(d_row[j * ds2]));
  }
}

unsigned int rows_grid(int64_t B, bool block_per_row) {
  return cuda::grid_for(block_per_row ? B : cuda::ceil_div(B, kThreads / kWarp));
}

at::Tensor sqnorm_rows(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  const int64_t B = a.size(0), d_in = a.size(2), d_out = delta.size(2);
  at::Tensor out = at::empty({B}, a.options().dtype(compute_dtype(a.scalar_type())));
  if (B == 0) return out;
  const bool block_per_row = std::max(d_in, d_out) > kBlockPerRowWidth;
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_example_sqnorm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t bias_term = bias ? acc_t(1) : acc_t(0);
    auto launch = [&](auto kernel) {
      kernel<<<rows_grid(B, block_per_row), kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(2), delta.const_data_ptr<scalar_t>(), delta.stride(0),
          delta.stride(2), B, d_in, d_out, bias_term, out.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (block_per_row) launch(sqnorm_rows_kernel<true, scalar_t, acc_t>);
    else launch(sqnorm_rows_kernel<false, scalar_t, acc_t>);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sqnorm_rows_backward(const at::Tensor& grad, const at::Tensor& a,
                                                        const at::Tensor& delta, bool bias) {
  const int64_t B = a.size(0), d_in = a.size(2), d_out = delta.size(2);
  // empty_like keeps the inputs' strides, as the fake kernel (torch.empty_like) does.
  at::Tensor grad_a = at::empty_like(a), grad_d = at::empty_like(delta);
  if (B == 0) return {grad_a, grad_d};
  const at::Tensor g = grad.to(compute_dtype(a.scalar_type())).contiguous();
  const bool block_per_row = std::max(d_in, d_out) > kBlockPerRowWidth;
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_example_sqnorm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t bias_term = bias ? acc_t(1) : acc_t(0);
    auto launch = [&](auto kernel) {
      kernel<<<rows_grid(B, block_per_row), kThreads, 0, stream>>>(
          g.const_data_ptr<acc_t>(), a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(2),
          delta.const_data_ptr<scalar_t>(), delta.stride(0), delta.stride(2), grad_a.mutable_data_ptr<scalar_t>(),
          grad_a.stride(0), grad_a.stride(2), grad_d.mutable_data_ptr<scalar_t>(), grad_d.stride(0), grad_d.stride(2),
          B, d_in, d_out, bias_term);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (block_per_row) launch(sqnorm_rows_backward_kernel<true, scalar_t, acc_t>);
    else launch(sqnorm_rows_backward_kernel<false, scalar_t, acc_t>);
  });
  return {grad_a, grad_d};
}

at::Tensor sqnorm_sequence(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  const int64_t B = a.size(0), T = a.size(1), d_in = a.size(2), d_out = delta.size(2);
  const at::ScalarType cdt = compute_dtype(a.scalar_type());
  const at::Tensor ac = a.to(cdt), dc = delta.to(cdt);
  at::Tensor s;
  if (use_ghost(T, d_in, d_out)) {  // sum_{t,s} (a_t . a_s)(delta_t . delta_s)
    s = cuda::rowwise_dot(at::bmm(ac, ac.transpose(1, 2)).view({B, T * T}),
                          at::bmm(dc, dc.transpose(1, 2)).view({B, T * T}));
  } else {  // ||delta^T a||_F^2, the per-example weight gradient materialized
    const at::Tensor J = at::bmm(dc.transpose(1, 2), ac).view({B, d_out * d_in});
    s = cuda::rowwise_dot(J, J);
  }
  if (bias) {
    const at::Tensor delta_sum = dc.sum(1).contiguous();
    s.add_(cuda::rowwise_dot(delta_sum, delta_sum));
  }
  return s;
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_example_sqnorm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* scale = g2.const_data_ptr<acc_t>();
    cuda::write_rows<scalar_t, acc_t>(grad_a, raw_a, scale, nullptr);
    cuda::write_rows<scalar_t, acc_t>(grad_d, raw_d, scale, bias ? delta_sum.const_data_ptr<acc_t>() : nullptr);
  });
  return {grad_a, grad_d};
}

at::Tensor per_example_sqnorm_cuda(const at::Tensor& a, const at::Tensor& delta, bool bias) {
  check_pair("per_example_sqnorm", a, delta, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(a.device());
  return a.size(1) == 1 ? sqnorm_rows(a, delta, bias) : sqnorm_sequence(a, delta, bias);
}

std::tuple<at::Tensor, at::Tensor> per_example_sqnorm_backward_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                                    const at::Tensor& delta, bool bias) {
  check_pair("per_example_sqnorm_backward", a, delta, c10::DeviceType::CUDA);
  check_grad("per_example_sqnorm_backward", grad, {a.size(0)}, a);
  const c10::cuda::CUDAGuard guard(a.device());
  return a.size(1) == 1 ? sqnorm_rows_backward(grad, a, delta, bias) : sqnorm_sequence_backward(grad, a, delta, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcurv, CUDA, m) {
  m.impl("per_example_sqnorm", &per_example_sqnorm_cuda);
  m.impl("per_example_sqnorm_backward", &per_example_sqnorm_backward_cuda);
}

}  // namespace fastcurv
