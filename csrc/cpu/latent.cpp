// CPU implementation of the fused latent op and its backward.
//
// Forward: one pass over mu, logvar (and eps, or the in-loop Philox stream)
// writes z and the per-row sums kl, log_q, log_p. Backward needs only z, mu
// and logvar (std*eps = z - mu), so eps is never stored.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "cpu_loops.h"

namespace fastvae {
namespace cpu {
namespace {

template <typename T>
struct LatentForward {
  const T* mu;
  const T* logvar;
  const T* eps;  // nullptr: draw from (seed, offset)
  T* z;
  T* kl;
  T* log_q;
  T* log_p;
  int64_t batch, dim;
  uint64_t seed, offset;
  int64_t row_offset;  // global index of this batch's first example (data-parallel shards)
};

// The noise of elements [c, c+count) of z's row `row`, as T: the caller's eps,
// or fresh Philox normals (drawn in float32 for every dtype, so a seed gives the
// same eps whatever the dtype).
template <typename T>
__attribute__((always_inline)) inline const T* noise_chunk(const LatentForward<T>& a, int64_t row, int64_t c,
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

template <typename T>
__attribute__((always_inline)) inline void latent_forward_rows(const LatentForward<T>& a, int64_t begin,
                                                               int64_t end) {
  float fbuf[kNoiseChunk + 8];
  T tbuf[std::is_same_v<T, float> ? 1 : kNoiseChunk];
  const int64_t D = a.dim;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row % a.batch;
    const T* mu = a.mu + b * D;
    const T* logvar = a.logvar + b * D;
    T* z = a.z + row * D;
    T lq = 0, lp = 0, kl = 0;
    for (int64_t c = 0; c < D; c += kNoiseChunk) {
      const int64_t n = std::min(kNoiseChunk, D - c);
      const T* eps = noise_chunk(a, row, c, n, fbuf, tbuf);
#pragma omp simd reduction(+ : lq, lp, kl)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t d = c + j;
        const T std_dev = exp_of(T(0.5) * logvar[d]);
        const LatentElement<T> e = latent_element(mu[d], std_dev, logvar[d], eps[j]);
        z[d] = e.z;
        lq += e.log_q;
        lp += e.log_p;
        kl += kl_element(mu[d], std_dev * std_dev, logvar[d]);
      }
    }
    const T normalizer = T(-0.5 * kLog2Pi) * static_cast<T>(D);
    a.log_q[row] = lq + normalizer;
    a.log_p[row] = lp + normalizer;
    if (row < a.batch) a.kl[b] = kl;  // KL does not depend on the sample: write it once
  }
}

template <typename T>
struct LatentBackward {
  const T* grad_z;      // (L,B,D) or nullptr (zero)
  const T* grad_kl;     // (B) or nullptr
  const T* grad_log_q;  // (L,B) or nullptr
  const T* grad_log_p;  // (L,B) or nullptr
  const T* z;
  const T* mu;
  const T* logvar;
  T* grad_mu;
  T* grad_logvar;
  int64_t samples, batch, dim;
  bool stl;  // sticking the landing: log_q's gradient only through z
};

// Adds sample l's contribution to row b's gradients (DESIGN.md section 1).
template <typename T, bool kHasGradZ, bool kPathLogQ>
__attribute__((always_inline)) inline void latent_backward_sample(const LatentBackward<T>& a, int64_t l, int64_t b) {
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
__attribute__((always_inline)) inline void latent_backward_rows(const LatentBackward<T>& a, int64_t begin,
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

// float32 entry points, one clone per ISA level; float64 uses the plain template.
FASTVAE_MULTIVERSION void latent_forward_rows_f32(const LatentForward<float>& a, int64_t begin, int64_t end) {
  latent_forward_rows<float>(a, begin, end);
}
FASTVAE_MULTIVERSION void latent_backward_rows_f32(const LatentBackward<float>& a, int64_t begin, int64_t end) {
  latent_backward_rows<float>(a, begin, end);
}
void run_rows(const LatentForward<float>& a, int64_t begin, int64_t end) { latent_forward_rows_f32(a, begin, end); }
void run_rows(const LatentForward<double>& a, int64_t begin, int64_t end) { latent_forward_rows<double>(a, begin, end); }
void run_rows(const LatentBackward<float>& a, int64_t begin, int64_t end) { latent_backward_rows_f32(a, begin, end); }
void run_rows(const LatentBackward<double>& a, int64_t begin, int64_t end) {
  latent_backward_rows<double>(a, begin, end);
}

// Half and bfloat16 are computed in float32 (inputs upcast once, z cast back).
at::ScalarType compute_dtype(const at::Tensor& t) { return sum_dtype(t.scalar_type()); }

template <typename T>
const T* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

c10::optional<at::Tensor> prepared(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value()) return c10::nullopt;
  return t->to(dtype).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_terms(const at::Tensor& mu_in,
                                                                      const at::Tensor& logvar_in,
                                                                      const c10::optional<at::Tensor>& eps_in,
                                                                      c10::optional<int64_t> num_samples, int64_t seed,
                                                                      int64_t offset, int64_t row_offset,
                                                                      bool /*stl*/) {
  check_latent_inputs(mu_in, logvar_in, eps_in, num_samples);
  TORCH_CHECK(row_offset >= 0, "fastvae: row_offset must be >= 0, got ", row_offset);
  const at::ScalarType dtype = compute_dtype(mu_in);
  const at::Tensor mu = mu_in.to(dtype).contiguous();
  const at::Tensor logvar = logvar_in.to(dtype).contiguous();
  const c10::optional<at::Tensor> eps = prepared(eps_in, dtype);
  const int64_t B = mu.size(0), D = mu.size(1), L = num_samples.value_or(1);
  const auto z_shape = latent_z_shape(mu, num_samples);
  const auto row_shape = at::IntArrayRef(z_shape).slice(0, z_shape.size() - 1);
  at::Tensor z = at::empty(z_shape, mu.options());
  at::Tensor kl = at::empty({B}, mu.options());
  at::Tensor log_q = at::empty(row_shape, mu.options());
  at::Tensor log_p = at::empty(row_shape, mu.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::latent_terms", [&] {
    const LatentForward<scalar_t> args{mu.data_ptr<scalar_t>(),    logvar.data_ptr<scalar_t>(),
                                       optional_ptr<scalar_t>(eps), z.data_ptr<scalar_t>(),
                                       kl.data_ptr<scalar_t>(),     log_q.data_ptr<scalar_t>(),
                                       log_p.data_ptr<scalar_t>(),  B,
                                       D,                           static_cast<uint64_t>(seed),
                                       static_cast<uint64_t>(offset), row_offset};
    parallel_rows(L * B, D, [&](int64_t begin, int64_t end) { run_rows(args, begin, end); });
  });
  return {z.to(mu_in.scalar_type()), kl, log_q, log_p};
}

std::tuple<at::Tensor, at::Tensor> latent_terms_backward(
    const c10::optional<at::Tensor>& grad_z_in, const c10::optional<at::Tensor>& grad_kl_in,
    const c10::optional<at::Tensor>& grad_log_q_in, const c10::optional<at::Tensor>& grad_log_p_in,
    const at::Tensor& z_in, const at::Tensor& mu_in, const at::Tensor& logvar_in, bool stl) {
  check_latent_backward_inputs(grad_z_in, grad_kl_in, grad_log_q_in, grad_log_p_in, z_in, mu_in, logvar_in);
  const at::ScalarType dtype = compute_dtype(mu_in);
  const at::Tensor z = z_in.to(dtype).contiguous();
  const at::Tensor mu = mu_in.to(dtype).contiguous();
  const at::Tensor logvar = logvar_in.to(dtype).contiguous();
  const auto grad_z = prepared(grad_z_in, dtype);
  const auto grad_kl = prepared(grad_kl_in, dtype);
  const auto grad_log_q = prepared(grad_log_q_in, dtype);
  const auto grad_log_p = prepared(grad_log_p_in, dtype);
  const int64_t L = z.dim() == 3 ? z.size(0) : 1, B = mu.size(0), D = mu.size(1);
  at::Tensor grad_mu = at::empty_like(mu);
  at::Tensor grad_logvar = at::empty_like(logvar);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::latent_terms_backward", [&] {
    const LatentBackward<scalar_t> args{optional_ptr<scalar_t>(grad_z),     optional_ptr<scalar_t>(grad_kl),
                                        optional_ptr<scalar_t>(grad_log_q), optional_ptr<scalar_t>(grad_log_p),
                                        z.data_ptr<scalar_t>(),             mu.data_ptr<scalar_t>(),
                                        logvar.data_ptr<scalar_t>(),        grad_mu.data_ptr<scalar_t>(),
                                        grad_logvar.data_ptr<scalar_t>(),   L,
                                        B,                                  D,
                                        stl};
    parallel_rows(B, L * D, [&](int64_t begin, int64_t end) { run_rows(args, begin, end); });
  });
  return {grad_mu.to(mu_in.scalar_type()), grad_logvar.to(mu_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) {
  m.impl("latent_terms", &latent_terms);
  m.impl("latent_terms_backward", &latent_terms_backward);
}

}  // namespace cpu
}  // namespace fastvae
