// CUDA sparse transposed convolution: forward over the surviving entries of a compact activation (or the
// non-zeros of a dense input), the input gradient at the surviving entries only, and the weight gradient.
//
//   out[n, o, oy, ox] = bias[o] + sum_{c, iy, ix, ky, kx} in[n, c, iy, ix] * W[c, o, ky, kx],
//   oy = iy * sh - ph + ky, ox = ix * sw - pw + kx,   W: [Cin, Cout, kh, kw] (ConvTranspose2d layout).
//
// Every kernel reads the weight as Wp = W.permute(0, 2, 3, 1).contiguous() ([Cin, kh, kw, Cout], a no-op
// for the folded upsample weight) so the inner loops run contiguous over Cout.
//
// Forward kernels, chosen in this order:
//   * tensor-core implicit GEMM (float16/bfloat16, the folded 4x4 / stride 2 / padding 1 geometry, Cin and Cout
//     multiples of 8, a dense input or a compact one of density >= 5%): the input is laid out dense NHWC
//     (zeros included) and each of the 4 output phases is a GEMM [pixels x 4*Cin] x [4*Cin x Cout] on WMMA
//     fragments with float32 accumulation (sm_80+). Deterministic.
//   * gather (output-stationary; channel-mode compact input, e.g. the FC layer's channel top-8): one block
//     per output pixel sums its window's surviving (channel, value) pairs. No atomics, deterministic.
//   * scatter (input-stationary; any geometry, spatial/global compact input or a dense input): each
//     surviving entry adds v * Wp[c, ky, kx, :] to its output window with float atomics into an
//     [N, Ho, Wo, Cout] accumulator (float32; float64 for double). The atomics make the summation order,
//     and so the last bits of the result, vary from run to run (not bitwise deterministic).
//   The gather and scatter accumulators are then transposed to NCHW with the bias added and cast.
// Backward:
//   * input gradient: one warp per surviving entry, a dot product of the output-gradient window with the
//     weight over (taps, Cout). Deterministic, nothing computed for pruned entries.
//   * weight gradient: one block per (input channel, Cout tile, sample chunk) walks the input channel's
//     non-zeros (ballot over 32 positions at a time) and accumulates v * grad_out window per tap in
//     registers; the sample chunks are summed in a fixed order. Deterministic, no atomics.
#include <mma.h>
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

// Dense input: one warp per input row (n, c, iy); the row's non-zeros are found 32 at a time by ballot.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256)
    scatter_dense_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ wp, acc_t* __restrict__ acc,
                         ConvArgs a) {
  using T = Traits<scalar_t>;
  const int lane = static_cast<int>(lane_id());
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t rows = a.N * a.Cin * a.H;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
    const int64_t iy = r % a.H;
    const int64_t nc = r / a.H;
    const int64_t c = nc % a.Cin;
    const int64_t n = nc / a.Cin;
    const scalar_t* row = input + r * a.W;
    for (int64_t x0 = 0; x0 < a.W; x0 += 32) {
      const acc_t v = x0 + lane < a.W ? T::to_acc(row[x0 + lane]) : acc_t(0);
      unsigned nz = __ballot_sync(kFullMask, v != acc_t(0));
      while (nz) {
        const int b = __ffs(nz) - 1;
        nz &= nz - 1;
        const acc_t vb = __shfl_sync(kFullMask, v, b);
        scatter_entry<scalar_t, acc_t>(a, wp, acc, n, c, iy, x0 + b, vb, lane);
      }
    }
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

// ---- forward: tensor-core implicit GEMM (folded 4x4, stride 2, padding 1; fp16/bf16) --------------------------
// Output pixel (oy, ox) of phase (ry, rx) = ((oy + 1) % 2, (ox + 1) % 2) reads input rows iy = (oy + 1 - ky) / 2
// for ky in {ry, ry + 2} (and likewise columns): 4 taps x Cin per output pixel, a K = 4 * Cin reduction.
// Per phase this is a GEMM [N * QH * QW pixels, 4 * Cin] x [4 * Cin, Cout]; a block computes kTileM pixels
// (across samples) x kTileN output channels with 8 warps of 32 x 32 WMMA tiles (float32 accumulators),
// the operand tiles double-buffered in shared memory by cp.async. The input arrives as a dense NHWC tensor
// (decompressed from the compact form), the weight as Wp [Cin, 4, 4, Cout]. Needs Cin % 8 == 0, Cout % 8 == 0.
namespace wm = nvcuda::wmma;
constexpr int kTileM = 128;        // output pixels per block
constexpr int kTileN = 64;         // output channels per block
constexpr int kTileK = 32;         // input channels per step
constexpr int kGemmThreads = 256;  // 8 warps: 4 (pixels) x 2 (channels) of 32 x 32
constexpr int kLdA = kTileK + 8;   // padded rows (16 bytes) against bank conflicts
constexpr int kLdB = kTileN + 8;
constexpr int kLdC = kTileN + 4;

template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <typename scalar_t>
__global__ void __launch_bounds__(kGemmThreads)
    folded_gemm_kernel(const scalar_t* __restrict__ in_nhwc, const scalar_t* __restrict__ wp,
                       const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, ConvArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using T = Traits<scalar_t>;
  using mma_t = typename WmmaType<scalar_t>::type;
  constexpr int kABytes = 2 * kTileM * kLdA * 2;
  constexpr int kBBytes = 2 * kTileK * kLdB * 2;
  constexpr int kCBytes = kTileM * kLdC * 4;
  constexpr int kSmem = (kABytes + kBBytes) > kCBytes ? (kABytes + kBBytes) : kCBytes;
  __shared__ __align__(128) unsigned char smem[kSmem];
  auto As = reinterpret_cast<mma_t(*)[kTileM][kLdA]>(smem);            // [2][kTileM][kLdA]
  auto Bs = reinterpret_cast<mma_t(*)[kTileK][kLdB]>(smem + kABytes);  // [2][kTileK][kLdB]
  auto Cs = reinterpret_cast<float(*)[kLdC]>(smem);                    // [kTileM][kLdC], after the main loop

  const int phase = blockIdx.z;
  const int ry = phase / 2, rx = phase % 2;
  const int64_t oy_first = 1 - ry;  // smallest oy with (oy + 1) % 2 == ry
  const int64_t ox_first = 1 - rx;
  const int64_t QH = a.Ho > oy_first ? (a.Ho - oy_first + 1) / 2 : 0;
  const int64_t QW = a.Wo > ox_first ? (a.Wo - ox_first + 1) / 2 : 0;
  const int64_t Q = QH * QW;
  const int64_t M = a.N * Q;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  if (m0 >= M) return;  // block-uniform

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm0 = (warp / 2) * 32, wn0 = (warp % 2) * 32;

  // A rows this thread loads: r = tid / 4 + 64 * h (h = 0, 1), channels cc .. cc + 7 of the step.
  constexpr int kAChunks = kTileK / 8;  // 16-byte chunks per A row
  const int a_cc = (tid % kAChunks) * 8;
  int64_t a_n[2], a_oy[2], a_ox[2];
  bool a_row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t m = m0 + tid / kAChunks + h * (kGemmThreads / kAChunks);
    a_row_ok[h] = m < M;
    const int64_t mm = a_row_ok[h] ? m : 0;
    a_n[h] = Q > 0 ? mm / Q : 0;
    const int64_t q = Q > 0 ? mm - a_n[h] * Q : 0;
    a_oy[h] = oy_first + 2 * (QW > 0 ? q / QW : 0);
    a_ox[h] = ox_first + 2 * (QW > 0 ? q % QW : 0);
  }
  // B: row tid / 8 of the step, columns (tid % 8) * 8 .. + 7.
  const int b_r = tid / (kTileN / 8);
  const int b_cc = (tid % (kTileN / 8)) * 8;

  const mma_t* in_ptr = reinterpret_cast<const mma_t*>(in_nhwc);
  const mma_t* w_ptr = reinterpret_cast<const mma_t*>(wp);
  const int64_t csteps = (a.Cin + kTileK - 1) / kTileK;
  const int64_t steps = 4 * csteps;

  auto load_step = [&](int64_t s, int buf) {
    const int t = static_cast<int>(s / csteps);
    const int64_t c0 = (s - static_cast<int64_t>(t) * csteps) * kTileK;
    const int ky = ry + 2 * (t / 2);
    const int kx = rx + 2 * (t % 2);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = tid / kAChunks + h * (kGemmThreads / kAChunks);
      const int64_t ty = a_oy[h] + a.ph - ky, tx = a_ox[h] + a.pw - kx;  // = 2 * iy, 2 * ix
      const int64_t iy = ty / 2, ix = tx / 2;
      const bool ok = a_row_ok[h] && ty >= 0 && tx >= 0 && iy < a.H && ix < a.W && c0 + a_cc < a.Cin;
      const mma_t* src = ok ? in_ptr + ((a_n[h] * a.H + iy) * a.W + ix) * a.Cin + c0 + a_cc : in_ptr;
      cp_async16(&As[buf][r][a_cc], src, ok);
    }
    const int64_t c = c0 + b_r, o = o0 + b_cc;
    const bool okb = c < a.Cin && o < a.Cout;
    const mma_t* srcb = okb ? w_ptr + ((c * 4 + ky) * 4 + kx) * a.Cout + o : w_ptr;
    cp_async16(&Bs[buf][b_r][b_cc], srcb, okb);
  };

  wm::fragment<wm::accumulator, 16, 16, 16, float> cfrag[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wm::fill_fragment(cfrag[i][j], 0.0f);

  load_step(0, 0);
  cp_async_commit();
  for (int64_t s = 0; s < steps; ++s) {
    const int buf = static_cast<int>(s & 1);
    if (s + 1 < steps) {
      load_step(s + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wm::fragment<wm::matrix_a, 16, 16, 16, mma_t, wm::row_major> af[2];
      wm::fragment<wm::matrix_b, 16, 16, 16, mma_t, wm::row_major> bf[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wm::load_matrix_sync(af[i], &As[buf][wm0 + 16 * i][kk], kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wm::load_matrix_sync(bf[j], &Bs[buf][kk][wn0 + 16 * j], kLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wm::mma_sync(cfrag[i][j], af[i], bf[j], cfrag[i][j]);
    }
    __syncthreads();  // the buffer is refilled by the next step's loads
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wm::store_matrix_sync(&Cs[wm0 + 16 * i][wn0 + 16 * j], cfrag[i][j], kLdC, wm::mem_row_major);
  __syncthreads();
  // NCHW store: consecutive threads take consecutive pixels of one output channel.
  for (int l = tid; l < kTileM * kTileN; l += kGemmThreads) {
    const int r = l % kTileM;
    const int col = l / kTileM;
    const int64_t m = m0 + r, o = o0 + col;
    if (m >= M || o >= a.Cout) continue;
    const int64_t n = m / Q, q = m - (m / Q) * Q;
    const int64_t oy = oy_first + 2 * (q / QW);
    const int64_t ox = ox_first + 2 * (q % QW);
    float v = Cs[r][col];
    if (bias != nullptr) v += T::to_acc(bias[o]);
    out[((n * a.Cout + o) * a.Ho + oy) * a.Wo + ox] = T::from_acc(v);
  }
#endif
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

// The GEMM path reads its operands with 16-byte copies: a view with an odd storage offset is copied.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone();
}

bool gemm_path_applies(const ConvArgs& a, at::ScalarType st, bool compact) {
  if (st != at::kHalf && st != at::kBFloat16) return false;
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;  // WMMA bf16 and cp.async: sm_80+
  if (a.kh != 4 || a.kw != 4 || a.sh != 2 || a.sw != 2 || a.ph != 1 || a.pw != 1) return false;
  if (a.Cin % 8 != 0 || a.Cout % 8 != 0) return false;  // 16-byte operand loads
  if (ceil_div(a.N * ((a.Ho + 1) / 2) * ((a.Wo + 1) / 2), kTileM) > std::numeric_limits<int32_t>::max()) return false;
  if (!compact) return true;
  // Density of the compact input: the GEMM does the dense work, worth it from a few percent on.
  const double density = static_cast<double>(a.entries) / static_cast<double>(std::max<int64_t>(1, a.N * a.Cin * a.H * a.W));
  return density >= 0.05;
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
  const at::Tensor wp = weight.permute({0, 2, 3, 1}).contiguous();  // [Cin, kh, kw, Cout]
  const at::Tensor indices = compact ? indices_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty({a.N, a.Cout, a.Ho, a.Wo}, values.options());
  if (out.numel() == 0) return out;

  if (gemm_path_applies(a, values.scalar_type(), compact)) {
    at::Tensor nhwc;
    if (compact) {
      nhwc = at::zeros({a.N, a.H, a.W, a.Cin}, values.options());
      dispatch_index(indices.scalar_type(), [&](auto tag) {
        using index_t = decltype(tag);
        AT_DISPATCH_REDUCED_FLOATING_TYPES(values.scalar_type(), "sparsegen_to_nhwc", [&] {
          const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(a.entries, 256), num_sms() * 32));
          compact_to_nhwc_kernel<scalar_t, index_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
              values.const_data_ptr<scalar_t>(), indices.const_data_ptr<index_t>(), nhwc.mutable_data_ptr<scalar_t>(),
              a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    } else {
      nhwc = values.permute({0, 2, 3, 1}).contiguous();
    }
    const int64_t QH = (a.Ho + 1) / 2, QW = (a.Wo + 1) / 2;  // the largest phase
    const dim3 grid(static_cast<unsigned>(ceil_div(a.N * QH * QW, kTileM)),
                    static_cast<unsigned>(ceil_div(a.Cout, kTileN)), 4);
    const at::Tensor wp16 = aligned16(wp);
    nhwc = aligned16(nhwc);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(values.scalar_type(), "sparsegen_folded_gemm", [&] {
      folded_gemm_kernel<scalar_t><<<grid, kGemmThreads, 0, stream>>>(
          nhwc.const_data_ptr<scalar_t>(), wp16.const_data_ptr<scalar_t>(),
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

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
    } else if (compact) {
      dispatch_index(indices.scalar_type(), [&](auto tag) {
        using index_t = decltype(tag);
        if (a.entries == 0) return;
        scatter_compact_kernel<scalar_t, acc_t, index_t>
            <<<static_cast<unsigned>(scatter_blocks(a.entries)), 256, 0, stream>>>(
                values.const_data_ptr<scalar_t>(), indices.const_data_ptr<index_t>(), wp.const_data_ptr<scalar_t>(),
                acc.mutable_data_ptr<acc_t>(), a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      const int64_t rows = a.N * a.Cin * a.H;
      if (rows > 0 && a.W > 0) {
        scatter_dense_kernel<scalar_t, acc_t><<<static_cast<unsigned>(scatter_blocks(rows)), 256, 0, stream>>>(
            values.const_data_ptr<scalar_t>(), wp.const_data_ptr<scalar_t>(), acc.mutable_data_ptr<acc_t>(), a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
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
  const at::Tensor gout = grad_out_in.permute({0, 2, 3, 1}).contiguous();  // [N, Ho, Wo, Cout]
  const at::Tensor wp = weight.permute({0, 2, 3, 1}).contiguous();
  const at::Tensor indices = indices_in.contiguous();
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
  at::Tensor dense;
  if (compact) {
    check_same_device(grad_out_in, *indices_in, op, "indices");
    set_compact(a, values_in, *indices_in, std::string(mode_sv), op);
    dense = scatter_to_dense(values_in, *indices_in, static_cast<Mode>(a.mode), a.N, a.Cin, a.H, a.W);
  } else {
    TORCH_CHECK_VALUE(values_in.dim() == 4 && values_in.sizes() == in_shape, "sparsegen::", op,
                      ": a dense input must have shape in_shape = ", in_shape, ", got ", values_in.sizes());
    dense = values_in.contiguous();
  }
  const bool is_double = grad_out_in.scalar_type() == at::kDouble;
  const auto acc_dtype = is_double ? at::kDouble : at::kFloat;
  if (a.N == 0 || a.Cin == 0 || a.Cout == 0 || a.H * a.W == 0) {
    return at::zeros(wshape, grad_out_in.options());
  }
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

TORCH_LIBRARY_IMPL(sparsegen, CUDA, m) {
  m.impl("sparse_conv_transpose2d_cuda", &sparsegen::cuda::sparse_conv_transpose2d_cuda);
  m.impl("sparse_conv_transpose2d_input_grad_cuda", &sparsegen::cuda::sparse_conv_transpose2d_input_grad_cuda);
  m.impl("sparse_conv_transpose2d_weight_grad_cuda", &sparsegen::cuda::sparse_conv_transpose2d_weight_grad_cuda);
}
