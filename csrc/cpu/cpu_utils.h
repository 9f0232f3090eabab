// Loops shared by the CPU kernels: strided reductions with several independent accumulators (so
// the compiler can keep them in SIMD registers without reassociating one running sum), and the
// fused epilogues that turn fp32/fp64 GEMM results into the outputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace fastcurv {
namespace cpu {

constexpr int kLanes = 8;

// Rows per at::parallel_for chunk so that a chunk touches about GRAIN_SIZE elements.
inline int64_t row_grain(int64_t elements_per_row) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elements_per_row));
}

template <typename acc_t>
inline acc_t combine_lanes(const acc_t* part) {
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// sum_j x[j * stride]^2, accumulated in acc_t.
template <typename acc_t, typename scalar_t>
inline acc_t sum_of_squares(const scalar_t* x, int64_t n, int64_t stride) {
  acc_t part[kLanes] = {};
  int64_t j = 0;
  if (stride == 1) {
    for (; j + kLanes <= n; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const acc_t v = static_cast<acc_t>(x[j + k]);
        part[k] += v * v;
      }
    }
  }
  acc_t tail = 0;
  for (; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[j * stride]);
    tail += v * v;
  }
  return combine_lanes(part) + tail;
}

// part[k] += the products x[j] y[j] with j = k (mod kLanes), over contiguous arrays: lets a caller
// accumulate several short spans before one combine_lanes.
template <typename acc_t>
inline void dot_accumulate(acc_t* part, const acc_t* x, const acc_t* y, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) part[k] += x[j + k] * y[j + k];
  }
  for (int k = 0; j < n; ++j, ++k) part[k] += x[j] * y[j];
}

// sum_j x[j] * y[j] over contiguous arrays.
template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t part[kLanes] = {};
  dot_accumulate(part, x, y, n);
  return combine_lanes(part);
}

// out[i] = sum_j X[i, j] Y[i, j] (+ sum_j Z[i, j]^2 if Z is defined), X, Y [B, n] and Z [B, m]
// contiguous in acc_t. One pass, no [B, n] temporary for the product.
template <typename acc_t>
void rowwise_dot(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& Z, at::Tensor& out) {
  const int64_t B = X.size(0), n = X.size(1), m = Z.defined() ? Z.size(1) : 0;
  const acc_t* x = X.const_data_ptr<acc_t>();
  const acc_t* y = Y.const_data_ptr<acc_t>();
  const acc_t* z = Z.defined() ? Z.const_data_ptr<acc_t>() : nullptr;
  acc_t* o = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B, row_grain(n + m), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t s = dot<acc_t>(x + i * n, y + i * n, n);
      if (z != nullptr) s += dot<acc_t>(z + i * m, z + i * m, m);
      o[i] = s;
    }
  });
}

// out[i, t, :] = scale[i] * (tmp[i, t, :] + add[i, :]), cast to out's dtype. tmp is a contiguous
// [B, T, d] acc_t tensor; out [B, T, d] may have any strides (it is empty_like(input), matching
// the fake kernel). scale / add may be null (1 / 0).
template <typename scalar_t, typename acc_t>
void write_rows(at::Tensor& out, const at::Tensor& tmp, const acc_t* scale, const acc_t* add) {
  const int64_t B = out.size(0), T = out.size(1), d = out.size(2);
  const int64_t s0 = out.stride(0), s1 = out.stride(1), s2 = out.stride(2);
  const acc_t* src = tmp.const_data_ptr<acc_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, B * T, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / T, t = r % T;
      const acc_t c = scale != nullptr ? scale[i] : acc_t(1);
      const acc_t* row = src + r * d;
      scalar_t* o = dst + i * s0 + t * s1;
      const acc_t* add_row = add != nullptr ? add + i * d : nullptr;
      if (s2 == 1) {  // separate unit-stride loops so that they vectorize
        if (add_row != nullptr) {
          for (int64_t j = 0; j < d; ++j) o[j] = static_cast<scalar_t>(c * (row[j] + add_row[j]));
        } else {
          for (int64_t j = 0; j < d; ++j) o[j] = static_cast<scalar_t>(c * row[j]);
        }
      } else {
        for (int64_t j = 0; j < d; ++j)
          o[j * s2] = static_cast<scalar_t>(c * (row[j] + (add_row != nullptr ? add_row[j] : acc_t(0))));
      }
    }
  });
}

// In place on [B*T, B*T] contiguous GA, GD with W [B, B] contiguous:
//   GA[p, q] = W[p/T, q/T] * (GA[p, q] + shift),  GD[p, q] = W[p/T, q/T] * GD[p, q].
// The Gram backward's weighted Gram matrices (shift = 1 adds the bias term when T == 1).
template <typename acc_t>
void weight_gram_blocks(at::Tensor& GA, at::Tensor& GD, const at::Tensor& W, int64_t T, acc_t shift) {
  const int64_t N = GA.size(0), B = W.size(0);
  acc_t* ga = GA.mutable_data_ptr<acc_t>();
  acc_t* gd = GD.mutable_data_ptr<acc_t>();
  const acc_t* w = W.const_data_ptr<acc_t>();
  at::parallel_for(0, N, row_grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const acc_t* w_row = w + (p / T) * B;
      acc_t* ga_row = ga + p * N;
      acc_t* gd_row = gd + p * N;
      for (int64_t j = 0; j < B; ++j) {
        const acc_t wv = w_row[j];
        for (int64_t q = j * T; q < (j + 1) * T; ++q) {
          ga_row[q] = wv * (ga_row[q] + shift);
          gd_row[q] = wv * gd_row[q];
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace fastcurv
