// Fused elementwise kernels of a decoder layer, CPU: the residual add with the following
// RMSNorm (Gemma's post-norm of the added branch included), and the gated activations
// (SwiGLU, GeGLU-tanh). fp32 in and out; rows split across the pool, each row computed
// whole by one thread with a fixed operation order, so its bits never depend on the
// batch, the thread count or the ISA path.

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bind.h"
#include "isa.h"
#include "ops.h"
#include "pool.h"

namespace {

namespace generic {
#include "fused_body.inc"
}  // namespace generic

TIERLM_TARGET_AVX2
namespace avx2 {
#include "fused_body.inc"
}  // namespace avx2
TIERLM_TARGET_END

TIERLM_TARGET_AVX512_VNNI
namespace vnni {
#include "fused_body.inc"
}  // namespace vnni
TIERLM_TARGET_END

void check_rows(const torch::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.dim() == 2 && t.size(1) == n, what,
                " must be contiguous fp32 [T, ", n, "]");
}

}  // namespace

namespace tierlm {

// x (fp32 [T, H], the residual stream, updated in place) += y (normalised by post_w first
// when given); returns norm(x) * w. Without y, only the norm. Weights fp32 [H], effective
// (Gemma's 1 + w already added).
torch::Tensor residual_norm(torch::Tensor x, c10::optional<torch::Tensor> y, c10::optional<torch::Tensor> post_w,
                            torch::Tensor w, double eps, int64_t isa) {
    tierlm::check_isa(isa, "residual_norm");
    const int64_t H = x.size(-1);
    check_rows(x, H, "residual_norm: x");
    if (y) check_rows(*y, H, "residual_norm: y");
    TORCH_CHECK(!y || y->size(0) == x.size(0), "residual_norm: x and y must have the same rows");
    for (const auto* t : {&w, post_w ? &*post_w : nullptr})
        TORCH_CHECK(!t || (t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == H),
                    "residual_norm: weights must be fp32 [H]");
    auto out = torch::empty_like(x);
    float* X = x.data_ptr<float>();
    const float* Y = y ? y->data_ptr<float>() : nullptr;
    const float* P = post_w ? post_w->data_ptr<float>() : nullptr;
    const float* W = w.data_ptr<float>();
    float* O = out.data_ptr<float>();
    tierlm::pool().run(x.size(0), 8, [&](int64_t a, int64_t b) {
        std::vector<float> tmp(H);
        for (int64_t t = a; t < b; ++t) {
            const float* yt = Y ? Y + t * H : nullptr;
            TIERLM_DISPATCH(isa, residual_row, X + t * H, yt, P, W, H, (float)eps, O + t * H, tmp.data());
        }
    });
    return out;
}

// gate_up fp32 [T, 2I] -> act(gate) * up [T, I]; kind 0 SiLU, 1 GELU (tanh approximation).
torch::Tensor gated(torch::Tensor gu, int64_t kind, int64_t isa) {
    tierlm::check_isa(isa, "gated");
    TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0, "gated: gate_up must be [T, 2I]");
    const int64_t I = gu.size(1) / 2;
    check_rows(gu, 2 * I, "gated: gate_up");
    TORCH_CHECK(kind == 0 || kind == 1, "gated: kind 0 (silu) or 1 (gelu_tanh)");
    auto out = torch::empty({gu.size(0), I}, torch::kFloat32);
    const float* G = gu.data_ptr<float>();
    float* O = out.data_ptr<float>();
    tierlm::pool().run(gu.size(0), 4, [&](int64_t a, int64_t b) {
        for (int64_t t = a; t < b; ++t) {
            const float* g = G + t * 2 * I;
            float* o = O + t * I;
            if (kind == 0) TIERLM_DISPATCH(isa, silu_row, g, I, o);
            else TIERLM_DISPATCH(isa, gelu_tanh_row, g, I, o);
        }
    });
    return out;
}

}  // namespace tierlm

namespace {

using tierlm::gated;
using tierlm::residual_norm;

// Reads every byte of `t` once on the pool (64-bit XOR of its words): the memory read
// bandwidth the kernels can reach, the roofline of one decoding stream.
int64_t read_all(torch::Tensor t) {
    TORCH_CHECK(t.is_contiguous() && t.nbytes() % 64 == 0, "read_all: a contiguous tensor of whole 64-byte lines");
    const uint64_t* w = static_cast<const uint64_t*>(t.data_ptr());
    const int64_t lines = (int64_t)t.nbytes() / 64;
    std::atomic<uint64_t> total{0};
    tierlm::pool().run(lines, 4096, [&](int64_t a, int64_t b) {
        uint64_t x[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t l = a; l < b; ++l)
            for (int k = 0; k < 8; ++k) x[k] ^= w[l * 8 + k];
        total.fetch_xor(x[0] ^ x[1] ^ x[2] ^ x[3] ^ x[4] ^ x[5] ^ x[6] ^ x[7]);
    });
    return (int64_t)total.load();
}

}  // namespace

void register_fused(pybind11::module& m) {
    m.def("residual_norm", &residual_norm, "x += y (post-normed), then RMSNorm(x) * w; fp32 rows", tierlm::kNoGil);
    m.def("read_all", &read_all, "read every byte once on the pool (bandwidth probe)", tierlm::kNoGil);
    m.def("gated", &gated, "act(gate) * up over [T, 2I] rows (0 silu, 1 gelu_tanh)", tierlm::kNoGil);
}
