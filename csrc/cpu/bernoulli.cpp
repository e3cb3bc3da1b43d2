// CPU implementation of gather_bernoulli: rows `index` of probs, each pixel
// replaced by a Bernoulli draw with the pixel as probability (csrc/fastvae.h,
// "Binarization"), in one pass: the gather and the draw write the batch once,
// instead of a gather, a torch.rand and a comparison.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "cpu_loops.h"

namespace fastvae {
namespace cpu {
namespace {

// Pixels per Philox draw: 128 blocks, so the vector paths' rounding up stays within the words buffer.
constexpr int64_t kChunkPixels = 4 * (kWordBlocks - 16);

// The uniforms of a chunk in pixel order first, then one branch-free comparison per pixel:
// both loops vectorize (a comparison written as a branch mispredicts on half the pixels).
template <typename T>
void gather_bernoulli_rows(const T* probs, const int64_t* index, T* out, int64_t pixels, uint64_t seed,
                           int64_t begin, int64_t end) {
  alignas(64) uint32_t words[4 * kWordBlocks];
  alignas(64) float uniforms[kChunkPixels];
  const uint32_t *w0 = words, *w1 = words + kWordBlocks, *w2 = words + 2 * kWordBlocks, *w3 = words + 3 * kWordBlocks;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = index[r];
    const T* p = probs + row * pixels;
    T* o = out + r * pixels;
    for (int64_t first = 0; first < pixels; first += kChunkPixels) {
      const int64_t count = std::min(kChunkPixels, pixels - first), blocks = (count + 3) / 4;
      philox_words(seed, kBernoulliStream, noise_block(static_cast<uint64_t>(row), first / 4), blocks, words);
#pragma omp simd
      for (int64_t b = 0; b < blocks - 1; ++b) {
        uniforms[4 * b] = unit_uniform(w0[b]);
        uniforms[4 * b + 1] = unit_uniform(w1[b]);
        uniforms[4 * b + 2] = unit_uniform(w2[b]);
        uniforms[4 * b + 3] = unit_uniform(w3[b]);
      }
      for (int64_t j = 4 * (blocks - 1); j < count; ++j) uniforms[j] = unit_uniform(words[(j & 3) * kWordBlocks + j / 4]);
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) o[first + j] = static_cast<T>(static_cast<T>(uniforms[j]) < p[first + j]);
    }
  }
}

at::Tensor gather_bernoulli(const at::Tensor& probs, const at::Tensor& index, int64_t seed) {
  check_gather_bernoulli_inputs(probs, index);
  const int64_t rows = probs.size(0);
  const at::Tensor idx = index.contiguous();
  const int64_t* indices = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < idx.numel(); ++r) {
    TORCH_CHECK_INDEX(indices[r] >= 0 && indices[r] < rows, "fastvae: index ", indices[r],
                      " is out of range for probs with ", rows, " rows");
  }
  const at::Tensor p = probs.contiguous();
  std::vector<int64_t> shape = probs.sizes().vec();
  shape[0] = idx.numel();
  at::Tensor out = at::empty(shape, probs.options());
  const int64_t pixels = rows > 0 ? p.numel() / rows : 0;
  cpu_level();  // a bad FASTVAE_CPU_LEVEL is reported here, not from a worker thread
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "fastvae::gather_bernoulli", [&] {
    const scalar_t* probs_ptr = p.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    parallel_rows(idx.numel(), pixels, kNoiseElementsPerTask, [&](int64_t begin, int64_t end) {
      gather_bernoulli_rows(probs_ptr, indices, out_ptr, pixels, static_cast<uint64_t>(seed), begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) { m.impl("gather_bernoulli", &gather_bernoulli); }

}  // namespace cpu
}  // namespace fastvae
