// The kernels' C++ entry points shared across files: the whole-step decoder (decoder.cpp)
// calls them directly, with no Python between a layer's kernels. Each is also bound to
// Python on its own (tierlm/kernels/__init__.py) and checks its arguments the same way.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace tierlm {

// One packed weight matrix (reference.py `Packed`): raw views of its tensors, checked once.
struct Part {
    const uint8_t *QS, *HB, *SUB;
    const uint16_t *D, *MN;
    int64_t groups, nb, n_out;
    int fmt;
};

// How Python hands over a projection: per packed matrix (qs, high, sub, d, mins, n_out, ggml_type)
// (kernels.Parts.args).
using PartArgs =
    std::vector<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t>>;

// Raw views of each matrix, checked; the caller keeps the tensors alive.
std::vector<Part> parts_of(const PartArgs& args);

// fp32 [M, sum n_out]: x quantized once, times every part, outputs side by side.
torch::Tensor linear_parts(const torch::Tensor& x, const std::vector<Part>& parts, int64_t isa);

torch::Tensor residual_norm(torch::Tensor x, c10::optional<torch::Tensor> y, c10::optional<torch::Tensor> post_w,
                            torch::Tensor w, double eps, int64_t isa);

torch::Tensor gated(torch::Tensor gu, int64_t kind, int64_t isa);

torch::Tensor rope_attention(torch::Tensor qkv, int64_t H, torch::Tensor cos, torch::Tensor sin,
                             c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, double eps,
                             torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables, torch::Tensor seq,
                             torch::Tensor pos, int64_t window, double scale, int64_t isa);

// y (fp32 [T, N], in place) += each row's adapter product (lora.cpp has the numerics).
void lora_add(torch::Tensor y, const torch::Tensor& x, const torch::Tensor& slots, const torch::Tensor& A,
              const torch::Tensor& B, const torch::Tensor& ends, const torch::Tensor& active, int64_t isa);

}  // namespace tierlm
