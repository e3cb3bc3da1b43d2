// CPU implementation of the fused latent op and its backward.
//
// Forward: one pass over mu, logvar (and eps, or the in-loop Philox stream)
// writes z and the per-row sums kl, log_q, log_p. Backward needs only z, mu
// and logvar (std*eps = z - mu), so eps is never stored.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "../host.h"
#include "cpu_loops.h"
#include "seed.h"

namespace fastvae {
namespace cpu {
namespace {

// The noise of `count` consecutive elements of z from column c of row `row` on
// (count <= kNoiseChunk; they may run on into the next rows of the same sample),
// as T: the caller's eps, or fresh Philox normals (drawn in float32 for every
// dtype, so a seed gives the same eps whatever the dtype).
template <typename T>
__attribute__((always_inline)) inline const T* noise_chunk(const LatentForwardArgs<T>& a, int64_t row, int64_t c,
                                                           int64_t count, float* fbuf, T* tbuf) {
  if (a.eps != nullptr) return a.eps + row * a.dim + c;
  const int64_t sample = row / a.batch, example = row % a.batch + a.row_offset;
  const float* normals = draw_normals(a.seed, a.offset, sample, example * a.dim + c, count, fbuf);
  if constexpr (std::is_same_v<T, float>) {
    return normals;
  } else {
    for (int64_t j = 0; j < count; ++j) tbuf[j] = static_cast<T>(normals[j]);
    return tbuf;
  }
}

// A row's three running sums (fastvae.h, latent_element), each held as kLanes
// partial sums that the vectorizer keeps in registers and that are added as a
// tree at the end of the row. (With `omp simd reduction` GCC added the lanes
// one after another: a serial tail worth ~15% of a 256-wide float32 row.)
template <typename T>
struct LatentRowSums {
  static constexpr int kLanes = 16;
  T kl2[kLanes] = {}, eps_sq_logvar[kLanes] = {}, z_sq[kLanes] = {};

  // z[j] for j < count (<= kNoiseChunk), adding each element's terms to lane j % kLanes.
  // Two passes (fastvae.h, latent_std): z and std first, then the sums from them.
  __attribute__((always_inline)) inline void add(const T* mu, const T* logvar, const T* eps, T* z, int64_t count) {
    T std_dev[kNoiseChunk];
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) {
      std_dev[j] = latent_std(logvar[j]);
      z[j] = mu[j] + std_dev[j] * eps[j];
    }
    int64_t j = 0;
    for (; j + kLanes <= count; j += kLanes) {
#pragma omp simd
      for (int k = 0; k < kLanes; ++k) {
        latent_add_terms(mu[j + k], logvar[j + k], eps[j + k], std_dev[j + k], z[j + k], kl2[k], eps_sq_logvar[k],
                         z_sq[k]);
      }
    }
    for (int k = 0; j < count; ++j, ++k) {
      latent_add_terms(mu[j], logvar[j], eps[j], std_dev[j], z[j], kl2[k], eps_sq_logvar[k], z_sq[k]);
    }
  }

  LatentRowResults<T> results(int64_t dim) {
    for (int width = kLanes / 2; width > 0; width /= 2) {
#pragma omp simd
      for (int k = 0; k < width; ++k) {
        kl2[k] += kl2[k + width];
        eps_sq_logvar[k] += eps_sq_logvar[k + width];
        z_sq[k] += z_sq[k + width];
      }
    }
    return latent_row_results(kl2[0], eps_sq_logvar[0], z_sq[0], dim);
  }
};

// Writes row `row`'s kl (once per example), log_q and log_p from its sums.
template <typename T>
__attribute__((always_inline)) inline void store_row_results(const LatentForwardArgs<T>& a, int64_t row,
                                                             LatentRowSums<T>& sums) {
  const LatentRowResults<T> r = sums.results(a.dim);
  a.log_q[row] = r.log_q;
  a.log_p[row] = r.log_p;
  if (row < a.batch) a.kl[row] = r.kl;  // KL does not depend on the sample: write it once
}

// Noise is fetched in spans of at most kNoiseChunk elements: a piece of one long
// row, or several whole short rows of one sample, whose noise indices are
// contiguous. (Drawing 32 normals at a time cost ~1.7x per normal what 512 did,
// which showed at D = 32.) One call site each for the noise and the row sums,
// so that GCC inlines the whole noise generator into this vectorized loop.
template <typename T>
__attribute__((always_inline)) inline void latent_forward_rows(const LatentForwardArgs<T>& a, int64_t begin,
                                                               int64_t end) {
  float fbuf[kNoiseBufferFloats];
  T tbuf[std::is_same_v<T, float> ? 1 : kNoiseChunk];
  const int64_t D = a.dim;
  LatentRowSums<T> sums;
  if (D == 0) {  // empty rows: every sum is 0
    for (int64_t row = begin; row < end; ++row) store_row_results(a, row, sums);
    return;
  }
  const int64_t rows_per_span = std::max<int64_t>(1, kNoiseChunk / D);
  int64_t row = begin, col = 0;
  while (row < end) {
    const int64_t rows = col == 0 ? std::min({end - row, rows_per_span, a.batch - row % a.batch}) : 1;
    const int64_t span = rows > 1 ? rows * D : std::min(kNoiseChunk, D - col);
    const T* eps = noise_chunk(a, row, col, span, fbuf, tbuf);
    for (int64_t done = 0; done < span;) {
      const int64_t b = row % a.batch, count = std::min(span - done, D - col);
      sums.add(a.mu + b * D + col, a.logvar + b * D + col, eps + done, a.z + row * D + col, count);
      done += count;
      col += count;
      if (col == D) {  // the row is complete
        store_row_results(a, row, sums);
        sums = LatentRowSums<T>();
        ++row;
        col = 0;
      }
    }
  }
}

// Adds sample l's contribution to row b's gradients (docs/DESIGN.md section 1).
template <typename T, bool kHasGradZ, bool kPathLogQ>
__attribute__((always_inline)) inline void latent_backward_sample(const LatentBackwardArgs<T>& a, int64_t l, int64_t b) {
  const int64_t D = a.dim, row = l * a.batch + b;
  const T glp = a.grad_log_p ? a.grad_log_p[row] : T(0);
  const T glq_path = kPathLogQ ? a.grad_log_q[row] : T(0);
  const T* gz = kHasGradZ ? a.grad_z + row * D : nullptr;
  const T* z = a.z + row * D;
  const T* mu = a.mu + b * D;
  const T* logvar = a.logvar + b * D;
  T* gmu = a.grad_mu + b * D;
  T* glv = a.grad_logvar + b * D;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const T inv_var = kPathLogQ ? exp_of(-logvar[d]) : T(0);
    const T g = latent_grad_through_z(kHasGradZ ? gz[d] : T(0), glp, glq_path, z[d], mu[d], inv_var);
    gmu[d] += g;
    glv[d] += g * T(0.5) * (z[d] - mu[d]);
  }
}

template <typename T>
__attribute__((always_inline)) inline void latent_backward_rows(const LatentBackwardArgs<T>& a, int64_t begin,
                                                                int64_t end) {
  const int64_t D = a.dim;
  for (int64_t b = begin; b < end; ++b) {
    const T gkl = a.grad_kl ? a.grad_kl[b] : T(0);
    // log_q = sum(-0.5*eps^2 - 0.5*logvar) with eps fixed: -0.5 per dimension for logvar.
    T glq_sum = 0;
    if (!a.stl && a.grad_log_q) {
      for (int64_t l = 0; l < a.samples; ++l) glq_sum += a.grad_log_q[l * a.batch + b];
    }
    const T* mu = a.mu + b * D;
    const T* logvar = a.logvar + b * D;
    T* gmu = a.grad_mu + b * D;
    T* glv = a.grad_logvar + b * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      gmu[d] = gkl * mu[d];
      glv[d] = gkl * T(0.5) * (exp_of(logvar[d]) - T(1)) - T(0.5) * glq_sum;
    }
    const bool path_log_q = a.stl && a.grad_log_q;
    for (int64_t l = 0; l < a.samples; ++l) {
      if (a.grad_z && path_log_q) {
        latent_backward_sample<T, true, true>(a, l, b);
      } else if (a.grad_z) {
        latent_backward_sample<T, true, false>(a, l, b);
      } else if (path_log_q) {
        latent_backward_sample<T, false, true>(a, l, b);
      } else {
        latent_backward_sample<T, false, false>(a, l, b);
      }
    }
  }
}

// float32 runs at the process's CPU level (cpu_level.h); float64 uses the plain template.
struct LatentForwardF32 {
  __attribute__((always_inline)) void operator()(const LatentForwardArgs<float>& a, int64_t begin, int64_t end) const {
    latent_forward_rows<float>(a, begin, end);
  }
};
struct LatentBackwardF32 {
  __attribute__((always_inline)) void operator()(const LatentBackwardArgs<float>& a, int64_t begin, int64_t end) const {
    latent_backward_rows<float>(a, begin, end);
  }
};
void run_rows(const LatentForwardArgs<float>& a, int64_t begin, int64_t end) {
  run_at_cpu_level<LatentForwardF32>(a, begin, end);
}
void run_rows(const LatentForwardArgs<double>& a, int64_t begin, int64_t end) { latent_forward_rows<double>(a, begin, end); }
void run_rows(const LatentBackwardArgs<float>& a, int64_t begin, int64_t end) {
  run_at_cpu_level<LatentBackwardF32>(a, begin, end);
}
void run_rows(const LatentBackwardArgs<double>& a, int64_t begin, int64_t end) {
  latent_backward_rows<double>(a, begin, end);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_latent_forward(const LatentForwardIO& io) {
  cpu_level();  // a bad FASTVAE_CPU_LEVEL is reported here, not from a worker thread
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::latent_terms", [&] {
    const auto args = io.args<scalar_t>();
    const int64_t per_task = io.eps.has_value() ? kElementsPerTask : kNoiseElementsPerTask;
    parallel_rows(io.samples * io.batch, io.dim, per_task,
                  [&](int64_t begin, int64_t end) { run_rows(args, begin, end); });
  });
  return io.result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_terms(const at::Tensor& mu,
                                                                      const at::Tensor& logvar,
                                                                      const c10::optional<at::Tensor>& eps,
                                                                      c10::optional<int64_t> num_samples, int64_t seed,
                                                                      int64_t offset, int64_t row_offset,
                                                                      bool /*stl*/) {
  return run_latent_forward(prepare_latent_forward(mu, logvar, eps, num_samples, seed, offset, row_offset));
}

// One seed from the generator, offset 0: the noise latent_terms gives for that seed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_terms_from_generator(
    const at::Tensor& mu, const at::Tensor& logvar, c10::optional<int64_t> num_samples,
    const c10::optional<at::Generator>& generator, int64_t row_offset, bool /*stl*/) {
  LatentForwardIO io = prepare_latent_forward(mu, logvar, c10::nullopt, num_samples, 0, 0, row_offset);
  // Drawn after the arguments are checked, so that a rejected call leaves the generator alone.
  io.seed = static_cast<uint64_t>(draw_cpu_seed(generator));
  return run_latent_forward(io);
}

std::tuple<at::Tensor, at::Tensor> latent_terms_backward(
    const c10::optional<at::Tensor>& grad_z, const c10::optional<at::Tensor>& grad_kl,
    const c10::optional<at::Tensor>& grad_log_q, const c10::optional<at::Tensor>& grad_log_p, const at::Tensor& z,
    const at::Tensor& mu, const at::Tensor& logvar, bool stl) {
  const LatentBackwardIO io = prepare_latent_backward(grad_z, grad_kl, grad_log_q, grad_log_p, z, mu, logvar, stl);
  cpu_level();
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::latent_terms_backward", [&] {
    const auto args = io.args<scalar_t>();
    parallel_rows(io.batch, io.samples * io.dim, kElementsPerTask,
                  [&](int64_t begin, int64_t end) { run_rows(args, begin, end); });
  });
  return io.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) {
  m.impl("latent_terms", &latent_terms);
  m.impl("latent_terms_from_generator", &latent_terms_from_generator);
  m.impl("latent_terms_backward", &latent_terms_backward);
}

}  // namespace cpu
}  // namespace fastvae
