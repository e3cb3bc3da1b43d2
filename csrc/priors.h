// priors.h: the per-element math of the prior ops, shared by the CPU loops
// (csrc/cpu/priors.cpp) and the CUDA kernels (csrc/cuda/priors.cu).
//
//   gaussian_kl_prior:    KL(N(mu, e^lv) || N(m, e^s)) summed over the last dimension
//   gaussian_log_density: log N(z; m, e^s) summed over the last dimension
//   mixture_log_prob:     the exact quadratic form of the (z, component) pairs whose
//                         GEMM-shaped form cancels (csrc/priors_host.h)
//
// Notation: posterior N(mu, e^lv), prior N(m, e^s), r = lv - s.
// Each element op takes its operands as an array in schema order, returns its
// contribution to the row sum and writes its gradients (of that contribution).
#pragma once

#include "fastvae.h"

namespace fastvae {

// e^r - 1 and e^r - 1 - r, both to the last digit. For |r| < 1/2 both come from the
// Taylor series sum_{n>=2} r^n / n! (the truncation after n = 15 is below 1e-17
// relative): exp(r) - 1 - r would cancel to nothing there (r = 1e-8 leaves no digit of
// r^2/2 in float64). Outside, exp(r) - 1 loses at most two bits. Branch-free (both
// forms are computed) so that the CPU loops vectorize.
template <typename T>
struct ExpMinusOne {
  T em1;          // e^r - 1
  T em1_minus_r;  // e^r - 1 - r
};

template <typename T>
FASTVAE_FN ExpMinusOne<T> exp_minus_one(T r) {
  T p = T(1.0 / 1307674368000.0);  // 1/15!
  p = p * r + T(1.0 / 87178291200.0);
  p = p * r + T(1.0 / 6227020800.0);
  p = p * r + T(1.0 / 479001600.0);
  p = p * r + T(1.0 / 39916800.0);
  p = p * r + T(1.0 / 3628800.0);
  p = p * r + T(1.0 / 362880.0);
  p = p * r + T(1.0 / 40320.0);
  p = p * r + T(1.0 / 5040.0);
  p = p * r + T(1.0 / 720.0);
  p = p * r + T(1.0 / 120.0);
  p = p * r + T(1.0 / 24.0);
  p = p * r + T(1.0 / 6.0);
  p = p * r + T(0.5);
  const T series = r * r * p;
  const T direct = exp_of(r) - T(1);
  const bool small = r < T(0.5) && r > T(-0.5);
  return {small ? r + series : direct, small ? series : direct - r};
}

// KL(N(mu, e^lv) || N(m, e^s)) per dimension:
//   0.5 * ((e^r - 1 - r) + (mu - m)^2 e^-s)
//   d/dmu = (mu - m) e^-s        d/dlv = 0.5 (e^r - 1)
//   d/dm  = -(mu - m) e^-s       d/ds  = -0.5 ((e^r - 1) + (mu - m)^2 e^-s)
// With m = 0, s = 0 this is the standard-normal KL of latent_terms.
struct PriorKLElement {
  static constexpr int kOperands = 4;  // mu, logvar, prior_mu, prior_logvar
  template <typename T>
  static FASTVAE_FN T row_constant(int64_t) {
    return T(0);
  }
  template <typename T>
  static FASTVAE_FN T value(const T* v) {
    const T diff = v[0] - v[2];
    return T(0.5) * (exp_minus_one(v[1] - v[3]).em1_minus_r + diff * diff * exp_of(-v[3]));
  }
  template <typename T>
  static FASTVAE_FN void grads(const T* v, T* g) {
    const T diff = v[0] - v[2];
    const T scaled = diff * exp_of(-v[3]);
    const T em1 = exp_minus_one(v[1] - v[3]).em1;
    g[0] = scaled;
    g[1] = T(0.5) * em1;
    g[2] = -scaled;
    g[3] = T(-0.5) * (em1 + diff * scaled);
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
  static FASTVAE_FN T value(const T* v) {
    const T diff = v[0] - v[1];
    return T(-0.5) * (diff * diff * exp_of(-v[2]) + v[2]);
  }
  template <typename T>
  static FASTVAE_FN void grads(const T* v, T* g) {
    const T diff = v[0] - v[1];
    const T scaled = diff * exp_of(-v[2]);
    g[0] = -scaled;
    g[1] = scaled;
    g[2] = T(0.5) * (diff * scaled - T(1));
  }
};

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
