// cpu_loops.h: helpers the CPU loops share (parallel row splitting, noise
// buffers, per-ISA compilation of the hot loops).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "../fastvae.h"

// The float32 hot loops are compiled once per x86-64 level (AVX-512, AVX2,
// baseline) and the loader picks the best one for the running CPU, so a
// wheel built here is still safe on an older machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTVAE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTVAE_MULTIVERSION
#endif

namespace fastvae {
namespace cpu {

// Latent rows longer than this are processed in chunks so the noise buffer
// stays on the stack and in L1.
constexpr int64_t kNoiseChunk = 512;

// Threads are only woken for tasks big enough to pay for it (a few us of work):
// plain elementwise math costs well under 1 ns per element, so tasks get at
// least 32k elements; drawing Philox normals costs ~1 ns per element, so 2k
// already pay (a (128, 32) latent layer is then split over two threads).
constexpr int64_t kElementsPerTask = 32768;
constexpr int64_t kNoiseElementsPerTask = 2048;

// Splits `rows` rows of `row_len` elements over threads, each task holding at
// least `min_elements_per_task` elements.
template <typename F>
inline void parallel_rows(int64_t rows, int64_t row_len, int64_t min_elements_per_task, const F& f) {
  int64_t grain = std::max<int64_t>(1, min_elements_per_task / std::max<int64_t>(row_len, 1));
  at::parallel_for(0, rows, grain, f);
}

// Writes the standard normals of sample `sample`, within-sample indices
// [first, first+count) (count <= kNoiseChunk), into `buf`, which must hold
// kNoiseChunk + 8 floats, and returns the pointer to the normal of index `first`.
// Forced inline for the reason given in fastvae.h.
__attribute__((always_inline)) inline const float* draw_normals(uint64_t seed, uint64_t offset, int64_t sample,
                                                                int64_t first, int64_t count, float* buf) {
  const int64_t first_block = first / 4;
  const int64_t end_block = (first + count + 3) / 4;
#pragma omp simd
  for (int64_t block = first_block; block < end_block; ++block) {
    float* out = buf + 4 * (block - first_block);
    normal4(seed, offset, noise_block(static_cast<uint64_t>(sample), static_cast<uint64_t>(block)), out);
  }
  return buf + (first - 4 * first_block);
}

}  // namespace cpu
}  // namespace fastvae
