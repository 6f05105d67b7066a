// The ISA paths every kernel file compiles its body for, and how a call picks one.
// Each file includes its body (a .inc) three times: in namespace `generic` with the
// build's baseline flags, in `avx2` under TIERLM_TARGET_AVX2, and in `vnni` under
// TIERLM_TARGET_AVX512_VNNI (quant_gemm.cpp keeps its own scalar loop as `generic`).
#pragma once

#include <cstdint>

namespace tierlm {

enum Isa { SCALAR = 0, AVX2 = 1, AVX512_VNNI = 2 };

bool cpu_has(Isa isa);                           // quant_gemm.cpp: probed with cpuid
void check_isa(int64_t isa, const char* what);   // a clear error for a path this CPU cannot run

}  // namespace tierlm

// Open a region compiled for that path; TIERLM_TARGET_END closes it.
#define TIERLM_TARGET_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define TIERLM_TARGET_AVX512_VNNI \
    _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni\")")
#define TIERLM_TARGET_END _Pragma("GCC pop_options")

// fn(...) from the body compiled for `isa`.
#define TIERLM_DISPATCH(isa, fn, ...)                                      \
    ((isa) == tierlm::AVX512_VNNI ? vnni::fn(__VA_ARGS__)                  \
     : (isa) == tierlm::AVX2      ? avx2::fn(__VA_ARGS__)                  \
                                  : generic::fn(__VA_ARGS__))
