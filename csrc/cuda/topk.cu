// CUDA top-k selection (fused bias + ReLU) and the compact <-> dense layout ops.
//
// Selection is a radix select on order-preserving unsigned keys, one key bit per pass from the top:
// a pass counts the keys of the group that extend the threshold prefix found so far with a 1 bit and
// keeps that bit if at least `kk` (the rank still to find) do. It stops as soon as the keys sharing the
// prefix are exactly the ones still needed (for random data after ~log2(group size) + exponent bits,
// never more than the key width). The output keeps every key above the prefix and the first `kk` keys
// equal to it in index order (a prefix count), so ties go to the lower index and entries come out in
// ascending index order without a sort. The result is deterministic.
//
// Two kernels:
//   * warp per group, keys in registers (group size <= 1024: the spatial layers, small channel groups);
//   * block per group, keys staged in shared memory when they fit, re-read from global memory otherwise
//     (large groups: channel mode with many channels, global mode).
#include <torch/library.h>

#include <tuple>

#include "common.cuh"
#include "layout.cuh"

namespace sparsegen {
namespace cuda {
namespace {

constexpr int kWarpKernelWarps = 4;     // groups per block of the warp kernel
constexpr int kWarpKernelMaxItems = 32;  // keys per lane: groups of up to 32 * 32 = 1024 elements

struct TopkArgs {
  int mode;
  int64_t groups;  // N * G
  int64_t G;
  int64_t S;  // group size
  int64_t CHW;
  int64_t HW;
  int k;
  bool relu;
  bool idx16;
};

template <typename scalar_t>
__device__ __forceinline__ typename Traits<scalar_t>::key_t load_key(const scalar_t* __restrict__ xs,
                                                                   const scalar_t* __restrict__ bias,
                                                                   const TopkArgs& a, int64_t g, int64_t i) {
  using T = Traits<scalar_t>;
  const Elem e = group_elem(a.mode, g, i, a.HW);
  scalar_t v = xs[e.off];
  if (bias != nullptr) v = T::add(v, bias[e.c]);
  if (a.relu) v = T::relu(v);
  return T::to_key(v);
}

template <typename scalar_t>
__device__ __forceinline__ void store_index(void* indices, bool idx16, int64_t pos, int64_t i) {
  if (idx16) {
    static_cast<int16_t*>(indices)[pos] = static_cast<int16_t>(i);
  } else {
    static_cast<int32_t*>(indices)[pos] = static_cast<int32_t>(i);
  }
}

// ---- warp per group ------------------------------------------------------------------------------------
template <typename scalar_t, int ITEMS>
__global__ void __launch_bounds__(kWarpKernelWarps * 32)
    topk_warp_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ bias, TopkArgs a,
                     scalar_t* __restrict__ values, void* __restrict__ indices, scalar_t* __restrict__ mask_out) {
  using T = Traits<scalar_t>;
  using key_t = typename T::key_t;
  constexpr int NB = KeyBits<scalar_t>::value;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kWarpKernelWarps + threadIdx.x / 32;
  if (gid >= a.groups) return;  // the whole warp leaves together
  const int lane = static_cast<int>(lane_id());
  const int64_t n = gid / a.G;
  const int64_t g = gid - n * a.G;
  const scalar_t* xs = x + n * a.CHW;
  const int S = static_cast<int>(a.S);

  // Keys of element i = j * 32 + lane; padding gets key 0, below every real key (k <= S keeps it out).
  key_t keys[ITEMS];
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int i = j * 32 + lane;
    keys[j] = i < S ? load_key(xs, bias, a, g, i) : key_t(0);
  }

  key_t prefix = 0;
  int kk = a.k;
  int cands = ITEMS * 32;
  int shift = 0;
#pragma unroll 1
  for (int bit = NB - 1; bit >= 0; --bit) {
    const key_t cand = prefix | (key_t(1) << bit);
    const key_t top = cand >> bit;
    unsigned c = 0;
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) c += (keys[j] >> bit) == top;
    const int cnt = static_cast<int>(warp_sum_u32(c));
    if (cnt >= kk) {
      prefix = cand;
      cands = cnt;
    } else {
      kk -= cnt;
      cands -= cnt;
    }
    shift = bit;
    if (cands == kk) break;
  }

  const key_t P = prefix >> shift;
  const unsigned lt = lanemask_lt();
  int gt_base = 0, eq_base = 0;
  const int64_t out_base = gid * a.k;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int i = j * 32 + lane;
    const bool valid = i < S;
    const key_t hi = keys[j] >> shift;
    const bool gt = valid && hi > P;
    const bool eq = valid && hi == P;
    const unsigned bg = __ballot_sync(kFullMask, gt);
    const unsigned be = __ballot_sync(kFullMask, eq);
    const int eq_before = eq_base + __popc(be & lt);
    const bool sel = gt || (eq && eq_before < kk);
    if (sel) {
      const int64_t pos = out_base + gt_base + __popc(bg & lt) + min(eq_before, kk);
      if (values != nullptr) values[pos] = T::from_key(keys[j]);
      store_index<scalar_t>(indices, a.idx16, pos, i);
    }
    if (mask_out != nullptr && valid) {
      const Elem e = group_elem(a.mode, g, i, a.HW);
      mask_out[n * a.CHW + e.off] = sel ? T::from_key(keys[j]) : static_cast<scalar_t>(0.0f);
    }
    gt_base += __popc(bg);
    eq_base += __popc(be);
  }
}

// ---- block per group -----------------------------------------------------------------------------------
template <typename scalar_t, bool USE_SMEM>
__global__ void __launch_bounds__(1024)
    topk_block_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ bias, TopkArgs a,
                      scalar_t* __restrict__ values, void* __restrict__ indices, scalar_t* __restrict__ mask_out) {
  using T = Traits<scalar_t>;
  using key_t = typename T::key_t;
  constexpr int NB = KeyBits<scalar_t>::value;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  key_t* skeys = reinterpret_cast<key_t*>(smem_raw);
  __shared__ int red[2][32];
  __shared__ int sgt[2][32];
  __shared__ int seq[2][32];

  const int64_t gid = blockIdx.x;
  const int64_t n = gid / a.G;
  const int64_t g = gid - n * a.G;
  const scalar_t* xs = x + n * a.CHW;
  const int64_t S = a.S;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int warp = tid / 32;
  const int nwarps = nthreads / 32;
  const int lane = static_cast<int>(lane_id());

  if (USE_SMEM) {
    for (int64_t i = tid; i < S; i += nthreads) skeys[i] = load_key(xs, bias, a, g, i);
    __syncthreads();
  }
  auto key_at = [&](int64_t i) -> key_t { return USE_SMEM ? skeys[i] : load_key(xs, bias, a, g, i); };

  key_t prefix = 0;
  int64_t kk = a.k;
  int64_t cands = S;
  int shift = 0;
  int parity = 0;
#pragma unroll 1
  for (int bit = NB - 1; bit >= 0; --bit) {
    const key_t cand = prefix | (key_t(1) << bit);
    const key_t top = cand >> bit;
    unsigned c = 0;
    for (int64_t i = tid; i < S; i += nthreads) c += (key_at(i) >> bit) == top;
    c = warp_sum_u32(c);
    if (lane == 0) red[parity][warp] = static_cast<int>(c);
    __syncthreads();
    int64_t cnt = 0;
    for (int w = 0; w < nwarps; ++w) cnt += red[parity][w];
    parity ^= 1;
    if (cnt >= kk) {
      prefix = cand;
      cands = cnt;
    } else {
      kk -= cnt;
      cands -= cnt;
    }
    shift = bit;
    if (cands == kk) break;  // uniform: every thread saw the same counts
  }

  const key_t P = prefix >> shift;
  const unsigned lt = lanemask_lt();
  int64_t gt_base = 0, eq_base = 0;
  const int64_t out_base = gid * a.k;
  for (int64_t c0 = 0; c0 < S; c0 += nthreads) {
    const int64_t i = c0 + tid;
    const bool valid = i < S;
    const key_t key = valid ? key_at(i) : key_t(0);
    const key_t hi = key >> shift;
    const bool gt = valid && hi > P;
    const bool eq = valid && hi == P;
    const unsigned bg = __ballot_sync(kFullMask, gt);
    const unsigned be = __ballot_sync(kFullMask, eq);
    if (lane == 0) {
      sgt[parity][warp] = __popc(bg);
      seq[parity][warp] = __popc(be);
    }
    __syncthreads();
    int64_t gt_before = gt_base + __popc(bg & lt);
    int64_t eq_before = eq_base + __popc(be & lt);
    int64_t tot_gt = 0, tot_eq = 0;
    for (int w = 0; w < nwarps; ++w) {
      const int cg = sgt[parity][w];
      const int ce = seq[parity][w];
      if (w < warp) {
        gt_before += cg;
        eq_before += ce;
      }
      tot_gt += cg;
      tot_eq += ce;
    }
    parity ^= 1;
    const bool sel = gt || (eq && eq_before < kk);
    if (sel) {
      const int64_t pos = out_base + gt_before + (eq_before < kk ? eq_before : kk);
      if (values != nullptr) values[pos] = T::from_key(key);
      store_index<scalar_t>(indices, a.idx16, pos, i);
    }
    if (mask_out != nullptr && valid) {
      const Elem e = group_elem(a.mode, g, i, a.HW);
      mask_out[n * a.CHW + e.off] = sel ? T::from_key(key) : static_cast<scalar_t>(0.0f);
    }
    gt_base += tot_gt;
    eq_base += tot_eq;
  }
}

template <typename scalar_t, int ITEMS>
void launch_warp(const scalar_t* x, const scalar_t* bias, const TopkArgs& a, scalar_t* values, void* indices,
                 scalar_t* mask_out, cudaStream_t stream) {
  const int64_t blocks = ceil_div(a.groups, kWarpKernelWarps);
  topk_warp_kernel<scalar_t, ITEMS>
      <<<static_cast<unsigned>(blocks), kWarpKernelWarps * 32, 0, stream>>>(x, bias, a, values, indices, mask_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_topk(const scalar_t* x, const scalar_t* bias, const TopkArgs& a, scalar_t* values, void* indices,
                 scalar_t* mask_out, cudaStream_t stream) {
  if (a.S <= 32 * kWarpKernelMaxItems) {
    if (a.S <= 32) return launch_warp<scalar_t, 1>(x, bias, a, values, indices, mask_out, stream);
    if (a.S <= 64) return launch_warp<scalar_t, 2>(x, bias, a, values, indices, mask_out, stream);
    if (a.S <= 128) return launch_warp<scalar_t, 4>(x, bias, a, values, indices, mask_out, stream);
    if (a.S <= 256) return launch_warp<scalar_t, 8>(x, bias, a, values, indices, mask_out, stream);
    if (a.S <= 512) return launch_warp<scalar_t, 16>(x, bias, a, values, indices, mask_out, stream);
    return launch_warp<scalar_t, 32>(x, bias, a, values, indices, mask_out, stream);
  }
  using key_t = typename Traits<scalar_t>::key_t;
  const int threads = a.S >= 16384 ? 1024 : (a.S >= 4096 ? 512 : 256);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t smem_limit = static_cast<int64_t>(prop->sharedMemPerBlockOptin) - 2048;  // room for static smem
  const int64_t smem = a.S * static_cast<int64_t>(sizeof(key_t));
  TORCH_CHECK(a.groups <= std::numeric_limits<int>::max(), "sparsegen::topk_cuda: too many groups (", a.groups, ")");
  const unsigned grid = static_cast<unsigned>(a.groups);
  if (smem <= smem_limit) {
    auto kernel = topk_block_kernel<scalar_t, true>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<grid, threads, static_cast<size_t>(smem), stream>>>(x, bias, a, values, indices, mask_out);
  } else {
    topk_block_kernel<scalar_t, false><<<grid, threads, 0, stream>>>(x, bias, a, values, indices, mask_out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> topk_common(const at::Tensor& x_in, int64_t k, const std::string& mode_str,
                                               const c10::optional<at::Tensor>& bias_in, bool relu, bool mask,
                                               const char* op) {
  check_cuda(x_in, op, "x");
  check_float_dtype(x_in, op, "x");
  TORCH_CHECK_VALUE(x_in.dim() == 4, "sparsegen::", op, ": x must be [N, C, H, W], got shape ", x_in.sizes());
  const Mode mode = parse_mode(mode_str);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const Groups gr = groups_of(mode, C, H, W);
  TORCH_CHECK_VALUE(k >= 1 && k <= gr.size, "sparsegen::", op, ": k=", k, " is out of range for mode '", mode_str,
                    "' with group size ", gr.size, " (need 1 <= k <= group size)");
  TORCH_CHECK_VALUE(gr.size <= std::numeric_limits<int32_t>::max(), "sparsegen::", op, ": group size ", gr.size,
                    " does not fit int32 indices");
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = *bias_in;
    check_same_device(x_in, bias, op, "bias");
    TORCH_CHECK_TYPE(bias.scalar_type() == x_in.scalar_type(), "sparsegen::", op, ": bias dtype ",
                     bias.scalar_type(), " differs from x dtype ", x_in.scalar_type());
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == C, "sparsegen::", op, ": bias must be [C] = [", C,
                      "], got shape ", bias.sizes());
    bias = bias.contiguous();
  }
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto idx_dtype = index_dtype_for(gr.size);
  at::Tensor indices = at::empty({N, gr.G, k}, x.options().dtype(idx_dtype));
  at::Tensor values, out;
  if (mask) {
    out = at::empty_like(x);
  } else {
    values = at::empty({N, gr.G, k}, x.options());
  }
  TopkArgs a;
  a.mode = static_cast<int>(mode);
  a.groups = N * gr.G;
  a.G = gr.G;
  a.S = gr.size;
  a.CHW = C * H * W;
  a.HW = H * W;
  a.k = static_cast<int>(k);
  a.relu = relu;
  a.idx16 = idx_dtype == at::kShort;
  if (a.groups == 0) return {mask ? out : values, indices};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparsegen_topk_cuda", [&] {
    launch_topk<scalar_t>(x.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                          a, mask ? nullptr : values.mutable_data_ptr<scalar_t>(), indices.data_ptr(),
                          mask ? out.mutable_data_ptr<scalar_t>() : nullptr, stream);
  });
  return {mask ? out : values, indices};
}

std::tuple<at::Tensor, at::Tensor> topk_compact_cuda(const at::Tensor& x, int64_t k, c10::string_view mode,
                                                     const c10::optional<at::Tensor>& bias, bool relu) {
  return topk_common(x, k, std::string(mode), bias, relu, /*mask=*/false, "topk_compact_cuda");
}

std::tuple<at::Tensor, at::Tensor> topk_mask_cuda(const at::Tensor& x, int64_t k, c10::string_view mode,
                                                  const c10::optional<at::Tensor>& bias, bool relu) {
  return topk_common(x, k, std::string(mode), bias, relu, /*mask=*/true, "topk_mask_cuda");
}

// ---- layout (kernels in layout.cuh) ---------------------------------------------------------------
at::Tensor compact_to_dense_cuda(const at::Tensor& values_in, const at::Tensor& indices_in, c10::string_view mode_sv,
                                 c10::SymIntArrayRef shape_sym) {
  const char* op = "compact_to_dense_cuda";
  check_cuda(values_in, op, "values");
  check_float_dtype(values_in, op, "values");
  check_same_device(values_in, indices_in, op, "indices");
  check_index_dtype(indices_in, op);
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_sym);
  TORCH_CHECK_VALUE(shape.size() == 4, "sparsegen::", op, ": shape must be [N, C, H, W], got ", shape);
  const Mode mode = parse_mode(std::string(mode_sv));
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  const Groups gr = groups_of(mode, C, H, W);
  TORCH_CHECK_VALUE(values_in.dim() == 3 && values_in.size(0) == N && values_in.size(1) == gr.G,
                    "sparsegen::", op, ": values must be [N, G, k] = [", N, ", ", gr.G, ", k], got ", values_in.sizes());
  TORCH_CHECK_VALUE(indices_in.sizes() == values_in.sizes(), "sparsegen::", op, ": indices shape ", indices_in.sizes(),
                    " differs from values shape ", values_in.sizes());
  c10::cuda::CUDAGuard guard(values_in.device());
  return scatter_to_dense(values_in, indices_in, mode, N, C, H, W);
}

at::Tensor compact_gather_cuda(const at::Tensor& dense_in, const at::Tensor& indices_in, c10::string_view mode_sv) {
  const char* op = "compact_gather_cuda";
  check_cuda(dense_in, op, "dense");
  check_float_dtype(dense_in, op, "dense");
  check_same_device(dense_in, indices_in, op, "indices");
  check_index_dtype(indices_in, op);
  TORCH_CHECK_VALUE(dense_in.dim() == 4, "sparsegen::", op, ": dense must be [N, C, H, W], got ", dense_in.sizes());
  const Mode mode = parse_mode(std::string(mode_sv));
  const int64_t N = dense_in.size(0), C = dense_in.size(1), H = dense_in.size(2), W = dense_in.size(3);
  const Groups gr = groups_of(mode, C, H, W);
  TORCH_CHECK_VALUE(indices_in.dim() == 3 && indices_in.size(0) == N && indices_in.size(1) == gr.G, "sparsegen::", op,
                    ": indices must be [N, G, k] = [", N, ", ", gr.G, ", k], got ", indices_in.sizes());
  c10::cuda::CUDAGuard guard(dense_in.device());
  at::Tensor dense = dense_in.contiguous();
  at::Tensor out = at::empty(indices_in.sizes(), dense.options());
  LayoutArgs a{static_cast<int>(mode), out.numel(), gr.G, out.size(2), gr.size, C * H * W, H * W};
  launch_layout(dense, out, indices_in.contiguous(), a, /*scatter=*/false);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparsegen

TORCH_LIBRARY_IMPL(_sparsegen_cuda, CUDA, m) {
  m.impl("topk_compact", &sparsegen::cuda::topk_compact_cuda);
  m.impl("topk_mask", &sparsegen::cuda::topk_mask_cuda);
  m.impl("compact_to_dense", &sparsegen::cuda::compact_to_dense_cuda);
  m.impl("compact_gather", &sparsegen::cuda::compact_gather_cuda);
}
