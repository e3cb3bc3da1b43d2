// cpu_loops.h: helpers the CPU loops share (parallel row splitting, noise
// buffers). Per-ISA compilation of the hot loops is in cpu_level.h.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "../fastvae.h"
#include "cpu_level.h"

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

// Room for the normals draw_normals writes: a span of kNoiseChunk, up to 3
// leading normals of its first Philox block, and the vector paths' rounding up
// to whole groups of 16 blocks.
constexpr int64_t kNoiseBufferFloats = kNoiseChunk + 64;
// Philox blocks per buffer of words (philox_words): 4 words per block.
constexpr int64_t kWordBlocks = kNoiseBufferFloats / 4;

// Writes the standard normals of sample `sample`, within-sample indices
// [first, first+count) (count <= kNoiseChunk), into `buf`, which must hold
// kNoiseBufferFloats floats, and returns the pointer to the normal of index
// `first`. AVX2 and AVX-512 give the same bits; the baseline level, which has no
// FMA, agrees to float rounding (csrc/cpu/noise.cpp).
const float* draw_normals(uint64_t seed, uint64_t offset, int64_t sample, int64_t first, int64_t count, float* buf);

// The Philox words of blocks counter, counter + 1, ..., counter + blocks - 1 under (seed,
// offset): word j of block b at words[j * kWordBlocks + b]. `words` holds 4 * kWordBlocks
// words; blocks <= kWordBlocks - 16 (the vector paths round up to whole groups of 16).
void philox_words(uint64_t seed, uint64_t offset, uint64_t counter, int64_t blocks, uint32_t* words);

}  // namespace cpu
}  // namespace fastvae
