"""Shared fixtures: the bundled model, tiny random HF checkpoints, a tokenizer cache dir."""

from __future__ import annotations

import pytest
import torch

from tierlm.loader.bundled import resolve


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tierlm-cache")


@pytest.fixture(scope="session")
def smollm2_path(cache_dir):
    return resolve("smollm2-135m", cache_dir)


def make_tiny_checkpoint(arch: str, out_dir, *, shards: bool = False):
    """A random-weight transformers model saved with save_pretrained; returns the HF model."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        common["tie_word_embeddings"] = True
        cfg = transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        model = transformers.Qwen2ForCausalLM(cfg)
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
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    return d, make_tiny_checkpoint("llama", d, shards=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-qwen2")
    return d, make_tiny_checkpoint("qwen2", d)
