// Device helpers shared by the CUDA kernels of sparsegen: dtype traits (exact pre-activation arithmetic,
// order-preserving keys), warp reductions and argument checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common.h"

namespace sparsegen {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- exact float arithmetic ----------------------------------------------------------------------
// The extension is compiled with --use_fast_math (flush-to-zero). Selection must match the reference
// bit for bit, so the pre-activation add goes through inline PTX without .ftz (IEEE round-to-nearest,
// denormals kept) and ReLU is decided on the sign bit rather than by a (flushing) comparison.
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// ---- dtype traits ----------------------------------------------------------------------------------
// key_t: unsigned integer whose order equals the float order of the value (-0.0 is mapped to +0.0 so
// the two compare equal, every NaN to the largest key, as torch.sort places NaN above +inf).
// acc_t: accumulation type (float for the 16-bit types).
template <typename scalar_t>
struct Traits;

template <>
struct Traits<float> {
  using key_t = uint32_t;
  using acc_t = float;
  static __device__ __forceinline__ float add(float a, float b) { return add_rn(a, b); }
  static __device__ __forceinline__ float relu(float v) {
    const uint32_t u = __float_as_uint(v);
    return ((u & 0x80000000u) && (u & 0x7fffffffu) <= 0x7f800000u) ? 0.0f : v;
  }
  static __device__ __forceinline__ uint32_t to_key(float v) {
    uint32_t u = __float_as_uint(v);
    const uint32_t mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return 0xffffffffu;  // NaN
    if (mag == 0) u = 0;                       // -0.0 -> +0.0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  static __device__ __forceinline__ float from_key(uint32_t k) {
    const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(u);
  }
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};

template <>
struct Traits<double> {
  using key_t = unsigned long long;
  using acc_t = double;
  static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
  static __device__ __forceinline__ double relu(double v) {
    const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v));
    return ((u >> 63) && (u & 0x7fffffffffffffffull) <= 0x7ff0000000000000ull) ? 0.0 : v;
  }
  static __device__ __forceinline__ unsigned long long to_key(double v) {
    unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v));
    const unsigned long long mag = u & 0x7fffffffffffffffull;
    if (mag > 0x7ff0000000000000ull) return ~0ull;
    if (mag == 0) u = 0;
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
  }
  static __device__ __forceinline__ double from_key(unsigned long long k) {
    const unsigned long long u = (k >> 63) ? (k & 0x7fffffffffffffffull) : ~k;
    return __longlong_as_double(static_cast<long long>(u));
  }
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};

// 16-bit floats: the pre-activation is computed as PyTorch does (in float32, one rounding to the
// 16-bit type); keys come from the 16-bit pattern (2 bytes, so the radix select needs 16 passes at most).
template <typename T, uint16_t kInfBits>
struct Traits16 {
  using key_t = uint32_t;  // holds a 16-bit key; 32-bit registers are the natural width
  using acc_t = float;
  static __device__ __forceinline__ uint16_t bits(T v) { return v.x; }
  static __device__ __forceinline__ T from_bits(uint16_t b) {
    T r;
    r.x = b;
    return r;
  }
  static __device__ __forceinline__ T add(T a, T b) {
    return T(add_rn(static_cast<float>(a), static_cast<float>(b)));
  }
  static __device__ __forceinline__ T relu(T v) {
    const uint16_t u = v.x;
    return ((u & 0x8000u) && (u & 0x7fffu) <= kInfBits) ? from_bits(0) : v;
  }
  static __device__ __forceinline__ uint32_t to_key(T v) {
    uint32_t u = v.x;
    const uint32_t mag = u & 0x7fffu;
    if (mag > kInfBits) return 0xffffu;
    if (mag == 0) u = 0;
    return (u & 0x8000u) ? ((~u) & 0xffffu) : (u | 0x8000u);
  }
  static __device__ __forceinline__ T from_key(uint32_t k) {
    const uint32_t u = (k & 0x8000u) ? (k & 0x7fffu) : ((~k) & 0xffffu);
    return from_bits(static_cast<uint16_t>(u));
  }
  static __device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
  static __device__ __forceinline__ T from_acc(float v) { return T(v); }
};

template <>
struct Traits<c10::Half> : Traits16<c10::Half, 0x7c00u> {};
template <>
struct Traits<c10::BFloat16> : Traits16<c10::BFloat16, 0x7f80u> {};

// Significant bits of a key (the radix select walks them from the top).
template <typename scalar_t>
struct KeyBits {
  static constexpr int value = 8 * sizeof(typename Traits<scalar_t>::key_t);
};
template <>
struct KeyBits<c10::Half> {
  static constexpr int value = 16;
};
template <>
struct KeyBits<c10::BFloat16> {
  static constexpr int value = 16;
};

// ---- warp helpers -----------------------------------------------------------------------------------
__device__ __forceinline__ unsigned warp_sum_u32(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(kFullMask, v);
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
#endif
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }
__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Offset of element `i` of group `g` inside one sample, and the channel it belongs to.
struct Elem {
  int64_t off;
  int64_t c;
};
__device__ __forceinline__ Elem group_elem(int mode, int64_t g, int64_t i, int64_t HW) {
  if (mode == static_cast<int>(Mode::Spatial)) return {g * HW + i, g};
  if (mode == static_cast<int>(Mode::Channel)) return {i * HW + g, i};
  return {i, i / HW};
}


// ---- host checks ------------------------------------------------------------------------------------
inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "sparsegen::", op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "sparsegen::", op,
                   ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "sparsegen::", op, ": ", name, " is on ", b.device(),
                    " but the input is on ", a.device());
}

inline void check_index_dtype(const at::Tensor& idx, const char* op) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kShort || idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
                   "sparsegen::", op, ": indices must be int16, int32 or int64, got ", idx.scalar_type());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace cuda
}  // namespace sparsegen
