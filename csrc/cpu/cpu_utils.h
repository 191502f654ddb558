// Helpers shared by the CPU kernels: argument checks, instruction-set selection, index readers.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "../common.h"

namespace sparsegen {
namespace cpu {

// The hot loops are compiled for the baseline x86-64 target the extension is built for, with AVX2+FMA
// and (the convolution's) with AVX-512 (csrc/cpu/*_impl.h included under `#pragma GCC target`, see
// isa_copies.h). The widest copy the CPU runs is used. SPARSEGEN_CPU_ISA (read at every call, so tests
// can exercise every copy in one process) caps it: "default" forces the baseline copy, "avx2" the AVX2
// one; "auto" (or unset) picks the best available.
inline bool cpu_supports_avx2_fma() {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

inline bool cpu_supports_avx512() {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_supports_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
  }();
  return ok;
#else
  return false;
#endif
}

inline bool isa_capped_at(const char* name) {
  const char* isa = std::getenv("SPARSEGEN_CPU_ISA");
  return isa != nullptr && std::strcmp(isa, name) == 0;
}

inline bool use_avx2() { return cpu_supports_avx2_fma() && !isa_capped_at("default"); }

inline bool use_avx512() { return cpu_supports_avx512() && !isa_capped_at("default") && !isa_capped_at("avx2"); }

inline void check_float_tensor(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "sparsegen.", op, ": ", what,
                   " must be float32 or float64 on the CPU, got ", t.scalar_type());
}

inline void check_index_tensor(const at::Tensor& t, const char* op) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kShort || st == at::kInt || st == at::kLong, "sparsegen.", op,
                   ": indices must be int16, int32 or int64, got ", st);
}

// (h, w) from an int[] argument of length 1 (both) or 2.
inline std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* name, const char* op) {
  TORCH_CHECK_VALUE(v.size() == 1 || v.size() == 2, "sparsegen.", op, ": ", name,
                    " must have 1 or 2 elements, got ", v.size());
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

// Reads one index of any supported integer dtype.
struct IndexReader {
  const void* ptr;
  at::ScalarType type;
  explicit IndexReader(const at::Tensor& t) : ptr(t.data_ptr()), type(t.scalar_type()) {}
  inline int64_t operator()(int64_t i) const {
    switch (type) {
      case at::kShort: return static_cast<const int16_t*>(ptr)[i];
      case at::kInt: return static_cast<const int32_t*>(ptr)[i];
      default: return static_cast<const int64_t*>(ptr)[i];
    }
  }
};

inline const char* mode_name(Mode m) {
  switch (m) {
    case Mode::Spatial: return "spatial";
    case Mode::Channel: return "channel";
    default: return "global";
  }
}

// Checks a compact pair values/indices [N, G, k] against in_shape [N, C, H, W] and mode.
inline void check_compact(const at::Tensor& values, const at::Tensor& indices, Mode mode, int64_t N, int64_t C,
                          int64_t H, int64_t W, const char* op) {
  TORCH_CHECK_VALUE(values.dim() == 3, "sparsegen.", op, ": values must be [N, G, k], got ", values.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), "sparsegen.", op, ": indices shape ", indices.sizes(),
                    " differs from values shape ", values.sizes());
  const Groups gr = groups_of(mode, C, H, W);
  TORCH_CHECK_VALUE(values.size(0) == N && values.size(1) == gr.G, "sparsegen.", op, ": values ", values.sizes(),
                    " do not match ", mode_name(mode), " groups of an input of shape [", N, ", ", C, ", ", H, ", ",
                    W, "] (expected [", N, ", ", gr.G, ", k])");
  TORCH_CHECK_VALUE(values.size(2) <= gr.size, "sparsegen.", op, ": k = ", values.size(2),
                    " exceeds the group size ", gr.size, " of mode '", mode_name(mode), "'");
}

}  // namespace cpu
}  // namespace sparsegen
