// CUDA implementation of the fused decoder head (see csrc/head.h for the contract).
//
// Same algorithm as csrc/cpu/head.cpp, with cuBLAS (at::mm_out / addmm_ on
// the current stream) for the three products and one kernel for the element
// math of a chunk: one block per row, the threads striding over the pixels,
// each element's log-probability from csrc/fastvae.h summed by a block
// reduction, its gradient written in place over the raw output. The chunks
// are larger than on the CPU (a GPU wants whole products, not cache-sized
// ones): at most kHeadChunkBytes of raw outputs, so the memory held stays
// bounded however large L*B grows, and one chunk covers the usual IWAE step.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "../head.h"

namespace fastvae {
namespace gpu {  // (not "cuda": that would shadow ::cuda inside CCCL macros)
namespace {

constexpr int kHeadThreads = 256;
constexpr int64_t kHeadChunkBytes = int64_t(32) << 20;  // 32 MiB of raw outputs per chunk

template <HeadLikelihood kKind, bool kLogProb, bool kGrads, typename T>
__global__ void __launch_bounds__(kHeadThreads)
    head_rows_kernel(const HeadArgs<T> a, T* raw, int64_t first_row, int64_t count) {
  using BlockReduce = cub::BlockReduce<T, kHeadThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const int64_t P = a.pixels;
  for (int64_t i = blockIdx.x; i < count; i += gridDim.x) {  // i is uniform over the block
    const int64_t row = first_row + i;
    T* r = raw + i * a.outputs;
    const T* x = a.x + (row % a.batch) * P;
    const T g = a.grad != nullptr ? a.grad[row] : T(1);
    T acc = T(0);
    for (int64_t p = threadIdx.x; p < P; p += kHeadThreads) {
      if constexpr (kKind == HeadLikelihood::kBernoulli) {
        acc += head_bernoulli_element<T, kLogProb, kGrads>(r[p], a.bias[p], x[p], g);
      } else if constexpr (kKind == HeadLikelihood::kGaussian) {
        acc += head_gaussian_element<T, kLogProb, kGrads>(r[p], a.bias[p], x[p], g, a.logvar_value, a.fixed_inv_var);
      } else {
        acc += head_gaussian_learned_element<T, kLogProb, kGrads>(r[p], r[P + p], a.bias[p], a.bias[P + p], x[p], g);
      }
    }
    if constexpr (kLogProb) {
      const T total = BlockReduce(temp).Sum(acc);
      if (threadIdx.x == 0) a.log_prob[row] = total + head_row_constant<T>(kKind, P);
      __syncthreads();  // temp is reused by the next row
    }
  }
}

unsigned int grid_for(int64_t rows) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 30;
  return static_cast<unsigned int>(std::min(std::max<int64_t>(rows, 1), kMaxBlocks));
}

template <HeadLikelihood kKind, typename T>
void launch_rows_of_kind(const HeadArgs<T>& a, HeadWants wants, T* raw, int64_t first_row, int64_t count,
                         cudaStream_t stream) {
  const unsigned int grid = grid_for(count);
  if (!wants.any_grad()) {
    head_rows_kernel<kKind, true, false, T><<<grid, kHeadThreads, 0, stream>>>(a, raw, first_row, count);
  } else if (wants.log_prob) {
    head_rows_kernel<kKind, true, true, T><<<grid, kHeadThreads, 0, stream>>>(a, raw, first_row, count);
  } else {
    head_rows_kernel<kKind, false, true, T><<<grid, kHeadThreads, 0, stream>>>(a, raw, first_row, count);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_rows(const HeadArgs<T>& a, HeadWants wants, T* raw, int64_t first_row, int64_t count) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (a.kind) {
    case HeadLikelihood::kBernoulli:
      return launch_rows_of_kind<HeadLikelihood::kBernoulli>(a, wants, raw, first_row, count, stream);
    case HeadLikelihood::kGaussian:
      return launch_rows_of_kind<HeadLikelihood::kGaussian>(a, wants, raw, first_row, count, stream);
    case HeadLikelihood::kGaussianLearned:
      return launch_rows_of_kind<HeadLikelihood::kGaussianLearned>(a, wants, raw, first_row, count, stream);
  }
}

template <typename T>
void run_head(const HeadIO& io, HeadWants wants) {
  const HeadArgs<T> a = io.args<T>();
  if (a.rows == 0) return;
  const int64_t chunk = std::max<int64_t>(1, kHeadChunkBytes / std::max<int64_t>(a.outputs * sizeof(T), 1));
  const at::Tensor weight_t = io.weight.t();
  const at::Tensor grad_h = io.grad_h.defined() ? io.grad_h.view({a.rows, a.hidden}) : at::Tensor();
  const at::Tensor raw = at::empty({std::min(chunk, a.rows), a.outputs}, io.h.options());
  for (int64_t first_row = 0; first_row < a.rows; first_row += chunk) {
    const int64_t count = std::min(chunk, a.rows - first_row);
    at::Tensor raw_chunk = raw.narrow(0, 0, count);
    const at::Tensor h_chunk = io.h.narrow(0, first_row, count);
    at::mm_out(raw_chunk, h_chunk, weight_t);
    launch_rows<T>(a, wants, raw.data_ptr<T>(), first_row, count);
    if (grad_h.defined()) {
      at::Tensor grad_h_chunk = grad_h.narrow(0, first_row, count);
      at::mm_out(grad_h_chunk, raw_chunk, io.weight);
    }
    if (io.grad_weight.defined()) io.grad_weight.addmm_(raw_chunk.t(), h_chunk);
    if (io.grad_bias.defined()) io.grad_bias.add_(raw_chunk.sum(0));
  }
}

struct CudaHeadBackend {
  using Guard = c10::cuda::CUDAGuard;
  static void compute(const HeadIO& io, HeadWants wants) {
    AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::fused_head (CUDA)", [&] { run_head<scalar_t>(io, wants); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) { HeadOps<CudaHeadBackend>::register_kernels(m); }

}  // namespace gpu
}  // namespace fastvae
