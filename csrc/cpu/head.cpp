// CPU implementation of the fused decoder head (see csrc/head.h for the contract).
//
// The rows are split into chunks small enough that a chunk's raw outputs stay
// in the core's L2 cache; threads take contiguous runs of chunks. Per chunk:
// raw = h_chunk W^T (one GEMM), the element loop adds the bias, sums the row's
// log-likelihood and overwrites raw with g * d log p / d raw, then
// grad_h_chunk = raw W and grad_W += raw^T h_chunk (two GEMMs) while raw is
// still in cache. Each thread sums grad_W and grad_b into its own buffer; the
// buffers are added in thread order at the end, so the result does not depend
// on timing.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "../head.h"
#include "cpu_loops.h"

namespace fastvae {
namespace cpu {
namespace {

// Bytes of raw outputs per chunk. A chunk's raw outputs are touched four times
// (written by the first product, rewritten by the element loop, read by the two
// gradient products), so they should stay in the core's L2; but every chunk also
// streams the weight twice and grad_W once (627 KiB each for a 784x200 float32
// layer), which favours fewer, larger chunks. The default is set from
// benchmarks/README.md ("Fused decoder head"); FASTVAE_HEAD_CHUNK_KIB overrides
// it (read once), for tuning on CPUs with other cache sizes.
constexpr int64_t kDefaultHeadChunkKiB = 256;

int64_t head_chunk_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("FASTVAE_HEAD_CHUNK_KIB");
    const int64_t kib = env != nullptr ? std::atoll(env) : 0;
    return (kib > 0 ? kib : kDefaultHeadChunkKiB) * 1024;
  }();
  return bytes;
}

// Rows per chunk: about head_chunk_bytes() of raw outputs, the rows split evenly over the
// chunks (no short tail chunk whose products run at a fraction of the speed). Up to twice
// that in all is one chunk: an MNIST minibatch (100 x 784 float32, 313 KB) split in two
// over two threads ran slower than whole on one (a second grad_W buffer to zero and add).
int64_t head_chunk_rows(int64_t rows, int64_t outputs, int64_t element_size) {
  const int64_t row_bytes = std::max<int64_t>(outputs * element_size, 1);
  if (rows * row_bytes <= 2 * head_chunk_bytes()) return std::max<int64_t>(8, (rows + 7) / 8 * 8);
  const int64_t target = std::clamp<int64_t>(head_chunk_bytes() / row_bytes, 8, 4096);
  const int64_t chunks = (rows + target - 1) / target;
  const int64_t even = (rows + chunks - 1) / std::max<int64_t>(chunks, 1);
  return std::max<int64_t>(8, (even + 7) / 8 * 8);
}

// The element loop of likelihood D over `count` rows starting at `first_row`, whose raw
// outputs are in `raw` (count x outputs). Adds the gradient columns into `grad_bias` when
// it is given.
template <class D, typename T, bool kLayerSecond, bool kLogProb, bool kGrads>
__attribute__((always_inline)) inline void head_rows(const HeadArgs<T>& a, T* raw, int64_t first_row, int64_t count,
                                                     T* grad_bias) {
  const int64_t P = a.pixels, outputs = a.outputs;
  const T* bias = a.bias;
  const HeadSecond<D, T> second = a.template second<D>();
  const T row_constant = D::template row_constant<T>(P);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = first_row + i;
    T* r = raw + i * outputs;
    const T* x = a.x + (row % a.batch) * P;
    const T g = a.grad ? a.grad[row] : T(1);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < P; ++p) {
      sum += head_element<D, kLayerSecond, kLogProb, kGrads>(r + p, bias + p, P, x[p], g, second);
    }
    if constexpr (kLogProb) a.log_prob[row] = sum + row_constant;
    if constexpr (kGrads) {
      if (grad_bias) {
#pragma omp simd
        for (int64_t o = 0; o < outputs; ++o) grad_bias[o] += r[o];
      }
    }
  }
}

// float32 runs at the process's CPU level (cpu_level.h): the row loop is compiled once per level.
struct HeadTaskF32 {
  const HeadArgs<float>* a;
  float* raw;
  float* grad_bias;
};

template <class D, bool kLayerSecond, bool kLogProb, bool kGrads>
struct HeadRowsF32 {
  __attribute__((always_inline)) void operator()(const HeadTaskF32& t, int64_t first_row, int64_t count) const {
    head_rows<D, float, kLayerSecond, kLogProb, kGrads>(*t.a, t.raw, first_row, count, t.grad_bias);
  }
};

template <class D, typename T, bool kLayerSecond, bool kLogProb, bool kGrads>
void rows_for(const HeadArgs<T>& a, T* raw, int64_t first_row, int64_t count, T* grad_bias) {
  if constexpr (std::is_same_v<T, float>) {
    run_at_cpu_level<HeadRowsF32<D, kLayerSecond, kLogProb, kGrads>>(HeadTaskF32{&a, raw, grad_bias}, first_row,
                                                                      count);
  } else {
    head_rows<D, T, kLayerSecond, kLogProb, kGrads>(a, raw, first_row, count, grad_bias);
  }
}

template <class D, typename T, bool kLayerSecond>
void rows_with_second(const HeadArgs<T>& a, HeadWants wants, T* raw, int64_t first_row, int64_t count,
                      T* grad_bias) {
  if (!wants.any_grad()) {
    rows_for<D, T, kLayerSecond, true, false>(a, raw, first_row, count, grad_bias);
  } else if (wants.log_prob) {
    rows_for<D, T, kLayerSecond, true, true>(a, raw, first_row, count, grad_bias);
  } else {
    rows_for<D, T, kLayerSecond, false, true>(a, raw, first_row, count, grad_bias);
  }
}

template <class D, typename T>
void rows(const HeadArgs<T>& a, HeadWants wants, T* raw, int64_t first_row, int64_t count, T* grad_bias) {
  if constexpr (has_second<D>()) {
    if (a.layer_second) return rows_with_second<D, T, true>(a, wants, raw, first_row, count, grad_bias);
  }
  rows_with_second<D, T, false>(a, wants, raw, first_row, count, grad_bias);
}

template <class D, typename T>
void run_head(const HeadIO& io, HeadWants wants) {
  const HeadArgs<T> a = io.args<T>();
  if (a.rows == 0) return;
  const int64_t chunk = head_chunk_rows(a.rows, a.outputs, sizeof(T));
  const int64_t chunks = (a.rows + chunk - 1) / chunk;
  const at::Tensor weight_t = io.weight.t();
  const at::Tensor grad_h = io.grad_h.defined() ? io.grad_h.view({a.rows, a.hidden}) : at::Tensor();
  // Thread t sums its chunks' grad_W and grad_b into partials[t]; thread 0 into the outputs themselves.
  // A thread's first GEMM into its grad_W partial has beta = 0 (the partials are not zeroed);
  // weight_written[t] says it ran.
  const int threads = at::get_num_threads();
  std::vector<at::Tensor> weight_partials(threads), bias_partials(threads);
  std::vector<char> weight_written(threads, 0);
  weight_partials[0] = io.grad_weight;
  bias_partials[0] = io.grad_bias;
  cpu_level();  // a bad FASTVAE_CPU_LEVEL is reported here, not from a worker thread
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // OpenMP workers start with the default thread-local state (grad mode on,
    // autograd keys in); the GEMMs below must not be seen by autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::NoGradGuard no_grad;
    const int tid = at::get_thread_num();
    // Once per thread: a parallel backend may hand one thread several ranges.
    if (tid > 0 && io.grad_weight.defined() && !weight_partials[tid].defined()) {
      weight_partials[tid] = at::empty_like(io.grad_weight);
    }
    if (tid > 0 && io.grad_bias.defined() && !bias_partials[tid].defined()) {
      bias_partials[tid] = at::zeros_like(io.grad_bias);
    }
    const at::Tensor& grad_weight = weight_partials[tid];
    T* grad_bias = defined_ptr<T>(bias_partials[tid]);
    const at::Tensor raw = at::empty({std::min(chunk, a.rows), a.outputs}, io.h.options());
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first_row = c * chunk, count = std::min(chunk, a.rows - first_row);
      at::Tensor raw_chunk = raw.narrow(0, 0, count);
      const at::Tensor h_chunk = io.h.narrow(0, first_row, count);
      at::mm_out(raw_chunk, h_chunk, weight_t);
      rows<D, T>(a, wants, raw.data_ptr<T>(), first_row, count, grad_bias);
      if (grad_h.defined()) {
        at::Tensor grad_h_chunk = grad_h.narrow(0, first_row, count);
        at::mm_out(grad_h_chunk, raw_chunk, io.weight);
      }
      if (grad_weight.defined()) {
        grad_weight.addmm_(raw_chunk.t(), h_chunk, weight_written[tid] ? 1.0 : 0.0);
        weight_written[tid] = 1;
      }
    }
  });
  // Thread 0 runs the first range unless the call is nested in another parallel region,
  // where the whole range runs on the calling thread, whatever its number.
  if (io.grad_weight.defined() && !weight_written[0]) io.grad_weight.zero_();
  for (int t = 1; t < threads; ++t) {
    if (weight_written[t]) io.grad_weight.add_(weight_partials[t]);
    if (bias_partials[t].defined()) io.grad_bias.add_(bias_partials[t]);
  }
}

struct CpuHeadBackend {
  using Guard = NoDeviceGuard;
  template <class D>
  static void compute(const HeadIO& io, HeadWants wants) {
    AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::fused_head", [&] { run_head<D, scalar_t>(io, wants); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) { HeadOps<CpuHeadBackend>::register_kernels(m); }

}  // namespace cpu
}  // namespace fastvae
