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

template <class D, bool kLayerSecond, bool kLogProb, bool kGrads, typename T>
__global__ void __launch_bounds__(kHeadThreads)
    head_rows_kernel(const HeadArgs<T> a, T* raw, int64_t first_row, int64_t count) {
  using BlockReduce = cub::BlockReduce<T, kHeadThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const int64_t P = a.pixels;
  const HeadSecond<D, T> second = a.template second<D>();
  for (int64_t i = blockIdx.x; i < count; i += gridDim.x) {  // i is uniform over the block
    const int64_t row = first_row + i;
    T* r = raw + i * a.outputs;
    const T* x = a.x + (row % a.batch) * P;
    const T g = a.grad != nullptr ? a.grad[row] : T(1);
    T acc = T(0);
    for (int64_t p = threadIdx.x; p < P; p += kHeadThreads) {
      acc += head_element<D, kLayerSecond, kLogProb, kGrads>(r + p, a.bias + p, P, x[p], g, second);
    }
    if constexpr (kLogProb) {
      const T total = BlockReduce(temp).Sum(acc);
      if (threadIdx.x == 0) a.log_prob[row] = total + D::template row_constant<T>(P);
      __syncthreads();  // temp is reused by the next row
    }
  }
}

unsigned int grid_for(int64_t rows) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 30;
  return static_cast<unsigned int>(std::min(std::max<int64_t>(rows, 1), kMaxBlocks));
}

template <class D, bool kLayerSecond, typename T>
void launch_rows_with_second(const HeadArgs<T>& a, HeadWants wants, T* raw, int64_t first_row, int64_t count,
                             cudaStream_t stream) {
  const unsigned int grid = grid_for(count);
  if (!wants.any_grad()) {
    head_rows_kernel<D, kLayerSecond, true, false, T><<<grid, kHeadThreads, 0, stream>>>(a, raw, first_row, count);
  } else if (wants.log_prob) {
    head_rows_kernel<D, kLayerSecond, true, true, T><<<grid, kHeadThreads, 0, stream>>>(a, raw, first_row, count);
  } else {
    head_rows_kernel<D, kLayerSecond, false, true, T><<<grid, kHeadThreads, 0, stream>>>(a, raw, first_row, count);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class D, typename T>
void launch_rows(const HeadArgs<T>& a, HeadWants wants, T* raw, int64_t first_row, int64_t count) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if constexpr (has_second<D>()) {
    if (a.layer_second) return launch_rows_with_second<D, true>(a, wants, raw, first_row, count, stream);
  }
  launch_rows_with_second<D, false>(a, wants, raw, first_row, count, stream);
}

template <class D, typename T>
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
    launch_rows<D, T>(a, wants, raw.data_ptr<T>(), first_row, count);
    if (grad_h.defined()) {
      at::Tensor grad_h_chunk = grad_h.narrow(0, first_row, count);
      at::mm_out(grad_h_chunk, raw_chunk, io.weight);
    }
    // beta = 0 for the first chunk: grad_weight is allocated, not zeroed (prepare_head)
    if (io.grad_weight.defined()) io.grad_weight.addmm_(raw_chunk.t(), h_chunk, first_row == 0 ? 0.0 : 1.0);
    if (io.grad_bias.defined()) io.grad_bias.add_(raw_chunk.sum(0));
  }
}

struct CudaHeadBackend {
  using Guard = c10::cuda::CUDAGuard;
  template <class D>
  static void compute(const HeadIO& io, HeadWants wants) {
    AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::fused_head (CUDA)", [&] { run_head<D, scalar_t>(io, wants); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) { HeadOps<CudaHeadBackend>::register_kernels(m); }

}  // namespace gpu
}  // namespace fastvae
