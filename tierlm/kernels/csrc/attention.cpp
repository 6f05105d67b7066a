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
//
// int8 caches (--kv-cache-dtype int8) quantize each token's K and V per KV head, in groups
// of 64 dimensions (the last may be shorter), asymmetrically (keys after RoPE and values are
// not centred on 0): with lo, hi a group's min and max (clamped to +-65504), m = f16(lo),
// s = f16((hi - m) / 255) (f16: IEEE half, round to nearest even), q = round-half-even(
// (x - m) / s) in [0, 255] (0 when s is), read back as q * s + m, all in float32. A head's
// codes, then each group's (s, m) as two little-endian halves (4 bytes), sit side by side in
// the page: a head takes W = head_dim + 4 * groups elements; K is [blocks, kv_heads, W,
// block_size] (a token's column), V [blocks, block_size, kv_heads, W] (a row). Block copies
// (tiers, cold store) thus move the parameters with the codes. Every value depends on its
// own token and head only: batch-invariant.

#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bind.h"
#include "half.h"
#include "isa.h"
#include "ops.h"
#include "pool.h"

namespace {

constexpr int CHUNK = 16;
constexpr int SCALE_BYTES = 4;  // an int8 cache's (scale, min) halves per group of a head
constexpr int KV_GROUP = 64;    // dimensions sharing one (scale, min)
constexpr int MAX_GROUPS = 8;   // head_dim <= 512
enum KVKind { KV_F32 = 0, KV_BF16 = 1, KV_INT8 = 2 };

struct Args {
    const void *q, *k_cache, *v_cache;
    void* out;
    const int32_t *tables, *seq;
    const int64_t* pos;
    int64_t H, Hkv, D, Ds, BS, MB, window;  // Ds: a head's stored width (D, or int8 codes + parameters)
    float scale;
    bool q_bf16;
    int kv;  // KVKind
};

// rope_attention's first stage (attention_body.inc `prep_token`).
struct PrepArgs {
    const float *qkv, *cos, *sin, *qn, *kn;
    float* qbuf;
    void *k_cache, *v_cache;
    const int32_t *tables, *seq;
    const int64_t* pos;
    int64_t H, Hkv, D, Ds, BS, MB;
    float eps;
    int kv;  // KVKind
};

inline float to_f32(float v) { return v; }
inline float to_f32(uint8_t v) { return (float)v; }
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

struct KVParams {
    float scale, min;  // a group's values are code * scale + min
};

inline int64_t kv_groups(int64_t D) { return (D + KV_GROUP - 1) / KV_GROUP; }

// x [n] -> codes q[i * stride] and their parameters (see the header): one group.
inline KVParams quantize_group(const float* x, int64_t n, uint8_t* q, int64_t stride) {
    constexpr float HALF_MAX = 65504.0f;
    float lo = x[0], hi = x[0];
    for (int64_t i = 1; i < n; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
    lo = std::clamp(lo, -HALF_MAX, HALF_MAX), hi = std::clamp(hi, -HALF_MAX, HALF_MAX);
    const float m = f16_to_f32(f32_to_f16(lo));
    const float s = f16_to_f32(f32_to_f16(std::clamp((hi - m) / 255.0f, 0.0f, HALF_MAX)));
    for (int64_t i = 0; i < n; ++i)
        q[i * stride] = s == 0.0f ? 0 : (uint8_t)std::clamp(std::nearbyint((x[i] - m) / s), 0.0f, 255.0f);
    return {s, m};
}

// The parameters' 4 bytes (scale, then min: little-endian halves) at p[0], p[step],
// p[2 step], p[3 step], and back.
inline void put_params(uint8_t* p, int64_t step, KVParams k) {
    const uint16_t h[2] = {f32_to_f16(k.scale), f32_to_f16(k.min)};
    uint8_t b[SCALE_BYTES];
    std::memcpy(b, h, SCALE_BYTES);
    for (int i = 0; i < SCALE_BYTES; ++i) p[i * step] = b[i];
}
inline KVParams get_params(const uint8_t* p, int64_t step) {
    uint8_t b[SCALE_BYTES];
    for (int i = 0; i < SCALE_BYTES; ++i) b[i] = p[i * step];
    uint16_t h[2];
    std::memcpy(h, b, SCALE_BYTES);
    return {f16_to_f32(h[0]), f16_to_f32(h[1])};
}

// One token's head x [D] into its W elements at head[e * stride] (K: stride block_size,
// the token's column; V: stride 1, its row): codes, then each group's parameters.
inline void quantize_head(const float* x, int64_t D, uint8_t* head, int64_t stride) {
    for (int64_t g = 0; g < kv_groups(D); ++g) {
        const int64_t i0 = g * KV_GROUP, n = std::min<int64_t>(KV_GROUP, D - i0);
        put_params(head + (D + g * SCALE_BYTES) * stride, stride, quantize_group(x + i0, n, head + i0 * stride, stride));
    }
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

int kv_kind(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const char* who) {
    TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), who, ": K and V caches must have one dtype");
    switch (k_cache.scalar_type()) {
        case torch::kFloat32: return KV_F32;
        case torch::kBFloat16: return KV_BF16;
        case torch::kInt8: return KV_INT8;
        default: TORCH_CHECK(false, who, ": caches must be float32, bfloat16 or int8");
    }
    return KV_F32;
}

// A head's stored width in a cache of this kind.
int64_t stored_width(int kv, int64_t D) { return kv == KV_INT8 ? D + SCALE_BYTES * kv_groups(D) : D; }

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
    const int kv = kv_kind(k_cache, v_cache, "attention");
    const int64_t Ds = stored_width(kv, D);
    TORCH_CHECK(kv != KV_INT8 || D <= KV_GROUP * MAX_GROUPS, "attention: an int8 cache's head_dim must be <= 512");
    TORCH_CHECK(k_cache.size(2) == Ds && v_cache.size(1) == BS && v_cache.size(2) == Hkv && v_cache.size(3) == Ds,
                "attention: K must be [blocks, kv_heads, W, block_size] and V [blocks, block_size, kv_heads, W] "
                "(W = D, or D + 4 per 64 dimensions for int8)");
    TORCH_CHECK(H % Hkv == 0 && BS % CHUNK == 0, "attention: heads a multiple of kv_heads, block_size of 16");
    TORCH_CHECK(is_bf16(q) || q.scalar_type() == torch::kFloat32, "attention: q must be float32 or bfloat16");
    TORCH_CHECK(tables.scalar_type() == torch::kInt32 && tables.dim() == 2 && tables.is_contiguous(),
                "attention: tables must be int32 [S, max_blocks]");
    TORCH_CHECK(seq.scalar_type() == torch::kInt32 && seq.numel() == T && pos.scalar_type() == torch::kInt64 &&
                    pos.numel() == T && seq.is_contiguous() && pos.is_contiguous(),
                "attention: seq (int32) and pos (int64) must have one entry per token");
    auto out = torch::empty({T, H * D}, q.options());
    Args a{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), tables.data_ptr<int32_t>(),
           seq.data_ptr<int32_t>(), pos.data_ptr<int64_t>(), H, Hkv, D, Ds, BS, tables.size(1), window,
           (float)scale, is_bf16(q), kv};
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
    const int64_t T = qkv.size(0), Hkv = k_cache.size(1), D = qkv.size(1) / (H + 2 * Hkv);
    const int kv = kv_kind(k_cache, v_cache, "rope_attention");
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous() && qkv.dim() == 2 &&
                    qkv.size(1) == (H + 2 * Hkv) * D && k_cache.size(2) == stored_width(kv, D),
                "rope_attention: qkv must be contiguous fp32 [T, (H + 2 * kv_heads) * D] for the cache's head_dim");
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
               H, Hkv, D, stored_width(kv, D), k_cache.size(3), tables.size(1), (float)eps, kv};
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
// (layouts above), converting to the caches' dtype (bf16: round to nearest even; int8:
// quantized per token and head, scale beside).
void kv_write(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
    TORCH_CHECK(k.sizes() == v.sizes() && k.dim() == 3, "kv_write: k and v must be [T, kv_heads, D]");
    const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2), BS = k_cache.size(3), NB = k_cache.size(0);
    const int kv = kv_kind(k_cache, v_cache, "kv_write");
    const int64_t Ds = stored_width(kv, D);
    TORCH_CHECK(k_cache.size(1) == Hkv && k_cache.size(2) == Ds && v_cache.size(2) == Hkv && v_cache.size(3) == Ds,
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
    if (kv == KV_INT8) {  // codes are stored as uint8 bits in the int8 tensor
        uint8_t *kc = reinterpret_cast<uint8_t*>(k_cache.data_ptr()), *vc = reinterpret_cast<uint8_t*>(v_cache.data_ptr());
        for (int64_t t = 0; t < T; ++t) {
            const int64_t b = S[t] / BS, o = S[t] % BS;
            for (int64_t h = 0; h < Hkv; ++h) {
                quantize_head(K + (t * Hkv + h) * D, D, kc + ((b * Hkv + h) * Ds) * BS + o, BS);  // its column
                quantize_head(V + (t * Hkv + h) * D, D, vc + ((b * BS + o) * Hkv + h) * Ds, 1);
            }
        }
    } else if (kv == KV_BF16) {
        write(reinterpret_cast<uint16_t*>(k_cache.data_ptr()), reinterpret_cast<uint16_t*>(v_cache.data_ptr()));
    } else {
        write(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
    }
}

}  // namespace

void register_attention(pybind11::module& m) {
    m.def("attention", &attention, "paged attention, one fixed arithmetic per query row", tierlm::kNoGil);
    m.def("kv_write", &kv_write, "write k/v into the kernels' paged cache layout", tierlm::kNoGil);
    m.def("rope_attention", &rope_attention, "q/k norm, RoPE, K/V write and attention after a fused q/k/v projection", tierlm::kNoGil);
}
