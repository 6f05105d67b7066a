"""Shared fixtures: the bundled model, tiny random HF checkpoints, a tokenizer cache dir."""

from __future__ import annotations

import os

import pytest
import torch

from tierlm.loader.bundled import resolve

# Every engine in the suite, in this process or a server it starts, checks the scheduler's and
# KV cache's invariants after each step: a bookkeeping slip fails the test that caused it.
os.environ["TIERLM_DEBUG_INVARIANTS"] = "1"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tierlm-cache")


@pytest.fixture(scope="session")
def smollm2_path(cache_dir):
    return resolve("smollm2-135m", cache_dir)


@pytest.fixture(scope="session")
def gemma3_path(cache_dir):
    return resolve("gemma3-270m", cache_dir)


@pytest.fixture(scope="session")
def hf_gguf(cache_dir):
    """Factory: bundled model name -> transformers loading the same GGUF (dequantised to
    fp32), the independent reference; each loaded once per session."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            import transformers

            path = resolve(name, cache_dir)
            loaded[name] = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        return loaded[name]

    return get


# Shorter than the tests' sequences, and not a multiple of the block size.
SLIDING_WINDOW = 24
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")


def make_tiny_checkpoint(arch: str, out_dir, *, shards: bool = False):
    """A random-weight transformers model saved with save_pretrained; returns the HF model."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    moe = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        common["tie_word_embeddings"] = True
        cfg = transformers.Qwen2Config(**common, rope_parameters=rope)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=24, rope_parameters=rope)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=SLIDING_WINDOW, rope_parameters=rope)
        model = transformers.MistralForCausalLM(cfg)
    elif arch == "gemma3":
        common.update(head_dim=32, num_hidden_layers=4, tie_word_embeddings=True)
        cfg = transformers.Gemma3TextConfig(
            **common, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=24, final_logit_softcapping=30.0,
            attn_logit_softcapping=20.0,  # unused by Gemma 3: must be ignored
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}})
        model = transformers.Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # norms start at 0 (= scale 1); give them values
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    elif arch == "mixtral":
        common["intermediate_size"] = 48
        cfg = transformers.MixtralConfig(**common, num_local_experts=6, num_experts_per_tok=2,
                                         rope_parameters=rope)
        model = transformers.MixtralForCausalLM(cfg)
    elif arch == "qwen2_moe":  # shared expert, no renormalisation, one dense layer
        cfg = transformers.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=80,
                                          norm_topk_prob=False, mlp_only_layers=[1], rope_parameters=rope)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, **moe, head_dim=16, norm_topk_prob=True, rope_parameters=rope)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # Random init leaves biases at zero; give them values so the bias path is really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(out_dir, max_shard_size="100KB" if shards else "5GB")
    _write_byte_tokenizer(out_dir, cfg.vocab_size)
    return model


def _write_byte_tokenizer(out_dir, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json sized to the tiny vocab (ids < vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: arch -> (checkpoint dir, transformers model), built once per session."""
    made = {}

    def get(arch: str):
        if arch not in made:
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[arch] = d, make_tiny_checkpoint(arch, d)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    return d, make_tiny_checkpoint("llama", d, shards=True)
