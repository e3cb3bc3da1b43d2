// CUDA implementation of gather_bernoulli (same contract as csrc/cpu/bernoulli.cpp):
// one thread per Philox block of an output row, four pixels each, with the draw
// of csrc/fastvae.h ("Binarization"), so both backends give the same bits.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../fastvae.h"

namespace fastvae {
namespace gpu {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_bernoulli_kernel(const T* probs, const int64_t* index, T* out, int64_t rows, int64_t pixels,
                            uint64_t seed) {
  const int64_t blocks_per_row = (pixels + 3) / 4;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < rows * blocks_per_row;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / blocks_per_row, block = t % blocks_per_row;
    const int64_t row = index[r];
    const Philox4 words = philox4x32_10(noise_block(static_cast<uint64_t>(row), block), kBernoulliStream, seed);
    for (int k = 0; k < 4 && 4 * block + k < pixels; ++k) {
      const int64_t j = 4 * block + k;
      out[r * pixels + j] = static_cast<T>(unit_uniform(words.v[k])) < probs[row * pixels + j] ? T(1) : T(0);
    }
  }
}

at::Tensor gather_bernoulli(const at::Tensor& probs, const at::Tensor& index, int64_t seed) {
  check_gather_bernoulli_inputs(probs, index);
  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t rows = probs.size(0);
  const at::Tensor idx = index.contiguous();
  if (idx.numel() > 0) {  // one synchronization: an out-of-range row must fail here, not read past probs
    const auto [low, high] = at::aminmax(idx);
    const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < rows, "fastvae: index ", lo < 0 ? lo : hi, " is out of range for probs with ",
                      rows, " rows");
  }
  const at::Tensor p = probs.contiguous();
  std::vector<int64_t> shape = probs.sizes().vec();
  shape[0] = idx.numel();
  at::Tensor out = at::empty(shape, probs.options());
  const int64_t pixels = rows > 0 ? p.numel() / rows : 0;
  const int64_t threads = idx.numel() * ((pixels + 3) / 4);
  if (threads == 0) return out;
  const auto grid = static_cast<unsigned int>(std::min<int64_t>((threads + kThreads - 1) / kThreads, 1 << 20));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "fastvae::gather_bernoulli", [&] {
    gather_bernoulli_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), idx.numel(), pixels,
        static_cast<uint64_t>(seed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) { m.impl("gather_bernoulli", &gather_bernoulli); }

}  // namespace gpu
}  // namespace fastvae
