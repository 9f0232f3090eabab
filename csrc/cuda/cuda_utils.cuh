// Device helpers and small kernels shared by the CUDA ops: warp/block all-reduce, a chunked
// row-wise dot product (for the T > 1 reductions), the fused output epilogue and the weighted
// Gram blocks of the Gram backward. Everything indexes with int64 and runs on the current stream.
//
// NOTE: written and compiled on a machine without a GPU; it has not been run on one yet.
#pragma once

// Only c10/cuda headers (not ATen/cuda/CUDAContext.h): those pull in cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit (and the compile-only CI check) may lack. cuBLAS is reached through
// at::mm / at::bmm instead.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>

namespace fastcurv {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // every launch uses whole warps: the shuffles use a full mask

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Multiprocessor count of the current device, queried once per device.
inline int64_t sm_count() {
  static std::array<std::atomic<int>, 64> cache{};  // 0 = not queried yet
  const c10::DeviceIndex device = c10::cuda::current_device();
  if (device >= 0 && device < static_cast<c10::DeviceIndex>(cache.size())) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < static_cast<c10::DeviceIndex>(cache.size())) cache[device].store(count);
  return std::max(count, 1);
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Blocks for a grid-stride loop over `work_blocks` blocks' worth of work: enough to fill every SM
// several times over, never above the 1-D grid limit.
inline unsigned int grid_for(int64_t work_blocks) {
  const int64_t cap = sm_count() * 32;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(work_blocks, cap)));
}

template <typename T>
__device__ __forceinline__ T warp_allreduce_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Every thread of the block gets the block's sum. All threads must call it (it synchronizes);
// `scratch` holds one value per warp (at most 32 warps).
template <typename T>
__device__ __forceinline__ T block_allreduce_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_allreduce_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// partials[row * chunks + c] = sum over j in chunk c of x[row, j] * y[row, j]; x, y [rows, n] contiguous.
template <typename acc_t>
__global__ void rowwise_dot_partials_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ y, int64_t rows,
                                            int64_t n, int64_t chunk, int64_t chunks, acc_t* __restrict__ partials) {
  __shared__ acc_t scratch[kThreads / kWarp];
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {  // uniform across the block
    const int64_t row = b / chunks, start = (b % chunks) * chunk;
    const int64_t end = start + chunk < n ? start + chunk : n;
    const acc_t* xr = x + row * n;
    const acc_t* yr = y + row * n;
    acc_t s = 0;
    for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) s += xr[j] * yr[j];
    s = block_allreduce_sum(s, scratch);
    if (threadIdx.x == 0) partials[b] = s;
  }
}

// out[row] = sum_j x[row, j] * y[row, j] for contiguous [rows, n] tensors of the compute dtype.
// Each row is split into chunks when there are too few rows to fill the GPU; the chunk partials
// are summed by ATen (deterministic, no atomics).
inline at::Tensor rowwise_dot(const at::Tensor& x, const at::Tensor& y) {
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options());
  if (rows == 0) return out;
  const int64_t min_chunk = 4 * kThreads;
  const int64_t chunks = std::max<int64_t>(1, std::min(ceil_div(sm_count() * 8, rows), ceil_div(n, min_chunk)));
  const int64_t chunk = std::max<int64_t>(1, ceil_div(n, chunks));
  at::Tensor partials = at::empty({rows, chunks}, x.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastcurv_rowwise_dot", [&] {
    rowwise_dot_partials_kernel<scalar_t><<<grid_for(rows * chunks), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), rows, n, chunk, chunks,
        partials.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return chunks == 1 ? partials.view({rows}) : partials.sum(1);
}

// out[i, t, j] = scale[i] * (src[i, t, j] + add[i, j]) in out's dtype and strides; src contiguous
// [B, T, d] of acc_t; scale / add may be null.
template <typename scalar_t, typename acc_t>
__global__ void write_rows_kernel(scalar_t* __restrict__ out, int64_t s0, int64_t s1, int64_t s2,
                                  const acc_t* __restrict__ src, const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ add, int64_t B, int64_t T, int64_t d) {
  const int64_t total = B * T * d;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = k % d, r = k / d, t = r % T, i = r / T;
    acc_t v = src[k];
    if (add != nullptr) v += add[i * d + j];
    if (scale != nullptr) v *= scale[i];
    out[i * s0 + t * s1 + j * s2] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
void write_rows(at::Tensor& out, const at::Tensor& src, const acc_t* scale, const acc_t* add) {
  const int64_t B = out.size(0), T = out.size(1), d = out.size(2);
  if (B * T * d == 0) return;
  const at::Tensor s = src.contiguous();
  write_rows_kernel<scalar_t, acc_t><<<grid_for(ceil_div(B * T * d, kThreads)), kThreads, 0,
                                       current_stream()>>>(
      out.mutable_data_ptr<scalar_t>(), out.stride(0), out.stride(1), out.stride(2), s.const_data_ptr<acc_t>(), scale,
      add, B, T, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fastcurv
