"""PEFT LoRA adapters read into (A, B, scale) per module: what they add to each weight equals
what peft's own merge adds, and everything we cannot serve is one clear line."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from tierlm.lora.adapter import LoRAError, load_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(hf_model, out_dir, **config):
    """A PEFT adapter over a copy of `hf_model` with random (not zero) B, saved to out_dir;
    returns {module name: merged weight - base weight} from peft's merge."""
    import copy

    torch.manual_seed(1)
    base = copy.deepcopy(hf_model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = peft.LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, "target_modules": ALL, **config})
    model = peft.get_peft_model(base, cfg)
    model.save_pretrained(out_dir)
    merged = model.merge_and_unload().state_dict()
    return {k.removeprefix("model.").removesuffix(".weight"): merged[k] - before[k]
            for k in before if not torch.equal(merged[k], before[k])}


@pytest.mark.parametrize("config", [
    {},
    {"use_rslora": True, "lora_alpha": 16},
    {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3}},
    {"target_modules": ["q_proj", "v_proj"], "r": 8},
])
def test_each_module_adds_what_peft_merges(tiny_llama, tmp_path, config):
    _, hf = tiny_llama
    want = make_adapter(hf, tmp_path, **config)
    adapter = load_adapter(tmp_path, "a")
    assert set(adapter.modules) == set(want)
    for name, m in adapter.modules.items():
        torch.testing.assert_close(m.delta(), want[name].float(), rtol=1e-5, atol=1e-6)
    if "rank_pattern" in config:
        assert adapter.modules["layers.0.mlp.down_proj"].rank == 2 and adapter.rank == 4


def test_bin_weights_load_like_safetensors(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    make_adapter(tiny_llama[1], tmp_path)
    a = load_adapter(tmp_path, "st")
    torch.save(load_file(str(tmp_path / "adapter_model.safetensors")), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    b = load_adapter(tmp_path, "bin")
    assert all(torch.equal(a.modules[k].delta(), b.modules[k].delta()) for k in a.modules)


@pytest.mark.parametrize("config,needle", [
    ({"use_dora": True}, "DoRA"),
    ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head' is not supported"),
    ({"target_modules": ["embed_tokens"]}, "embedding adapters not supported"),
    ({"r": 16}, "rank 16, over --max-lora-rank 8"),
])
def test_what_we_cannot_serve_is_one_clear_line(tiny_llama, tmp_path, config, needle):
    make_adapter(tiny_llama[1], tmp_path, **config)
    with pytest.raises(LoRAError, match=needle) as e:
        load_adapter(tmp_path, "x", max_rank=8)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_a_path_that_is_not_an_adapter_says_so(tmp_path):
    with pytest.raises(LoRAError, match="not a directory"):
        load_adapter(tmp_path / "missing", "x")
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        load_adapter(tmp_path, "x")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(LoRAError, match="no adapter_model.safetensors"):
        load_adapter(tmp_path, "x")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(LoRAError, match="PREFIX_TUNING"):
        load_adapter(tmp_path, "x")


def test_an_unreadable_path_is_one_line(tmp_path):
    with pytest.raises(LoRAError, match=r"cannot be read \(File name too long\)"):
        load_adapter(tmp_path / ("n" * 300), "long")
