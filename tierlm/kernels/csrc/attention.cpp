// Paged attention with one fixed arithmetic per query row, CPU.
//
// Numerics (every path computes these bits; tierlm/kernels/reference.py `attention` is the
// PyTorch oracle to rounding): for query row t of head h, at position p in its sequence,
// keys run from lo = max(0, p - window + 1) (0 without a window) to p, in chunks of 16
// positions aligned at absolute position 0, ascending. Per chunk:
//   s_j  = (sum_i q_i k_ji, i ascending) * scale            for the chunk's keys j in [lo, p]
//   m'   = max(m, max_j s_j);  a = exp(m - m');  e_j = exp(s_j - m')
//   l    = l * a + tree16(e)   (a fixed pairwise tree over the 16 lanes; masked lanes 0)
//   acc  = acc * a, then acc += e_j v_j for j ascending
// and out = acc / l. exp is the polynomial in vmath.inc. A row's result thus
// depends on its own query, position and keys only: never on the rows batched with it,
// how a prompt is chunked, the thread count or the ISA path.
//
// Cache layout (kernel-run models only): K [blocks, kv_heads, head_dim, block_size], a
// block's keys transposed so a chunk's 16 keys of one dimension are contiguous; V
// [blocks, block_size, kv_heads, head_dim]. block_size is a multiple of 16.

#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bind.h"
#include "isa.h"
#include "ops.h"
#include "pool.h"

namespace {

constexpr int CHUNK = 16;

struct Args {
    const void *q, *k_cache, *v_cache;
    void* out;
    const int32_t *tables, *seq;
    const int64_t* pos;
    int64_t H, Hkv, D, BS, MB, window;
    float scale;
    bool q_bf16, kv_bf16;
};

// rope_attention's first stage (attention_body.inc `prep_token`).
struct PrepArgs {
    const float *qkv, *cos, *sin, *qn, *kn;
    float* qbuf;
    void *k_cache, *v_cache;
    const int32_t *tables, *seq;
    const int64_t* pos;
    int64_t H, Hkv, D, BS, MB;
    float eps;
    bool kv_bf16;
};

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) {  // bf16 bits
    const uint32_t b = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
template <typename Q>
inline Q from_f32(float v);
template <>
inline float from_f32<float>(float v) { return v; }
template <>
inline uint16_t from_f32<uint16_t>(float v) {  // round to nearest even, as torch's .to(bfloat16)
    uint32_t b;
    std::memcpy(&b, &v, 4);
    if ((b & 0x7fffffff) > 0x7f800000) return (uint16_t)((b >> 16) | 0x40);  // NaN stays NaN
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

namespace generic {
#include "attention_body.inc"
}  // namespace generic

TIERLM_TARGET_AVX2
namespace avx2 {
#define TIERLM_SIMD
#include "attention_body.inc"
#undef TIERLM_SIMD
}  // namespace avx2
TIERLM_TARGET_END

TIERLM_TARGET_AVX512_VNNI
namespace vnni {
#define TIERLM_SIMD
#define TIERLM_AVX512
#include "attention_body.inc"
#undef TIERLM_AVX512
#undef TIERLM_SIMD
}  // namespace vnni
TIERLM_TARGET_END

bool is_bf16(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16; }

// q [T, H, D] (fp32/bf16); caches as above; tables int32 [S, max blocks]; seq int32 [T]
// (each token's row in tables); pos int64 [T]. A sequence's tokens are consecutive rows
// with ascending positions. Returns [T, H * D] in q's dtype.
torch::Tensor attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                        torch::Tensor seq, torch::Tensor pos, int64_t window, double scale, int64_t isa) {
    tierlm::check_isa(isa, "attention");
    TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "attention: q must be contiguous [T, H, D]");
    TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
                "attention: caches must be contiguous 4-D");
    const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1), BS = k_cache.size(3);
    TORCH_CHECK(k_cache.size(2) == D && v_cache.size(1) == BS && v_cache.size(2) == Hkv && v_cache.size(3) == D,
                "attention: K must be [blocks, kv_heads, D, block_size] and V [blocks, block_size, kv_heads, D]");
    TORCH_CHECK(H % Hkv == 0 && BS % CHUNK == 0, "attention: heads a multiple of kv_heads, block_size of 16");
    TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                    (is_bf16(k_cache) || k_cache.scalar_type() == torch::kFloat32),
                "attention: caches must both be float32 or bfloat16");
    TORCH_CHECK(is_bf16(q) || q.scalar_type() == torch::kFloat32, "attention: q must be float32 or bfloat16");
    TORCH_CHECK(tables.scalar_type() == torch::kInt32 && tables.dim() == 2 && tables.is_contiguous(),
                "attention: tables must be int32 [S, max_blocks]");
    TORCH_CHECK(seq.scalar_type() == torch::kInt32 && seq.numel() == T && pos.scalar_type() == torch::kInt64 &&
                    pos.numel() == T && seq.is_contiguous() && pos.is_contiguous(),
                "attention: seq (int32) and pos (int64) must have one entry per token");
    auto out = torch::empty({T, H * D}, q.options());
    Args a{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), tables.data_ptr<int32_t>(),
           seq.data_ptr<int32_t>(), pos.data_ptr<int64_t>(), H, Hkv, D, BS, tables.size(1), window,
           (float)scale, is_bf16(q), is_bf16(k_cache)};
    const int32_t* sq = a.seq;
    const int64_t* ps = a.pos;
    for (int64_t t = 0; t < T; ++t) {
        TORCH_CHECK(sq[t] >= 0 && sq[t] < tables.size(0) && ps[t] >= 0 && ps[t] / BS < tables.size(1),
                    "attention: token ", t, " has no block for its position");
        TORCH_CHECK(t == 0 || sq[t] != sq[t - 1] || ps[t] == ps[t - 1] + 1,
                    "attention: a sequence's tokens must be consecutive positions");
    }
    // Items: up to 8 consecutive rows of one sequence x one KV head (any split gives the same bits).
    std::vector<std::pair<int64_t, int64_t>> tiles;
    for (int64_t t = 0; t < T;) {
        int64_t e = t + 1;
        while (e < T && e - t < 8 && sq[e] == sq[t]) ++e;
        tiles.emplace_back(t, e);
        t = e;
    }
    tierlm::pool().run((int64_t)tiles.size() * Hkv, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            const auto [t0, t1] = tiles[i / Hkv];
            // The SIMD bodies take whole 16-lane slices of head_dim (same bits as generic).
            TIERLM_DISPATCH(D % 16 == 0 ? isa : tierlm::SCALAR, run, a, t0, t1, i % Hkv);
        }
    });
    return out;
}

}  // namespace

namespace tierlm {

// The attention sub-layer after the q/k/v projection, in one call: per token, q-norm and
// k-norm (when given, fp32 [D] effective weights), RoPE (fp32 cos/sin tables [positions,
// D], rotate-half), K/V written at the token's slot; then `attention` over fp32 queries.
// qkv fp32 [T, (H + 2 * kv_heads) * D]; returns fp32 [T, H * D].
torch::Tensor rope_attention(torch::Tensor qkv, int64_t H, torch::Tensor cos, torch::Tensor sin,
                             c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, double eps,
                             torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables, torch::Tensor seq,
                             torch::Tensor pos, int64_t window, double scale, int64_t isa) {
    tierlm::check_isa(isa, "rope_attention");
    const int64_t T = qkv.size(0), Hkv = k_cache.size(1), D = k_cache.size(2);
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous() && qkv.dim() == 2 &&
                    qkv.size(1) == (H + 2 * Hkv) * D,
                "rope_attention: qkv must be contiguous fp32 [T, (H + 2 * kv_heads) * D]");
    TORCH_CHECK(D <= 512 && D % 2 == 0, "rope_attention: head_dim must be even and <= 512");
    TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.size(1) == D && sin.sizes() == cos.sizes(),
                "rope_attention: cos/sin must be contiguous fp32 [positions, head_dim]");
    for (const auto& n : {q_norm, k_norm})
        TORCH_CHECK(!n || (n->scalar_type() == torch::kFloat32 && n->is_contiguous() && n->numel() == D),
                    "rope_attention: q/k norm weights must be fp32 [head_dim]");
    TORCH_CHECK(seq.scalar_type() == torch::kInt32 && seq.numel() == T && pos.scalar_type() == torch::kInt64 &&
                    pos.numel() == T && tables.scalar_type() == torch::kInt32 && tables.dim() == 2,
                "rope_attention: seq int32 [T], pos int64 [T], tables int32 [S, max blocks]");
    const int64_t* ps = pos.data_ptr<int64_t>();
    const int32_t* sq = seq.data_ptr<int32_t>();
    for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(ps[t] >= 0 && ps[t] < cos.size(0) && sq[t] >= 0 && sq[t] < tables.size(0) &&
                        ps[t] / k_cache.size(3) < tables.size(1),
                    "rope_attention: token ", t, " has no rotary row or cache block for its position");
    auto qbuf = torch::empty({T, H, D}, torch::kFloat32);
    PrepArgs p{qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
               q_norm ? q_norm->data_ptr<float>() : nullptr, k_norm ? k_norm->data_ptr<float>() : nullptr,
               qbuf.data_ptr<float>(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr<int32_t>(), sq, ps,
               H, Hkv, D, k_cache.size(3), tables.size(1), (float)eps, is_bf16(k_cache)};
    tierlm::pool().run(T, 4, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            TIERLM_DISPATCH(isa, prep, p, t);
        }
    });
    return attention(qbuf, k_cache, v_cache, tables, seq, pos, window, scale, isa).view({T, H * D});
}

}  // namespace tierlm

namespace {

using tierlm::rope_attention;

// Writes k, v [T, kv_heads, D] at flat slots (block * block_size + offset) of the caches
// (layouts above), converting to the caches' dtype (bf16: round to nearest even).
void kv_write(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
    TORCH_CHECK(k.sizes() == v.sizes() && k.dim() == 3, "kv_write: k and v must be [T, kv_heads, D]");
    const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2), BS = k_cache.size(3), NB = k_cache.size(0);
    TORCH_CHECK(k_cache.size(1) == Hkv && k_cache.size(2) == D && v_cache.size(2) == Hkv && v_cache.size(3) == D,
                "kv_write: cache shapes do not match k/v");
    TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.numel() == T, "kv_write: slots must be int64 [T]");
    auto kf = k.to(torch::kFloat32).contiguous(), vf = v.to(torch::kFloat32).contiguous();
    auto sl = slots.contiguous();
    const float *K = kf.data_ptr<float>(), *V = vf.data_ptr<float>();
    const int64_t* S = sl.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) TORCH_CHECK(S[t] >= 0 && S[t] < NB * BS, "kv_write: slot out of range");
    auto write = [&](auto* kc, auto* vc) {
        using E = std::remove_pointer_t<decltype(kc)>;
        for (int64_t t = 0; t < T; ++t) {
            const int64_t b = S[t] / BS, o = S[t] % BS;
            for (int64_t h = 0; h < Hkv; ++h)
                for (int64_t i = 0; i < D; ++i) {
                    kc[((b * Hkv + h) * D + i) * BS + o] = from_f32<E>(K[(t * Hkv + h) * D + i]);
                    vc[((b * BS + o) * Hkv + h) * D + i] = from_f32<E>(V[(t * Hkv + h) * D + i]);
                }
        }
    };
    if (is_bf16(k_cache))
        write(reinterpret_cast<uint16_t*>(k_cache.data_ptr()), reinterpret_cast<uint16_t*>(v_cache.data_ptr()));
    else
        write(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
}

}  // namespace

void register_attention(pybind11::module& m) {
    m.def("attention", &attention, "paged attention, one fixed arithmetic per query row", tierlm::kNoGil);
    m.def("kv_write", &kv_write, "write k/v into the kernels' paged cache layout", tierlm::kNoGil);
    m.def("rope_attention", &rope_attention, "q/k norm, RoPE, K/V write and attention after a fused q/k/v projection", tierlm::kNoGil);
}
