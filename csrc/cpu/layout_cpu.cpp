// CPU kernels converting between the compact form (values/indices [N, G, k]) and dense [N, C, H, W]:
// compact_to_dense (scatter into zeros) and compact_gather (read dense at the compact indices).
// Semantics: compact_to_dense_ref / compact_gather_ref in sparsegen_kernels/reference.py.
// An index outside [0, group size) raises ValueError (it is checked, never clamped).
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_utils.h"

namespace sparsegen {
namespace cpu {
namespace {

std::vector<int64_t> shape4(c10::SymIntArrayRef shape, const char* op) {
  TORCH_CHECK_VALUE(shape.size() == 4, "sparsegen.", op, ": shape must be [N, C, H, W], got ", shape.size(),
                    " elements");
  std::vector<int64_t> s(4);
  for (int i = 0; i < 4; ++i) {
    s[i] = shape[i].guard_int(__FILE__, __LINE__);
    TORCH_CHECK_VALUE(s[i] >= 0, "sparsegen.", op, ": negative size in shape ", shape);
  }
  return s;
}

[[noreturn]] void bad_index(const char* op, int64_t v, int64_t size, Mode mode) {
  TORCH_CHECK_VALUE(false, "sparsegen.", op, ": index ", v, " out of range for mode '", mode_name(mode),
                    "' with group size ", size);
}

at::Tensor compact_to_dense_cpu(const at::Tensor& values_in, const at::Tensor& indices_in, c10::string_view mode_str,
                                c10::SymIntArrayRef shape_sym) {
  const char* op = "compact_to_dense";
  const Mode mode = parse_mode(std::string(mode_str));
  const auto s = shape4(shape_sym, op);
  const int64_t N = s[0], C = s[1], H = s[2], W = s[3], HW = H * W;
  check_float_tensor(values_in, "values", op);
  check_index_tensor(indices_in, op);
  check_compact(values_in, indices_in, mode, N, C, H, W, op);
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous();
  at::Tensor out = at::zeros({N, C, H, W}, values.options());
  const Groups gr = groups_of(mode, C, H, W);
  const int64_t k = values.size(2), NG = N * gr.G;
  if (out.numel() == 0 || k == 0) return out;
  const IndexReader idx(indices);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "compact_to_dense", [&] {
    const scalar_t* vp = values.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, NG, std::max<int64_t>(1, 4096 / k), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / gr.G, g = t % gr.G;
        scalar_t* on = op_ + n * C * HW;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t i = idx(t * k + j);
          if (i < 0 || i >= gr.size) bad_index(op, i, gr.size, mode);
          on[element_offset(mode, g, i, HW)] = vp[t * k + j];
        }
      }
    });
  });
  return out;
}

at::Tensor compact_gather_cpu(const at::Tensor& dense, const at::Tensor& indices_in, c10::string_view mode_str) {
  const char* op = "compact_gather";
  const Mode mode = parse_mode(std::string(mode_str));
  TORCH_CHECK_VALUE(dense.dim() == 4, "sparsegen.", op, ": dense must be [N, C, H, W] (4-D), got shape ",
                    dense.sizes());
  check_float_tensor(dense, "dense", op);
  check_index_tensor(indices_in, op);
  const int64_t N = dense.size(0), C = dense.size(1), H = dense.size(2), W = dense.size(3), HW = H * W;
  const Groups gr = groups_of(mode, C, H, W);
  TORCH_CHECK_VALUE(indices_in.dim() == 3 && indices_in.size(0) == N && indices_in.size(1) == gr.G,
                    "sparsegen.", op, ": indices ", indices_in.sizes(), " do not match ", mode_name(mode),
                    " groups of a dense input of shape ", dense.sizes(), " (expected [", N, ", ", gr.G, ", k])");
  const at::Tensor indices = indices_in.contiguous();
  const int64_t k = indices.size(2), NG = N * gr.G;
  at::Tensor out = at::empty({N, gr.G, k}, dense.options());
  if (out.numel() == 0) return out;
  const IndexReader idx(indices);
  // Dense is read through its strides (gradients arriving here are often expanded or transposed).
  const int64_t sn = dense.stride(0), sc = dense.stride(1), sh = dense.stride(2), sw = dense.stride(3);
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "compact_gather", [&] {
    const scalar_t* dp = dense.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, NG, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / gr.G, g = t % gr.G;
        const scalar_t* dn = dp + n * sn;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t i = idx(t * k + j);
          if (i < 0 || i >= gr.size) bad_index(op, i, gr.size, mode);
          int64_t c, p;
          switch (mode) {
            case Mode::Spatial: c = g; p = i; break;
            case Mode::Channel: c = i; p = g; break;
            default: c = i / HW; p = i % HW; break;
          }
          op_[t * k + j] = dn[c * sc + (p / W) * sh + (p % W) * sw];
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace sparsegen

TORCH_LIBRARY_IMPL(sparsegen, CPU, m) {
  m.impl("compact_to_dense", &sparsegen::cpu::compact_to_dense_cpu);
  m.impl("compact_gather", &sparsegen::cpu::compact_gather_cpu);
}
