// CPU implementation of the fused reconstruction log-likelihood ops: one
// generic row loop for every likelihood of csrc/fastvae.h (FusedLikelihoods),
// which supplies the per-element math through its traits struct.
//
// The decoder output has one row per (sample l, example b): (L, B, P) or
// (B, P); x is (B, P) and is broadcast over l. Each row is summed over P in
// one pass. Backward writes the per-element gradient scaled by the row's
// incoming gradient, and (only when x needs it) the gradient for x summed over l.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "../host.h"
#include "cpu_loops.h"

namespace fastvae {
namespace cpu {
namespace {

// The second parameter of element p: from the tensor when there is one, else
// the value made once per call (kSecondTensor is a compile-time switch, so
// that each variant of the loop has no branch left inside).
template <class D, bool kSecondTensor, typename T>
__attribute__((always_inline)) inline auto second_at(const T* second, int64_t p,
                                                     typename D::template Second<T> fixed) {
  if constexpr (kSecondTensor) {
    return D::second(second[p]);
  } else {
    return fixed;
  }
}

template <class D, bool kSecondTensor, typename T>
__attribute__((always_inline)) inline void forward_rows(const LikelihoodArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t P = a.pixels;
  const auto fixed = D::second(a.second_value);
  const T row_constant = D::template row_constant<T>(P);
  for (int64_t row = begin; row < end; ++row) {
    const T* params = a.params + row * P;
    const T* x = a.x + (row % a.batch) * P;
    const T* second = kSecondTensor ? a.second + row * P : nullptr;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < P; ++p) sum += D::log_prob(params[p], second_at<D, kSecondTensor>(second, p, fixed), x[p]);
    a.out[row] = sum + row_constant;
  }
}

// Parallel over examples b, so that grad_x (a sum over samples) has one writer.
template <class D, bool kSecondTensor, bool kGradX, typename T>
__attribute__((always_inline)) inline void backward_examples(const LikelihoodArgs<T>& a, int64_t begin,
                                                             int64_t end) {
  const int64_t P = a.pixels, samples = a.rows / a.batch;
  const auto fixed = D::second(a.second_value);
  for (int64_t b = begin; b < end; ++b) {
    const T* x = a.x + b * P;
    T* gx = kGradX ? a.grad_x + b * P : nullptr;
    if constexpr (kGradX) std::fill(gx, gx + P, T(0));
    for (int64_t l = 0; l < samples; ++l) {
      const int64_t row = l * a.batch + b;
      const T g = a.grad[row];
      const T* params = a.params + row * P;
      const T* second = kSecondTensor ? a.second + row * P : nullptr;
      T* gparams = a.out + row * P;
      T* gsecond = kSecondTensor ? a.grad_second + row * P : nullptr;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const LikelihoodGrads<T> d = D::grads(params[p], second_at<D, kSecondTensor>(second, p, fixed), x[p]);
        gparams[p] = g * d.param;
        if constexpr (kSecondTensor) gsecond[p] = g * d.second;
        if constexpr (kGradX) gx[p] += g * d.x;
      }
    }
  }
}

// The loop variant for this call's arguments (second parameter a tensor or a
// float; grad_x wanted or not), chosen once per task.
template <class D, typename T>
__attribute__((always_inline)) inline void run_task(const LikelihoodArgs<T>& a, bool backward, int64_t begin,
                                                    int64_t end) {
  const bool second_tensor = has_second<D>() && a.second != nullptr;
  if (!backward) {
    if (second_tensor) {
      if constexpr (has_second<D>()) forward_rows<D, true>(a, begin, end);
    } else {
      forward_rows<D, false>(a, begin, end);
    }
    return;
  }
  const bool grad_x = a.grad_x != nullptr;
  if (second_tensor) {
    if constexpr (has_second<D>()) {
      grad_x ? backward_examples<D, true, true>(a, begin, end) : backward_examples<D, true, false>(a, begin, end);
    }
  } else {
    grad_x ? backward_examples<D, false, true>(a, begin, end) : backward_examples<D, false, false>(a, begin, end);
  }
}

// float32 runs at the process's CPU level (cpu_level.h): the task is compiled once per level.
template <class D, bool kBackward>
struct RunTaskF32 {
  __attribute__((always_inline)) void operator()(const LikelihoodArgs<float>& a, int64_t begin, int64_t end) const {
    run_task<D, float>(a, kBackward, begin, end);
  }
};

struct CpuBackend {
  using Guard = NoDeviceGuard;

  template <class D, typename T>
  static void run(const LikelihoodArgs<T>& a, bool backward) {
    // Forward splits rows; backward splits examples (each owns its grad_x row).
    const int64_t units = backward ? a.batch : a.rows;
    if (units == 0) return;
    const int64_t unit_len = backward ? (a.rows / a.batch) * a.pixels : a.pixels;
    cpu_level();  // a bad FASTVAE_CPU_LEVEL is reported here, not from a worker thread
    parallel_rows(units, unit_len, kElementsPerTask, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<T, float>) {
        backward ? run_at_cpu_level<RunTaskF32<D, true>>(a, begin, end)
                 : run_at_cpu_level<RunTaskF32<D, false>>(a, begin, end);
      } else {
        run_task<D, T>(a, backward, begin, end);
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) { register_likelihood_kernels<CpuBackend>(m); }

}  // namespace cpu
}  // namespace fastvae
