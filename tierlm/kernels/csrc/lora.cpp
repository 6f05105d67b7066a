// LoRA adapters over a batch whose rows use different adapters (or none), CPU.
//
// Adapters sit in a fixed number of slots; a projection of P fused parts (q/k/v: 3,
// gate/up: 2, others: 1) keeps, per slot, A [P * R, K] (part p's rows at p * R, its
// rank zero-padded to R) and B [N, R] (the scale folded in, columns zero-padded). Each
// row r with slot s >= 0 gets, for every output n of part p:
//   t = A_s x_r                      (P * R dot products over K)
//   y[r, n] += dot(B_s[n], t[p * R : (p + 1) * R])
// every dot in 16 lanes (lane l: i = l mod 16, ascending) then a fixed tree (sum16). A
// row's result thus depends on its own values and adapter only: never on the rows or
// adapters batched with it, the thread count or the ISA path. Rows grouped by slot share
// the adapter's rows in cache; rows without a slot (-1) or of a slot whose adapter does
// not target this projection are left untouched.

#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bind.h"
#include "isa.h"
#include "ops.h"
#include "pool.h"

namespace {

struct LoraArgs {
    const float *x, *A, *B;
    float *y, *t;
    const int32_t* slot;
    const int64_t* ends;  // each part's end in the outputs
    int64_t K, N, R, PR;
};

namespace generic {
#include "lora_body.inc"
}  // namespace generic

TIERLM_TARGET_AVX2
namespace avx2 {
#define TIERLM_SIMD
#include "lora_body.inc"
#undef TIERLM_SIMD
}  // namespace avx2
TIERLM_TARGET_END

TIERLM_TARGET_AVX512_VNNI
namespace vnni {
#define TIERLM_SIMD
#define TIERLM_AVX512
#include "lora_body.inc"
#undef TIERLM_AVX512
#undef TIERLM_SIMD
}  // namespace vnni
TIERLM_TARGET_END

constexpr int64_t kRowTile = 32;   // rows per work item: a tile's x rows stay in L2
constexpr int64_t kShrinkRows = 8;  // A rows per work item
constexpr int64_t kOutCols = 64;    // outputs per work item

}  // namespace

namespace tierlm {

void lora_add(torch::Tensor y, const torch::Tensor& x, const torch::Tensor& slots, const torch::Tensor& A,
              const torch::Tensor& B, const torch::Tensor& ends, const torch::Tensor& active, int64_t isa) {
    tierlm::check_isa(isa, "lora_add");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
                "lora_add: x must be contiguous fp32 [T, K]");
    TORCH_CHECK(A.scalar_type() == torch::kFloat32 && A.dim() == 3 && A.is_contiguous() && A.size(2) == x.size(1),
                "lora_add: A must be contiguous fp32 [slots, P * R, K]");
    const int64_t T = x.size(0), K = x.size(1), S = A.size(0), PR = A.size(1);
    TORCH_CHECK(B.scalar_type() == torch::kFloat32 && B.dim() == 3 && B.is_contiguous() && B.size(0) == S,
                "lora_add: B must be contiguous fp32 [slots, N, R]");
    const int64_t N = B.size(1), R = B.size(2);
    TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.is_contiguous() && y.dim() == 2 && y.size(0) == T &&
                    y.size(1) == N,
                "lora_add: y must be contiguous fp32 [T, N]");
    TORCH_CHECK(ends.scalar_type() == torch::kInt64 && ends.dim() == 1 && ends.numel() >= 1 && R > 0 &&
                    ends.numel() * R == PR,
                "lora_add: ends must be int64 [P] with P * R == A's rows");
    const int64_t* E = ends.data_ptr<int64_t>();
    for (int64_t p = 0; p < ends.numel(); ++p)
        TORCH_CHECK(E[p] > (p ? E[p - 1] : 0), "lora_add: part ends must ascend");
    TORCH_CHECK(E[ends.numel() - 1] == N, "lora_add: the last part must end at N");
    TORCH_CHECK(slots.scalar_type() == torch::kInt32 && slots.dim() == 1 && slots.numel() == T,
                "lora_add: slots must be int32 [T]");
    TORCH_CHECK(active.scalar_type() == torch::kBool && active.numel() == S, "lora_add: active must be bool [slots]");
    const int32_t* slot = slots.data_ptr<int32_t>();
    const bool* on = active.data_ptr<bool>();
    // The rows to touch, grouped by slot (stable), so an adapter's rows run back to back.
    for (int64_t r = 0; r < T; ++r) TORCH_CHECK(slot[r] >= -1 && slot[r] < S, "lora_add: slot ", slot[r], " out of range");
    std::vector<int32_t> rows;
    for (int64_t s = 0; s < S; ++s)
        if (on[s])
            for (int64_t r = 0; r < T; ++r)
                if (slot[r] == s) rows.push_back((int32_t)r);
    if (rows.empty()) return;
    std::vector<float> t((size_t)(T * PR));
    LoraArgs g{x.data_ptr<float>(), A.data_ptr<float>(), B.data_ptr<float>(), y.data_ptr<float>(), t.data(),
               slot, E, K, N, R, PR};
    const int64_t nr = (int64_t)rows.size(), tiles = (nr + kRowTile - 1) / kRowTile;
    const int64_t sj = (PR + kShrinkRows - 1) / kShrinkRows, sn = (N + kOutCols - 1) / kOutCols;
    auto& pool = tierlm::pool();
    pool.run(tiles * sj, 1, [&](int64_t a, int64_t b) {
        for (int64_t w = a; w < b; ++w) {
            const int64_t r0 = (w / sj) * kRowTile, j0 = (w % sj) * kShrinkRows;
            TIERLM_DISPATCH(isa, shrink, g, rows.data() + r0, std::min(kRowTile, nr - r0), j0,
                            std::min(j0 + kShrinkRows, PR));
        }
    });
    pool.run(tiles * sn, 1, [&](int64_t a, int64_t b) {
        for (int64_t w = a; w < b; ++w) {
            const int64_t r0 = (w / sn) * kRowTile, n0 = (w % sn) * kOutCols;
            TIERLM_DISPATCH(isa, expand, g, rows.data() + r0, std::min(kRowTile, nr - r0), n0,
                            std::min(n0 + kOutCols, N));
        }
    });
}

}  // namespace tierlm

void register_lora(pybind11::module& m) {
    m.def("lora_add", &tierlm::lora_add, "y += LoRA(x) per row, each row's adapter slot (-1: none)", tierlm::kNoGil);
}
