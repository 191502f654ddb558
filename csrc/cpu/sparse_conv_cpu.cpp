// CPU kernels of the sparse transposed convolution:
//   sparse_conv_transpose2d            out = conv_transpose2d(dense(input), weight, bias, ...)
//   sparse_conv_transpose2d_input_grad d out / d values, only at the surviving entries
//   sparse_conv_transpose2d_weight_grad d out / d weight = sum over surviving entries of v * grad window
// Semantics: sparse_conv_transpose2d_ref (F.conv_transpose2d) in sparsegen_kernels/reference.py.
//
// Work is proportional to the surviving (non-zero) entries. The input, compact in any mode or dense
// with zeros, is first regrouped (counting sort) into per-position lists of (channel, value) for the
// forward and the input gradient, or per-channel lists of (position, value) for the weight gradient.
// Forward: for each input position, the partial outputs of a block of taps x 16 output channels stay in
// registers while the position's entries stream past (one broadcast of the value per 12 FMAs), then
// land in a padded channels-last buffer that is transposed to NCHW with the bias at the end. The
// weight is read as W[c, tap, 16 output channels]: where input channels have several entries over the
// batch (>= kPackReuse on average) it is packed once per call to [Cout/16][Cin][taps][16], so that the
// columns of one chunk are one contiguous block that stays in L2 while the chunk is processed for every
// sample; otherwise (the FC layer's channel top-8) it is read in place with the chunks innermost, each
// needed weight row streamed once. Measured on an AVX2 CPU, this input-stationary form runs at the L2
// bandwidth for the weight (one 32-byte load per FMA); a channel-stationary scatter (weights in
// registers, outputs updated in L1) measured no faster (store bound), and leaving the weight unpacked
// is 3x slower (power-of-two strides alias in the caches).
//
// Parallelism and determinism: the forward runs one task per (output-channel chunk, sample), the
// input gradient per (sample, block of input positions), the weight gradient per input channel.
// Every output element is owned by one task and summed in a fixed order, so results are bitwise
// reproducible for any number of threads. Entries whose value is exactly zero are skipped by the
// forward and the weight gradient (so a non-finite weight meeting a zero input does not give NaN
// there, unlike the dense convolution).
//
// Indices outside [0, group size) raise ValueError; they are checked, never clamped.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_utils.h"

namespace sparsegen {
namespace cpu {

// Geometry of one transposed convolution (see sparse_conv_impl.h for the buffer layouts).
struct ConvGeom {
  int64_t N, Cin, H, W;  // input
  int64_t Cout, kh, kw, T;
  int64_t sh, sw, ph, pw;
  int64_t Ho, Wo;    // output
  int64_t Hp, Wp;    // padded output, Ho + 2 ph, Wo + 2 pw
  int64_t Cpad;      // Cout rounded up to a chunk
  int64_t nchunks;   // Cpad / chunk
  int64_t w_chunk, w_cin;  // weight strides (elements) between chunks and between input channels
  bool w_packed;           // taps of one channel are consecutive chunks (woff[t] = t * chunk)
  int64_t cin_block;       // input channels whose weight columns of one chunk are walked together
};

}  // namespace cpu
}  // namespace sparsegen

#define SPARSEGEN_ISA_IMPL "sparse_conv_impl.h"
#define SPARSEGEN_ISA_WANT_AVX512 1
#include "isa_copies.h"

namespace sparsegen {
namespace cpu {
namespace {

// The loops of one compiled copy and its chunk widths (output channels per chunk): the forward takes
// one vector (8 floats with AVX2, 16 with AVX-512), the gradients two.
template <typename T>
struct ConvFns {
  int64_t fwd_vw, grad_vw;
  void (*fwd)(const ConvGeom&, const int64_t*, const int32_t*, const T*, const T*, const T*, const int64_t*,
              const int64_t*, int64_t, int64_t, int64_t, bool, T*, T*);
  void (*igrad)(const ConvGeom&, const int64_t*, const int32_t*, const int64_t*, const T*, const int64_t*, const T*,
                const int64_t*, int64_t, int64_t, int64_t, bool, T*);
  void (*wgrad)(const ConvGeom&, const int64_t*, const int64_t*, const T*, const T*, const int64_t*, int64_t, int64_t,
                T*);
};

// The widest copy the CPU runs (see cpu_utils.h), except that the AVX-512 one is taken only where its
// wider chunk saves vector instructions: Cout above the AVX2 chunk (so a 3-channel output layer keeps
// 8-wide chunks instead of padding 3 channels to 16). forward: the op's chunk is one vector, else two.
template <typename T>
ConvFns<T> conv_fns(int64_t Cout, bool forward) {
#ifdef SPARSEGEN_HAVE_AVX512_COPY
  if (use_avx512() && Cout > (forward ? 1 : 2) * isa_avx2::VecT<T>::L) {
    constexpr int64_t L = isa_avx512::VecT<T>::L;
    return {L, 2 * L, &isa_avx512::fwd_task<T>, &isa_avx512::igrad_task<T>, &isa_avx512::wgrad_task<T>};
  }
#endif
#ifdef SPARSEGEN_HAVE_AVX2_COPY
  if (use_avx2()) {
    constexpr int64_t L = isa_avx2::VecT<T>::L;
    return {L, 2 * L, &isa_avx2::fwd_task<T>, &isa_avx2::igrad_task<T>, &isa_avx2::wgrad_task<T>};
  }
#endif
  constexpr int64_t L = isa_default::VecT<T>::L;
  return {L, 2 * L, &isa_default::fwd_task<T>, &isa_default::igrad_task<T>, &isa_default::wgrad_task<T>};
}

std::vector<int64_t> int4_shape(c10::SymIntArrayRef s, const char* name, const char* op) {
  TORCH_CHECK_VALUE(s.size() == 4, "sparsegen.", op, ": ", name, " must have 4 elements, got ", s.size());
  std::vector<int64_t> v(4);
  for (int i = 0; i < 4; ++i) {
    v[i] = s[i].guard_int(__FILE__, __LINE__);
    TORCH_CHECK_VALUE(v[i] >= 0, "sparsegen.", op, ": negative size in ", name, " ", s);
  }
  return v;
}

// Geometry from the input shape, weight shape, stride, padding and the output size.
ConvGeom make_geom(const std::vector<int64_t>& in, const std::vector<int64_t>& wshape, at::IntArrayRef stride,
                   at::IntArrayRef padding, int64_t Ho, int64_t Wo, int64_t vw, const char* op) {
  ConvGeom g{};
  g.N = in[0];
  g.Cin = in[1];
  g.H = in[2];
  g.W = in[3];
  TORCH_CHECK_VALUE(wshape[0] == g.Cin, "sparsegen.", op, ": weight [Cin, Cout, kh, kw] has Cin = ", wshape[0],
                    " but the input has ", g.Cin, " channels");
  g.Cout = wshape[1];
  g.kh = wshape[2];
  g.kw = wshape[3];
  TORCH_CHECK_VALUE(g.kh >= 1 && g.kw >= 1, "sparsegen.", op, ": empty kernel ", g.kh, "x", g.kw);
  g.T = g.kh * g.kw;
  std::tie(g.sh, g.sw) = pair_arg(stride, "stride", op);
  std::tie(g.ph, g.pw) = pair_arg(padding, "padding", op);
  TORCH_CHECK_VALUE(g.sh >= 1 && g.sw >= 1, "sparsegen.", op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(g.ph >= 0 && g.pw >= 0, "sparsegen.", op, ": padding must be >= 0, got ", padding);
  g.Ho = Ho;
  g.Wo = Wo;
  g.Hp = Ho + 2 * g.ph;
  g.Wp = Wo + 2 * g.pw;
  g.Cpad = (g.Cout + vw - 1) / vw * vw;
  g.nchunks = g.Cpad / vw;
  return g;
}

// Bytes of packed weight columns walked at a time: half of a 512 KiB L2, the rest for the buffers.
constexpr int64_t kWeightBlockBytes = 256 << 10;

// The weight as W[c, t, chunk] = base + chunk * w_chunk + c * w_cin + woff[t] (VW contiguous values).
template <typename T>
struct WeightView {
  at::Tensor holder;  // the packed copy, when one is made
  const T* ptr = nullptr;
  std::vector<int64_t> woff;  // [T]
};

// Read in place when the output channels are contiguous and fill whole chunks and when the weight
// is streamed (few entries per input channel); otherwise pack [nchunks][Cin][T][VW] so that one
// chunk's columns are one contiguous block that stays in cache.
template <typename T>
WeightView<T> weight_view(const at::Tensor& weight, ConvGeom& g, bool packed, int64_t VW) {
  WeightView<T> v;
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1), s2 = weight.stride(2), s3 = weight.stride(3);
  if (!packed && s1 == 1 && g.Cout % VW == 0) {
    v.ptr = weight.data_ptr<T>();
    g.w_packed = false;
    g.cin_block = g.Cin;
    g.w_chunk = VW;
    g.w_cin = s0;
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) v.woff.push_back(i * s2 + j * s3);
    return v;
  }
  v.holder = at::empty({g.nchunks, g.Cin, g.T, VW}, weight.options());
  const T* src = weight.data_ptr<T>();
  T* dst = v.holder.template data_ptr<T>();
  const int64_t kw = g.kw, T_ = g.T, Cin = g.Cin, Cout = g.Cout;
  at::parallel_for(0, g.nchunks * Cin, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t chunk = r / Cin, c = r % Cin;
      T* d = dst + r * T_ * VW;
      const bool whole = s1 == 1 && (chunk + 1) * VW <= Cout;
      for (int64_t t = 0; t < T_; ++t) {
        const T* sp = src + c * s0 + (t / kw) * s2 + (t % kw) * s3 + chunk * VW * s1;
        if (whole) {
          std::memcpy(d + t * VW, sp, sizeof(T) * VW);
          continue;
        }
        for (int64_t jj = 0; jj < VW; ++jj) d[t * VW + jj] = chunk * VW + jj < Cout ? sp[jj * s1] : T(0);
      }
    }
  });
  v.ptr = dst;
  g.w_packed = true;
  g.cin_block = std::max<int64_t>(1, kWeightBlockBytes / (T_ * VW * static_cast<int64_t>(sizeof(T))));
  g.w_chunk = Cin * T_ * VW;
  g.w_cin = T_ * VW;
  for (int64_t t = 0; t < T_; ++t) v.woff.push_back(t * VW);
  return v;
}

// grad_out [N, Cout, Ho, Wo] -> zero-bordered, chunked channels-last [nchunks][N][Hp][Wp][VW].
template <typename T>
at::Tensor pad_grad(const at::Tensor& grad_out, const ConvGeom& g, int64_t VW) {
  at::Tensor gpad = at::empty({g.nchunks, g.N, g.Hp, g.Wp, VW}, grad_out.options());
  const at::Tensor go = grad_out.contiguous();
  const T* src = go.data_ptr<T>();
  T* dst = gpad.data_ptr<T>();
  const int64_t row = g.Wp * VW;
  at::parallel_for(0, g.N * g.Hp, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / g.Hp, hp = r % g.Hp, oh = hp - g.ph;
      for (int64_t chunk = 0; chunk < g.nchunks; ++chunk) {
        T* d = dst + ((chunk * g.N + n) * g.Hp + hp) * row;
        const int64_t nco = std::min<int64_t>(VW, g.Cout - chunk * VW);
        if (oh < 0 || oh >= g.Ho || nco < VW) std::memset(d, 0, sizeof(T) * row);
        if (oh < 0 || oh >= g.Ho) continue;
        std::memset(d, 0, sizeof(T) * g.pw * VW);
        std::memset(d + (g.pw + g.Wo) * VW, 0, sizeof(T) * g.pw * VW);
        for (int64_t jj = 0; jj < nco; ++jj) {
          const T* sr = src + ((n * g.Cout + chunk * VW + jj) * g.Ho + oh) * g.Wo;
          T* dr = d + g.pw * VW + jj;
          for (int64_t ow = 0; ow < g.Wo; ++ow) dr[ow * VW] = sr[ow];
        }
      }
    }
  });
  return gpad;
}

// Offsets of every tap in the padded output buffer [Hp][Wp][VW] (the same in gpad's chunk planes).
std::vector<int64_t> pixel_offsets(const ConvGeom& g, int64_t vw) {
  std::vector<int64_t> o;
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) o.push_back((i * g.Wp + j) * vw);
  return o;
}

// Average number of non-zero entries per input channel over the batch above which the weight is
// packed and walked chunk by chunk (each weight column is then reused from cache).
constexpr int64_t kPackReuse = 4;

// Channel and position of compact entry index i of group g.
inline void decode_entry(Mode mode, int64_t g, int64_t i, int64_t HW, int64_t& c, int64_t& p) {
  switch (mode) {
    case Mode::Spatial: c = g; p = i; break;
    case Mode::Channel: c = i; p = g; break;
    default: c = i / HW; p = i % HW; break;
  }
}

// The input, compact (values [N, G, k] + indices) or dense [N, C, H, W] (indices undefined).
template <typename T>
struct SparseInput {
  const T* val;
  IndexReader idx;
  bool dense;
  Mode mode;
  int64_t G, k, gsize;
  const char* op;

  // Calls f(c, p, v, slot) for every entry of sample n in (group, slot) order -- for a dense input,
  // (channel, position) order. Zero values are skipped when skip_zeros.
  template <typename F>
  void for_each(int64_t n, const ConvGeom& g, bool skip_zeros, F&& f) const {
    const int64_t HW = g.H * g.W;
    if (dense) {
      const T* x = val + n * g.Cin * HW;
      for (int64_t c = 0; c < g.Cin; ++c)
        for (int64_t p = 0; p < HW; ++p) {
          const T v = x[c * HW + p];
          if (v != T(0)) f(c, p, v, (n * g.Cin + c) * HW + p);
        }
      return;
    }
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t base = (n * G + gi) * k;
      for (int64_t j = 0; j < k; ++j) {
        const T v = val[base + j];
        if (skip_zeros && v == T(0)) continue;
        const int64_t i = idx(base + j);
        TORCH_CHECK_VALUE(i >= 0 && i < gsize, "sparsegen.", op, ": index ", i, " out of range for mode '",
                          mode_name(mode), "' with group size ", gsize);
        int64_t c, p;
        decode_entry(mode, gi, i, HW, c, p);
        f(c, p, v, base + j);
      }
    }
  }
};

// Entries grouped by (sample, input position), channels ascending inside a position.
template <typename T>
struct PositionLists {
  std::vector<int64_t> ptr;  // [N*HW + 1]
  std::vector<int32_t> ch;
  std::vector<T> val;
  std::vector<int64_t> slot;  // flat index into [N, G, k] (only filled when asked for)
};

template <typename T>
PositionLists<T> position_lists(const SparseInput<T>& in, const ConvGeom& g, bool skip_zeros, bool want_slot) {
  const int64_t HW = g.H * g.W, NP = g.N * HW;
  PositionLists<T> L;
  L.ptr.assign(static_cast<size_t>(NP + 1), 0);
  int64_t* cnt = L.ptr.data() + 1;
  at::parallel_for(0, g.N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      in.for_each(n, g, skip_zeros, [&](int64_t, int64_t p, T, int64_t) { cnt[n * HW + p]++; });
  });
  for (int64_t i = 0; i < NP; ++i) L.ptr[i + 1] += L.ptr[i];
  const int64_t nnz = L.ptr[NP];
  L.ch.resize(static_cast<size_t>(nnz));
  L.val.resize(static_cast<size_t>(nnz));
  if (want_slot) L.slot.resize(static_cast<size_t>(nnz));
  at::parallel_for(0, g.N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      std::vector<int64_t> cur(L.ptr.begin() + n * HW, L.ptr.begin() + (n + 1) * HW);
      in.for_each(n, g, skip_zeros, [&](int64_t c, int64_t p, T v, int64_t s) {
        const int64_t q = cur[p]++;
        L.ch[q] = static_cast<int32_t>(c);
        L.val[q] = v;
        if (want_slot) L.slot[q] = s;
      });
    }
  });
  return L;
}

// Non-zero entries grouped by input channel, (sample, position) ascending inside a channel; pos is
// the offset of the entry's output window in one chunk plane [N][Hp][Wp][VW] of gpad.
template <typename T>
struct ChannelLists {
  std::vector<int64_t> ptr;  // [Cin + 1]
  std::vector<int64_t> pos;
  std::vector<T> val;
};

template <typename T>
ChannelLists<T> channel_lists(const SparseInput<T>& in, const ConvGeom& g, int64_t vw) {
  const int64_t C = g.Cin;
  std::vector<int64_t> cnt(static_cast<size_t>(g.N * C), 0);  // per (sample, channel)
  at::parallel_for(0, g.N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      in.for_each(n, g, true, [&](int64_t c, int64_t, T, int64_t) { cnt[n * C + c]++; });
  });
  ChannelLists<T> L;
  L.ptr.assign(static_cast<size_t>(C + 1), 0);
  std::vector<int64_t> start(static_cast<size_t>(g.N * C));
  int64_t run = 0;
  for (int64_t c = 0; c < C; ++c) {
    L.ptr[c] = run;
    for (int64_t n = 0; n < g.N; ++n) {
      start[n * C + c] = run;
      run += cnt[n * C + c];
    }
  }
  L.ptr[C] = run;
  L.pos.resize(static_cast<size_t>(run));
  L.val.resize(static_cast<size_t>(run));
  at::parallel_for(0, g.N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      int64_t* cur = start.data() + n * C;
      in.for_each(n, g, true, [&](int64_t c, int64_t p, T v, int64_t) {
        const int64_t q = cur[c]++;
        const int64_t ih = p / g.W, iw = p % g.W;
        L.pos[q] = ((n * g.Hp + ih * g.sh) * g.Wp + iw * g.sw) * vw;
        L.val[q] = v;
      });
    }
  });
  return L;
}

// Checks of the (values, indices, mode, in_shape) input shared by the three ops.
struct InputSpec {
  std::vector<int64_t> shape;  // [N, Cin, H, W]
  bool dense;
  Mode mode;
  at::Tensor values, indices;  // contiguous
};

InputSpec input_spec(const at::Tensor& values, const c10::optional<at::Tensor>& indices, c10::string_view mode_str,
                     c10::SymIntArrayRef in_shape, const char* op) {
  InputSpec s;
  s.shape = int4_shape(in_shape, "in_shape", op);
  s.dense = !(indices.has_value() && indices->defined());
  s.mode = s.dense ? Mode::Spatial : parse_mode(std::string(mode_str));
  check_float_tensor(values, "values", op);
  if (s.dense) {
    TORCH_CHECK_VALUE(values.dim() == 4 && values.sizes() == at::IntArrayRef(s.shape), "sparsegen.", op,
                      ": without indices, values must be the dense input of shape in_shape = ", s.shape, ", got ",
                      values.sizes());
  } else {
    check_index_tensor(*indices, op);
    check_compact(values, *indices, s.mode, s.shape[0], s.shape[1], s.shape[2], s.shape[3], op);
    s.indices = indices->contiguous();
  }
  s.values = values.contiguous();
  return s;
}

template <typename T>
SparseInput<T> sparse_input(const InputSpec& s, const char* op) {
  const Groups gr = groups_of(s.mode, s.shape[1], s.shape[2], s.shape[3]);
  const at::Tensor& idx = s.dense ? s.values : s.indices;  // IndexReader unused for dense
  return SparseInput<T>{s.values.data_ptr<T>(), IndexReader(idx), s.dense, s.mode, gr.G,
                        s.dense ? 0 : s.values.size(2), gr.size, op};
}

void check_weight(const at::Tensor& weight, const at::Tensor& values, const char* op) {
  TORCH_CHECK_VALUE(weight.dim() == 4, "sparsegen.", op, ": weight must be [Cin, Cout, kh, kw], got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == values.scalar_type(), "sparsegen.", op, ": weight dtype ",
                   weight.scalar_type(), " differs from values dtype ", values.scalar_type());
}

at::Tensor sparse_conv_transpose2d_cpu(const at::Tensor& values, const c10::optional<at::Tensor>& indices,
                                       c10::string_view mode, c10::SymIntArrayRef in_shape, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef output_padding) {
  const char* op = "sparse_conv_transpose2d";
  const InputSpec s = input_spec(values, indices, mode, in_shape, op);
  check_weight(weight, values, op);
  const auto wshape = weight.sizes().vec();
  int64_t sh, sw, ph, pw, oph, opw;
  std::tie(sh, sw) = pair_arg(stride, "stride", op);
  std::tie(ph, pw) = pair_arg(padding, "padding", op);
  std::tie(oph, opw) = pair_arg(output_padding, "output_padding", op);
  TORCH_CHECK_VALUE(oph >= 0 && opw >= 0 && oph < std::max<int64_t>(sh, 1) && opw < std::max<int64_t>(sw, 1),
                    "sparsegen.", op, ": output_padding ", output_padding, " must be >= 0 and smaller than stride ",
                    stride);
  const int64_t Ho = (s.shape[2] - 1) * sh - 2 * ph + wshape[2] + oph;
  const int64_t Wo = (s.shape[3] - 1) * sw - 2 * pw + wshape[3] + opw;
  TORCH_CHECK_VALUE(s.shape[2] >= 1 && s.shape[3] >= 1 && Ho >= 1 && Wo >= 1, "sparsegen.", op, ": output size ", Ho,
                    "x", Wo, " (input ", s.shape[2], "x", s.shape[3], ") is empty");
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == wshape[1], "sparsegen.", op, ": bias must be [Cout] = [",
                      wshape[1], "], got ", bias.sizes());
    TORCH_CHECK_TYPE(bias.scalar_type() == values.scalar_type(), "sparsegen.", op, ": bias dtype ",
                     bias.scalar_type(), " differs from values dtype ", values.scalar_type());
  }
  at::Tensor out = at::empty({s.shape[0], wshape[1], Ho, Wo}, s.values.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_conv_transpose2d", [&] {
    using T = scalar_t;
    const ConvFns<T> fns = conv_fns<T>(wshape[1], /*forward=*/true);
    const int64_t VW = fns.fwd_vw;
    ConvGeom g = make_geom(s.shape, wshape, stride, padding, Ho, Wo, VW, op);
    const SparseInput<T> in = sparse_input<T>(s, op);
    const PositionLists<T> L = position_lists<T>(in, g, /*skip_zeros=*/true, /*want_slot=*/false);
    const bool reuse = static_cast<int64_t>(L.ch.size()) >= kPackReuse * std::max<int64_t>(g.Cin, 1);
    const WeightView<T> wv = weight_view<T>(weight, g, reuse, VW);
    const std::vector<int64_t> boff = pixel_offsets(g, VW);
    const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
    T* op_ = out.data_ptr<T>();
    // Reused weight: one task per (chunk, sample), consecutive tasks share the chunk's weight columns.
    // Streamed weight: one task per (sample, group of chunks), chunks innermost; enough groups to keep
    // both threads busy and one task's buffer within ~4 MiB.
    const int64_t plane_bytes = g.Hp * g.Wp * VW * static_cast<int64_t>(sizeof(T));
    const int64_t groups =
        reuse ? g.nchunks
              : std::min<int64_t>(g.nchunks, std::max<int64_t>({int64_t(1), (2 * at::get_num_threads() + g.N - 1) / g.N,
                                                                 g.nchunks * plane_bytes / (int64_t(4) << 20)}));
    const int64_t per = (g.nchunks + groups - 1) / groups;
    at::parallel_for(0, groups * g.N, 1, [&](int64_t b, int64_t e) {
      std::vector<T> buf(static_cast<size_t>(per * g.Hp * g.Wp * VW));
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = reuse ? t % g.N : t / groups, grp = reuse ? t / g.N : t % groups;
        const int64_t c0 = grp * per, c1 = std::min(g.nchunks, c0 + per);
        if (c0 >= c1) continue;
        fns.fwd(g, L.ptr.data(), L.ch.data(), L.val.data(), wv.ptr, bp, wv.woff.data(), boff.data(), n, c0, c1,
                !reuse, buf.data(), op_);
      }
    });
  });
  return out;
}

// Output size of the convolution that produced grad_out; checks it against the input and weight.
void check_grad_out(const at::Tensor& grad_out, const std::vector<int64_t>& in, const std::vector<int64_t>& wshape,
                    at::IntArrayRef stride, at::IntArrayRef padding, const char* op) {
  TORCH_CHECK_VALUE(grad_out.dim() == 4, "sparsegen.", op, ": grad_out must be [N, Cout, Ho, Wo], got shape ",
                    grad_out.sizes());
  int64_t sh, sw, ph, pw;
  std::tie(sh, sw) = pair_arg(stride, "stride", op);
  std::tie(ph, pw) = pair_arg(padding, "padding", op);
  const int64_t Hb = (in[2] - 1) * sh - 2 * ph + wshape[2], Wb = (in[3] - 1) * sw - 2 * pw + wshape[3];
  TORCH_CHECK_VALUE(grad_out.size(0) == in[0] && grad_out.size(1) == wshape[1] && grad_out.size(2) >= Hb &&
                        grad_out.size(3) >= Wb && grad_out.size(2) >= 1 && grad_out.size(3) >= 1,
                    "sparsegen.", op, ": grad_out shape ", grad_out.sizes(), " does not fit input ", in,
                    ", weight ", wshape, ", stride ", stride, ", padding ", padding);
}

at::Tensor sparse_conv_transpose2d_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& indices,
                                                  c10::string_view mode, c10::SymIntArrayRef in_shape,
                                                  const at::Tensor& weight, at::IntArrayRef stride,
                                                  at::IntArrayRef padding) {
  const char* op = "sparse_conv_transpose2d_input_grad";
  check_float_tensor(grad_out, "grad_out", op);
  check_index_tensor(indices, op);
  const Mode md = parse_mode(std::string(mode));
  const auto in = int4_shape(in_shape, "in_shape", op);
  TORCH_CHECK_VALUE(weight.dim() == 4, "sparsegen.", op, ": weight must be [Cin, Cout, kh, kw], got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == grad_out.scalar_type(), "sparsegen.", op, ": weight dtype ",
                   weight.scalar_type(), " differs from grad_out dtype ", grad_out.scalar_type());
  const auto wshape = weight.sizes().vec();
  check_grad_out(grad_out, in, wshape, stride, padding, op);
  // The compact shape is checked with a values stand-in of the indices' shape.
  check_compact(indices, indices, md, in[0], in[1], in[2], in[3], op);
  const at::Tensor idx = indices.contiguous();
  at::Tensor gv = at::zeros(idx.sizes(), grad_out.options());
  if (gv.numel() == 0) return gv;
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "sparse_conv_transpose2d_input_grad", [&] {
    using T = scalar_t;
    const ConvFns<T> fns = conv_fns<T>(wshape[1], /*forward=*/false);
    const int64_t VW = fns.grad_vw;
    ConvGeom g = make_geom(in, wshape, stride, padding, grad_out.size(2), grad_out.size(3), VW, op);
    // Values are not needed: a stand-in of ones makes every entry count (zeros included).
    const Groups gr = groups_of(md, in[1], in[2], in[3]);
    SparseInput<T> sin{nullptr, IndexReader(idx), false, md, gr.G, idx.size(2), gr.size, op};
    std::vector<T> ones(static_cast<size_t>(idx.numel()), T(1));
    sin.val = ones.data();
    const PositionLists<T> L = position_lists<T>(sin, g, /*skip_zeros=*/false, /*want_slot=*/true);
    const bool reuse = static_cast<int64_t>(L.ch.size()) >= kPackReuse * std::max<int64_t>(g.Cin, 1);
    const WeightView<T> wv = weight_view<T>(weight, g, reuse, VW);
    const at::Tensor gpad = pad_grad<T>(grad_out, g, VW);
    const std::vector<int64_t> goff = pixel_offsets(g, VW);
    const int64_t HW = g.H * g.W;
    const int64_t nthreads = at::get_num_threads();
    const int64_t blocks = std::min<int64_t>(HW, std::max<int64_t>(1, (4 * nthreads + g.N - 1) / g.N));
    const int64_t bsize = (HW + blocks - 1) / blocks;
    const T* gp = gpad.data_ptr<T>();
    T* gvp = gv.data_ptr<T>();
    at::parallel_for(0, g.N * blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / blocks, p0 = (t % blocks) * bsize, p1 = std::min(HW, p0 + bsize);
        if (p0 < p1)
          fns.igrad(g, L.ptr.data(), L.ch.data(), L.slot.data(), wv.ptr, wv.woff.data(), gp, goff.data(), n, p0,
                    p1, !reuse, gvp);
      }
    });
  });
  return gv;
}

at::Tensor sparse_conv_transpose2d_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                                   const c10::optional<at::Tensor>& indices, c10::string_view mode,
                                                   c10::SymIntArrayRef in_shape, c10::SymIntArrayRef weight_shape,
                                                   at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "sparse_conv_transpose2d_weight_grad";
  check_float_tensor(grad_out, "grad_out", op);
  const InputSpec s = input_spec(values, indices, mode, in_shape, op);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == values.scalar_type(), "sparsegen.", op, ": grad_out dtype ",
                   grad_out.scalar_type(), " differs from values dtype ", values.scalar_type());
  const auto wshape = int4_shape(weight_shape, "weight_shape", op);
  check_grad_out(grad_out, s.shape, wshape, stride, padding, op);
  at::Tensor dW = at::empty({wshape[0], wshape[1], wshape[2], wshape[3]}, grad_out.options());
  if (dW.numel() == 0) return dW;
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "sparse_conv_transpose2d_weight_grad", [&] {
    using T = scalar_t;
    const ConvFns<T> fns = conv_fns<T>(wshape[1], /*forward=*/false);
    const int64_t VW = fns.grad_vw;
    const ConvGeom g = make_geom(s.shape, wshape, stride, padding, grad_out.size(2), grad_out.size(3), VW, op);
    const SparseInput<T> in = sparse_input<T>(s, op);
    const ChannelLists<T> L = channel_lists<T>(in, g, VW);
    if (L.pos.empty()) {
      dW.zero_();
      return;
    }
    const at::Tensor gpad = pad_grad<T>(grad_out, g, VW);
    const std::vector<int64_t> goff = pixel_offsets(g, VW);
    const T* gp = gpad.data_ptr<T>();
    T* dwp = dW.data_ptr<T>();
    at::parallel_for(0, g.Cin, 1, [&](int64_t b, int64_t e) {
      fns.wgrad(g, L.ptr.data(), L.pos.data(), L.val.data(), gp, goff.data(), b, e, dwp);
    });
  });
  return dW;
}

}  // namespace
}  // namespace cpu
}  // namespace sparsegen

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

TORCH_LIBRARY_IMPL(sparsegen, CPU, m) {
  m.impl("sparse_conv_transpose2d", &sparsegen::cpu::sparse_conv_transpose2d_cpu);
  m.impl("sparse_conv_transpose2d_input_grad", &sparsegen::cpu::sparse_conv_transpose2d_input_grad_cpu);
  m.impl("sparse_conv_transpose2d_weight_grad", &sparsegen::cpu::sparse_conv_transpose2d_weight_grad_cpu);
}
