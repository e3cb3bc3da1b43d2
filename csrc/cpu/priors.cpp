// CPU kernels of the prior ops (csrc/priors_host.h has the layouts and the ATen parts,
// csrc/priors.h the per-element math).
//
// Row-broadcast ops: the forward sums each result row over d in one pass; a backward
// pass runs over the rows of the operands it computes, summing every element's
// gradient over the result rows that read it (one writer per element, parallel over
// those rows). float32 loops run at the process's CPU level (cpu_level.h).
// Mixture: the flagged pairs are listed (at::nonzero) and handled pair by pair.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../priors_host.h"
#include "cpu_loops.h"

namespace fastvae {
namespace cpu {
namespace {

// Row chunk held on the stack by the backward pass: all operands' gradients of a
// chunk are computed in one vectorized loop. For the first result row reading an operand
// row, that loop writes the wanted gradients, scaled, straight to the outputs (staging them
// in the chunk and copying cost a third of the KL's backward at (4096, 256)) and only the
// unwanted ones land in the chunk; later result rows' gradients are staged and added.
constexpr int64_t kPriorChunk = 256;

template <class E, typename T>
__attribute__((always_inline)) inline void forward_rows(const RowBroadcastArgs<T, E::kOperands>& a, int64_t begin,
                                                        int64_t end) {
  constexpr int N = E::kOperands;
  const int64_t D = a.dim;
  const T constant = E::template row_constant<T>(D);
  for (int64_t r = begin; r < end; ++r) {
    const T* row[N];
    for (int i = 0; i < N; ++i) row[i] = a.in[i] + (r % a.in_rows[i]) * D;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; ++d) sum += element_value<E>(row, d);
    a.out[r] = sum + constant;
  }
}

// Operand rows j in [begin, end) of this pass: result rows j, j + pass_rows, ...
template <class E, typename T>
__attribute__((always_inline)) inline void backward_rows(const RowBroadcastArgs<T, E::kOperands>& a, int64_t begin,
                                                         int64_t end) {
  constexpr int N = E::kOperands;
  const int64_t D = a.dim, repeats = a.rows / a.pass_rows;
  T chunk[N][kPriorChunk];
  T* chunk_rows[N];
  for (int i = 0; i < N; ++i) chunk_rows[i] = chunk[i];
  for (int64_t j = begin; j < end; ++j) {
    for (int64_t t = 0; t < repeats; ++t) {
      const int64_t r = t * a.pass_rows + j;
      const T g = a.grad[r];
      const T* row[N];
      for (int i = 0; i < N; ++i) row[i] = a.in[i] + (r % a.in_rows[i]) * D;
      for (int64_t c = 0; c < D; c += kPriorChunk) {
        const int64_t count = std::min(kPriorChunk, D - c);
        if (t == 0) {  // the first result row reading operand row j: its gradients are the outputs' first values
          T* out[N];   // (the unwanted ones go to the chunk and are dropped)
          for (int i = 0; i < N; ++i) out[i] = a.grad_in[i] != nullptr ? a.grad_in[i] + j * D + c : chunk[i];
#pragma omp simd
          for (int64_t d = 0; d < count; ++d) scaled_element_grads<E>(row, c + d, g, out, d);
          continue;
        }
#pragma omp simd
        for (int64_t d = 0; d < count; ++d) element_grads<E>(row, c + d, chunk_rows, d);
        for (int i = 0; i < N; ++i) {
          if (a.grad_in[i] == nullptr) continue;
          T* out = a.grad_in[i] + j * D + c;
#pragma omp simd
          for (int64_t d = 0; d < count; ++d) out[d] += g * chunk[i][d];
        }
      }
    }
  }
}

template <class E>
struct ForwardF32 {
  __attribute__((always_inline)) void operator()(const RowBroadcastArgs<float, E::kOperands>& a, int64_t begin,
                                                 int64_t end) const {
    forward_rows<E, float>(a, begin, end);
  }
};
template <class E>
struct BackwardF32 {
  __attribute__((always_inline)) void operator()(const RowBroadcastArgs<float, E::kOperands>& a, int64_t begin,
                                                 int64_t end) const {
    backward_rows<E, float>(a, begin, end);
  }
};

struct CpuKernels {
  using Guard = NoDeviceGuard;

  template <class E, typename T>
  static void forward(const RowBroadcastArgs<T, E::kOperands>& a) {
    cpu_level();  // a bad FASTVAE_CPU_LEVEL is reported here, not from a worker thread
    parallel_rows(a.rows, a.dim, kElementsPerTask, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<T, float>) {
        run_at_cpu_level<ForwardF32<E>>(a, begin, end);
      } else {
        forward_rows<E, T>(a, begin, end);
      }
    });
  }

  template <class E, typename T>
  static void backward_pass(const RowBroadcastArgs<T, E::kOperands>& a) {
    cpu_level();
    parallel_rows(a.pass_rows, a.rows / a.pass_rows * a.dim, kElementsPerTask, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<T, float>) {
        run_at_cpu_level<BackwardF32<E>>(a, begin, end);
      } else {
        backward_rows<E, T>(a, begin, end);
      }
    });
  }

  // Q_nk = sum_d (z_nd - m_kd)^2 e^-s_kd for each flagged (n, k), one pair per iteration.
  static void recompute_flagged(at::Tensor& Q, const at::Tensor& flagged, const at::Tensor& Z,
                                const at::Tensor& means, const at::Tensor& inv_var) {
    const at::Tensor pairs = at::nonzero(flagged).contiguous();  // (F, 2); nonzero gives it transposed
    const int64_t count = pairs.size(0), D = Z.size(1), K = Q.size(1);
    if (count == 0) return;
    const int64_t* pair = pairs.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "fastvae::mixture_recompute_flagged", [&] {
      const scalar_t* z = Z.data_ptr<scalar_t>();
      const scalar_t* m = means.data_ptr<scalar_t>();
      const scalar_t* inv = inv_var.data_ptr<scalar_t>();
      scalar_t* q = Q.data_ptr<scalar_t>();
      at::parallel_for(0, count, std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(D, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t f = begin; f < end; ++f) {
                           const int64_t n = pair[2 * f], k = pair[2 * f + 1];
                           scalar_t sum = 0;
                           for (int64_t d = 0; d < D; ++d) sum += scaled_square(z[n * D + d], m[k * D + d], inv[k * D + d]);
                           q[n * K + k] = sum;
                         }
                       });
    });
  }

  // Parallel over d: every thread walks all flagged pairs for its own columns, so each
  // gradient element has one writer.
  static void add_flagged_grads(const at::Tensor& resp, const at::Tensor& grad, const at::Tensor& Z,
                                const at::Tensor& means, const at::Tensor& inv_var, at::Tensor& grad_z,
                                at::Tensor& grad_means, at::Tensor& grad_logvars) {
    const at::Tensor pairs = at::nonzero(resp < 0).contiguous();
    const int64_t count = pairs.size(0), D = Z.size(1), K = resp.size(1);
    if (count == 0 || D == 0) return;
    const int64_t* pair = pairs.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "fastvae::mixture_add_flagged_grads", [&] {
      const scalar_t* r = resp.data_ptr<scalar_t>();
      const scalar_t* g = grad.data_ptr<scalar_t>();
      const scalar_t* z = Z.data_ptr<scalar_t>();
      const scalar_t* m = means.data_ptr<scalar_t>();
      const scalar_t* inv = inv_var.data_ptr<scalar_t>();
      scalar_t* gz = grad_z.data_ptr<scalar_t>();
      scalar_t* gm = grad_means.data_ptr<scalar_t>();
      scalar_t* glv = grad_logvars.data_ptr<scalar_t>();
      at::parallel_for(0, D, std::max<int64_t>(1, kElementsPerTask / count), [&](int64_t begin, int64_t end) {
        for (int64_t f = 0; f < count; ++f) {
          const int64_t n = pair[2 * f], k = pair[2 * f + 1];
          const scalar_t w = -r[n * K + k] * g[n];
          for (int64_t d = begin; d < end; ++d) {
            const PairGrads<scalar_t> p = flagged_pair_grads(w, z[n * D + d], m[k * D + d], inv[k * D + d]);
            gz[n * D + d] += p.z;
            gm[k * D + d] += p.mean;
            glv[k * D + d] += p.logvar;
          }
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) { register_prior_kernels<CpuKernels>(m); }

}  // namespace cpu
}  // namespace fastvae
