// CUDA sparse transposed convolution: forward over the surviving entries of a compact activation (or the
// non-zeros of a dense input), the input gradient at the surviving entries only, and the weight gradient.
//
//   out[n, o, oy, ox] = bias[o] + sum_{c, iy, ix, ky, kx} in[n, c, iy, ix] * W[c, o, ky, kx],
//   oy = iy * sh - ph + ky, ox = ix * sw - pw + kx,   W: [Cin, Cout, kh, kw] (ConvTranspose2d layout).
//
// Every kernel reads the weight as Wp = W.permute(0, 2, 3, 1).contiguous() ([Cin, kh, kw, Cout], a no-op
// for the folded upsample weight) so the inner loops run contiguous over Cout.
//
// Moderate densities (>= kCudnnMinDensity, such as the spatial top-k's 25%) and dense inputs: the compact input
// is decompressed into a zero-filled channels-last buffer and cuDNN runs the convolution, its input gradient
// (a strided conv, then a gather at the surviving entries) and its weight gradient on the tensor cores. At
// these densities nearly every (pixel tile x channel block) holds a survivor, so the dense tensor-core work
// on the folded weight (2.25x fewer MACs than upsample + 3x3 conv) beats any CUDA-core sparse kernel.
//
// Very sparse compact inputs, exactly the sparse MACs on CUDA cores:
//   * forward, gather (output-stationary; channel-mode input, e.g. the FC layer's channel top-8): one block
//     per output pixel sums its window's surviving (channel, value) pairs. No atomics, deterministic.
//   * forward, scatter (input-stationary; spatial / global mode): each surviving entry adds
//     v * Wp[c, ky, kx, :] to its output window with float atomics into an [N, Ho, Wo, Cout] accumulator
//     (float32; float64 for double). The atomics make the summation order, and so the last bits of the
//     result, vary from run to run (not bitwise deterministic).
//   The gather and scatter accumulators are then transposed to NCHW with the bias added and cast.
//   * input gradient: one warp per surviving entry, a dot product of the output-gradient window with the
//     weight over (taps, Cout). Deterministic, nothing computed for pruned entries.
//   * weight gradient: one block per (input channel, Cout tile, sample chunk) walks the input channel's
//     non-zeros (ballot over 32 positions at a time) and accumulates v * grad_out window per tap in
//     registers; the sample chunks are summed in a fixed order. Deterministic, no atomics.
#include <torch/library.h>

#include "common.cuh"
#include "layout.cuh"

namespace sparsegen {
namespace cuda {
namespace {

struct ConvArgs {
  int64_t N, Cin, H, W, Cout, kh, kw, sh, sw, ph, pw, Ho, Wo;
  // compact input
  int mode;
  int64_t G, k, entries;
};

// ---- geometry / argument parsing -------------------------------------------------------------------------
std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 1 || v.size() == 2, "sparsegen::", op, ": ", name, " must have 1 or 2 elements, got ",
                    v);
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

ConvArgs make_geometry(at::IntArrayRef in_shape, at::IntArrayRef wshape, at::IntArrayRef stride,
                       at::IntArrayRef padding, const char* op) {
  TORCH_CHECK_VALUE(in_shape.size() == 4, "sparsegen::", op, ": in_shape must be [N, Cin, H, W], got ", in_shape);
  TORCH_CHECK_VALUE(wshape.size() == 4, "sparsegen::", op, ": weight must be [Cin, Cout, kh, kw], got ", wshape);
  ConvArgs a{};
  a.N = in_shape[0];
  a.Cin = in_shape[1];
  a.H = in_shape[2];
  a.W = in_shape[3];
  TORCH_CHECK_VALUE(wshape[0] == a.Cin, "sparsegen::", op, ": weight has ", wshape[0], " input channels, input has ",
                    a.Cin);
  a.Cout = wshape[1];
  a.kh = wshape[2];
  a.kw = wshape[3];
  std::tie(a.sh, a.sw) = pair_arg(stride, op, "stride");
  std::tie(a.ph, a.pw) = pair_arg(padding, op, "padding");
  TORCH_CHECK_VALUE(a.sh >= 1 && a.sw >= 1, "sparsegen::", op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(a.ph >= 0 && a.pw >= 0, "sparsegen::", op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(a.kh >= 1 && a.kw >= 1, "sparsegen::", op, ": empty kernel ", wshape);
  return a;
}

void set_compact(ConvArgs& a, const at::Tensor& values, const at::Tensor& indices, const std::string& mode_str,
                 const char* op) {
  const Mode mode = parse_mode(mode_str);
  const Groups gr = groups_of(mode, a.Cin, a.H, a.W);
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == a.N && values.size(1) == gr.G, "sparsegen::", op,
                    ": values must be [N, G, k] = [", a.N, ", ", gr.G, ", k] for mode '", mode_str, "', got ",
                    values.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), "sparsegen::", op, ": indices shape ", indices.sizes(),
                    " differs from values shape ", values.sizes());
  check_index_dtype(indices, op);
  a.mode = static_cast<int>(mode);
  a.G = gr.G;
  a.k = values.size(2);
  a.entries = values.numel();
}

template <typename index_t>
__device__ __forceinline__ void entry_position(const ConvArgs& a, const index_t* __restrict__ indices, int64_t e,
                                               int64_t& n, int64_t& c, int64_t& iy, int64_t& ix) {
  const int64_t ng = e / a.k;
  n = ng / a.G;
  const int64_t g = ng - n * a.G;
  const int64_t idx = static_cast<int64_t>(indices[e]);
  const int64_t HW = a.H * a.W;
  CUDA_KERNEL_ASSERT(idx >= 0 && idx < (a.mode == 0 ? HW : (a.mode == 1 ? a.Cin : a.Cin * HW)));
  const Elem el = group_elem(a.mode, g, idx, HW);
  c = el.c;
  const int64_t pos = el.off - c * HW;
  iy = pos / a.W;
  ix = pos - iy * a.W;
}

// ---- forward: scatter ------------------------------------------------------------------------------------
// The warp adds v * Wp[c, ky, kx, :] to acc[n, oy, ox, :] for every tap of (c, iy, ix) landing in the output.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void scatter_entry(const ConvArgs& a, const scalar_t* __restrict__ wp, acc_t* __restrict__ acc,
                                              int64_t n, int64_t c, int64_t iy, int64_t ix, acc_t v, int lane) {
  using T = Traits<scalar_t>;
  for (int64_t ky = 0; ky < a.kh; ++ky) {
    const int64_t oy = iy * a.sh - a.ph + ky;
    if (oy < 0 || oy >= a.Ho) continue;
    for (int64_t kx = 0; kx < a.kw; ++kx) {
      const int64_t ox = ix * a.sw - a.pw + kx;
      if (ox < 0 || ox >= a.Wo) continue;
      const scalar_t* wrow = wp + ((c * a.kh + ky) * a.kw + kx) * a.Cout;
      acc_t* dst = acc + ((n * a.Ho + oy) * a.Wo + ox) * a.Cout;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      if constexpr (std::is_same_v<acc_t, float>) {
        if ((a.Cout & 3) == 0) {
          // 16-byte vector reductions (sm_90): a quarter of the atomic instructions.
          for (int64_t o = 4 * lane; o < a.Cout; o += 128) {
            float4 d = make_float4(v * T::to_acc(wrow[o]), v * T::to_acc(wrow[o + 1]), v * T::to_acc(wrow[o + 2]),
                                   v * T::to_acc(wrow[o + 3]));
            atomicAdd(reinterpret_cast<float4*>(dst + o), d);
          }
          continue;
        }
      }
#endif
      for (int64_t o = lane; o < a.Cout; o += 32) atomicAdd(dst + o, v * T::to_acc(wrow[o]));
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(256)
    scatter_compact_kernel(const scalar_t* __restrict__ values, const index_t* __restrict__ indices,
                           const scalar_t* __restrict__ wp, acc_t* __restrict__ acc, ConvArgs a) {
  using T = Traits<scalar_t>;
  const int lane = static_cast<int>(lane_id());
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; e < a.entries; e += warps) {
    const acc_t v = T::to_acc(values[e]);
    if (v == acc_t(0)) continue;  // warp-uniform
    int64_t n, c, iy, ix;
    entry_position(a, indices, e, n, c, iy, ix);
    scatter_entry<scalar_t, acc_t>(a, wp, acc, n, c, iy, ix, v, lane);
  }
}

// Channel-mode compact input (k channels per input position): output-stationary gather. One block per output
// pixel (n, oy, ox); each thread owns output channels o = tid, tid + blockDim, ... and sums v * Wp[c, ky, kx, o]
// over the input positions whose window covers the pixel and their k surviving channels. No atomics, a fixed
// summation order (deterministic); writes acc [N, Ho, Wo, Cout] (every element), finalized like the scatter.
constexpr int kGatherMaxO = 4;  // output channels per thread (Cout <= kGatherMaxO * blockDim.x per pass)

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(128)
    gather_channel_kernel(const scalar_t* __restrict__ values, const index_t* __restrict__ indices,
                          const scalar_t* __restrict__ wp, acc_t* __restrict__ acc, ConvArgs a) {
  using T = Traits<scalar_t>;
  const int64_t pix = blockIdx.x;  // (n * Ho + oy) * Wo + ox
  const int64_t ox = pix % a.Wo;
  const int64_t oy = (pix / a.Wo) % a.Ho;
  const int64_t n = pix / (a.Wo * a.Ho);
  acc_t* dst = acc + pix * a.Cout;
  for (int64_t o0 = 0; o0 < a.Cout; o0 += static_cast<int64_t>(kGatherMaxO) * blockDim.x) {
    acc_t s[kGatherMaxO];
#pragma unroll
    for (int q = 0; q < kGatherMaxO; ++q) s[q] = 0;
    for (int64_t ky = 0; ky < a.kh; ++ky) {
      const int64_t ty = oy + a.ph - ky;
      if (ty < 0 || ty % a.sh != 0 || ty / a.sh >= a.H) continue;
      const int64_t iy = ty / a.sh;
      for (int64_t kx = 0; kx < a.kw; ++kx) {
        const int64_t tx = ox + a.pw - kx;
        if (tx < 0 || tx % a.sw != 0 || tx / a.sw >= a.W) continue;
        const int64_t ix = tx / a.sw;
        const int64_t e0 = (n * a.G + iy * a.W + ix) * a.k;  // channel mode: group = position
        for (int64_t j = 0; j < a.k; ++j) {
          const acc_t v = T::to_acc(values[e0 + j]);
          if (v == acc_t(0)) continue;  // block-uniform
          const int64_t c = static_cast<int64_t>(indices[e0 + j]);
          CUDA_KERNEL_ASSERT(c >= 0 && c < a.Cin);
          const scalar_t* wrow = wp + ((c * a.kh + ky) * a.kw + kx) * a.Cout;
#pragma unroll
          for (int q = 0; q < kGatherMaxO; ++q) {
            const int64_t o = o0 + threadIdx.x + static_cast<int64_t>(q) * blockDim.x;
            if (o < a.Cout) s[q] += v * T::to_acc(wrow[o]);
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kGatherMaxO; ++q) {
      const int64_t o = o0 + threadIdx.x + static_cast<int64_t>(q) * blockDim.x;
      if (o < a.Cout) dst[o] = s[q];
    }
  }
}

// acc [N, Ho*Wo, Cout] -> out [N, Cout, Ho*Wo] (+ bias), through a 32 x 32 shared-memory tile.
template <typename scalar_t, typename acc_t>
__global__ void finalize_kernel(const acc_t* __restrict__ acc, const scalar_t* __restrict__ bias,
                                scalar_t* __restrict__ out, int64_t P, int64_t Cout) {
  using T = Traits<scalar_t>;
  __shared__ acc_t tile[32][33];
  const int64_t n = blockIdx.z;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * 32;
  const acc_t* src = acc + n * P * Cout;
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {
    const int64_t p = p0 + r, o = o0 + threadIdx.x;
    tile[r][threadIdx.x] = (p < P && o < Cout) ? src[p * Cout + o] : acc_t(0);
  }
  __syncthreads();
  scalar_t* dst = out + n * Cout * P;
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {
    const int64_t o = o0 + r, p = p0 + threadIdx.x;
    if (o < Cout && p < P) {
      acc_t v = tile[threadIdx.x][r];
      if (bias != nullptr) v += T::to_acc(bias[o]);
      dst[o * P + p] = T::from_acc(v);
    }
  }
}

// Dense NHWC copy of a compact activation (zeros elsewhere), for the GEMM path.
template <typename scalar_t, typename index_t>
__global__ void compact_to_nhwc_kernel(const scalar_t* __restrict__ values, const index_t* __restrict__ indices,
                                       scalar_t* __restrict__ nhwc, ConvArgs a) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < a.entries;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, iy, ix;
    entry_position(a, indices, e, n, c, iy, ix);
    nhwc[((n * a.H + iy) * a.W + ix) * a.Cin + c] = values[e];
  }
}

template <typename F>
void dispatch_index(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kShort: f(int16_t{}); break;
    case at::kInt: f(int32_t{}); break;
    default: f(int64_t{}); break;
  }
}

int64_t scatter_blocks(int64_t warps_needed) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(warps_needed, 8), static_cast<int64_t>(num_sms()) * 16));
}

// Density of a compact input from which the dense convolution of cuDNN (on the decompressed input, with
// the tensor cores) beats the sparse kernels, which do exactly the sparse MACs on CUDA cores.
constexpr double kCudnnMinDensity = 0.05;

bool cudnn_path_applies(const ConvArgs& a, bool compact) {
  if (!compact) return true;
  const double dense = static_cast<double>(std::max<int64_t>(1, a.N * a.Cin * a.H * a.W));
  return static_cast<double>(a.entries) / dense >= kCudnnMinDensity;
}

// Dense input of the cuDNN path: the compact activation decompressed into zeros, channels-last (NHWC storage
// seen as an [N, Cin, H, W] tensor), which the tensor-core convolutions read without a transpose.
at::Tensor decompress_nhwc(const at::Tensor& values, const at::Tensor& indices, const ConvArgs& a) {
  at::Tensor nhwc = at::zeros({a.N, a.H, a.W, a.Cin}, values.options());
  if (a.entries > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(a.entries, 256), num_sms() * 32));
    dispatch_index(indices.scalar_type(), [&](auto tag) {
      using index_t = decltype(tag);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparsegen_to_nhwc", [&] {
        compact_to_nhwc_kernel<scalar_t, index_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
            values.const_data_ptr<scalar_t>(), indices.const_data_ptr<index_t>(), nhwc.mutable_data_ptr<scalar_t>(),
            a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return nhwc.permute({0, 3, 1, 2});
}

at::Tensor sparse_conv_transpose2d_cuda(const at::Tensor& values_in, const c10::optional<at::Tensor>& indices_in,
                                        c10::string_view mode_sv, c10::SymIntArrayRef in_shape_sym,
                                        const at::Tensor& weight, const c10::optional<at::Tensor>& bias_in,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef output_padding) {
  const char* op = "sparse_conv_transpose2d_cuda";
  check_cuda(values_in, op, "values");
  check_float_dtype(values_in, op, "values");
  check_same_device(values_in, weight, op, "weight");
  TORCH_CHECK_TYPE(weight.scalar_type() == values_in.scalar_type(), "sparsegen::", op, ": weight dtype ",
                   weight.scalar_type(), " differs from input dtype ", values_in.scalar_type());
  const auto in_shape = C10_AS_INTARRAYREF_SLOW(in_shape_sym);
  ConvArgs a = make_geometry(in_shape, weight.sizes(), stride, padding, op);
  int64_t oph, opw;
  std::tie(oph, opw) = pair_arg(output_padding, op, "output_padding");
  TORCH_CHECK_VALUE(oph >= 0 && opw >= 0 && (oph < a.sh || oph == 0) && (opw < a.sw || opw == 0), "sparsegen::", op,
                    ": output_padding ", output_padding, " must be smaller than stride ", stride);
  a.Ho = (a.H - 1) * a.sh - 2 * a.ph + a.kh + oph;
  a.Wo = (a.W - 1) * a.sw - 2 * a.pw + a.kw + opw;
  TORCH_CHECK_VALUE(a.Ho > 0 && a.Wo > 0, "sparsegen::", op, ": output size ", a.Ho, "x", a.Wo, " is not positive");
  const bool compact = indices_in.has_value() && indices_in->defined();
  if (compact) {
    check_same_device(values_in, *indices_in, op, "indices");
    set_compact(a, values_in, *indices_in, std::string(mode_sv), op);
  } else {
    TORCH_CHECK_VALUE(values_in.dim() == 4 && values_in.sizes() == in_shape, "sparsegen::", op,
                      ": a dense input must have shape in_shape = ", in_shape, ", got ", values_in.sizes());
  }
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = *bias_in;
    check_same_device(values_in, bias, op, "bias");
    TORCH_CHECK_TYPE(bias.scalar_type() == values_in.scalar_type(), "sparsegen::", op, ": bias dtype ",
                     bias.scalar_type(), " differs from input dtype ", values_in.scalar_type());
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == a.Cout, "sparsegen::", op, ": bias must be [Cout] = [",
                      a.Cout, "], got ", bias.sizes());
    bias = bias.contiguous();
  }
  c10::cuda::CUDAGuard guard(values_in.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor indices = compact ? indices_in->contiguous() : at::Tensor();
  if (a.N * a.Cout * a.Ho * a.Wo == 0) return at::empty({a.N, a.Cout, a.Ho, a.Wo}, values.options());

  if (cudnn_path_applies(a, compact)) {
    const at::Tensor x = compact ? decompress_nhwc(values, indices, a) : values_in;
    return at::conv_transpose2d(x, weight, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt,
                                {a.sh, a.sw}, {a.ph, a.pw}, {oph, opw}, 1, {1, 1})
        .contiguous();
  }
  const at::Tensor wp = weight.permute({0, 2, 3, 1}).contiguous();  // [Cin, kh, kw, Cout]
  at::Tensor out = at::empty({a.N, a.Cout, a.Ho, a.Wo}, values.options());

  const bool is_double = values.scalar_type() == at::kDouble;
  const bool gather = compact && a.mode == static_cast<int>(Mode::Channel);
  TORCH_CHECK(!gather || a.N * a.Ho * a.Wo <= std::numeric_limits<int32_t>::max(), "sparsegen::", op,
              ": output too large for the gather kernel");
  const auto acc_opts = values.options().dtype(is_double ? at::kDouble : at::kFloat);
  // The gather kernel writes every accumulator element; the scatter kernels add into zeros.
  at::Tensor acc = gather ? at::empty({a.N, a.Ho, a.Wo, a.Cout}, acc_opts) : at::zeros({a.N, a.Ho, a.Wo, a.Cout}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparsegen_scatter", [&] {
    using acc_t = typename Traits<scalar_t>::acc_t;
    if (compact && a.mode == static_cast<int>(Mode::Channel)) {
      dispatch_index(indices.scalar_type(), [&](auto tag) {
        using index_t = decltype(tag);
        const int threads = a.Cout <= 32 ? 32 : (a.Cout <= 64 ? 64 : 128);
        gather_channel_kernel<scalar_t, acc_t, index_t>
            <<<static_cast<unsigned>(a.N * a.Ho * a.Wo), threads, 0, stream>>>(
                values.const_data_ptr<scalar_t>(), indices.const_data_ptr<index_t>(), wp.const_data_ptr<scalar_t>(),
                acc.mutable_data_ptr<acc_t>(), a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      dispatch_index(indices.scalar_type(), [&](auto tag) {
        using index_t = decltype(tag);
        if (a.entries == 0) return;
        scatter_compact_kernel<scalar_t, acc_t, index_t>
            <<<static_cast<unsigned>(scatter_blocks(a.entries)), 256, 0, stream>>>(
                values.const_data_ptr<scalar_t>(), indices.const_data_ptr<index_t>(), wp.const_data_ptr<scalar_t>(),
                acc.mutable_data_ptr<acc_t>(), a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    const int64_t P = a.Ho * a.Wo;
    const dim3 grid(static_cast<unsigned>(ceil_div(P, 32)), static_cast<unsigned>(ceil_div(a.Cout, 32)),
                    static_cast<unsigned>(a.N));
    finalize_kernel<scalar_t, acc_t><<<grid, dim3(32, 8), 0, stream>>>(
        acc.const_data_ptr<acc_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), P, a.Cout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- backward: input gradient ----------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(256)
    input_grad_kernel(const scalar_t* __restrict__ gout_nhwc, const index_t* __restrict__ indices,
                      const scalar_t* __restrict__ wp, scalar_t* __restrict__ grad_values, ConvArgs a) {
  using T = Traits<scalar_t>;
  using acc_t = typename T::acc_t;
  const int lane = static_cast<int>(lane_id());
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; e < a.entries; e += warps) {
    int64_t n, c, iy, ix;
    entry_position(a, indices, e, n, c, iy, ix);
    acc_t s = 0;
    for (int64_t ky = 0; ky < a.kh; ++ky) {
      const int64_t oy = iy * a.sh - a.ph + ky;
      if (oy < 0 || oy >= a.Ho) continue;
      for (int64_t kx = 0; kx < a.kw; ++kx) {
        const int64_t ox = ix * a.sw - a.pw + kx;
        if (ox < 0 || ox >= a.Wo) continue;
        const scalar_t* wrow = wp + ((c * a.kh + ky) * a.kw + kx) * a.Cout;
        const scalar_t* grow = gout_nhwc + ((n * a.Ho + oy) * a.Wo + ox) * a.Cout;
        for (int64_t o = lane; o < a.Cout; o += 32) s += T::to_acc(grow[o]) * T::to_acc(wrow[o]);
      }
    }
    s = warp_sum(s);
    if (lane == 0) grad_values[e] = T::from_acc(s);
  }
}

at::Tensor sparse_conv_transpose2d_input_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& indices_in,
                                                   c10::string_view mode_sv, c10::SymIntArrayRef in_shape_sym,
                                                   const at::Tensor& weight, at::IntArrayRef stride,
                                                   at::IntArrayRef padding) {
  const char* op = "sparse_conv_transpose2d_input_grad_cuda";
  check_cuda(grad_out_in, op, "grad_out");
  check_float_dtype(grad_out_in, op, "grad_out");
  check_same_device(grad_out_in, weight, op, "weight");
  check_same_device(grad_out_in, indices_in, op, "indices");
  check_index_dtype(indices_in, op);
  TORCH_CHECK_TYPE(weight.scalar_type() == grad_out_in.scalar_type(), "sparsegen::", op, ": weight dtype ",
                   weight.scalar_type(), " differs from grad_out dtype ", grad_out_in.scalar_type());
  const auto in_shape = C10_AS_INTARRAYREF_SLOW(in_shape_sym);
  ConvArgs a = make_geometry(in_shape, weight.sizes(), stride, padding, op);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 4 && grad_out_in.size(0) == a.N && grad_out_in.size(1) == a.Cout,
                    "sparsegen::", op, ": grad_out must be [N, Cout, Ho, Wo] with N = ", a.N, ", Cout = ", a.Cout,
                    ", got ", grad_out_in.sizes());
  a.Ho = grad_out_in.size(2);
  a.Wo = grad_out_in.size(3);
  const Mode mode = parse_mode(std::string(mode_sv));
  const Groups gr = groups_of(mode, a.Cin, a.H, a.W);
  TORCH_CHECK_VALUE(indices_in.dim() == 3 && indices_in.size(0) == a.N && indices_in.size(1) == gr.G, "sparsegen::",
                    op, ": indices must be [N, G, k] = [", a.N, ", ", gr.G, ", k], got ", indices_in.sizes());
  a.mode = static_cast<int>(mode);
  a.G = gr.G;
  a.k = indices_in.size(2);
  a.entries = indices_in.numel();
  c10::cuda::CUDAGuard guard(grad_out_in.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_values = at::empty(indices_in.sizes(), grad_out_in.options());
  if (a.entries == 0) return grad_values;
  if (a.Cout == 0) return grad_values.zero_();
  const at::Tensor indices = indices_in.contiguous();
  if (cudnn_path_applies(a, /*compact=*/true)) {
    // The adjoint of the transposed conv is a strided conv: evaluated densely by cuDNN (tensor cores), then
    // gathered at the surviving entries.
    at::Tensor full = at::conv2d(grad_out_in, weight, c10::nullopt, {a.sh, a.sw}, {a.ph, a.pw});
    full = full.narrow(2, 0, a.H).narrow(3, 0, a.W).contiguous();
    LayoutArgs la{a.mode, a.entries, a.G, a.k, gr.size, a.Cin * a.H * a.W, a.H * a.W};
    launch_layout(full, grad_values, indices, la, /*scatter=*/false);
    return grad_values;
  }
  const at::Tensor gout = grad_out_in.permute({0, 2, 3, 1}).contiguous();  // [N, Ho, Wo, Cout]
  const at::Tensor wp = weight.permute({0, 2, 3, 1}).contiguous();
  dispatch_index(indices.scalar_type(), [&](auto tag) {
    using index_t = decltype(tag);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gout.scalar_type(), "sparsegen_input_grad", [&] {
      input_grad_kernel<scalar_t, index_t><<<static_cast<unsigned>(scatter_blocks(a.entries)), 256, 0, stream>>>(
          gout.const_data_ptr<scalar_t>(), indices.const_data_ptr<index_t>(), wp.const_data_ptr<scalar_t>(),
          grad_values.mutable_data_ptr<scalar_t>(), a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_values;
}

// ---- backward: weight gradient ---------------------------------------------------------------------------
constexpr int kTapChunk = 16;  // taps accumulated in registers per pass over the input

// grid: (Cin, ceil(Cout / blockDim.x), sample chunks); part[chunk, c, tap, o].
template <typename scalar_t>
__global__ void __launch_bounds__(128)
    weight_grad_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ gout_nhwc,
                       typename Traits<scalar_t>::acc_t* __restrict__ part, ConvArgs a, int64_t n_per_chunk) {
  using T = Traits<scalar_t>;
  using acc_t = typename T::acc_t;
  const int64_t c = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.z;
  const int64_t n_begin = chunk * n_per_chunk;
  const int64_t n_end = n_begin + n_per_chunk < a.N ? n_begin + n_per_chunk : a.N;
  const int lane = static_cast<int>(lane_id());
  const int64_t HW = a.H * a.W;
  const int64_t taps = a.kh * a.kw;
  const bool active = o < a.Cout;
  for (int64_t t0 = 0; t0 < taps; t0 += kTapChunk) {
    acc_t acc[kTapChunk];
#pragma unroll
    for (int t = 0; t < kTapChunk; ++t) acc[t] = 0;
    for (int64_t n = n_begin; n < n_end; ++n) {
      const scalar_t* plane = input + (n * a.Cin + c) * HW;
      const scalar_t* gbase = gout_nhwc + n * a.Ho * a.Wo * a.Cout + o;
      for (int64_t p0 = 0; p0 < HW; p0 += 32) {
        const acc_t v = p0 + lane < HW ? T::to_acc(plane[p0 + lane]) : acc_t(0);
        unsigned nz = __ballot_sync(kFullMask, v != acc_t(0));
        while (nz) {
          const int b = __ffs(nz) - 1;
          nz &= nz - 1;
          const acc_t vb = __shfl_sync(kFullMask, v, b);
          if (!active) continue;
          const int64_t p = p0 + b;
          const int64_t iy = p / a.W, ix = p - (p / a.W) * a.W;
#pragma unroll
          for (int t = 0; t < kTapChunk; ++t) {
            const int64_t tap = t0 + t;
            if (tap >= taps) break;
            const int64_t ky = tap / a.kw, kx = tap - (tap / a.kw) * a.kw;
            const int64_t oy = iy * a.sh - a.ph + ky, ox = ix * a.sw - a.pw + kx;
            if (oy < 0 || oy >= a.Ho || ox < 0 || ox >= a.Wo) continue;
            acc[t] += vb * T::to_acc(gbase[(oy * a.Wo + ox) * a.Cout]);
          }
        }
      }
    }
    if (active) {
#pragma unroll
      for (int t = 0; t < kTapChunk; ++t) {
        const int64_t tap = t0 + t;
        if (tap < taps) part[((chunk * a.Cin + c) * taps + tap) * a.Cout + o] = acc[t];
      }
    }
  }
}

at::Tensor sparse_conv_transpose2d_weight_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& values_in,
                                                    const c10::optional<at::Tensor>& indices_in,
                                                    c10::string_view mode_sv, c10::SymIntArrayRef in_shape_sym,
                                                    c10::SymIntArrayRef weight_shape_sym, at::IntArrayRef stride,
                                                    at::IntArrayRef padding) {
  const char* op = "sparse_conv_transpose2d_weight_grad_cuda";
  check_cuda(grad_out_in, op, "grad_out");
  check_float_dtype(grad_out_in, op, "grad_out");
  check_same_device(grad_out_in, values_in, op, "values");
  TORCH_CHECK_TYPE(values_in.scalar_type() == grad_out_in.scalar_type(), "sparsegen::", op, ": values dtype ",
                   values_in.scalar_type(), " differs from grad_out dtype ", grad_out_in.scalar_type());
  const auto in_shape = C10_AS_INTARRAYREF_SLOW(in_shape_sym);
  const auto wshape = C10_AS_INTARRAYREF_SLOW(weight_shape_sym);
  ConvArgs a = make_geometry(in_shape, wshape, stride, padding, op);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 4 && grad_out_in.size(0) == a.N && grad_out_in.size(1) == a.Cout,
                    "sparsegen::", op, ": grad_out must be [N, Cout, Ho, Wo] with N = ", a.N, ", Cout = ", a.Cout,
                    ", got ", grad_out_in.sizes());
  a.Ho = grad_out_in.size(2);
  a.Wo = grad_out_in.size(3);
  c10::cuda::CUDAGuard guard(grad_out_in.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool compact = indices_in.has_value() && indices_in->defined();
  if (compact) {
    check_same_device(grad_out_in, *indices_in, op, "indices");
    set_compact(a, values_in, *indices_in, std::string(mode_sv), op);
  } else {
    TORCH_CHECK_VALUE(values_in.dim() == 4 && values_in.sizes() == in_shape, "sparsegen::", op,
                      ": a dense input must have shape in_shape = ", in_shape, ", got ", values_in.sizes());
  }
  if (a.N == 0 || a.Cin == 0 || a.Cout == 0 || a.H * a.W == 0) {
    return at::zeros(wshape, grad_out_in.options());
  }
  // float64 (gradcheck) keeps the deterministic kernel below: cuDNN's weight-gradient algorithms may sum
  // in a varying order unless torch.backends.cudnn.deterministic is set.
  if (grad_out_in.scalar_type() != at::kDouble && cudnn_path_applies(a, compact)) {
    const int64_t oph = a.Ho - ((a.H - 1) * a.sh - 2 * a.ph + a.kh);
    const int64_t opw = a.Wo - ((a.W - 1) * a.sw - 2 * a.pw + a.kw);
    TORCH_CHECK_VALUE(oph >= 0 && opw >= 0 && (oph < a.sh || oph == 0) && (opw < a.sw || opw == 0), "sparsegen::",
                      op, ": grad_out size ", a.Ho, "x", a.Wo, " does not match a transposed conv of a ", a.H, "x",
                      a.W, " input");
    const at::Tensor x = compact ? decompress_nhwc(values_in.contiguous(), indices_in->contiguous(), a) : values_in;
    // Only the weight's shape and layout matter for its gradient (output_mask selects the weight alone).
    const at::Tensor w_like = at::empty(wshape, grad_out_in.options(), at::MemoryFormat::ChannelsLast);
    auto grads = at::convolution_backward(grad_out_in, x, w_like, c10::nullopt, {a.sh, a.sw}, {a.ph, a.pw}, {1, 1},
                                          /*transposed=*/true, {oph, opw}, 1, {false, true, false});
    return std::get<1>(grads).contiguous();
  }
  const at::Tensor dense = compact ? scatter_to_dense(values_in, *indices_in, static_cast<Mode>(a.mode), a.N, a.Cin,
                                                      a.H, a.W)
                                   : values_in.contiguous();
  const bool is_double = grad_out_in.scalar_type() == at::kDouble;
  const auto acc_dtype = is_double ? at::kDouble : at::kFloat;
  const at::Tensor gout = grad_out_in.permute({0, 2, 3, 1}).contiguous();
  const int threads = a.Cout <= 32 ? 32 : (a.Cout <= 64 ? 64 : 128);
  const int64_t base_blocks = a.Cin * ceil_div(a.Cout, threads);
  const int64_t want = static_cast<int64_t>(num_sms()) * 8;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(a.N, ceil_div(want, base_blocks)));
  const int64_t n_per_chunk = ceil_div(a.N, chunks);
  const int64_t nchunks = ceil_div(a.N, n_per_chunk);
  at::Tensor part = at::empty({nchunks, a.Cin, a.kh, a.kw, a.Cout}, grad_out_in.options().dtype(acc_dtype));
  const dim3 grid(static_cast<unsigned>(a.Cin), static_cast<unsigned>(ceil_div(a.Cout, threads)),
                  static_cast<unsigned>(nchunks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gout.scalar_type(), "sparsegen_weight_grad", [&] {
    using acc_t = typename Traits<scalar_t>::acc_t;
    weight_grad_kernel<scalar_t><<<grid, threads, 0, stream>>>(dense.const_data_ptr<scalar_t>(),
                                                                gout.const_data_ptr<scalar_t>(),
                                                                part.mutable_data_ptr<acc_t>(), a, n_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Fixed-order sum over the sample chunks, then [Cin, kh, kw, Cout] -> [Cin, Cout, kh, kw].
  at::Tensor grad_w = nchunks == 1 ? part.select(0, 0) : part.sum(0);
  return grad_w.permute({0, 3, 1, 2}).to(grad_out_in.scalar_type()).contiguous();
}

}  // namespace
}  // namespace cuda
}  // namespace sparsegen

TORCH_LIBRARY_IMPL(_sparsegen_cuda, CUDA, m) {
  m.impl("sparse_conv_transpose2d", &sparsegen::cuda::sparse_conv_transpose2d_cuda);
  m.impl("sparse_conv_transpose2d_input_grad", &sparsegen::cuda::sparse_conv_transpose2d_input_grad_cuda);
  m.impl("sparse_conv_transpose2d_weight_grad", &sparsegen::cuda::sparse_conv_transpose2d_weight_grad_cuda);
}
