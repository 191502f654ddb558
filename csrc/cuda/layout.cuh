// Compact <-> dense layout kernels (scatter a compact activation into zeros, gather at its indices),
// shared by the layout ops and the sparse convolution's backward.
#pragma once

#include "common.cuh"

namespace sparsegen {
namespace cuda {
namespace {  // internal linkage: each translation unit gets its own copy of the kernels

// ---- compact <-> dense ---------------------------------------------------------------------------------------------
struct LayoutArgs {
  int mode;
  int64_t total;  // N * G * k
  int64_t G;
  int64_t k;
  int64_t S;
  int64_t CHW;
  int64_t HW;
};

template <typename scalar_t, typename index_t, bool SCATTER>
__global__ void compact_layout_kernel(scalar_t* __restrict__ dense, scalar_t* __restrict__ compact,
                                      const index_t* __restrict__ indices, LayoutArgs a) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < a.total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ng = e / a.k;
    const int64_t n = ng / a.G;
    const int64_t g = ng - n * a.G;
    const int64_t idx = static_cast<int64_t>(indices[e]);
    CUDA_KERNEL_ASSERT(idx >= 0 && idx < a.S);
    const int64_t off = n * a.CHW + group_elem(a.mode, g, idx, a.HW).off;
    if (SCATTER) {
      dense[off] = compact[e];
    } else {
      compact[e] = dense[off];
    }
  }
}

template <typename index_t>
void launch_layout_idx(at::Tensor& dense, at::Tensor& compact, const at::Tensor& indices, const LayoutArgs& a,
                       bool scatter) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(a.total, threads), static_cast<int64_t>(num_sms()) * 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "sparsegen_layout_cuda", [&] {
    auto* d = dense.mutable_data_ptr<scalar_t>();
    auto* c = compact.mutable_data_ptr<scalar_t>();
    const auto* ip = indices.const_data_ptr<index_t>();
    if (scatter) {
      compact_layout_kernel<scalar_t, index_t, true><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(d, c, ip, a);
    } else {
      compact_layout_kernel<scalar_t, index_t, false><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(d, c, ip, a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

inline void launch_layout(at::Tensor& dense, at::Tensor& compact, const at::Tensor& indices, const LayoutArgs& a,
                          bool scatter) {
  if (a.total == 0) return;
  switch (indices.scalar_type()) {
    case at::kShort: return launch_layout_idx<int16_t>(dense, compact, indices, a, scatter);
    case at::kInt: return launch_layout_idx<int32_t>(dense, compact, indices, a, scatter);
    default: return launch_layout_idx<int64_t>(dense, compact, indices, a, scatter);
  }
}

// Dense [N, C, H, W] tensor of zeros with `values` scattered at `indices` (both [N, G, k], contiguous).
inline at::Tensor scatter_to_dense(const at::Tensor& values, const at::Tensor& indices, Mode mode, int64_t N, int64_t C,
                                   int64_t H, int64_t W) {
  const Groups gr = groups_of(mode, C, H, W);
  at::Tensor dense = at::zeros({N, C, H, W}, values.options());
  at::Tensor v = values.contiguous();
  LayoutArgs a{static_cast<int>(mode), v.numel(), gr.G, v.size(2), gr.size, C * H * W, H * W};
  launch_layout(dense, v, indices.contiguous(), a, /*scatter=*/true);
  return dense;
}

}  // namespace
}  // namespace cuda
}  // namespace sparsegen
