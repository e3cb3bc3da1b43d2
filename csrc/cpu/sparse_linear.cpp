// CPU implementation of sparse_input_linear: y = x W^T + b from the nonzeros
// of x only.
//
// Why: the first layer of an MLP encoder on binarized images (MNIST: about 13%
// of the pixels are 1) is the largest matrix product of a training step with
// its weight gradient, and most of a dense product's work multiplies zeros.
// Per row of x the kernel lists the nonzeros, then adds v * W^T[j] for each
// nonzero (j, v) into the row of y, the output columns in blocks held in
// registers. The weight gradient is the same walk the other way round:
// grad_W^T[j] += v * grad_y[row] for every nonzero, each task owning a range of
// input columns (no two tasks write the same row of grad_W^T). Both need W^T
// row-major, so the weight is transposed in and its gradient out (a copy of the
// weight each way: a fraction of the product saved).
//
// Above kMaxSparseDensity nonzeros the dense product (MKL/oneDNN) is faster and
// runs instead; so does every dtype other than float32 and float64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../host.h"
#include "cpu_loops.h"

namespace fastvae {
namespace cpu {
namespace {

// The fraction of nonzeros in x above which the dense product is faster
// (benchmarks/README.md, "A sparse first layer").
constexpr double kMaxSparseDensity = 0.3;

// kBytes of T as one GCC vector. Each level uses its own register width (64 bytes
// at AVX-512, 32 at AVX2, 16 at the baseline): GCC splits a vector wider than the
// level's registers through the stack, which made the AVX2 loops 4x slower.
template <typename T, int kBytes>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
  static constexpr int64_t kLanes = kBytes / sizeof(T);
};

template <typename T, int kBytes>
FASTVAE_FN typename Vec<T, kBytes>::type load(const T* p) {
  typename Vec<T, kBytes>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int kBytes>
FASTVAE_FN void store(T* p, typename Vec<T, kBytes>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// Output columns are accumulated kBlockVecs vectors at a time (64 float32 in 4
// AVX-512 registers), in registers across all the nonzeros of a row.
constexpr int64_t kBlockVecs = 4;

// Rows of W^T (and of its gradient) are padded to whole 64-byte lines, so every
// load and store of the inner loops is a full vector at every level.
template <typename T>
int64_t padded(int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  return (n + kLine - 1) / kLine * kLine;
}

template <typename T>
struct SparseLinearForwardArgs {
  const T* x;         // (rows, in)
  const T* weight_t;  // (in, stride): W^T, rows padded with zeros
  const T* bias;      // (stride), padded with zeros
  T* y;               // (rows, out)
  int64_t in, out, stride;
};

template <typename T>
struct SparseLinearWeightGradArgs {
  const T* x;        // (rows, in)
  const T* grad;     // (rows, stride), padded with zeros
  T* grad_weight_t;  // (in, stride)
  int64_t rows, in, stride;
};

// The nonzeros of row[0, n): their positions into `index` and values into
// `value`; returns how many. 64 elements at a time: a bit mask of the nonzeros
// (a loop without branches), then one step per set bit. A branch per element
// would mispredict at every edge of an image's strokes.
template <typename T>
FASTVAE_FN int64_t list_nonzeros(const T* row, int64_t n, int32_t* index, T* value) {
  int64_t count = 0;
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t width = std::min<int64_t>(64, n - j0);
    uint64_t mask = 0;
    for (int64_t b = 0; b < width; ++b) mask |= static_cast<uint64_t>(row[j0 + b] != T(0)) << b;
    for (; mask != 0; mask &= mask - 1) {
      const int64_t j = j0 + __builtin_ctzll(mask);
      index[count] = static_cast<int32_t>(j);
      value[count++] = row[j];
    }
  }
  return count;
}

// out[0, kVecs vectors) = start (nullptr: zeros) + sum_k value[k] * rows[index[k]], rows
// `stride` apart; only the first `keep` elements are written.
template <typename T, int kBytes, int64_t kVecs>
FASTVAE_FN void sum_rows(const T* start, const T* rows, int64_t stride, const int32_t* index,
                                    const T* value, int64_t count, T* out, int64_t keep) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int64_t kLanes = Vec<T, kBytes>::kLanes;
  V acc[kVecs];
  for (int64_t i = 0; i < kVecs; ++i) acc[i] = start != nullptr ? load<T, kBytes>(start + i * kLanes) : V{};
  for (int64_t k = 0; k < count; ++k) {
    const T* row = rows + index[k] * stride;
    const V v = V{} + value[k];
    for (int64_t i = 0; i < kVecs; ++i) acc[i] += v * load<T, kBytes>(row + i * kLanes);
  }
  if (keep == kVecs * kLanes) {
    for (int64_t i = 0; i < kVecs; ++i) store<T, kBytes>(out + i * kLanes, acc[i]);
  } else {
    alignas(64) T tail[kVecs * kLanes];
    for (int64_t i = 0; i < kVecs; ++i) store<T, kBytes>(tail + i * kLanes, acc[i]);
    std::copy(tail, tail + keep, out);
  }
}

// out[0, keep) = start + sum_k value[k] * rows[index[k]] (rows `stride` apart, padded to whole
// vectors), block of output columns by block.
template <typename T, int kBytes>
FASTVAE_FN void sum_rows_blocked(const T* start, const T* rows, int64_t stride, const int32_t* index,
                                            const T* value, int64_t count, T* out, int64_t keep) {
  constexpr int64_t kLanes = Vec<T, kBytes>::kLanes, kBlock = kBlockVecs * kLanes;
  auto at = [](const T* p, int64_t o) { return p != nullptr ? p + o : nullptr; };
  int64_t o = 0;
  for (; o + kBlock <= stride && o < keep; o += kBlock) {
    sum_rows<T, kBytes, kBlockVecs>(at(start, o), rows + o, stride, index, value, count, out + o,
                                    std::min(kBlock, keep - o));
  }
  for (; o < keep; o += kLanes) {  // vectors past `keep` (the padding) are not computed
    sum_rows<T, kBytes, 1>(at(start, o), rows + o, stride, index, value, count, out + o, std::min(kLanes, keep - o));
  }
}

template <typename T, int kBytes>
FASTVAE_FN void forward_rows(const SparseLinearForwardArgs<T>& a, int64_t begin, int64_t end) {
  std::vector<int32_t> index(a.in);
  std::vector<T> value(a.in);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t count = list_nonzeros(a.x + r * a.in, a.in, index.data(), value.data());
    sum_rows_blocked<T, kBytes>(a.bias, a.weight_t, a.stride, index.data(), value.data(), count, a.y + r * a.out,
                                a.out);
  }
}

// Input columns [begin, end) of grad_W^T: row j is the sum of v * grad[r] over the
// nonzeros v = x[r][j] of column j. The nonzeros of the range are first sorted by
// column (counting sort), so that each row of grad_W^T is summed in registers and
// written once.
template <typename T, int kBytes>
FASTVAE_FN void weight_grad_columns(const SparseLinearWeightGradArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t cols = end - begin;
  std::vector<int32_t> index(cols), by_column_row(a.rows * cols), first(cols + 1, 0);
  std::vector<T> value(cols), by_column_value(a.rows * cols);
  for (int64_t r = 0; r < a.rows; ++r) {  // count each column's nonzeros
    const T* x = a.x + r * a.in + begin;
    for (int64_t j = 0; j < cols; ++j) first[j + 1] += x[j] != T(0);
  }
  for (int64_t j = 0; j < cols; ++j) first[j + 1] += first[j];
  std::vector<int32_t> next(first.begin(), first.end() - 1);
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t count = list_nonzeros(a.x + r * a.in + begin, cols, index.data(), value.data());
    for (int64_t k = 0; k < count; ++k) {
      const int32_t slot = next[index[k]]++;
      by_column_row[slot] = static_cast<int32_t>(r);
      by_column_value[slot] = value[k];
    }
  }
  for (int64_t j = 0; j < cols; ++j) {
    sum_rows_blocked<T, kBytes>(nullptr, a.grad, a.stride, by_column_row.data() + first[j],
                                by_column_value.data() + first[j], first[j + 1] - first[j],
                                a.grad_weight_t + (begin + j) * a.stride, a.stride);
  }
}

template <int kBytes>
struct ForwardF32 {
  FASTVAE_FN void operator()(const SparseLinearForwardArgs<float>& a, int64_t begin, int64_t end) const {
    forward_rows<float, kBytes>(a, begin, end);
  }
};

template <int kBytes>
struct WeightGradF32 {
  FASTVAE_FN void operator()(const SparseLinearWeightGradArgs<float>& a, int64_t begin,
                                        int64_t end) const {
    weight_grad_columns<float, kBytes>(a, begin, end);
  }
};

// float64 is for checking, not for speed: the baseline loops.
void run(const SparseLinearForwardArgs<float>& a, int64_t begin, int64_t end) {
  run_at_register_width<ForwardF32>(a, begin, end);
}
void run(const SparseLinearForwardArgs<double>& a, int64_t begin, int64_t end) {
  forward_rows<double, 16>(a, begin, end);
}
void run(const SparseLinearWeightGradArgs<float>& a, int64_t begin, int64_t end) {
  run_at_register_width<WeightGradF32>(a, begin, end);
}
void run(const SparseLinearWeightGradArgs<double>& a, int64_t begin, int64_t end) {
  weight_grad_columns<double, 16>(a, begin, end);
}

template <typename T>
struct TransposeArgs {
  const T* src;  // (rows, src_stride)
  T* dst;        // (cols, dst_stride)
  int64_t rows, cols, src_stride, dst_stride;
};

// dst[c][r] = src[r][c] for the 8 x 8 tile at src, in registers: three rounds of
// shuffles of row pairs (the classic unpack / shuffle / permute transposition).
FASTVAE_FN void transpose_tile8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef int I8 __attribute__((vector_size(32)));
  V8 a[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) __builtin_memcpy(&a[i], src + i * src_stride, sizeof(V8));
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(a[i], a[i + 1], I8{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(a[i], a[i + 1], I8{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], I8{0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], I8{2, 3, 10, 11, 6, 7, 14, 15});
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], I8{0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], I8{2, 3, 10, 11, 6, 7, 14, 15});
  }
  for (int i = 0; i < 4; ++i) {
    const V8 low = __builtin_shuffle(u[i], u[i + 4], I8{0, 1, 2, 3, 8, 9, 10, 11});
    const V8 high = __builtin_shuffle(u[i], u[i + 4], I8{4, 5, 6, 7, 12, 13, 14, 15});
    __builtin_memcpy(dst + i * dst_stride, &low, sizeof(V8));
    __builtin_memcpy(dst + (i + 4) * dst_stride, &high, sizeof(V8));
  }
}

// Rows [8 * begin, 8 * end) of src, transposed into dst: 8 x 8 tiles in registers
// for float32, element by element at the edges and for float64.
template <typename T>
FASTVAE_FN void transpose_rows(const TransposeArgs<T>& a, int64_t begin, int64_t end) {
  for (int64_t r0 = 8 * begin; r0 < std::min(a.rows, 8 * end); r0 += 8) {
    const int64_t r1 = std::min(a.rows, r0 + 8);
    int64_t c0 = 0;
    if constexpr (std::is_same_v<T, float>) {
      for (; r1 - r0 == 8 && c0 + 8 <= a.cols; c0 += 8) {
        transpose_tile8(a.src + r0 * a.src_stride + c0, a.src_stride, a.dst + c0 * a.dst_stride + r0, a.dst_stride);
      }
    }
    for (; c0 < a.cols; c0 += 8) {
      for (int64_t c = c0; c < std::min(a.cols, c0 + 8); ++c) {
        for (int64_t r = r0; r < r1; ++r) a.dst[c * a.dst_stride + r] = a.src[r * a.src_stride + c];
      }
    }
  }
}

struct TransposeF32 {
  FASTVAE_FN void operator()(const TransposeArgs<float>& a, int64_t begin, int64_t end) const {
    transpose_rows(a, begin, end);
  }
};

void run(const TransposeArgs<float>& a, int64_t begin, int64_t end) { run_at_cpu_level<TransposeF32>(a, begin, end); }
void run(const TransposeArgs<double>& a, int64_t begin, int64_t end) { transpose_rows(a, begin, end); }

// dst[c][r] = src[r][c] for r < rows, c < cols (rows of src src_stride apart, of dst
// dst_stride apart).
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t src_stride, T* dst, int64_t dst_stride) {
  const TransposeArgs<T> args{src, dst, rows, cols, src_stride, dst_stride};
  parallel_rows((rows + 7) / 8, 8 * cols, kElementsPerTask, [&](int64_t begin, int64_t end) { run(args, begin, end); });
}

template <typename T>
int64_t count_nonzeros(const T* x, int64_t n) {
  int64_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t i = 0; i < n; ++i) count += x[i] != T(0);
  return count;
}

// Whether the sparse kernels run for x: float32 or float64, and few enough nonzeros.
bool sparse_pays(const at::Tensor& x2d) {
  if (x2d.scalar_type() != at::kFloat && x2d.scalar_type() != at::kDouble) return false;
  if (x2d.numel() == 0) return false;
  int64_t nonzero = 0;
  AT_DISPATCH_FLOATING_TYPES(x2d.scalar_type(), "fastvae::sparse_input_linear",
                             [&] { nonzero = count_nonzeros(x2d.data_ptr<scalar_t>(), x2d.numel()); });
  return static_cast<double>(nonzero) <= kMaxSparseDensity * static_cast<double>(x2d.numel());
}

// The forward and the weight gradient of SparseInputLinearOps (host.h) on the CPU.
struct CpuSparseLinearBackend {
  using Guard = NoDeviceGuard;

  static at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
    const at::Tensor x2d = x.reshape({leading_rows(x), x.size(-1)}).contiguous();
    if (!sparse_pays(x2d)) return at::linear(x, weight, bias);
    const int64_t in = weight.size(1), out = weight.size(0);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = out;
    at::Tensor y = at::empty(shape, x.options());
    cpu_level();  // a bad FASTVAE_CPU_LEVEL is reported here, not from a worker thread
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastvae::sparse_input_linear", [&] {
      const int64_t stride = padded<scalar_t>(out);
      at::Tensor weight_t = at::empty({in, stride}, weight.options());
      weight_t.narrow(1, out, stride - out).zero_();  // the padding; the transposition writes the rest
      at::Tensor padded_bias = at::zeros({stride}, weight.options());
      if (bias.has_value()) padded_bias.narrow(0, 0, out).copy_(*bias);
      transpose(weight.contiguous().data_ptr<scalar_t>(), out, in, in, weight_t.data_ptr<scalar_t>(), stride);
      const SparseLinearForwardArgs<scalar_t> args{x2d.data_ptr<scalar_t>(), weight_t.data_ptr<scalar_t>(),
                                                   padded_bias.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), in, out,
                                                   stride};
      parallel_rows(x2d.size(0), in, kElementsPerTask, [&](int64_t begin, int64_t end) { run(args, begin, end); });
    });
    return y;
  }

  static at::Tensor weight_grad(const at::Tensor& grad2d, const at::Tensor& x2d) {
    if (!sparse_pays(x2d)) return at::mm(grad2d.t(), x2d);
    const int64_t rows = x2d.size(0), in = x2d.size(1), out = grad2d.size(1);
    at::Tensor grad_weight = at::empty({out, in}, x2d.options());
    cpu_level();  // a bad FASTVAE_CPU_LEVEL is reported here, not from a worker thread
    AT_DISPATCH_FLOATING_TYPES(x2d.scalar_type(), "fastvae::sparse_input_linear_backward", [&] {
      const int64_t stride = padded<scalar_t>(out);
      at::Tensor padded_grad = at::zeros({rows, stride}, grad2d.options());
      padded_grad.narrow(1, 0, out).copy_(grad2d);
      at::Tensor grad_weight_t = at::empty({in, stride}, x2d.options());
      const SparseLinearWeightGradArgs<scalar_t> args{x2d.data_ptr<scalar_t>(), padded_grad.data_ptr<scalar_t>(),
                                                      grad_weight_t.data_ptr<scalar_t>(), rows, in, stride};
      parallel_rows(in, rows * out, kElementsPerTask, [&](int64_t begin, int64_t end) { run(args, begin, end); });
      transpose(grad_weight_t.data_ptr<scalar_t>(), in, out, stride, grad_weight.data_ptr<scalar_t>(), in);
    });
    return grad_weight;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) { SparseInputLinearOps<CpuSparseLinearBackend>::register_kernels(m); }

}  // namespace cpu
}  // namespace fastvae
