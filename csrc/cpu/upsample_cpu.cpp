// CPU kernels of the upsample-conv on the 3x3 weight, for very sparse compact inputs (the FC layer's channel
// top-8 of 3200): out = conv2d(interpolate(dense(input), 2, "nearest"), W3, bias, padding=1), W3 [Cout, Cin, 3, 3].
//
// Folding the whole weight into its stride-2 4x4 form (or packing it in another layout) on every call costs more
// than the convolution when only a few entries survive. These kernels read W3 in its own layout, only the rows of
// the input channels that survive, and never copy it:
//
//   forward   P[n, p, t, o] = sum over the entries (c, v) at input pixel p of v * W3[o, c, t]   (t = 3y + x)
//             out[n, o, oy, ox] = bias[o] + sum_{y, x} P[n, ((oy + y - 1) / 2, (ox + x - 1) / 2), t, o]
//             (taps whose input pixel lies outside the map skipped): 9 * Cout multiply-adds per entry, 9 adds per
//             output. One task per block of output channels (P for the block stays in cache), entries in order.
//   backward  with the window sums of the output gradient
//             Gs[n, i, j, t, o] = sum_{a, b in {0, 1}} grad_out[n, o, 2i + a + 1 - y, 2j + b + 1 - x],
//             input gradient  dv(entry) = sum_{t, o} W3[o, c, t] * Gs[n, p, t, o]   (one task per block of entries)
//             weight gradient dW3[o, c, t] = sum over the entries of channel c of v * Gs[n, p, t, o]
//                             (entries sorted by channel; one task per block of channels; untouched channels 0).
// Every output element is summed by one task in a fixed order: results are bitwise reproducible for any number
// of threads. Entries whose value is zero are skipped by the forward and the weight gradient.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_utils.h"

namespace sparsegen {
namespace cpu {
namespace {

constexpr int64_t kOutBlock = 16;  // output channels per forward task

struct Entries {
  std::vector<int64_t> n, c, p;  // sample, input channel, input pixel (i * W + j) of each entry
};

std::vector<int64_t> shape4(c10::SymIntArrayRef s, const char* op) {
  TORCH_CHECK_VALUE(s.size() == 4, "sparsegen.", op, ": in_shape must be [N, C, H, W], got ", s.size(), " sizes");
  std::vector<int64_t> v(4);
  for (int i = 0; i < 4; ++i) {
    v[i] = s[i].guard_int(__FILE__, __LINE__);
    TORCH_CHECK_VALUE(v[i] >= 0, "sparsegen.", op, ": negative size in in_shape");
  }
  return v;
}

// The arguments every kernel checks alike: the input's shape and mode, and the compact indices (with values).
struct CompactInput {
  int64_t N, Cin, H, W;
  Mode mode;
};

CompactInput check_compact_input(const at::Tensor& values, const at::Tensor& indices, c10::string_view mode_sv,
                                 c10::SymIntArrayRef in_shape_sym, const char* op) {
  check_float_tensor(values, "values", op);
  check_index_tensor(indices, op);
  const auto in = shape4(in_shape_sym, op);
  const CompactInput a{in[0], in[1], in[2], in[3], parse_mode(std::string(mode_sv))};
  check_compact(values, indices, a.mode, a.N, a.Cin, a.H, a.W, op);
  return a;
}

// Location of every compact entry, with its index checked against the group.
Entries locate(const at::Tensor& indices, Mode mode, int64_t N, int64_t C, int64_t H, int64_t W, const char* op) {
  const Groups gr = groups_of(mode, C, H, W);
  const int64_t total = indices.numel(), k = indices.size(2), HW = H * W;
  Entries e;
  e.n.resize(total);
  e.c.resize(total);
  e.p.resize(total);
  const IndexReader idx(indices);
  for (int64_t i = 0; i < total; ++i) {
    const int64_t ng = i / k, n = ng / gr.G, g = ng % gr.G, v = idx(i);
    TORCH_CHECK_VALUE(v >= 0 && v < gr.size, "sparsegen.", op, ": index ", v, " is outside the group of size ",
                      gr.size, " (mode '", mode_name(mode), "')");
    const int64_t off = element_offset(mode, g, v, HW);
    e.n[i] = n;
    e.c[i] = off / HW;
    e.p[i] = off % HW;
  }
  return e;
}

// Gs [N, H, W, 9, Cout] from grad_out [N, Cout, 2H, 2W] (any strides).
template <typename T>
at::Tensor window_sums(const at::Tensor& grad_out, int64_t N, int64_t Cout, int64_t H, int64_t W) {
  const at::Tensor go = grad_out.contiguous();
  at::Tensor gs = at::empty({N, H, W, 9, Cout}, go.options());
  const T* src = go.const_data_ptr<T>();
  T* dst = gs.mutable_data_ptr<T>();
  const int64_t Ho = 2 * H, Wo = 2 * W;
  at::parallel_for(0, N * H * W, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / (H * W), i = (r / W) % H, j = r % W;
      T* row = dst + r * 9 * Cout;
      for (int64_t t = 0; t < 9; ++t) {
        const int64_t y = t / 3, x = t % 3;
        T* d = row + t * Cout;
        for (int64_t o = 0; o < Cout; ++o) d[o] = T(0);
        for (int64_t a = 0; a < 2; ++a) {
          const int64_t oy = 2 * i + a + 1 - y;
          if (oy < 0 || oy >= Ho) continue;
          for (int64_t bb = 0; bb < 2; ++bb) {
            const int64_t ox = 2 * j + bb + 1 - x;
            if (ox < 0 || ox >= Wo) continue;
            const T* s = src + (n * Cout * Ho + oy) * Wo + ox;  // channel o at s[o * Ho * Wo]
            for (int64_t o = 0; o < Cout; ++o) d[o] += s[o * Ho * Wo];
          }
        }
      }
    }
  });
  return gs;
}

template <typename T>
void forward_kernel(const Entries& e, const T* val, const T* w, const T* bias, T* out, int64_t N, int64_t Cin,
                    int64_t Cout, int64_t H, int64_t W) {
  const int64_t HW = H * W, Ho = 2 * H, Wo = 2 * W, total = static_cast<int64_t>(e.c.size());
  const int64_t nblocks = (Cout + kOutBlock - 1) / kOutBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> P(static_cast<size_t>(N * HW * 9 * kOutBlock));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = blk * kOutBlock, nb = std::min<int64_t>(kOutBlock, Cout - o0);
      std::fill(P.begin(), P.end(), T(0));
      for (int64_t i = 0; i < total; ++i) {
        const T v = val[i];
        if (v == T(0)) continue;
        T* prow = P.data() + (e.n[i] * HW + e.p[i]) * 9 * kOutBlock;
        const T* wc = w + (o0 * Cin + e.c[i]) * 9;  // W3[o0, c, :]; the next output channel is Cin * 9 further
        for (int64_t o = 0; o < nb; ++o) {
          const T* wo = wc + o * Cin * 9;
          for (int64_t t = 0; t < 9; ++t) prow[t * kOutBlock + o] += v * wo[t];
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t o = 0; o < nb; ++o) {
          T* plane = out + ((n * Cout) + o0 + o) * Ho * Wo;
          const T b = bias == nullptr ? T(0) : bias[o0 + o];
          for (int64_t oy = 0; oy < Ho; ++oy) {
            for (int64_t ox = 0; ox < Wo; ++ox) {
              T s = b;
              for (int64_t y = 0; y < 3; ++y) {
                const int64_t uy = oy + y - 1;
                if (uy < 0 || uy >= Ho) continue;
                for (int64_t x = 0; x < 3; ++x) {
                  const int64_t ux = ox + x - 1;
                  if (ux < 0 || ux >= Wo) continue;
                  s += P[((n * HW + (uy >> 1) * W + (ux >> 1)) * 9 + 3 * y + x) * kOutBlock + o];
                }
              }
              plane[oy * Wo + ox] = s;
            }
          }
        }
      }
    }
  });
}

at::Tensor upsample_conv_direct_cpu(const at::Tensor& values_in, const at::Tensor& indices_in, c10::string_view mode_sv,
                                    c10::SymIntArrayRef in_shape_sym, const at::Tensor& weight_in,
                                    const c10::optional<at::Tensor>& bias_in) {
  const char* op = "upsample_conv_direct";
  const CompactInput a = check_compact_input(values_in, indices_in, mode_sv, in_shape_sym, op);
  const int64_t N = a.N, Cin = a.Cin, H = a.H, W = a.W;
  const Mode mode = a.mode;
  TORCH_CHECK_VALUE(weight_in.dim() == 4 && weight_in.size(1) == Cin && weight_in.size(2) == 3 &&
                        weight_in.size(3) == 3,
                    "sparsegen.", op, ": weight must be [Cout, ", Cin, ", 3, 3], got ", weight_in.sizes());
  TORCH_CHECK_TYPE(weight_in.scalar_type() == values_in.scalar_type(), "sparsegen.", op, ": weight dtype ",
                   weight_in.scalar_type(), " differs from the input's ", values_in.scalar_type());
  const int64_t Cout = weight_in.size(0);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == Cout, "sparsegen.", op, ": bias must be [", Cout, "]");
    TORCH_CHECK_TYPE(bias.scalar_type() == values_in.scalar_type(), "sparsegen.", op, ": bias dtype differs");
  }
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor out = at::empty({N, Cout, 2 * H, 2 * W}, values.options());
  if (out.numel() == 0) return out;
  const Entries e = locate(indices, mode, N, Cin, H, W, op);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparsegen_upsample_conv_direct", [&] {
    forward_kernel<scalar_t>(e, values.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                             bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                             out.mutable_data_ptr<scalar_t>(), N, Cin, Cout, H, W);
  });
  return out;
}

// grad_out: a float tensor of shape [N, Cout, 2H, 2W] (with shape = false, only its dtype is checked).
void check_grad_out(const at::Tensor& grad_out, int64_t N, int64_t H, int64_t W, const char* op, bool shape = true) {
  check_float_tensor(grad_out, "grad_out", op);
  if (!shape) return;
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == N && grad_out.size(2) == 2 * H &&
                        grad_out.size(3) == 2 * W,
                    "sparsegen.", op, ": grad_out must be [", N, ", Cout, ", 2 * H, ", ", 2 * W, "], got ",
                    grad_out.sizes());
}

at::Tensor upsample_conv_direct_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& indices_in,
                                               c10::string_view mode_sv, c10::SymIntArrayRef in_shape_sym,
                                               const at::Tensor& weight_in) {
  const char* op = "upsample_conv_direct_input_grad";
  check_grad_out(grad_out, 0, 0, 0, op, /*shape=*/false);
  const CompactInput a = check_compact_input(grad_out.new_empty(indices_in.sizes()), indices_in, mode_sv,
                                             in_shape_sym, op);
  const int64_t N = a.N, Cin = a.Cin, H = a.H, W = a.W;
  const Mode mode = a.mode;
  check_grad_out(grad_out, N, H, W, op);
  const int64_t Cout = grad_out.size(1);
  TORCH_CHECK_VALUE(weight_in.dim() == 4 && weight_in.size(0) == Cout && weight_in.size(1) == Cin &&
                        weight_in.size(2) == 3 && weight_in.size(3) == 3,
                    "sparsegen.", op, ": weight must be [", Cout, ", ", Cin, ", 3, 3], got ", weight_in.sizes());
  TORCH_CHECK_TYPE(weight_in.scalar_type() == grad_out.scalar_type(), "sparsegen.", op, ": weight dtype differs");
  const at::Tensor indices = indices_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor dv = at::empty(indices.sizes(), grad_out.options());
  if (dv.numel() == 0) return dv;
  const Entries e = locate(indices, mode, N, Cin, H, W, op);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "sparsegen_upsample_conv_direct_input_grad", [&] {
    const at::Tensor gs = window_sums<scalar_t>(grad_out, N, Cout, H, W);
    const scalar_t* g = gs.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* d = dv.mutable_data_ptr<scalar_t>();
    const int64_t HW = H * W;
    at::parallel_for(0, dv.numel(), 16, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        const scalar_t* grow = g + (e.n[i] * HW + e.p[i]) * 9 * Cout;  // [9, Cout]
        const scalar_t* wc = w + e.c[i] * 9;                            // W3[o, c, t] at wc[o * Cin * 9 + t]
        scalar_t s = 0;
        for (int64_t o = 0; o < Cout; ++o) {
          const scalar_t* wo = wc + o * Cin * 9;
          for (int64_t t = 0; t < 9; ++t) s += wo[t] * grow[t * Cout + o];
        }
        d[i] = s;
      }
    });
  });
  return dv;
}

at::Tensor upsample_conv_direct_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& values_in,
                                                const at::Tensor& indices_in, c10::string_view mode_sv,
                                                c10::SymIntArrayRef in_shape_sym) {
  const char* op = "upsample_conv_direct_weight_grad";
  const CompactInput a = check_compact_input(values_in, indices_in, mode_sv, in_shape_sym, op);
  const int64_t N = a.N, Cin = a.Cin, H = a.H, W = a.W;
  const Mode mode = a.mode;
  check_grad_out(grad_out, N, H, W, op);
  TORCH_CHECK_TYPE(values_in.scalar_type() == grad_out.scalar_type(), "sparsegen.", op, ": values dtype differs");
  const int64_t Cout = grad_out.size(1);
  at::Tensor dw = at::zeros({Cout, Cin, 3, 3}, grad_out.options());
  if (dw.numel() == 0 || values_in.numel() == 0) return dw;
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous();
  const Entries e = locate(indices, mode, N, Cin, H, W, op);
  // Entries by input channel (counting sort, stable: a fixed summation order).
  std::vector<int64_t> start(Cin + 1, 0), order(e.c.size());
  for (int64_t c : e.c) ++start[c + 1];
  for (int64_t c = 0; c < Cin; ++c) start[c + 1] += start[c];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < static_cast<int64_t>(e.c.size()); ++i) order[fill[e.c[i]]++] = i;
  }
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "sparsegen_upsample_conv_direct_weight_grad", [&] {
    const at::Tensor gs = window_sums<scalar_t>(grad_out, N, Cout, H, W);
    const scalar_t* g = gs.const_data_ptr<scalar_t>();
    const scalar_t* val = values.const_data_ptr<scalar_t>();
    scalar_t* d = dw.mutable_data_ptr<scalar_t>();
    const int64_t HW = H * W;
    at::parallel_for(0, Cin, 8, [&](int64_t c0, int64_t c1) {
      std::vector<scalar_t> acc(static_cast<size_t>(9 * Cout));
      for (int64_t c = c0; c < c1; ++c) {
        if (start[c] == start[c + 1]) continue;
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t q = start[c]; q < start[c + 1]; ++q) {
          const int64_t i = order[q];
          const scalar_t v = val[i];
          if (v == scalar_t(0)) continue;
          const scalar_t* grow = g + (e.n[i] * HW + e.p[i]) * 9 * Cout;
          for (int64_t k = 0; k < 9 * Cout; ++k) acc[k] += v * grow[k];
        }
        for (int64_t o = 0; o < Cout; ++o)
          for (int64_t t = 0; t < 9; ++t) d[(o * Cin + c) * 9 + t] = acc[t * Cout + o];
      }
    });
  });
  return dw;
}

}  // namespace
}  // namespace cpu
}  // namespace sparsegen

TORCH_LIBRARY_IMPL(_sparsegen_cpu, CPU, m) {
  m.impl("upsample_conv_direct", &sparsegen::cpu::upsample_conv_direct_cpu);
  m.impl("upsample_conv_direct_input_grad", &sparsegen::cpu::upsample_conv_direct_input_grad_cpu);
  m.impl("upsample_conv_direct_weight_grad", &sparsegen::cpu::upsample_conv_direct_weight_grad_cpu);
}
