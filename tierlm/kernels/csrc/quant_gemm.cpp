// Integer-exact quantized matmul over GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K), CPU.
//
// Numerics (one definition, every path; tierlm/kernels/reference.py is its oracle):
//   activations: each row, per 32-value block b: d = amax / 127, q = nearbyint(x * (1 / d))
//     (int8), s = d * sum(q); d = 0 for an all-zero block.
//   y[m, n] over the blocks b in order, from acc = 0:
//     isum = sum_i qw[n, b, i] * qx[m, b, i]                          exact int32
//     acc  = (acc + (dw[n, b] * dx[m, b]) * float(isum)) [+ mw[n, b] * s[m, b]]
//   fp32 multiplies and adds, each rounded (the file builds with -ffp-contract=off).
// Every (m, n) is computed by that sequence whatever the number of rows, the tiling, the
// thread count or the ISA path: batch invariance by construction.
//
// Weights are repacked at load with 16 output rows interleaved (reference.py `pack`): a
// 512-bit vector holds 4 consecutive codes of each of 16 rows (a 256-bit one, of 8), so one
// broadcast of 4 activation codes feeds 16 outputs at once and no horizontal sums are needed.
//
// Paths: scalar, AVX2 (+FMA, F16C) on 256-bit halves of a group, AVX-512 VNNI on 512 bits. Each SIMD body is
// compiled under its own target pragma; `isa` picks one at run time (the caller may force
// a lower one).

#include <torch/extension.h>

#include "bind.h"
#include "isa.h"
#include "ops.h"
#include "half.h"
#include "pool.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int QK = 32;          // values per block

using tierlm::AVX2;
using tierlm::AVX512_VNNI;
using tierlm::Isa;
using tierlm::SCALAR;
enum Format { FMT_Q4_1 = 0, FMT_Q8_0 = 1, FMT_Q5_0 = 2, FMT_Q4_K = 3, FMT_Q6_K = 4, FMT_Q4_0 = 5, FMT_Q5_1 = 6 };

// ---- activation quantization ----------------------------------------------------------
void quantize_row_scalar(const float* x, int64_t k, int8_t* q, float* d, float* s, int32_t* sq, int32_t* sq16) {
    for (int64_t b = 0; b < k / QK; ++b) {
        const float* xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
        const float db = amax / 127.0f;
        const float id = db != 0.0f ? 1.0f / db : 0.0f;
        int sum = 0, half = 0;
        for (int i = 0; i < QK; ++i) {
            const int v = (int)std::nearbyint(xb[i] * id);
            q[b * QK + i] = (int8_t)v;
            sum += v;
            if (i == 15) half = sum;
        }
        sq16[2 * b] = half;
        sq16[2 * b + 1] = sum - half;
        d[b] = db;
        s[b] = db * (float)sum;
        sq[b] = sum;
    }
}

// ---- scalar path (the definition, spelled out) -----------------------------------------
// Code i of block b of row n (lane l of its group) in the interleaved layout.
template <int F>
inline int32_t code(const uint8_t* blk, const uint8_t* plane, int l, int i) {
    if (F == FMT_Q8_0) return (int8_t)blk[(i >> 2) * 64 + l * 4 + (i & 3)];
    const uint8_t byte = blk[((i & 15) >> 2) * 64 + l * 4 + (i & 3)];
    const int32_t nib = i < 16 ? (byte & 0x0f) : (byte >> 4);
    if (F == FMT_Q4_1 || F == FMT_Q4_K) return nib;
    if (F == FMT_Q4_0) return nib - 8;
    if (F == FMT_Q6_K) {  // top bits: plane c / 2, bits 4 (c % 2) (+ 2 for values 16-31)
        const int c = (i & 15) >> 2;
        const int top = (plane[(c >> 1) * 64 + l * 4 + (i & 3)] >> (4 * (c & 1) + 2 * (i >> 4))) & 3;
        return nib + 16 * top - 32;
    }
    const int bit = (plane[l * 4 + (i & 3)] >> (2 * ((i & 15) >> 2) + (i >> 4))) & 1;
    return F == FMT_Q5_1 ? nib + 16 * bit : nib + 16 * bit - 16;
}

template <int F>
void gemm_scalar(const uint8_t* QS, const uint8_t* HB, const uint8_t* SUB, const uint16_t* D, const uint16_t* MN,
                 int64_t nb, const int8_t* QX, const float* DX, const float* SX, float* Y, int64_t ldy, int64_t M,
                 int64_t N, int64_t g0, int64_t g1) {
    constexpr int64_t BQ = F == FMT_Q8_0 ? 512 : 256;  // code bytes of one block for 16 rows
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = g0 * 16; n < std::min(N, g1 * 16); ++n) {
            const int64_t g = n / 16;
            const int l = (int)(n % 16);
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                const int64_t gb = g * nb + b;
                const int8_t* xb = QX + (m * nb + b) * QK;
                if (F == FMT_Q6_K) {  // two halves of 16 values, each with its int8 scale
                    const float d = f16_to_f32(D[gb / 8 * 16 + l]);
                    for (int hf = 0; hf < 2; ++hf) {
                        int32_t part = 0;
                        for (int i = 16 * hf; i < 16 * hf + 16; ++i)
                            part += code<F>(QS + gb * BQ, HB + gb * 128, l, i) * xb[i];
                        const float dw = d * (float)(int8_t)SUB[gb * 32 + 16 * hf + l];
                        acc = acc + (dw * DX[m * nb + b]) * (float)part;
                    }
                    continue;
                }
                int32_t isum = 0;
                for (int i = 0; i < QK; ++i) isum += code<F>(QS + gb * BQ, HB + gb * 64, l, i) * xb[i];
                if (F == FMT_Q4_K) {
                    const int64_t sb = gb / 8 * 16 + l;
                    const float dw = f16_to_f32(D[sb]) * (float)SUB[gb * 32 + l];
                    const float dm = f16_to_f32(MN[sb]) * (float)SUB[gb * 32 + 16 + l];
                    acc = acc + (dw * DX[m * nb + b]) * (float)isum;
                    acc = acc - dm * SX[m * nb + b];
                    continue;
                }
                acc = acc + (f16_to_f32(D[gb * 16 + l]) * DX[m * nb + b]) * (float)isum;
                if (F == FMT_Q4_1 || F == FMT_Q5_1) acc = acc + f16_to_f32(MN[gb * 16 + l]) * SX[m * nb + b];
            }
            Y[m * ldy + n] = acc;
        }
}

// ---- SIMD paths: one body, compiled per ISA ------------------------------------------------
TIERLM_TARGET_AVX2
namespace avx2 {
#include "gemm_simd.inc"
}  // namespace avx2
TIERLM_TARGET_END

TIERLM_TARGET_AVX512_VNNI
#define TIERLM_VNNI 1
namespace vnni {
#include "gemm_simd.inc"
}  // namespace vnni
#undef TIERLM_VNNI
TIERLM_TARGET_END

// Calls fn with the format as a compile-time constant.
template <typename Fn>
void run_format(int fmt, Fn&& fn) {
    if (fmt == FMT_Q4_1) fn(std::integral_constant<int, FMT_Q4_1>{});
    else if (fmt == FMT_Q8_0) fn(std::integral_constant<int, FMT_Q8_0>{});
    else if (fmt == FMT_Q5_0) fn(std::integral_constant<int, FMT_Q5_0>{});
    else if (fmt == FMT_Q4_K) fn(std::integral_constant<int, FMT_Q4_K>{});
    else if (fmt == FMT_Q4_0) fn(std::integral_constant<int, FMT_Q4_0>{});
    else if (fmt == FMT_Q5_1) fn(std::integral_constant<int, FMT_Q5_1>{});
    else fn(std::integral_constant<int, FMT_Q6_K>{});
}

}  // namespace

namespace tierlm {

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

void check_isa(int64_t isa, const char* what) {
    TORCH_CHECK(isa >= SCALAR && isa <= AVX512_VNNI && cpu_has((Isa)isa), what, ": this CPU cannot run isa ", isa);
}

}  // namespace tierlm

namespace {

using tierlm::cpu_has;
using tierlm::pool;

void set_threads(int64_t threads, int64_t spin_us) {
    TORCH_CHECK(threads >= 1 && threads <= 1024, "set_threads: threads must be 1..1024");
    TORCH_CHECK(spin_us >= 0, "set_threads: spin_us must be >= 0");
    pool().set_spin_us(spin_us);
    if (pool().size() != threads) pool().resize((int)threads);
}

int64_t threads() { return pool().size(); }

// ---- Python-facing ---------------------------------------------------------------------
// x [M, K] -> codes [M, K] int8, scales and d * sum(q) [M, K/32] float32, sum(q) int32,
// and the sums of each 16 codes [M, K/16] int32.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, int64_t isa) {
    tierlm::check_isa(isa, "quantize_rows");
    TORCH_CHECK(x.dim() == 2 && x.size(1) % QK == 0, "quantize_rows: x must be [M, K] with K a multiple of 32");
    x = x.to(torch::kFloat32).contiguous();
    const int64_t M = x.size(0), K = x.size(1), nb = K / QK;
    auto q = torch::empty({M, K}, torch::kInt8);
    auto d = torch::empty({M, nb}, torch::kFloat32);
    auto s = torch::empty({M, nb}, torch::kFloat32);
    auto sq = torch::empty({M, nb}, torch::kInt32);
    auto sq16 = torch::empty({M, 2 * nb}, torch::kInt32);
    const float* xp = x.data_ptr<float>();
    int8_t* qp = q.data_ptr<int8_t>();
    float *dp = d.data_ptr<float>(), *sp = s.data_ptr<float>();
    int32_t *sqp = sq.data_ptr<int32_t>(), *sq16p = sq16.data_ptr<int32_t>();
    pool().run(M, 16, [&](int64_t a, int64_t b) {
        for (int64_t m = a; m < b; ++m) {
            int8_t* qm = qp + m * K;
            float *dm = dp + m * nb, *sm = sp + m * nb;
            int32_t *sqm = sqp + m * nb, *sq16m = sq16p + m * 2 * nb;
            if (isa == AVX512_VNNI) vnni::quantize_row(xp + m * K, K, qm, dm, sm, sqm, sq16m);
            else if (isa == AVX2) avx2::quantize_row(xp + m * K, K, qm, dm, sm, sqm, sq16m);
            else quantize_row_scalar(xp + m * K, K, qm, dm, sm, sqm, sq16m);
        }
    });
    return {q, d, s, sq, sq16};
}

}  // namespace

namespace tierlm {

Part part_of(const torch::Tensor& qs, const torch::Tensor& high, const torch::Tensor& sub, const torch::Tensor& d,
             const torch::Tensor& mins, int64_t n_out, int64_t ggml_type) {
    const int fmt = ggml_type == 3    ? FMT_Q4_1
                    : ggml_type == 2  ? FMT_Q4_0
                    : ggml_type == 7  ? FMT_Q5_1
                    : ggml_type == 8  ? FMT_Q8_0
                    : ggml_type == 6  ? FMT_Q5_0
                    : ggml_type == 12 ? FMT_Q4_K
                    : ggml_type == 14 ? FMT_Q6_K
                                      : -1;
    TORCH_CHECK(fmt >= 0, "gemm: only Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8), Q4_K (12) and Q6_K (14) weights");
    const bool super = fmt == FMT_Q4_K || fmt == FMT_Q6_K;
    const int64_t BQ = fmt == FMT_Q8_0 ? 512 : 256;
    TORCH_CHECK(qs.dtype() == torch::kUInt8 && qs.dim() == 3 && qs.is_contiguous() && qs.size(2) == BQ,
                "gemm: qs must be uint8 [N/16, nb, ", BQ, "]");
    const int64_t groups = qs.size(0), nb = qs.size(1);
    TORCH_CHECK(n_out > (groups - 1) * 16 && n_out <= groups * 16, "gemm: n_out does not match the packed rows");
    const int64_t per_scale = super ? 8 : 1;  // K-quants: d (and dmin) per 8 blocks
    TORCH_CHECK(!super || nb % 8 == 0, "gemm: K-quant rows are whole 256-value super-blocks");
    for (const auto& t : {d, mins})
        TORCH_CHECK(t.dtype() == torch::kFloat16 && t.is_contiguous() && t.numel() == groups * nb / per_scale * 16,
                    "gemm: scales must be float16 [N/16, nb (K-quants: nb / 8), 16]");
    TORCH_CHECK(sub.dtype() == torch::kUInt8 && sub.is_contiguous() && sub.numel() == (super ? groups * nb * 32 : 0),
                "gemm: sub must be uint8 [N/16, nb, 32] for K-quants, empty otherwise");
    const int64_t plane_bytes = (fmt == FMT_Q5_0 || fmt == FMT_Q5_1) ? 64 : fmt == FMT_Q6_K ? 128 : 0;
    TORCH_CHECK(high.dtype() == torch::kUInt8 && high.is_contiguous() && high.numel() == groups * nb * plane_bytes,
                "gemm: high must be uint8 [N/16, nb, 64 (Q5_0, Q5_1) | 128 (Q6_K)], empty otherwise");
    return {qs.data_ptr<uint8_t>(), high.data_ptr<uint8_t>(), sub.data_ptr<uint8_t>(),
            reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
            reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>()), groups, nb, n_out, fmt};
}

std::vector<Part> parts_of(const PartArgs& args) {
    TORCH_CHECK(!args.empty(), "linear: a projection needs at least one packed matrix");
    std::vector<Part> out;
    for (const auto& [qs, high, sub, d, mins, n_out, type] : args) out.push_back(part_of(qs, high, sub, d, mins, n_out, type));
    return out;
}

}  // namespace tierlm

namespace {

using tierlm::Part;
using tierlm::part_of;

struct Acts {  // quantized activations (quantize_rows)
    const int8_t* QX;
    const float *DX, *SX;
    const int32_t *SQ, *SQ16;
    int64_t M, nb;
};

Acts acts_of(const torch::Tensor& qx, const torch::Tensor& dx, const torch::Tensor& sx, const torch::Tensor& sq,
             const torch::Tensor& sq16) {
    TORCH_CHECK(qx.dtype() == torch::kInt8 && qx.dim() == 2 && qx.is_contiguous() && qx.size(1) % QK == 0,
                "gemm: qx must be int8 [M, K]");
    const int64_t M = qx.size(0), nb = qx.size(1) / QK;
    TORCH_CHECK(dx.is_contiguous() && sx.is_contiguous() && sq.is_contiguous() && dx.numel() == M * nb &&
                    sx.numel() == M * nb && sq.numel() == M * nb && sq.dtype() == torch::kInt32,
                "gemm: dx, sx and sq must be [M, K/32]");
    TORCH_CHECK(sq16.dtype() == torch::kInt32 && sq16.is_contiguous() && sq16.numel() == 2 * M * nb,
                "gemm: sq16 must be int32 [M, K/16]");
    return {qx.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>(), sq.data_ptr<int32_t>(),
            sq16.data_ptr<int32_t>(), M, nb};
}

// Groups [g0, g1) of `p` for every row of `x`, into Y (row stride ldy).
void run_groups(const Part& p, const Acts& x, float* Y, int64_t ldy, int64_t g0, int64_t g1, int64_t isa) {
    run_format(p.fmt, [&](auto f) {
        constexpr int F = decltype(f)::value;
        if (isa == AVX512_VNNI) {
            vnni::gemm<F>(p.QS, p.HB, p.SUB, p.D, p.MN, p.nb, x.QX, x.DX, x.SX, x.SQ, x.SQ16, Y, ldy, x.M, p.n_out,
                          g0, g1);
        } else if (isa == AVX2) {
            avx2::gemm<F>(p.QS, p.HB, p.SUB, p.D, p.MN, p.nb, x.QX, x.DX, x.SX, x.SQ, x.SQ16, Y, ldy, x.M, p.n_out,
                          g0, g1);
        } else {
            gemm_scalar<F>(p.QS, p.HB, p.SUB, p.D, p.MN, p.nb, x.QX, x.DX, x.SX, Y, ldy, x.M, p.n_out, g0, g1);
        }
    });
}

// Every part's output columns side by side, [M, sum n_out]. Threads take chunks of 4 groups
// of 16 outputs across all parts: each y[m, n] is computed whole by one thread.
torch::Tensor run_parts(const std::vector<Part>& parts, const Acts& x, int64_t isa) {
    tierlm::check_isa(isa, "gemm");
    int64_t total = 0, groups = 0;
    for (const auto& p : parts) groups += p.groups;
    // Few rows stream the weights once (memory-bound): each thread takes long contiguous
    // runs, which the hardware prefetchers follow; many rows take chunks of 4 groups.
    const int64_t span = x.M <= 8 ? std::max<int64_t>(4, groups / (4 * pool().size())) : 4;
    std::vector<std::array<int64_t, 3>> chunks;  // (part, first group, end group)
    std::vector<int64_t> col;
    for (size_t i = 0; i < parts.size(); ++i) {
        TORCH_CHECK(parts[i].nb == x.nb, "gemm: the activations' K does not match the weight's");
        col.push_back(total);
        total += parts[i].n_out;
        for (int64_t g = 0; g < parts[i].groups; g += span)
            chunks.push_back({(int64_t)i, g, std::min(parts[i].groups, g + span)});
    }
    auto y = torch::empty({x.M, total}, torch::kFloat32);
    float* Y = y.data_ptr<float>();
    pool().run((int64_t)chunks.size(), 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
            const auto [i, g0, g1] = chunks[c];
            run_groups(parts[i], x, Y + col[i], total, g0, g1, isa);
        }
    });
    return y;
}

torch::Tensor gemm(torch::Tensor qx, torch::Tensor dx, torch::Tensor sx, torch::Tensor sq, torch::Tensor sq16,
                   torch::Tensor qs, torch::Tensor high, torch::Tensor sub, torch::Tensor d, torch::Tensor mins,
                   int64_t n_out, int64_t ggml_type, int64_t isa) {
    return run_parts({part_of(qs, high, sub, d, mins, n_out, ggml_type)}, acts_of(qx, dx, sx, sq, sq16), isa);
}

// x (fp32 / bf16 [M, K]) quantized, then every part: one call for a fused projection.
torch::Tensor linear(torch::Tensor x, const tierlm::PartArgs& parts, int64_t isa) {
    return tierlm::linear_parts(x, tierlm::parts_of(parts), isa);
}

// Rows `ids` of a packed matrix as fp32 [T, K] (an embedding lookup on GGUF blocks):
// Q4_1 d * q + m, Q4_K (d * sc) * q - dmin * m, Q6_K (d * sc) * q, others d * q, each
// value one rounding from the file's (half-precision scale) x (integer code).
torch::Tensor dequant_rows(torch::Tensor ids, torch::Tensor qs, torch::Tensor high, torch::Tensor sub,
                           torch::Tensor d, torch::Tensor mins, int64_t n_out, int64_t ggml_type) {
    const Part p = part_of(qs, high, sub, d, mins, n_out, ggml_type);
    TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1, "dequant_rows: ids must be int64 [T]");
    auto idc = ids.contiguous();
    const int64_t* I = idc.data_ptr<int64_t>();
    const int64_t T = ids.size(0), K = p.nb * QK;
    for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(I[t] >= 0 && I[t] < n_out, "dequant_rows: row id ", I[t], " out of range [0, ", n_out, ")");
    auto y = torch::empty({T, K}, torch::kFloat32);
    float* Y = y.data_ptr<float>();
    pool().run(T, 1, [&](int64_t t0, int64_t t1) {
        run_format(p.fmt, [&](auto f) {
            constexpr int F = decltype(f)::value;
            constexpr int64_t BQ = F == FMT_Q8_0 ? 512 : 256;
            for (int64_t t = t0; t < t1; ++t) {
                const int64_t g = I[t] / 16;
                const int l = (int)(I[t] % 16);
                for (int64_t b = 0; b < p.nb; ++b) {
                    const int64_t gb = g * p.nb + b;
                    float* out = Y + t * K + b * QK;
                    for (int i = 0; i < QK; ++i) {
                        const float q = (float)code<F>(p.QS + gb * BQ, p.HB + gb * (F == FMT_Q6_K ? 128 : 64), l, i);
                        if (F == FMT_Q6_K) {
                            out[i] = (f16_to_f32(p.D[gb / 8 * 16 + l]) * (float)(int8_t)p.SUB[gb * 32 + 16 * (i / 16) + l]) * q;
                        } else if (F == FMT_Q4_K) {
                            const int64_t sb = gb / 8 * 16 + l;
                            out[i] = (f16_to_f32(p.D[sb]) * (float)p.SUB[gb * 32 + l]) * q -
                                     f16_to_f32(p.MN[sb]) * (float)p.SUB[gb * 32 + 16 + l];
                        } else if (F == FMT_Q4_1 || F == FMT_Q5_1) {
                            out[i] = f16_to_f32(p.D[gb * 16 + l]) * q + f16_to_f32(p.MN[gb * 16 + l]);
                        } else {
                            out[i] = f16_to_f32(p.D[gb * 16 + l]) * q;
                        }
                    }
                }
            }
        });
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

namespace tierlm {

torch::Tensor linear_parts(const torch::Tensor& x, const std::vector<Part>& parts, int64_t isa) {
    TORCH_CHECK(!parts.empty(), "linear: no parts");
    const auto q = quantize_rows(x, isa);
    return run_parts(parts, acts_of(q[0], q[1], q[2], q[3], q[4]), isa);
}

}  // namespace tierlm

void register_attention(pybind11::module& m);  // attention.cpp
void register_fused(pybind11::module& m);      // fused.cpp
void register_decoder(pybind11::module& m);    // decoder.cpp
void register_lora(pybind11::module& m);       // lora.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "tierlm's CPU kernels: integer-exact quantized matmul over GGUF blocks";
    m.def("quantize_rows", &quantize_rows, "fp32 rows -> (int8 codes, block scales, d * sum(q), sum(q), sums of 16)", tierlm::kNoGil);
    m.def("gemm", &gemm, "quantized activations x row-interleaved GGUF weight blocks -> fp32 [M, N]", tierlm::kNoGil);
    m.def("dequant_rows", &dequant_rows, "rows of a packed matrix as fp32 (embedding lookup on GGUF blocks)", tierlm::kNoGil);
    m.def("linear", &linear, "rows quantized, then every packed part's outputs side by side -> fp32 [M, sum N]", tierlm::kNoGil);
    m.def("set_threads", &set_threads, "size the kernels' worker pool (threads in all, spin before sleeping)", tierlm::kNoGil);
    m.def("threads", &threads, "the kernels' worker pool size");
    m.def("supported_isas", &supported_isas, "ISA paths this CPU runs (0 scalar, 1 avx2, 2 avx512-vnni)");
    register_attention(m);
    register_fused(m);
    register_decoder(m);
    register_lora(m);
}
