// fastvae.h: the per-element math of every fused op, and the noise generator.
//
// This header is the single source of truth for the numbers fastvae computes:
// the CPU loops (csrc/cpu/*.cpp) and the CUDA kernels (csrc/cuda/*.cu) both call
// these functions, so the two backends cannot drift apart. Everything here is
// branch-free scalar code so that GCC auto-vectorizes the CPU loops and nvcc
// compiles it unchanged for the device.
//
// Notation (docs/DESIGN.md section 1): std = exp(0.5*logvar), z = mu + std*eps.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// Every function here is forced inline. The CPU loops that call them are
// compiled once per ISA level (csrc/cpu/cpu_loops.h, FASTVAE_MULTIVERSION); a
// copy left out of line by GCC's inlining budget is compiled for the baseline
// ISA and stops the loop from vectorizing (the noise generator ran 3-6x slower
// when that happened). On the device nvcc treats it as __forceinline__.
#if defined(__GNUC__) || defined(__clang__)
#define FASTVAE_FN C10_HOST_DEVICE inline __attribute__((always_inline))
#else
#define FASTVAE_FN C10_HOST_DEVICE inline
#endif

namespace fastvae {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;  // log(2*pi)

// ---------------------------------------------------------------------------
// Bit casts that work on host and device.
// ---------------------------------------------------------------------------
FASTVAE_FN float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

FASTVAE_FN uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
#endif
}

// ---------------------------------------------------------------------------
// float32 elementary functions written as plain polynomials.
//
// Why not std::exp / std::log: a call into libm stops GCC from vectorizing the
// loop, and the noise generator must give the same bits on CPU and CUDA. These
// are accurate to a few float ulps, which is what float32 results can hold.
// float64 never uses them (see exp_of below).
// ---------------------------------------------------------------------------

// exp(x) = 2^k * exp(r), r = x - k*ln2 in [-ln2/2, ln2/2], exp(r) by its Taylor
// series to degree 7 (truncation error < 6e-9 relative). Written without
// branches or float->int conversions so that GCC vectorizes it: NaN flows
// through the arithmetic to a NaN result, +inf overflows to inf, -inf gives 0.
FASTVAE_FN float exp_poly(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;  // ln2 split so that k*kLn2Hi is exact
  const float kLn2Lo = 1.428606765330187045e-06f;
  const float kRoundMagic = 12582912.0f;    // 1.5 * 2^23: adding it rounds to an integer
  // Clamp so that each half of 2^k below stays a normal float; past the clamp
  // the result overflows to inf or rounds to 0 by itself.
  float xc = x > 88.8f ? 88.8f : x;
  xc = xc < -104.0f ? -104.0f : xc;
  float shifted = xc * kLog2e + kRoundMagic;
  int32_t ki = static_cast<int32_t>(float_to_bits(shifted) - float_to_bits(kRoundMagic));  // round(x*log2e)
  float k = shifted - kRoundMagic;
  float r = (xc - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^k as two factors, so that k in [-150, 128] fits the exponent field.
  int32_t k1 = ki >> 1;
  float scale1 = bits_to_float(static_cast<uint32_t>(k1 + 127) << 23);
  float scale2 = bits_to_float(static_cast<uint32_t>(ki - k1 + 127) << 23);
  return p * scale1 * scale2;
}

// log(1 + t) for t in [0, 1] via log1p(t) = 2*atanh(s), s = t/(2+t) in [0, 1/3]:
// exact near t = 0 (no cancellation in 1 + t), truncation error < 1e-9.
FASTVAE_FN float log1p_unit(float t) {
  float s = t / (2.0f + t);
  float s2 = s * s;
  float p = 1.0f / 17.0f;
  p = p * s2 + 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// log(u) for u in (0, 1], a normal float (the uniforms below are): u = m * 2^e
// with m in [sqrt(1/2), sqrt(2)), log(m) = 2*atanh((m-1)/(m+1)).
FASTVAE_FN float log_unit_interval(float u) {
  uint32_t bits = float_to_bits(u);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  bool big = m > 1.41421356237f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  float s = (m - 1.0f) / (m + 1.0f);
  float s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p + static_cast<float>(e) * 0.693147180559945309f;
}

// sin and cos of phi in [0, pi/2] by their Taylor series (error < 4e-8).
FASTVAE_FN void sincos_quarter(float phi, float* s, float* c) {
  float x2 = phi * phi;
  float ps = -1.0f / 39916800.0f;
  ps = ps * x2 + 1.0f / 362880.0f;
  ps = ps * x2 - 1.0f / 5040.0f;
  ps = ps * x2 + 1.0f / 120.0f;
  ps = ps * x2 - 1.0f / 6.0f;
  ps = ps * x2 + 1.0f;
  float pc = 1.0f / 479001600.0f;
  pc = pc * x2 - 1.0f / 3628800.0f;
  pc = pc * x2 + 1.0f / 40320.0f;
  pc = pc * x2 - 1.0f / 720.0f;
  pc = pc * x2 + 1.0f / 24.0f;
  pc = pc * x2 - 0.5f;
  pc = pc * x2 + 1.0f;
  *s = phi * ps;
  *c = pc;
}

// ---------------------------------------------------------------------------
// Noise: Philox4x32-10 (Salmon et al. 2011), counter-based, keyed by the seed.
//
// Element (l, b, d) of z, for sample l and example row b (plus the caller's
// row_offset), has the within-sample index i = (b + row_offset)*D + d; it uses
// Philox block noise_block(l, i/4), with the 64-bit `offset` as the counter's
// upper half, and takes normal number i%4 of that block. The mapping depends on
// nothing but (seed, offset, l, global row, d), so every backend, thread count,
// dtype and batch split (row_offset: a data-parallel shard) sees the same eps.
// ---------------------------------------------------------------------------
struct Philox4 {
  uint32_t v[4];
};

// The 32-bit words are held in 64-bit variables (always < 2^32): each round's
// 32x32->64 multiply is then one widening multiply per lane, which GCC
// vectorizes without the shuffles that packed 32-bit lanes need (~1.5x faster
// on AVX-512). The output is the standard Philox4x32-10 stream.
FASTVAE_FN Philox4 philox4x32_10(uint64_t counter_lo, uint64_t counter_hi, uint64_t seed) {
  const uint64_t kMask = 0xFFFFFFFFull;
  uint64_t c0 = counter_lo & kMask, c1 = counter_lo >> 32;
  uint64_t c2 = counter_hi & kMask, c3 = counter_hi >> 32;
  uint64_t k0 = seed & kMask, k1 = seed >> 32;
  for (int round = 0; round < 10; ++round) {
    const uint64_t product0 = 0xD2511F53ull * c0;
    const uint64_t product1 = 0xCD9E8D57ull * c2;
    const uint64_t n0 = (product1 >> 32) ^ c1 ^ k0;
    const uint64_t n2 = (product0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = product1 & kMask;
    c2 = n2;
    c3 = product0 & kMask;
    k0 = (k0 + 0x9E3779B9ull) & kMask;
    k1 = (k1 + 0xBB67AE85ull) & kMask;
  }
  return Philox4{{static_cast<uint32_t>(c0), static_cast<uint32_t>(c1), static_cast<uint32_t>(c2),
                  static_cast<uint32_t>(c3)}};
}

// Box-Muller on two 32-bit words: radius from the top 24 bits of `a`
// (u in (0, 1], so log(u) is finite), angle in [0, pi/2) from the top 24 bits
// of `b`, and the quadrant from two low bits of `a`. Random signs on
// (r cos phi, r sin phi) give the same joint law as an angle uniform on the
// whole circle, with trigonometry only on [0, pi/2].
FASTVAE_FN void box_muller(uint32_t a, uint32_t b, float* n0, float* n1) {
  const float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24
  float u = static_cast<float>(static_cast<int32_t>((a >> 8) + 1u)) * kTwoPow24Inv;
  float phi = static_cast<float>(static_cast<int32_t>(b >> 8)) * (kTwoPow24Inv * 1.57079632679489662f);
  float radius = sqrtf(-2.0f * log_unit_interval(u));
  float s, c;
  sincos_quarter(phi, &s, &c);
  float sign0 = (a & 1u) ? -1.0f : 1.0f;
  float sign1 = (a & 2u) ? -1.0f : 1.0f;
  *n0 = sign0 * radius * c;
  *n1 = sign1 * radius * s;
}

// Counter of block `block_in_sample` of sample l (room for 2^34 elements per sample).
FASTVAE_FN uint64_t noise_block(uint64_t sample, uint64_t block_in_sample) {
  return (sample << 32) + block_in_sample;
}

// The four standard normals of counter block `block` (elements 4*block .. 4*block+3).
FASTVAE_FN void normal4(uint64_t seed, uint64_t offset, uint64_t block, float out[4]) {
  Philox4 r = philox4x32_10(block, offset, seed);
  box_muller(r.v[0], r.v[1], &out[0], &out[1]);
  box_muller(r.v[2], r.v[3], &out[2], &out[3]);
}

// ---------------------------------------------------------------------------
// exp for the kernels' accumulation type: the vectorizable polynomial in float,
// libm in double (float64 results must match torch.distributions to ~1e-12).
// ---------------------------------------------------------------------------
FASTVAE_FN float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_poly(x);
#endif
}
FASTVAE_FN double exp_of(double x) { return exp(x); }

FASTVAE_FN float log1p_exp_neg_abs(float a) {  // log1p(exp(-|a|))
  return log1p_unit(exp_of(-fabsf(a)));
}
FASTVAE_FN double log1p_exp_neg_abs(double a) { return log1p(exp(-fabs(a))); }

// ---------------------------------------------------------------------------
// Latent terms, per element (sums over d are done by the callers).
// ---------------------------------------------------------------------------
// The forward sums three things over a row, and derives kl, log_q and log_p from
// them once per row (latent_row_results): term-by-term sums of the three results
// cost ~5 more operations per element, a quarter of the float32 CPU loop.
//   kl    = 0.5 * sum(mu^2 + var - 1 - logvar)
//   log_q = -0.5 * sum(eps^2 + logvar) - 0.5*D*log(2 pi)
//   log_p = -0.5 * sum(z^2)            - 0.5*D*log(2 pi)
// Returns z = mu + std*eps and adds the element's terms to the running sums.
template <typename T>
FASTVAE_FN T latent_element(T mu, T logvar, T eps, T& kl2_sum, T& eps_sq_logvar_sum, T& z_sq_sum) {
  const T std_dev = exp_of(T(0.5) * logvar);
  const T z = mu + std_dev * eps;
  // var - 1 - logvar first: near the prior it cancels to a small number that keeps its digits.
  kl2_sum += mu * mu + ((std_dev * std_dev - T(1)) - logvar);
  eps_sq_logvar_sum += eps * eps + logvar;
  z_sq_sum += z * z;
  return z;
}

template <typename T>
struct LatentRowResults {
  T kl, log_q, log_p;
};

template <typename T>
FASTVAE_FN LatentRowResults<T> latent_row_results(T kl2_sum, T eps_sq_logvar_sum, T z_sq_sum, int64_t dim) {
  const T normalizer = T(-0.5 * kLog2Pi) * static_cast<T>(dim);
  return {T(0.5) * kl2_sum, T(-0.5) * eps_sq_logvar_sum + normalizer, T(-0.5) * z_sq_sum + normalizer};
}

// Gradient flowing into z from one sample: the incoming dL/dz, log p(z)'s
// -z, and (sticking the landing only) log q's path derivative -eps/std =
// -(z - mu)/var.
template <typename T>
FASTVAE_FN T latent_grad_through_z(T gz, T glp, T glq_path, T z, T mu, T inv_var) {
  return gz - glp * z - glq_path * (z - mu) * inv_var;
}

// ---------------------------------------------------------------------------
// Reconstruction log-likelihoods, per element.
// ---------------------------------------------------------------------------
// log Bernoulli(x | sigmoid(a)) = x*a - softplus(a), softplus(a) = max(a,0) + log1p(exp(-|a|)).
template <typename T>
FASTVAE_FN T bernoulli_log_prob(T logit, T x) {
  T relu = logit > T(0) ? logit : T(0);
  return x * logit - relu - log1p_exp_neg_abs(logit);
}

// d/da = x - sigmoid(a); sigmoid from exp(-|a|) so it never overflows.
template <typename T>
FASTVAE_FN T bernoulli_grad_logit(T logit, T x) {
  T e = exp_of(logit > T(0) ? -logit : logit);  // exp(-|a|)
  T sigmoid = logit > T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
  return x - sigmoid;
}

// log N(x | m, exp(s)) without the -0.5*log2pi (added once per row).
template <typename T>
FASTVAE_FN T gaussian_log_prob(T mean, T x, T logvar, T inv_var) {
  T diff = x - mean;
  return T(-0.5) * (diff * diff * inv_var + logvar);
}

// d/dm = (x - m)/var;  d/ds = 0.5*((x - m)^2/var - 1).
template <typename T>
FASTVAE_FN void gaussian_grads(T mean, T x, T inv_var, T* grad_mean, T* grad_logvar) {
  T scaled = (x - mean) * inv_var;
  *grad_mean = scaled;
  *grad_logvar = T(0.5) * ((x - mean) * scaled - T(1));
}

}  // namespace fastvae
