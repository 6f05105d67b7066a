// LoRA adapters over a batch whose rows use different adapters (or none), CPU.
//
// Adapters sit in a fixed number of slots; a projection of P fused parts (q/k/v: 3,
// gate/up: 2, others: 1) keeps, per slot, AT [K, P * R] (A transposed; part p's rank
// at columns p * R.., zero-padded to R) and BT [R, N] (B transposed, the scale folded
// in, zero rows past a part's rank). Each row r with slot s >= 0 gets, for every output
// o of part p:
//   t[j]    = sum_k AT_s[k][j] * x_r[k]                  (k ascending from 0)
//   y[r, o] = y[r, o] + sum_j BT_s[j][o] * t[p * R + j]   (j ascending from 0)
// every product and sum rounded in float32 on its own. A row's result thus depends on
// its own values and adapter only: never on the rows or adapters batched with it, the
// thread count or the ISA path. Rows are grouped by slot (up to kGroup at a time share
// each weight load); rows without a slot (-1) or of a slot whose adapter does not
// target this projection are left untouched.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "bind.h"
#include "isa.h"
#include "ops.h"
#include "pool.h"

namespace {

struct LoraArgs {
    const float *x, *A, *B;  // A: AT [slots, K, P * R], B: BT [slots, R, N]
    float *y, *t;
    const int32_t* slot;
    int64_t K, N, R, PR;
};

constexpr int64_t kGroup = 4;          // rows of one slot per work item
constexpr int64_t kShrinkCols = 16;    // t columns per work item
constexpr int64_t kExpandCols = 256;   // outputs per work item

namespace generic {
#include "lora_body.inc"
}  // namespace generic

TIERLM_TARGET_AVX2
namespace avx2 {
#include "lora_body.inc"
}  // namespace avx2
TIERLM_TARGET_END

TIERLM_TARGET_AVX512_VNNI
namespace vnni {
#include "lora_body.inc"
}  // namespace vnni
TIERLM_TARGET_END

}  // namespace

namespace tierlm {

void lora_add(torch::Tensor y, const torch::Tensor& x, const torch::Tensor& slots, const torch::Tensor& A,
              const torch::Tensor& B, const torch::Tensor& ends, const torch::Tensor& active, int64_t isa) {
    tierlm::check_isa(isa, "lora_add");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
                "lora_add: x must be contiguous fp32 [T, K]");
    TORCH_CHECK(A.scalar_type() == torch::kFloat32 && A.dim() == 3 && A.is_contiguous() && A.size(1) == x.size(1),
                "lora_add: A must be contiguous fp32 [slots, K, P * R]");
    const int64_t T = x.size(0), K = x.size(1), S = A.size(0), PR = A.size(2);
    TORCH_CHECK(B.scalar_type() == torch::kFloat32 && B.dim() == 3 && B.is_contiguous() && B.size(0) == S,
                "lora_add: B must be contiguous fp32 [slots, R, N]");
    const int64_t R = B.size(1), N = B.size(2);
    TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.is_contiguous() && y.dim() == 2 && y.size(0) == T &&
                    y.size(1) == N,
                "lora_add: y must be contiguous fp32 [T, N]");
    TORCH_CHECK(ends.scalar_type() == torch::kInt64 && ends.dim() == 1 && ends.numel() >= 1 && R > 0 &&
                    ends.numel() * R == PR,
                "lora_add: ends must be int64 [P] with P * R == A's columns");
    const int64_t P = ends.numel();
    const int64_t* E = ends.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) TORCH_CHECK(E[p] > (p ? E[p - 1] : 0), "lora_add: part ends must ascend");
    TORCH_CHECK(E[P - 1] == N, "lora_add: the last part must end at N");
    TORCH_CHECK(slots.scalar_type() == torch::kInt32 && slots.dim() == 1 && slots.numel() == T,
                "lora_add: slots must be int32 [T]");
    TORCH_CHECK(active.scalar_type() == torch::kBool && active.numel() == S, "lora_add: active must be bool [slots]");
    const int32_t* slot = slots.data_ptr<int32_t>();
    const bool* on = active.data_ptr<bool>();
    for (int64_t r = 0; r < T; ++r) TORCH_CHECK(slot[r] >= -1 && slot[r] < S, "lora_add: slot ", slot[r], " out of range");
    // The rows to touch, grouped by slot, in groups of up to kGroup rows of one slot.
    std::vector<int32_t> rows;
    std::vector<std::pair<int64_t, int64_t>> groups;  // (first index in rows, count)
    for (int64_t s = 0; s < S; ++s) {
        if (!on[s]) continue;
        for (int64_t r = 0; r < T; ++r) {
            if (slot[r] != s) continue;
            if (groups.empty() || slot[rows[groups.back().first]] != s || groups.back().second == kGroup)
                groups.push_back({(int64_t)rows.size(), 0});
            rows.push_back((int32_t)r);
            ++groups.back().second;
        }
    }
    if (rows.empty()) return;
    std::vector<float> t((size_t)(T * PR));
    const LoraArgs g{x.data_ptr<float>(), A.data_ptr<float>(), B.data_ptr<float>(), y.data_ptr<float>(), t.data(),
                     slot, K, N, R, PR};
    const int64_t G = (int64_t)groups.size();
    const int64_t sj = (PR + kShrinkCols - 1) / kShrinkCols;
    auto& pool = tierlm::pool();
    pool.run(G * sj, 1, [&](int64_t a, int64_t b) {
        for (int64_t w = a; w < b; ++w) {
            const auto [first, n] = groups[w / sj];
            const int64_t j0 = (w % sj) * kShrinkCols;
            TIERLM_DISPATCH(isa, shrink, g, rows.data() + first, n, j0, std::min(j0 + kShrinkCols, PR));
        }
    });
    // Output chunks never straddle a part: (part, first output) per chunk.
    std::vector<std::pair<int64_t, int64_t>> chunks;
    for (int64_t p = 0, lo = 0; p < P; lo = E[p++])
        for (int64_t o = lo; o < E[p]; o += kExpandCols) chunks.push_back({p, o});
    const int64_t C = (int64_t)chunks.size();
    pool.run(G * C, 1, [&](int64_t a, int64_t b) {
        for (int64_t w = a; w < b; ++w) {
            const auto [first, n] = groups[w / C];
            const auto [p, o0] = chunks[w % C];
            TIERLM_DISPATCH(isa, expand, g, rows.data() + first, n, p, o0, std::min(o0 + kExpandCols, E[p]));
        }
    });
}

}  // namespace tierlm

void register_lora(pybind11::module& m) {
    m.def("lora_add", &tierlm::lora_add, "y += LoRA(x) per row, each row's adapter slot (-1: none)", tierlm::kNoGil);
}
