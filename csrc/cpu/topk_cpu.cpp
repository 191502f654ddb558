// CPU kernels of the fused top-k selection: topk_compact and topk_mask (bias + ReLU + select in one
// pass over x). Semantics: sparsegen_kernels/reference.py (topk_compact_ref, topk_mask_ref).
//
// Work is split over (sample, group) with at::parallel_for; each group's keys go to a per-thread
// buffer, its k-th largest key is found without sorting (topk_impl.h) and the selected entries are
// emitted in ascending index order. Channel mode (groups strided by H*W in memory) reads a tile of
// positions row by row and transposes the keys, so that x is read contiguously.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_utils.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define SPARSEGEN_ISA_IMPL "topk_impl.h"
#include "isa_copies.h"

namespace sparsegen {
namespace cpu {
namespace {

template <typename T>
using Key = typename isa_default::KeyTraits<T>::K;

template <typename T>
struct TopkFns {
  void (*group_keys)(const T*, int64_t, int64_t, const T*, int64_t, bool, Key<T>*);
  void (*tile_keys)(const T*, int64_t, int64_t, int64_t, int64_t, const T*, bool, Key<T>*, Key<T>*);
  void (*select)(const Key<T>*, int64_t, int64_t, Key<T>*, T*, int32_t*);
};

template <typename T>
TopkFns<T> topk_fns() {
#ifdef SPARSEGEN_HAVE_AVX2_COPY
  if (use_avx2())
    return {&isa_avx2::group_keys<T>, &isa_avx2::tile_keys<T>, &isa_avx2::select_topk<T>};
#endif
  return {&isa_default::group_keys<T>, &isa_default::tile_keys<T>, &isa_default::select_topk<T>};
}

// Channel mode: positions per tile (keys tile [P][C] stays within ~256 KiB).
int64_t channel_tile(int64_t C, int64_t HW) {
  int64_t P = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(C, 1));
  return std::min(P, HW);
}

template <typename T, typename IT>
void run_topk(const at::Tensor& x, int64_t k, Mode mode, const T* bias, bool relu, T* values, IT* indices,
              T* dense_out) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t HW = H * W;
  const Groups gr = groups_of(mode, C, H, W);
  const T* xp = x.data_ptr<T>();
  const TopkFns<T> fns = topk_fns<T>();
  const int64_t S = gr.size;

  if (mode == Mode::Channel) {
    const int64_t P = channel_tile(C, HW);
    const int64_t tiles = (HW + P - 1) / P;
    at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<Key<T>> keys(static_cast<size_t>(P * C)), scratch(static_cast<size_t>(std::max(C, 16 * P)));
      std::vector<T> vals(static_cast<size_t>(k + 1));
      std::vector<int32_t> idx(static_cast<size_t>(k + 1));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / tiles, p0 = (t % tiles) * P, np = std::min(P, HW - p0);
        const T* xn = xp + n * C * HW;
        fns.tile_keys(xn, C, HW, p0, np, bias, relu, keys.data(), scratch.data());
        if (dense_out != nullptr) {
          T* on = dense_out + n * C * HW;
          if (np == HW) std::memset(on, 0, sizeof(T) * C * HW);
          else
            for (int64_t c = 0; c < C; ++c) std::memset(on + c * HW + p0, 0, sizeof(T) * np);
        }
        for (int64_t p = 0; p < np; ++p) {
          fns.select(keys.data() + p * C, C, k, scratch.data(), vals.data(), idx.data());
          const int64_t g = p0 + p;
          const int64_t o = (n * HW + g) * k;
          for (int64_t j = 0; j < k; ++j) indices[o + j] = static_cast<IT>(idx[j]);
          if (values != nullptr) std::memcpy(values + o, vals.data(), sizeof(T) * k);
          if (dense_out != nullptr) {
            T* on = dense_out + n * C * HW + g;
            for (int64_t j = 0; j < k; ++j) on[int64_t(idx[j]) * HW] = vals[j];
          }
        }
      }
    });
    return;
  }

  // Spatial (group = one channel of one sample) and global (group = one sample): contiguous groups.
  const int64_t NG = N * gr.G;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1));
  at::parallel_for(0, NG, grain, [&](int64_t begin, int64_t end) {
    std::vector<Key<T>> keys(static_cast<size_t>(S)), scratch(static_cast<size_t>(S));
    std::vector<T> vals(static_cast<size_t>(k + 1));
    std::vector<int32_t> idx(static_cast<size_t>(k + 1));
    for (int64_t t = begin; t < end; ++t) {
      const T* xg = xp + t * S;
      if (mode == Mode::Spatial) fns.group_keys(xg, 1, HW, bias, t % C, relu, keys.data());
      else fns.group_keys(xg, C, HW, bias, 0, relu, keys.data());
      fns.select(keys.data(), S, k, scratch.data(), vals.data(), idx.data());
      const int64_t o = t * k;
      for (int64_t j = 0; j < k; ++j) indices[o + j] = static_cast<IT>(idx[j]);
      if (values != nullptr) std::memcpy(values + o, vals.data(), sizeof(T) * k);
      if (dense_out != nullptr) {
        T* og = dense_out + t * S;
        std::memset(og, 0, sizeof(T) * S);
        for (int64_t j = 0; j < k; ++j) og[idx[j]] = vals[j];
      }
    }
  });
}

// Shared by both ops: checks, allocation, dtype dispatch. Returns (values or dense out, indices).
std::tuple<at::Tensor, at::Tensor> topk_common(const at::Tensor& x_in, int64_t k, const std::string& mode_str,
                                               const c10::optional<at::Tensor>& bias_in, bool relu, bool mask) {
  const char* op = mask ? "topk_mask" : "topk_compact";
  const Mode mode = parse_mode(mode_str);
  TORCH_CHECK_VALUE(x_in.dim() == 4, "sparsegen.", op, ": x must be [N, C, H, W] (4-D), got ", x_in.dim(),
                    "-D tensor of shape ", x_in.sizes());
  check_float_tensor(x_in, "x", op);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const Groups gr = groups_of(mode, C, H, W);
  TORCH_CHECK_VALUE(gr.size <= INT32_MAX, "sparsegen.", op, ": group size ", gr.size, " exceeds 2^31 - 1");
  TORCH_CHECK_VALUE(k >= 1 && k <= gr.size, "sparsegen.", op, ": k = ", k, " is out of range for mode '", mode_str,
                    "' with group size ", gr.size, " (need 1 <= k <= ", gr.size, ")");
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = *bias_in;
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == C, "sparsegen.", op, ": bias must be [C] = [", C,
                      "], got ", bias.sizes());
    TORCH_CHECK_TYPE(bias.scalar_type() == x_in.scalar_type(), "sparsegen.", op, ": bias dtype ",
                     bias.scalar_type(), " differs from x dtype ", x_in.scalar_type());
    TORCH_CHECK_VALUE(bias.device() == x_in.device(), "sparsegen.", op, ": bias is on ", bias.device(),
                      ", x on ", x_in.device());
    bias = bias.contiguous();
  }
  const at::Tensor x = x_in.contiguous();
  const at::ScalarType idt = index_dtype_for(gr.size);
  at::Tensor indices = at::empty({N, gr.G, k}, x.options().dtype(idt));
  at::Tensor first = mask ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({N, gr.G, k}, x.options());
  if (x.numel() == 0) {
    if (mask) first.zero_();
    return {first, indices};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "topk", [&] {
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* vp = mask ? nullptr : first.data_ptr<scalar_t>();
    scalar_t* dp = mask ? first.data_ptr<scalar_t>() : nullptr;
    if (idt == at::kShort) run_topk<scalar_t, int16_t>(x, k, mode, bp, relu, vp, indices.data_ptr<int16_t>(), dp);
    else run_topk<scalar_t, int32_t>(x, k, mode, bp, relu, vp, indices.data_ptr<int32_t>(), dp);
  });
  return {first, indices};
}

std::tuple<at::Tensor, at::Tensor> topk_compact_cpu(const at::Tensor& x, int64_t k, c10::string_view mode,
                                                    const c10::optional<at::Tensor>& bias, bool relu) {
  return topk_common(x, k, std::string(mode), bias, relu, /*mask=*/false);
}

std::tuple<at::Tensor, at::Tensor> topk_mask_cpu(const at::Tensor& x, int64_t k, c10::string_view mode,
                                                 const c10::optional<at::Tensor>& bias, bool relu) {
  return topk_common(x, k, std::string(mode), bias, relu, /*mask=*/true);
}

}  // namespace
}  // namespace cpu
}  // namespace sparsegen

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

TORCH_LIBRARY_IMPL(sparsegen, CPU, m) {
  m.impl("topk_compact", &sparsegen::cpu::topk_compact_cpu);
  m.impl("topk_mask", &sparsegen::cpu::topk_mask_cpu);
}
