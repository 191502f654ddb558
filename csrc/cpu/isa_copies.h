// Compiles one kernel header twice: as sparsegen::cpu::isa_default (the baseline ISA) and, with GCC on x86,
// as sparsegen::cpu::isa_avx2 (AVX2 + FMA, with SPARSEGEN_ISA_AVX2 defined inside), defining
// SPARSEGEN_HAVE_AVX2_COPY when the second copy exists; cpu_utils.h's use_avx2() picks one at run time.
// A header whose vectors follow the ISA's width may ask for a third copy, sparsegen::cpu::isa_avx512
// (AVX-512 F/VL/DQ, with SPARSEGEN_ISA_AVX512 defined inside), by defining SPARSEGEN_ISA_WANT_AVX512;
// SPARSEGEN_HAVE_AVX512_COPY then says it exists and use_avx512() picks it.
//
//   #define SPARSEGEN_ISA_IMPL "topk_impl.h"
//   #include "isa_copies.h"
//
// GCC's -Wpsabi note about passing vectors by value is silenced until the including file pops it
// (#pragma GCC diagnostic pop at its end).
#ifndef SPARSEGEN_ISA_IMPL
#error "define SPARSEGEN_ISA_IMPL (the kernel header to compile per ISA) before including isa_copies.h"
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace sparsegen {
namespace cpu {
namespace isa_default {
#include SPARSEGEN_ISA_IMPL
}  // namespace isa_default
}  // namespace cpu
}  // namespace sparsegen

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define SPARSEGEN_HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace sparsegen {
namespace cpu {
namespace isa_avx2 {
#define SPARSEGEN_ISA_AVX2 1
#include SPARSEGEN_ISA_IMPL
#undef SPARSEGEN_ISA_AVX2
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace sparsegen
#pragma GCC pop_options

#ifdef SPARSEGEN_ISA_WANT_AVX512
#define SPARSEGEN_HAVE_AVX512_COPY 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
namespace sparsegen {
namespace cpu {
namespace isa_avx512 {
#define SPARSEGEN_ISA_AVX512 1
#include SPARSEGEN_ISA_IMPL
#undef SPARSEGEN_ISA_AVX512
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace sparsegen
#pragma GCC pop_options
#endif
#endif
