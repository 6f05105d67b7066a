// Integer-exact quantized matmul over GGUF blocks (Q4_1, Q8_0), CPU.
//
// Numerics (one definition, every path; tierlm/kernels/reference.py is its oracle):
//   activations: each row, per 32-value block b: d = amax / 127, q = nearbyint(x * (1 / d))
//     (int8), s = d * sum(q); d = 0 for an all-zero block.
//   output y[m, n], weights' blocks b with scale dw (and offset mw for Q4_1):
//     isum_b = sum_i qw[b, i] * qx[m, b, i]            exact int32
//     lane j = b % 8:  acc[j] = (acc[j] + (dw_b * dx_b) * float(isum_b)) [+ mw_b * s_b]
//     y = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7))
//   fp32 multiplies and adds, each rounded (the file builds with -ffp-contract=off).
// Every (m, n) is computed by that sequence whatever the number of rows, the tiling, the
// thread count or the ISA path: batch invariance by construction.
//
// Layouts (tierlm/kernels/reference.py has the details): weights repacked at load to an
// even block count, Q4_1 nibbles as stored, Q8_0 codes and activation codes
// pair-interleaved ([2p lo16, 2p+1 lo16, 2p hi16, 2p+1 hi16]), so each 32-byte load holds
// the same values of two blocks on both sides; activations padded to a multiple of 8
// blocks. Padding blocks are zero: they add +0 to their lane, which changes nothing.
//
// Paths: scalar, AVX2 (+FMA, F16C), AVX-512 VNNI on 256-bit vectors. Each SIMD function
// carries its own target attribute; `isa` picks one at run time (the caller may force a
// lower one).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int QK = 32;          // values per block

enum Isa { SCALAR = 0, AVX2 = 1, AVX512_VNNI = 2 };

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Position of block b's value i in a pair-interleaved row of codes.
inline int64_t at(int64_t b, int i) { return (b >> 1) * 64 + (i >> 4) * 32 + (b & 1) * 16 + (i & 15); }

inline float tree8(const float* a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// ---- activation quantization ----------------------------------------------------------
void quantize_row_scalar(const float* x, int64_t k, int8_t* q, float* d, float* s) {
    for (int64_t b = 0; b < k / QK; ++b) {
        const float* xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
        const float db = amax / 127.0f;
        const float id = db != 0.0f ? 1.0f / db : 0.0f;
        int sum = 0;
        for (int i = 0; i < QK; ++i) {
            const int v = (int)std::nearbyint(xb[i] * id);
            q[at(b, i)] = (int8_t)v;
            sum += v;
        }
        d[b] = db;
        s[b] = db * (float)sum;
    }
}

// ---- scalar path (the definition, spelled out) -----------------------------------------
template <bool Q41>
float dot_scalar(const uint8_t* qs, const uint16_t* D, const uint16_t* MN, int64_t nb, const int8_t* qx,
                 const float* dx, const float* sx) {
    constexpr int64_t BQ = Q41 ? 16 : 32;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t b = 0; b < nb; ++b) {
        int32_t isum = 0;
        if (Q41) {
            const uint8_t* blk = qs + b * BQ;
            for (int i = 0; i < 16; ++i) {
                isum += (int32_t)(blk[i] & 0x0f) * qx[at(b, i)];
                isum += (int32_t)(blk[i] >> 4) * qx[at(b, 16 + i)];
            }
        } else {
            for (int i = 0; i < QK; ++i) isum += (int32_t)((const int8_t*)qs)[at(b, i)] * qx[at(b, i)];
        }
        const int j = (int)(b & 7);
        const float dw = f16_to_f32(D[b]);
        acc[j] = acc[j] + (dw * dx[b]) * (float)isum;
        if (Q41) acc[j] = acc[j] + f16_to_f32(MN[b]) * sx[b];
    }
    return tree8(acc);
}

// ---- SIMD paths: one body, compiled per ISA ------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "gemm_simd.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define TIERLM_VNNI 1
namespace vnni {
#include "gemm_simd.inc"
}  // namespace vnni
#undef TIERLM_VNNI
#pragma GCC pop_options

template <bool Q41>
void gemm_scalar(const uint8_t* QS, const uint16_t* D, const uint16_t* MN, int64_t nb, int64_t nbp,
                 const int8_t* QX, const float* DX, const float* SX, float* Y, int64_t M, int64_t N, int64_t n0,
                 int64_t n1) {
    constexpr int64_t BQ = Q41 ? 16 : 32;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n)
            Y[m * N + n] = dot_scalar<Q41>(QS + n * nb * BQ, D + n * nb, MN + n * nb, nb, QX + m * nbp * QK,
                                           DX + m * nbp, SX + m * nbp);
}

bool cpu_has(Isa isa) {
    __builtin_cpu_init();
    switch (isa) {
        case SCALAR:
            return true;
        case AVX2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        case AVX512_VNNI:
            return cpu_has(AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    }
    return false;
}

// ---- Python-facing ---------------------------------------------------------------------
// x [M, K] -> codes [M, nbp * 32], scales and sums [M, nbp] (zero beyond K).
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, int64_t nbp) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) % QK == 0, "quantize_rows: x must be [M, K] with K a multiple of 32");
    TORCH_CHECK(nbp * QK >= x.size(1) && nbp % 8 == 0, "quantize_rows: nbp must cover K and be a multiple of 8");
    x = x.to(torch::kFloat32).contiguous();
    const int64_t M = x.size(0), K = x.size(1);
    auto q = torch::zeros({M, nbp * QK}, torch::kInt8);
    auto d = torch::zeros({M, nbp}, torch::kFloat32);
    auto s = torch::zeros({M, nbp}, torch::kFloat32);
    const float* xp = x.data_ptr<float>();
    int8_t* qp = q.data_ptr<int8_t>();
    float *dp = d.data_ptr<float>(), *sp = s.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t a, int64_t b) {
        for (int64_t m = a; m < b; ++m)
            quantize_row_scalar(xp + m * K, K, qp + m * nbp * QK, dp + m * nbp, sp + m * nbp);
    });
    return {q, d, s};
}

torch::Tensor gemm(torch::Tensor qx, torch::Tensor dx, torch::Tensor sx, torch::Tensor qs, torch::Tensor d,
                   torch::Tensor mins, int64_t ggml_type, int64_t isa) {
    const bool q41 = ggml_type == 3;
    TORCH_CHECK(q41 || ggml_type == 8, "gemm: only Q4_1 (3) and Q8_0 (8) weights");
    TORCH_CHECK(isa >= SCALAR && isa <= AVX512_VNNI && cpu_has((Isa)isa), "gemm: this CPU cannot run isa ", isa);
    TORCH_CHECK(qs.dtype() == torch::kUInt8 && qs.dim() == 3 && qs.is_contiguous() && qs.size(2) == (q41 ? 16 : 32),
                "gemm: qs must be uint8 [N, nb, 16 | 32]");
    const int64_t N = qs.size(0), nb = qs.size(1), nbp = (nb + 7) / 8 * 8;
    // Scales are loaded 8 at a time, past a row's end: 8 slack values after the last row.
    TORCH_CHECK(d.dtype() == torch::kFloat16 && d.is_contiguous() && d.numel() == N * nb + 8,
                "gemm: d must be float16 [N * nb + 8]");
    TORCH_CHECK(mins.dtype() == torch::kFloat16 && mins.is_contiguous() && mins.numel() == N * nb + 8,
                "gemm: mins must be float16 [N * nb + 8]");
    TORCH_CHECK(qx.dtype() == torch::kInt8 && qx.dim() == 2 && qx.is_contiguous() && qx.size(1) == nbp * QK,
                "gemm: qx must be int8 [M, nbp * 32], nbp = blocks rounded up to a multiple of 8");
    const int64_t M = qx.size(0);
    TORCH_CHECK(dx.is_contiguous() && sx.is_contiguous() && dx.numel() == M * nbp && sx.numel() == M * nbp,
                "gemm: dx and sx must be float32 [M, nbp]");
    auto y = torch::empty({M, N}, torch::kFloat32);
    const uint8_t* QS = qs.data_ptr<uint8_t>();
    const uint16_t* D = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
    const uint16_t* MN = reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>());
    const int8_t* QX = qx.data_ptr<int8_t>();
    const float *DX = dx.data_ptr<float>(), *SX = sx.data_ptr<float>();
    float* Y = y.data_ptr<float>();
    // Threads split the outputs: each y[m, n] is computed whole by one thread.
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        if (isa == AVX512_VNNI) {
            q41 ? vnni::gemm<true>(QS, D, MN, nb, nbp, QX, DX, SX, Y, M, N, n0, n1)
                : vnni::gemm<false>(QS, D, MN, nb, nbp, QX, DX, SX, Y, M, N, n0, n1);
        } else if (isa == AVX2) {
            q41 ? avx2::gemm<true>(QS, D, MN, nb, nbp, QX, DX, SX, Y, M, N, n0, n1)
                : avx2::gemm<false>(QS, D, MN, nb, nbp, QX, DX, SX, Y, M, N, n0, n1);
        } else {
            q41 ? gemm_scalar<true>(QS, D, MN, nb, nbp, QX, DX, SX, Y, M, N, n0, n1)
                : gemm_scalar<false>(QS, D, MN, nb, nbp, QX, DX, SX, Y, M, N, n0, n1);
        }
    });
    return y;
}

std::vector<int64_t> supported_isas() {
    std::vector<int64_t> out;
    for (int i = SCALAR; i <= AVX512_VNNI; ++i)
        if (cpu_has((Isa)i)) out.push_back(i);
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "tierlm's CPU kernels: integer-exact quantized matmul over GGUF blocks";
    m.def("quantize_rows", &quantize_rows, "fp32 rows -> (int8 codes, block scales, block sums)");
    m.def("gemm", &gemm, "quantized activations x repacked GGUF weight blocks -> fp32 [M, N]");
    m.def("supported_isas", &supported_isas, "ISA paths this CPU runs (0 scalar, 1 avx2, 2 avx512-vnni)");
}
