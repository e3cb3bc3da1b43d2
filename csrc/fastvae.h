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
#include <string>

// Every function here is forced inline. The CPU loops that call them are
// compiled once per ISA level (csrc/cpu/cpu_level.h, run_at_cpu_level); a
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

// x = k ln2 + r with k = round(x / ln2) and |r| <= ln2/2, for an x already clamped to where
// 2^k is representable (each caller has its own clamp). Branch-free, no float->int
// conversion (the rounding is by kRoundMagic), so that loops calling it vectorize. Shared by
// exp_poly and the float32 e^r - 1 of csrc/priors.h.
struct Ln2Reduced {
  int32_t k;
  float r;
};
FASTVAE_FN Ln2Reduced reduce_by_ln2(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;  // ln2 split so that k*kLn2Hi is exact
  const float kLn2Lo = 1.428606765330187045e-06f;
  const float kRoundMagic = 12582912.0f;    // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = x * kLog2e + kRoundMagic;
  const int32_t ki = static_cast<int32_t>(float_to_bits(shifted) - float_to_bits(kRoundMagic));
  const float k = shifted - kRoundMagic;
  return {ki, (x - k * kLn2Hi) - k * kLn2Lo};
}

// exp(x) = 2^k * exp(r), r = x - k*ln2 in [-ln2/2, ln2/2], exp(r) by its Taylor
// series to degree 7 (truncation error < 6e-9 relative). Written without
// branches or float->int conversions so that GCC vectorizes it: NaN flows
// through the arithmetic to a NaN result, +inf overflows to inf, -inf gives 0.
FASTVAE_FN float exp_poly(float x) {
  // Clamp so that each half of 2^k below stays a normal float; past the clamp
  // the result overflows to inf or rounds to 0 by itself.
  float xc = x > 88.8f ? 88.8f : x;
  xc = xc < -104.0f ? -104.0f : xc;
  const Ln2Reduced reduced = reduce_by_ln2(xc);
  const int32_t ki = reduced.k;
  const float r = reduced.r;
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

// Binarization (fastvae.ops.gather_bernoulli): pixel j of data-set row i becomes
// 1 when u < p, with u the uniform of word j%4 of Philox block noise_block(i, j/4)
// under (seed, kBernoulliStream). The draw depends on nothing but (seed, row index
// in the data set, pixel), so it does not depend on how a batch was gathered, split
// over processes or resumed. The stream's counter half is far from the latent
// noise's offsets (0 on CPU, small multiples of 4 on CUDA).
constexpr uint64_t kBernoulliStream = 0x62696E6172697A65ull;  // "binarize"

// A uniform in [0, 1) from a Philox word: its top 24 bits, as torch.rand's float32.
FASTVAE_FN float unit_uniform(uint32_t word) {
  return static_cast<float>(static_cast<int32_t>(word >> 8)) * 5.9604644775390625e-08f;  // 2^-24
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
// (The CPU loop calls the two halves in separate passes: one loop holding the exp's
// constants and one holding the sums each fit AVX2's 16 registers, where one loop
// holding both spilled to the stack.)
template <typename T>
FASTVAE_FN T latent_std(T logvar) {
  return exp_of(T(0.5) * logvar);
}

template <typename T>
FASTVAE_FN void latent_add_terms(T mu, T logvar, T eps, T std_dev, T z, T& kl2_sum, T& eps_sq_logvar_sum,
                                 T& z_sq_sum) {
  // var - 1 - logvar first: near the prior it cancels to a small number that keeps its digits.
  kl2_sum += mu * mu + ((std_dev * std_dev - T(1)) - logvar);
  eps_sq_logvar_sum += eps * eps + logvar;
  z_sq_sum += z * z;
}

template <typename T>
FASTVAE_FN T latent_element(T mu, T logvar, T eps, T& kl2_sum, T& eps_sq_logvar_sum, T& z_sq_sum) {
  const T std_dev = latent_std(logvar);
  const T z = mu + std_dev * eps;
  latent_add_terms(mu, logvar, eps, std_dev, z, kl2_sum, eps_sq_logvar_sum, z_sq_sum);
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

// ---------------------------------------------------------------------------
// Helpers of the continuous Bernoulli and the discretized logistic.
// ---------------------------------------------------------------------------
constexpr double kLn2 = 0.69314718055994530941723212145818;

// log(x) for any float x, written like log_unit_interval but valid for every
// positive float (subnormals are scaled into the normal range first); 0 gives
// -inf, +inf gives +inf, a negative x or NaN gives NaN. Error < 2 float ulps.
FASTVAE_FN float log_poly(float x) {
  const bool subnormal = x < 1.17549435e-38f;  // FLT_MIN
  const float scaled = subnormal ? x * 8388608.0f : x;  // * 2^23
  const uint32_t bits = float_to_bits(scaled);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xff) - 127 - (subnormal ? 23 : 0);
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356237f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const float result = 2.0f * s * p + static_cast<float>(e) * 0.693147180559945309f;
  const float kInf = bits_to_float(0x7f800000u);
  const float special = x == 0.0f ? -kInf : (x == kInf ? kInf : bits_to_float(0x7fc00000u));
  return x > 0.0f && x < kInf ? result : special;
}

// log and log1p for the accumulation type, following exp_of: polynomials in
// float on the CPU (vectorizable), the device's intrinsics in CUDA float, libm in double.
FASTVAE_FN float log_of(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return log_poly(x);
#endif
}
FASTVAE_FN double log_of(double x) { return log(x); }

template <typename T>
FASTVAE_FN T relu(T v) {
  return v > T(0) ? v : T(0);  // NaN -> 0: callers add a term that carries the NaN
}

// softplus(v) = log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)), exact for every v.
template <typename T>
FASTVAE_FN T softplus(T v) {
  return relu(v) + log1p_exp_neg_abs(v);
}

// sigmoid(v) from exp(-|v|), which never overflows.
template <typename T>
FASTVAE_FN T sigmoid(T v) {
  const T e = exp_of(v > T(0) ? -v : v);
  return v > T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// Below this argument the functions of a and exp(-a) below switch from their
// closed forms (which cancel as 1 - exp(-a) -> 0) to power series. At a < 1/2
// the series' terms shrink by (a / 2pi)^2 < 0.0064 each, so the 8 terms below
// reach float64 rounding; above it, 1 - exp(-a) > 0.39 loses no digits.
constexpr double kSeriesCutoff = 0.5;

// E(a^2) = sum_{k>=1} B_2k a^(2k-2) / (2k)! (B_2k the Bernoulli numbers), so that
//   a / (e^a - 1)                 = 1 - a/2 + a^2 E(a^2)
//   1 / (1 - e^-a) - 1/a          = 1/2 + a E(a^2)
template <typename T>
FASTVAE_FN T bernoulli_number_series(T a2) {
  T p = T(-3.389680296322582866830195e-13);
  p = p * a2 + T(1.338253653068467883282698e-11);
  p = p * a2 + T(-5.284190138687493184847682e-10);
  p = p * a2 + T(2.087675698786809897921009e-08);
  p = p * a2 + T(-8.267195767195767195767196e-07);
  p = p * a2 + T(3.306878306878306878306878e-05);
  p = p * a2 + T(-1.388888888888888888888889e-03);
  p = p * a2 + T(8.333333333333333333333333e-02);
  return p;
}

// F(a^2) = sum_{k>=1} B_2k a^(2k-2) / (2k (2k)!), the integral of a E(a^2) over a:
//   log(a / (1 - e^-a))           = a/2 - a^2 F(a^2)
template <typename T>
FASTVAE_FN T log_bernoulli_number_series(T a2) {
  T p = T(-2.118550185201614291768872e-14);
  p = p * a2 + T(9.558954664774770594876415e-13);
  p = p * a2 + T(-4.403491782239577654039735e-11);
  p = p * a2 + T(2.087675698786809897921009e-09);
  p = p * a2 + T(-1.033399470899470899470899e-07);
  p = p * a2 + T(5.511463844797178130511464e-06);
  p = p * a2 + T(-3.472222222222222222222222e-04);
  p = p * a2 + T(4.166666666666666666666667e-02);
  return p;
}

// The divisions below divide by a value selected to be safe in the branch not
// taken (never a quotient computed and then discarded): GCC keeps a division
// used on one side of a select behind a branch, and then does not vectorize the
// loop of the per-level copies (csrc/cpu/cpu_level.h).

// log(a / (1 - e^-a)) for a >= 0 (0 at a = 0), given e = exp(-a).
template <typename T>
FASTVAE_FN T log_a_over_one_minus_exp(T a, T e) {
  const bool small = a < T(kSeriesCutoff);
  const T series = a * (T(0.5) - a * log_bernoulli_number_series(a * a));
  const T direct = log_of(a / (small ? T(1) : T(1) - e));
  return small ? series : direct;
}

// log(1 - e^-a) for a >= 0, given e = exp(-a): log(a) - log(a / (1 - e^-a)) by
// the series for small a, where 1 - e^-a cancels; log(1 - e) directly above.
template <typename T>
FASTVAE_FN T log_one_minus_exp(T a, T e) {
  const bool small = a < T(kSeriesCutoff);
  const T correction = small ? a * (T(0.5) - a * log_bernoulli_number_series(a * a)) : T(0);
  return log_of(small ? a : T(1) - e) - correction;
}

// a / (e^a - 1) for a >= 0 (1 at a = 0), given e = exp(-a).
template <typename T>
FASTVAE_FN T a_over_expm1(T a, T e) {
  const bool small = a < T(kSeriesCutoff);
  const T series = T(1) - a * (T(0.5) - a * bernoulli_number_series(a * a));
  const T direct = a * e / (small ? T(1) : T(1) - e);
  return small ? series : direct;
}

// ---------------------------------------------------------------------------
// Fused likelihoods: one traits struct per distribution.
//
// The generic CPU row loop (csrc/cpu/likelihood.cpp), the CUDA kernel
// templates (csrc/cuda/likelihood.cu) and the autograd wrappers
// (csrc/autograd.cpp) take everything about a likelihood from its struct:
//
//   kName                    the likelihood's one spelling: its ops are
//                            fastvae::<kName>_log_prob and <kName>_log_prob_backward
//                            (schemas in csrc/ops.cpp), its fused head is
//                            fused_head_log_prob(..., likelihood="<kName>"), its
//                            public function fastvae.ops.<kName>_log_likelihood.
//                            One parameter: (params, x) -> (rows) and (grad, params,
//                            x, needs_grad_x) -> (grad_params, grad_x). Two:
//                            (params, x, second?, second_value) -> (rows) and
//                            (grad, params, x, second?, second_value,
//                            needs_grad_x) -> (grad_params, grad_second, grad_x).
//   kParamName, kSecondName  argument names for error messages (kSecondName
//                            nullptr: one parameter)
//   Second<T>, second(v)     what the element functions receive for the second
//                            parameter, made from its value (once per element
//                            for a tensor, once per call for a float)
//   log_prob(p, s, x)        one element's log-density
//   grads(p, s, x)           its derivatives in p, in the second parameter, and in x
//   row_constant<T>(P)       a term added once per row of P elements
//
// The fused decoder head (csrc/head.h) runs the same structs on the layer's
// output, so every likelihood here also has the head.
//
// Adding one: a struct here, its name in FusedLikelihoods below, its schema in
// csrc/ops.cpp (docs/extending.md, "Adding a fused likelihood").
// ---------------------------------------------------------------------------
template <typename T>
struct LikelihoodGrads {
  T param, second, x;
};

struct NoSecond {};  // the second parameter of a one-parameter likelihood

// Bernoulli from logits: log p = x*a - softplus(a).
struct BernoulliLikelihood {
  static constexpr const char* kName = "bernoulli";
  static constexpr const char* kParamName = "logits";
  static constexpr const char* kSecondName = nullptr;
  template <typename T>
  using Second = NoSecond;
  template <typename T>
  static FASTVAE_FN NoSecond second(T) { return {}; }
  template <typename T>
  static FASTVAE_FN T log_prob(T logit, NoSecond, T x) { return bernoulli_log_prob(logit, x); }
  template <typename T>
  static FASTVAE_FN LikelihoodGrads<T> grads(T logit, NoSecond, T x) {
    return {bernoulli_grad_logit(logit, x), T(0), logit};  // d/dx (x*a) = a
  }
  template <typename T>
  static FASTVAE_FN T row_constant(int64_t) { return T(0); }
};

// Gaussian with mean and log-variance (a tensor, or one float for every element).
struct GaussianLikelihood {
  static constexpr const char* kName = "gaussian";
  static constexpr const char* kParamName = "mean";
  static constexpr const char* kSecondName = "logvar";
  template <typename T>
  struct Second {
    T logvar, inv_var;
  };
  template <typename T>
  static FASTVAE_FN Second<T> second(T logvar) { return {logvar, exp_of(-logvar)}; }
  template <typename T>
  static FASTVAE_FN T log_prob(T mean, Second<T> s, T x) { return gaussian_log_prob(mean, x, s.logvar, s.inv_var); }
  template <typename T>
  static FASTVAE_FN LikelihoodGrads<T> grads(T mean, Second<T> s, T x) {
    T dm, ds;
    gaussian_grads(mean, x, s.inv_var, &dm, &ds);
    return {dm, ds, -dm};  // d/dx = -d/dm
  }
  template <typename T>
  static FASTVAE_FN T row_constant(int64_t pixels) { return T(-0.5 * kLog2Pi) * static_cast<T>(pixels); }
};

// Continuous Bernoulli from logits (Loaiza-Ganem & Cunningham 2019), x in [0, 1]:
//   log p = x*eta - softplus(eta) + log C(eta),  C(eta) = eta / tanh(eta/2)  (2 at eta = 0).
// With a = |eta|, tanh(a/2) = (1 - e^-a) / (1 + e^-a) and softplus(eta) =
// relu(eta) + log(1 + e^-a), so the log(1 + e^-a) terms cancel:
//   log p = x*eta - relu(eta) + log(a / (1 - e^-a)),
// exact at every logit: no probability is formed, nothing is clamped.
// d/deta = x - mean(eta), mean(eta) = 1/(1 - e^-eta) - 1/eta (1/2 at 0); d/dx = eta.
struct ContinuousBernoulliLikelihood {
  static constexpr const char* kName = "continuous_bernoulli";
  static constexpr const char* kParamName = "logits";
  static constexpr const char* kSecondName = nullptr;
  template <typename T>
  using Second = NoSecond;
  template <typename T>
  static FASTVAE_FN NoSecond second(T) { return {}; }
  template <typename T>
  static FASTVAE_FN T log_prob(T logit, NoSecond, T x) {
    const T a = logit < T(0) ? -logit : logit;
    // x*eta - relu(eta) as (x - 1)*eta for eta > 0: x - 1 is exact for x in [1/2, 1], so
    // near x = 1 nothing cancels (x*eta - eta loses the digits of a large eta).
    return (logit > T(0) ? x - T(1) : x) * logit + log_a_over_one_minus_exp(a, exp_of(-a));
  }
  template <typename T>
  static FASTVAE_FN LikelihoodGrads<T> grads(T logit, NoSecond, T x) {
    const T a = logit < T(0) ? -logit : logit;
    const T e = exp_of(-a);
    const bool small = a < T(kSeriesCutoff);
    // mean(a) and mean(-a) = 1 - mean(a), each in the form that keeps its digits.
    const T tail = a * bernoulli_number_series(a * a);
    const T inv_one_minus_e = T(1) / (small ? T(1) : T(1) - e), inv_a = T(1) / (small ? T(1) : a);
    const T mean_pos = small ? T(0.5) + tail : inv_one_minus_e - inv_a;
    const T mean_neg = small ? T(0.5) - tail : inv_a - e * inv_one_minus_e;
    return {x - (logit < T(0) ? mean_neg : mean_pos), T(0), logit};
  }
  template <typename T>
  static FASTVAE_FN T row_constant(int64_t) { return T(0); }
};

// Discretized logistic for 8-bit data (Salimans et al. 2017; Kingma et al. 2016):
// x in [0, 1] holds the levels k/255; the logistic(mean, exp(log_scale)) mass of
// the bin [x - h, x + h], h = 1/510, with the mass below 0's upper edge going to
// x = 0 and the mass above 1's lower edge to x = 1. With u+- = (x +- h - mean) /
// scale and d = u+ - u- = 2h / scale:
//   interior:  log(sigmoid(u+) - sigmoid(u-)) = log sigmoid(u+) + log sigmoid(-u-) + log(1 - e^-d)
//   x = 0:     log sigmoid(u+);      x = 1:  log sigmoid(-u-)
// (sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - e^(a-b))): every term is
// exact, so no mid-bin density fallback is needed where the CDF difference underflows.
struct DiscretizedLogisticLikelihood {
  static constexpr const char* kName = "discretized_logistic";
  static constexpr const char* kParamName = "mean";
  static constexpr const char* kSecondName = "log_scale";
  static constexpr double kHalfBin = 0.5 / 255.0;
  template <typename T>
  struct Second {
    T log_scale, inv_scale;
  };
  template <typename T>
  static FASTVAE_FN Second<T> second(T log_scale) { return {log_scale, exp_of(-log_scale)}; }

  // The bin of x in units of the scale: u+, u- and their distance d. (Plain
  // out-parameters, not a struct holding the edge flags: GCC leaves a struct
  // with bool members in memory and then does not vectorize the loop.)
  template <typename T>
  static FASTVAE_FN void bin(T mean, Second<T> s, T x, T* upper, T* lower, T* width) {
    const T centred = x - mean;
    *upper = (centred + T(kHalfBin)) * s.inv_scale;
    *lower = (centred - T(kHalfBin)) * s.inv_scale;
    *width = T(2 * kHalfBin) * s.inv_scale;
  }

  template <typename T>
  static FASTVAE_FN T log_prob(T mean, Second<T> s, T x) {
    T upper, lower, width;
    bin(mean, s, x, &upper, &lower, &width);
    const bool bottom = x < T(kHalfBin), top = x > T(1 - kHalfBin);  // x = 0, x = 1
    const T log_cdf_upper = -softplus(-upper);
    const T log_sf_lower = -softplus(lower);
    const T log_width = log_one_minus_exp(width, exp_of(-width));
    return (top ? T(0) : log_cdf_upper) + (bottom ? T(0) : log_sf_lower) + ((top | bottom) ? T(0) : log_width);
  }
  // d/du+ log sigmoid(u+) = sigmoid(-u+); d/du- log sigmoid(-u-) = -sigmoid(u-);
  // d/dd log(1 - e^-d) = 1/(e^d - 1). u+-, d scale as 1/scale: d/dlog_scale = -(u+ g+ + u- g- + d g_d).
  template <typename T>
  static FASTVAE_FN LikelihoodGrads<T> grads(T mean, Second<T> s, T x) {
    T upper, lower, width;
    bin(mean, s, x, &upper, &lower, &width);
    const bool bottom = x < T(kHalfBin), top = x > T(1 - kHalfBin);
    const T g_upper = top ? T(0) : sigmoid(-upper);
    const T g_lower = bottom ? T(0) : -sigmoid(lower);
    const T width_g_width = (top | bottom) ? T(0) : a_over_expm1(width, exp_of(-width));
    const T d_centred = (g_upper + g_lower) * s.inv_scale;
    const T d_log_scale = -(upper * g_upper + lower * g_lower + width_g_width);
    return {-d_centred, d_log_scale, d_centred};
  }
  template <typename T>
  static FASTVAE_FN T row_constant(int64_t) { return T(0); }
};

// Every fused likelihood, registered for each backend from this list.
template <class... Likelihoods>
struct LikelihoodList {};
using FusedLikelihoods = LikelihoodList<BernoulliLikelihood, GaussianLikelihood, ContinuousBernoulliLikelihood,
                                        DiscretizedLogisticLikelihood>;

// Calls f(static_cast<D*>(nullptr)) for every likelihood D of the list (host code only).
template <class F, class... Likelihoods>
inline void for_each_likelihood(LikelihoodList<Likelihoods...>, F&& f) {
  (f(static_cast<Likelihoods*>(nullptr)), ...);
}

template <class D>
constexpr bool has_second() {
  return D::kSecondName != nullptr;
}

// "fastvae::<kName><suffix>": the name of one of D's ops (host code only).
template <class D>
inline std::string op_name(const char* suffix) {
  return std::string("fastvae::") + D::kName + suffix;
}

}  // namespace fastvae
