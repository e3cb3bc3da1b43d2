// The in-kernel noise on CPU: Philox4x32-10 normals (csrc/fastvae.h, normal4),
// drawn a span at a time for the latent forward, with one copy per CPU level
// (cpu_level.h).
//
// The AVX2 and AVX-512 copies run the Philox rounds with explicit 32x32->64-bit
// multiplies (vpmuludq), four or eight blocks per register, each 32-bit word
// in the low half of a 64-bit lane. Auto-vectorized, the portable philox4x32_10
// costs a full 64-bit multiply per lane: vpmullq on AVX-512, and on AVX2, which
// has no 64-bit multiply, three vpmuludq and the shifts to combine them (the
// whole AVX2 draw then took 2.1x as long as here). Box-Muller stays the header's scalar
// code, which GCC vectorizes, so the words and the normals are the header's:
// the same stream as CUDA and the NumPy reference.
#include "cpu_loops.h"

#if FASTVAE_X86_LEVELS
// GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_epi32(), which
// -Wmaybe-uninitialized reports at every use (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace fastvae {
namespace cpu {
namespace {

// Philox's per-round constants (Salmon et al. 2011).
constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;

// The four Philox words of blocks [0, blocks) are words[j * kWordBlocks + block], j = 0..3.
// Box-Muller turns them into the normals 4*block .. 4*block+3 (normal4's order).
__attribute__((always_inline)) inline void box_muller_blocks(const uint32_t* words, int64_t blocks, float* out) {
  const uint32_t *w0 = words, *w1 = words + kWordBlocks, *w2 = words + 2 * kWordBlocks, *w3 = words + 3 * kWordBlocks;
#pragma omp simd
  for (int64_t b = 0; b < blocks; ++b) {
    box_muller(w0[b], w1[b], &out[4 * b], &out[4 * b + 1]);
    box_muller(w2[b], w3[b], &out[4 * b + 2], &out[4 * b + 3]);
  }
}

#if FASTVAE_X86_LEVELS
// Blocks counter, counter + 1, ... (a multiple of 8 of them), 8 per iteration in
// two registers (two independent chains; four or eight measured no faster: the
// rounds are throughput-bound).
// Words live in the low 32 bits of 64-bit lanes; the high halves hold garbage
// that no step reads: vpmuludq uses only the low halves, and xor and the final
// pack keep the halves apart.
FASTVAE_TARGET_AVX2 void philox_words_avx2(uint64_t counter, uint64_t offset, uint64_t seed, int64_t blocks,
                                           uint32_t* words) {
  const __m256i mul0 = _mm256_set1_epi64x(kMul0), mul1 = _mm256_set1_epi64x(kMul1);
  const __m256i offset_lo = _mm256_set1_epi64x(offset & 0xFFFFFFFFu), offset_hi = _mm256_set1_epi64x(offset >> 32);
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i low_halves_first = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t b = 0; b < blocks; b += 8) {
    __m256i x0[2], x1[2], x2[2], x3[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i ctr = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(counter + b + 4 * h)), lane);
      x0[h] = ctr;
      x1[h] = _mm256_srli_epi64(ctr, 32);
      x2[h] = offset_lo;
      x3[h] = offset_hi;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int32_t>(k0));
      const __m256i key1 = _mm256_set1_epi32(static_cast<int32_t>(k1));
      for (int h = 0; h < 2; ++h) {
        const __m256i product0 = _mm256_mul_epu32(x0[h], mul0), product1 = _mm256_mul_epu32(x2[h], mul1);
        x0[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product1, 32), x1[h]), key0);
        x2[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product0, 32), x3[h]), key1);
        x1[h] = product1;
        x3[h] = product0;
      }
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    const __m256i* out[4] = {x0, x1, x2, x3};
    for (int j = 0; j < 4; ++j) {  // the low halves of both registers, in block order
      const __m256i first4 = _mm256_permutevar8x32_epi32(out[j][0], low_halves_first);
      const __m256i last4 = _mm256_permutevar8x32_epi32(out[j][1], low_halves_first);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + j * kWordBlocks + b),
                          _mm256_permute2x128_si256(first4, last4, 0x20));
    }
  }
}

// The same with 8 blocks per register, 16 per iteration; vpternlogq does both xors.
FASTVAE_TARGET_AVX512 void philox_words_avx512(uint64_t counter, uint64_t offset, uint64_t seed, int64_t blocks,
                                               uint32_t* words) {
  const __m512i mul0 = _mm512_set1_epi64(kMul0), mul1 = _mm512_set1_epi64(kMul1);
  const __m512i offset_lo = _mm512_set1_epi64(offset & 0xFFFFFFFFu), offset_hi = _mm512_set1_epi64(offset >> 32);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  constexpr int kXor3 = 0x96;  // a ^ b ^ c
  for (int64_t b = 0; b < blocks; b += 16) {
    __m512i x0[2], x1[2], x2[2], x3[2];
    for (int h = 0; h < 2; ++h) {
      const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(counter + b + 8 * h)), lane);
      x0[h] = ctr;
      x1[h] = _mm512_srli_epi64(ctr, 32);
      x2[h] = offset_lo;
      x3[h] = offset_hi;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i key0 = _mm512_set1_epi32(static_cast<int32_t>(k0));
      const __m512i key1 = _mm512_set1_epi32(static_cast<int32_t>(k1));
      for (int h = 0; h < 2; ++h) {
        const __m512i product0 = _mm512_mul_epu32(x0[h], mul0), product1 = _mm512_mul_epu32(x2[h], mul1);
        x0[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(product1, 32), x1[h], key0, kXor3);
        x2[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(product0, 32), x3[h], key1, kXor3);
        x1[h] = product1;
        x3[h] = product0;
      }
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    const __m512i* out[4] = {x0, x1, x2, x3};
    for (int j = 0; j < 4; ++j) {
      for (int h = 0; h < 2; ++h) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + j * kWordBlocks + b + 8 * h),
                            _mm512_cvtepi64_epi32(out[j][h]));
      }
    }
  }
}

// The blocks a span needs, rounded up to whole vector iterations (`group` blocks).
inline int64_t span_blocks(int64_t first, int64_t count, int64_t group) {
  const int64_t blocks = (first + count + 3) / 4 - first / 4;
  return (blocks + group - 1) / group * group;
}

FASTVAE_TARGET_AVX2 const float* draw_normals_avx2(uint64_t seed, uint64_t offset, int64_t sample, int64_t first,
                                                   int64_t count, float* buf) {
  alignas(32) uint32_t words[4 * kWordBlocks];
  const int64_t blocks = span_blocks(first, count, 8);
  philox_words_avx2(noise_block(sample, first / 4), offset, seed, blocks, words);
  box_muller_blocks(words, blocks, buf);
  return buf + first % 4;
}

FASTVAE_TARGET_AVX512 const float* draw_normals_avx512(uint64_t seed, uint64_t offset, int64_t sample, int64_t first,
                                                       int64_t count, float* buf) {
  alignas(64) uint32_t words[4 * kWordBlocks];
  const int64_t blocks = span_blocks(first, count, 16);
  philox_words_avx512(noise_block(sample, first / 4), offset, seed, blocks, words);
  box_muller_blocks(words, blocks, buf);
  return buf + first % 4;
}
#endif

// Any CPU: the header's philox4x32_10, block by block.
void philox_words_portable(uint64_t counter, uint64_t offset, uint64_t seed, int64_t blocks, uint32_t* words) {
  for (int64_t b = 0; b < blocks; ++b) {
    const Philox4 r = philox4x32_10(counter + b, offset, seed);
    for (int j = 0; j < 4; ++j) words[j * kWordBlocks + b] = r.v[j];
  }
}

// Any CPU: the header's normal4, block by block (vectorized by GCC where it can).
const float* draw_normals_portable(uint64_t seed, uint64_t offset, int64_t sample, int64_t first, int64_t count,
                                   float* buf) {
  const int64_t first_block = first / 4;
  const int64_t end_block = (first + count + 3) / 4;
#pragma omp simd
  for (int64_t block = first_block; block < end_block; ++block) {
    float* out = buf + 4 * (block - first_block);
    normal4(seed, offset, noise_block(static_cast<uint64_t>(sample), static_cast<uint64_t>(block)), out);
  }
  return buf + (first - 4 * first_block);
}

}  // namespace

void philox_words(uint64_t seed, uint64_t offset, uint64_t counter, int64_t blocks, uint32_t* words) {
#if FASTVAE_X86_LEVELS
  switch (cpu_level()) {
    case CpuLevel::kAvx512:
      return philox_words_avx512(counter, offset, seed, (blocks + 15) / 16 * 16, words);
    case CpuLevel::kAvx2:
      return philox_words_avx2(counter, offset, seed, (blocks + 7) / 8 * 8, words);
    default:
      break;
  }
#endif
  philox_words_portable(counter, offset, seed, blocks, words);
}

const float* draw_normals(uint64_t seed, uint64_t offset, int64_t sample, int64_t first, int64_t count, float* buf) {
#if FASTVAE_X86_LEVELS
  switch (cpu_level()) {
    case CpuLevel::kAvx512:
      return draw_normals_avx512(seed, offset, sample, first, count, buf);
    case CpuLevel::kAvx2:
      return draw_normals_avx2(seed, offset, sample, first, count, buf);
    default:
      break;
  }
#endif
  return draw_normals_portable(seed, offset, sample, first, count, buf);
}

}  // namespace cpu
}  // namespace fastvae
