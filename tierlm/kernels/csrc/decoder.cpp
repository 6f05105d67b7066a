// A whole decoder step in C++ (tierlm/models/fused.py builds it and keeps the same loop in
// Python as the reference): the layers of a Llama-family or Gemma-3 model whose matrices
// are GGUF blocks, registered once at load with their KV caches, then run per step with
// the GIL released once. The Python loop made ~250 calls per token, each converting its
// arguments and taking the GIL back (the server's event loop holds it between them); here
// the same kernels run back to back, so a row's bits are the loop's bits. LoRA adapters
// (lora.cpp) attach per projection and run on the rows whose slot the step names.

#include <torch/extension.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "bind.h"
#include "ops.h"

namespace {

using tierlm::Part;
using tierlm::PartArgs;
using Tensor = torch::Tensor;
using Opt = c10::optional<Tensor>;
// Per KV group, this step: (block tables, each token's table row, positions, window).
using Groups = std::vector<std::tuple<Tensor, Tensor, Tensor, int64_t>>;

// One projection's adapter slots (lora.cpp's A, B, part ends and which slots target it).
struct Lora {
    Tensor A, B, ends, active;
};
using OptLora = c10::optional<Lora>;
enum Proj { QKV = 0, O = 1, GATE_UP = 2, DOWN = 3 };

struct Layer {
    std::vector<Part> qkv, o, gate_up, down;
    OptLora lora[4];
    Tensor in_norm, pre_mlp, cos, sin, k_cache, v_cache;
    Opt qkv_bias, q_norm, k_norm, post_attn, post_mlp;
    int64_t group = 0;
};

class Decoder {
   public:
    // act: 0 SiLU, 1 GELU-tanh (kernels.GATED).
    Decoder(int64_t heads, double eps, double scale, int64_t act) : heads_(heads), eps_(eps), scale_(scale), act_(act) {
        TORCH_CHECK(heads > 0 && (act == 0 || act == 1), "Decoder: heads > 0 and act 0 (silu) or 1 (gelu_tanh)");
    }

    void add_layer(Tensor in_norm, const PartArgs& qkv, Opt qkv_bias, Opt q_norm, Opt k_norm, Tensor cos, Tensor sin,
                   const PartArgs& o, Opt post_attn, Tensor pre_mlp, const PartArgs& gate_up, const PartArgs& down,
                   Opt post_mlp, Tensor k_cache, Tensor v_cache, int64_t group) {
        TORCH_CHECK(group >= 0, "Decoder: a layer's KV group must be >= 0");
        Layer l;
        l.qkv = parts(qkv);
        l.o = parts(o);
        l.gate_up = parts(gate_up);
        l.down = parts(down);
        l.in_norm = in_norm, l.pre_mlp = pre_mlp, l.cos = cos, l.sin = sin, l.k_cache = k_cache, l.v_cache = v_cache;
        l.qkv_bias = qkv_bias, l.q_norm = q_norm, l.k_norm = k_norm, l.post_attn = post_attn, l.post_mlp = post_mlp;
        l.group = group;
        layers_.push_back(std::move(l));
    }

    // Attach adapter slots to layer `layer`'s projection `proj` (Proj); the tensors are
    // filled in place as adapters load.
    void set_lora(int64_t layer, int64_t proj, Tensor A, Tensor B, Tensor ends, Tensor active) {
        TORCH_CHECK(layer >= 0 && layer < (int64_t)layers_.size() && proj >= 0 && proj < 4,
                    "Decoder: no layer ", layer, " projection ", proj);
        layers_[layer].lora[proj] = Lora{A, B, ends, active};
    }

    void set_head(Tensor final_norm, const PartArgs& head) {
        final_norm_ = final_norm;
        head_ = parts(head);
    }

    // x: the embedded rows, fp32 [T, hidden] (the residual stream, updated in place).
    // `slots`: int32 [T], each row's adapter slot (-1 none), or None without adapters.
    // Returns fp32 logits [len(logits_indices), vocab].
    Tensor forward(Tensor x, const Groups& groups, Tensor logits_indices, int64_t isa, Opt slots) {
        TORCH_CHECK(!layers_.empty() && !head_.empty(), "Decoder: no layers or no head");
        Tensor h = tierlm::residual_norm(x, c10::nullopt, c10::nullopt, layers_[0].in_norm, eps_, isa);
        for (size_t i = 0; i < layers_.size(); ++i) {
            const Layer& l = layers_[i];
            TORCH_CHECK(l.group < (int64_t)groups.size(), "Decoder: no attention inputs for KV group ", l.group);
            const auto& [tables, seq, pos, window] = groups[l.group];
            Tensor qkv = project(h, l.qkv, l.lora[QKV], slots, isa);
            if (l.qkv_bias) qkv.add_(*l.qkv_bias);
            Tensor a = tierlm::rope_attention(qkv, heads_, l.cos, l.sin, l.q_norm, l.k_norm, eps_, l.k_cache, l.v_cache,
                                              tables, seq, pos, window, scale_, isa);
            h = tierlm::residual_norm(x, project(a, l.o, l.lora[O], slots, isa), l.post_attn, l.pre_mlp, eps_, isa);
            Tensor m = tierlm::gated(project(h, l.gate_up, l.lora[GATE_UP], slots, isa), act_, isa);
            const Tensor& following = i + 1 < layers_.size() ? layers_[i + 1].in_norm : final_norm_;
            h = tierlm::residual_norm(x, project(m, l.down, l.lora[DOWN], slots, isa), l.post_mlp, following, eps_,
                                      isa);
        }
        return tierlm::linear_parts(h.index_select(0, logits_indices), head_, isa);
    }

   private:
    static Tensor project(const Tensor& x, const std::vector<Part>& parts, const OptLora& lora, const Opt& slots,
                          int64_t isa) {
        Tensor y = tierlm::linear_parts(x, parts, isa);
        if (lora && slots) tierlm::lora_add(y, x, *slots, lora->A, lora->B, lora->ends, lora->active, isa);
        return y;
    }

    // Raw views of the packed matrices; the tensors stay alive in keep_.
    std::vector<Part> parts(const PartArgs& args) {
        for (const auto& [qs, high, sub, d, mins, n_out, type] : args) keep_.insert(keep_.end(), {qs, high, sub, d, mins});
        return tierlm::parts_of(args);
    }

    int64_t heads_;
    double eps_, scale_;
    int64_t act_;
    std::vector<Layer> layers_;
    std::vector<Part> head_;
    Tensor final_norm_;
    std::vector<Tensor> keep_;
};

}  // namespace

void register_decoder(pybind11::module& m) {
    pybind11::class_<Decoder>(m, "Decoder", "a whole decoder step on the kernels (see tierlm/models/fused.py)")
        .def(pybind11::init<int64_t, double, double, int64_t>())
        .def("add_layer", &Decoder::add_layer)
        .def("set_head", &Decoder::set_head)
        .def("set_lora", &Decoder::set_lora)
        .def("forward", &Decoder::forward, tierlm::kNoGil);
}
