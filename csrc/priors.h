// priors.h: the per-element math of the prior ops, shared by the CPU loops
// (csrc/cpu/priors.cpp) and the CUDA kernels (csrc/cuda/priors.cu).
//
//   gaussian_kl_prior:    KL(N(mu, e^lv) || N(m, e^s)) summed over the last dimension
//   gaussian_log_density: log N(z; m, e^s) summed over the last dimension
//   mixture_log_prob:     the exact quadratic form of the (z, component) pairs whose
//                         GEMM-shaped form cancels (csrc/priors_host.h)
//
// Notation: posterior N(mu, e^lv), prior N(m, e^s), r = lv - s.
// Each element op takes its operands in schema order, returns its contribution to
// the row sum and writes its gradients (of that contribution).
#pragma once

#include <utility>

#include "fastvae.h"

namespace fastvae {

// e^r - 1 and e^r - 1 - r, both to the last digit: exp(r) - 1 - r would cancel to
// nothing for small r (r = 1e-8 leaves no digit of r^2/2 in float64).
template <typename T>
struct ExpMinusOne {
  T em1;          // e^r - 1
  T em1_minus_r;  // e^r - 1 - r
};

// float64: for |r| < 1/2 both come from the Taylor series sum_{n>=2} r^n / n! (the
// truncation after n = 15 is below 1e-17 relative); outside, exp(r) - 1 loses at
// most two bits. Branch-free (both forms are computed) so that the loops vectorize.
FASTVAE_FN ExpMinusOne<double> exp_minus_one(double r) {
  double p = 1.0 / 1307674368000.0;  // sum_{n>=2} r^(n-2) / n!, by Horner from 1/15!
  p = p * r + 1.0 / 87178291200.0;
  p = p * r + 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  const double series = r * r * p;
  const double direct = exp_of(r) - 1.0;
  const bool small = r < 0.5 && r > -0.5;
  return {small ? r + series : direct, small ? series : direct - r};
}

// float32: one range-reduced evaluation gives both (an exp and the series cost twice as much).
// r = k ln2 + f with |f| <= ln2/2 (reduce_by_ln2 in fastvae.h, as exp_poly); e^f - 1 = f + f^2 q(f),
// q the series above to n = 8 (truncation below 1e-9 relative at |f| = ln2/2). For
// k = 0, that is |r| < ln2/2, r = f and e^r - 1 - r = f^2 q(f) exactly as the series
// gives it; otherwise e^r - 1 = 2^k (e^f - 1) + (2^k - 1), and e^r - 1 - r, subtracted
// from it, loses at most three bits. r is clamped to [-87, 88], where 2^k is a normal
// float: a log-variance ratio beyond e^88 is reported as e^88.
FASTVAE_FN ExpMinusOne<float> exp_minus_one(float r) {
  float rc = r > 88.0f ? 88.0f : r;
  rc = rc < -87.0f ? -87.0f : rc;
  const Ln2Reduced reduced = reduce_by_ln2(rc);
  const int32_t k = reduced.k;
  const float f = reduced.r;
  float q = 1.0f / 40320.0f;  // 1/8!
  q = q * f + 1.0f / 5040.0f;
  q = q * f + 1.0f / 720.0f;
  q = q * f + 1.0f / 120.0f;
  q = q * f + 1.0f / 24.0f;
  q = q * f + 1.0f / 6.0f;
  q = q * f + 0.5f;
  const float f_tail = f * f * q;  // e^f - 1 - f
  const float scale = bits_to_float(static_cast<uint32_t>(k + 127) << 23);  // 2^k
  const float em1 = scale * (f + f_tail) + (scale - 1.0f);
  return {em1, k == 0 ? f_tail : em1 - r};
}

// KL(N(mu, e^lv) || N(m, e^s)) per dimension:
//   0.5 * ((e^r - 1 - r) + (mu - m)^2 e^-s)
//   d/dmu = (mu - m) e^-s        d/dlv = 0.5 (e^r - 1)
//   d/dm  = -(mu - m) e^-s       d/ds  = -0.5 ((e^r - 1) + (mu - m)^2 e^-s)
// With m = 0, s = 0 this is the standard-normal KL of latent_terms.
// Element ops take their operands as scalars, in schema order, and write their
// gradients through references: no per-element array, which GCC's vectorizer does
// not see through (the loops over d stayed scalar, with the selects as branches).
struct PriorKLElement {
  static constexpr int kOperands = 4;  // mu, logvar, prior_mu, prior_logvar
  template <typename T>
  static FASTVAE_FN T row_constant(int64_t) {
    return T(0);
  }
  template <typename T>
  static FASTVAE_FN T value(T mu, T logvar, T prior_mu, T prior_logvar) {
    const T diff = mu - prior_mu;
    return T(0.5) * (exp_minus_one(logvar - prior_logvar).em1_minus_r + diff * diff * exp_of(-prior_logvar));
  }
  template <typename T>
  static FASTVAE_FN void grads(T mu, T logvar, T prior_mu, T prior_logvar, T& d_mu, T& d_logvar, T& d_prior_mu,
                               T& d_prior_logvar) {
    const T diff = mu - prior_mu;
    const T scaled = diff * exp_of(-prior_logvar);
    const T em1 = exp_minus_one(logvar - prior_logvar).em1;
    d_mu = scaled;
    d_logvar = T(0.5) * em1;
    d_prior_mu = -scaled;
    d_prior_logvar = T(-0.5) * (em1 + diff * scaled);
  }
};

// log N(z; m, e^s) per dimension: -0.5 ((z - m)^2 e^-s + s + log 2 pi)
//   d/dz = -(z - m) e^-s    d/dm = (z - m) e^-s    d/ds = 0.5 ((z - m)^2 e^-s - 1)
struct GaussianLogDensityElement {
  static constexpr int kOperands = 3;  // z, mu, logvar
  template <typename T>
  static FASTVAE_FN T row_constant(int64_t dim) {
    return T(-0.5 * kLog2Pi) * static_cast<T>(dim);
  }
  template <typename T>
  static FASTVAE_FN T value(T z, T mu, T logvar) {
    const T diff = z - mu;
    return T(-0.5) * (diff * diff * exp_of(-logvar) + logvar);
  }
  template <typename T>
  static FASTVAE_FN void grads(T z, T mu, T logvar, T& d_z, T& d_mu, T& d_logvar) {
    const T diff = z - mu;
    const T scaled = diff * exp_of(-logvar);
    d_z = -scaled;
    d_mu = scaled;
    d_logvar = T(0.5) * (diff * scaled - T(1));
  }
};

// E::value and E::grads of element d of each operand's row (row[i] points at operand
// i's row); the gradients go to out[i][o].
template <class E, typename T, size_t... I>
FASTVAE_FN T element_value_of(const T* const* row, int64_t d, std::index_sequence<I...>) {
  return E::value(row[I][d]...);
}
template <class E, typename T>
FASTVAE_FN T element_value(const T* const* row, int64_t d) {
  return element_value_of<E>(row, d, std::make_index_sequence<E::kOperands>{});
}
template <class E, typename T, size_t... I>
FASTVAE_FN void element_grads_of(const T* const* row, int64_t d, T* const* out, int64_t o, std::index_sequence<I...>) {
  E::grads(row[I][d]..., out[I][o]...);
}
template <class E, typename T>
FASTVAE_FN void element_grads(const T* const* row, int64_t d, T* const* out, int64_t o) {
  element_grads_of<E>(row, d, out, o, std::make_index_sequence<E::kOperands>{});
}
// The same gradients times g (the incoming gradient of the element's row), written to out[i][o].
template <class E, typename T, size_t... I>
FASTVAE_FN void scaled_element_grads_of(const T* const* row, int64_t d, T g, T* const* out, int64_t o,
                                        std::index_sequence<I...>) {
  T grad[E::kOperands];  // indexed by constants only: held in registers
  E::grads(row[I][d]..., grad[I]...);
  ((out[I][o] = g * grad[I]), ...);
}
template <class E, typename T>
FASTVAE_FN void scaled_element_grads(const T* const* row, int64_t d, T g, T* const* out, int64_t o) {
  scaled_element_grads_of<E>(row, d, g, out, o, std::make_index_sequence<E::kOperands>{});
}

// The row-broadcast layout of both element ops (csrc/priors_host.h): every operand is
// contiguous (rows_i, dim), and output row r reads operand i's row r % rows_i. A
// backward pass computes the gradients of the operands with rows_i == pass_rows (those
// with a non-null grad pointer), each element summed over the rows that read it.
template <typename T, int kOperands>
struct RowBroadcastArgs {
  const T* in[kOperands];
  int64_t in_rows[kOperands];
  T* out;          // forward: (rows,) sums
  const T* grad;   // backward: (rows,) incoming gradient
  T* grad_in[kOperands];
  int64_t rows, dim, pass_rows;
};

// ---------------------------------------------------------------------------
// Mixture: the exact parts (csrc/priors_host.h has the GEMM form and the flags).
// ---------------------------------------------------------------------------
// One dimension's share of a pair's quadratic form sum_d (z_d - m_d)^2 e^-s_d.
template <typename T>
FASTVAE_FN T scaled_square(T z, T m, T inv_var) {
  const T diff = z - m;
  return diff * diff * inv_var;
}

// One dimension's share of a flagged pair's gradients, weighted by w = the incoming
// gradient times the pair's responsibility: d/dz -= w t, d/dm += w t,
// d/dlogvar += 0.5 w (z - m) t, t = (z - m) e^-s. (The -0.5 w of d/dlogvar is added
// for every pair by the host code.)
template <typename T>
struct PairGrads {
  T z, mean, logvar;
};

template <typename T>
FASTVAE_FN PairGrads<T> flagged_pair_grads(T w, T z, T m, T inv_var) {
  const T diff = z - m;
  const T t = w * diff * inv_var;
  return {-t, t, T(0.5) * diff * t};
}

}  // namespace fastvae
