"""Decode speed on an NVIDIA GPU: batch-1 decode tok/s of a bf16 model as a fraction of the
HBM roofline, and output tok/s at 64 concurrent requests, with and without CUDA graphs.

    python benchmarks/gpu_decode.py [--model DIR] [--tokens 256] [--out FILE]

The model: a Llama-architecture checkpoint of ~1.2B random bf16 weights (Llama-3.2-1B's
shape, 32k vocabulary) written here with safetensors (no download; speed does not depend
on the values), or `--model` (an HF directory or .gguf, run dense bf16). Roofline: the
bytes one decode step must read (every weight once, plus the request's K/V) over the
device's read bandwidth, measured here by a large device-to-device copy. Run by
benchmarks/gpu_check.sh; the results name the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096}


def synthetic_llama(out: Path) -> Path:
    """A Llama checkpoint of SHAPE with random bf16 weights, config.json and a byte-level tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    h, f, n = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    d = h // SHAPE["num_attention_heads"]
    kv = SHAPE["num_key_value_heads"] * d
    gen = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).bfloat16()

    tensors = {"model.embed_tokens.weight": w(SHAPE["vocab_size"], h), "model.norm.weight": torch.ones(h).bfloat16(),
               "lm_head.weight": w(SHAPE["vocab_size"], h)}
    for i in range(n):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
                        p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
                        p + "mlp.gate_proj.weight": w(f, h), p + "mlp.up_proj.weight": w(f, h),
                        p + "mlp.down_proj.weight": w(h, f), p + "input_layernorm.weight": torch.ones(h).bfloat16(),
                        p + "post_attention_layernorm.weight": torch.ones(h).bfloat16()})
    save_file(tensors, str(out / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "hidden_act": "silu", **SHAPE}
    (out / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return out


def read_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (counting the read and the write), best of 5."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


def decode_rate(llm, prompts: list[list[int]], tokens: int) -> float:
    """Output tok/s of the decode steps alone: (the run of `tokens`) - (the run of 1 token)."""
    from tierlm import SamplingParams

    def run(n: int) -> float:
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=n, temperature=0,
                                                                                ignore_eos=True))
        return time.perf_counter() - t0

    run(4)  # warm-up
    return len(prompts) * (tokens - 1) / (run(tokens) - run(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/gpu_decode.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_decode: needs a CUDA device (torch.cuda.is_available() is False)")
    from tierlm import LLM

    model = args.model or str(synthetic_llama(Path(tempfile.mkdtemp())))
    bandwidth = read_bandwidth()
    prompt = list(range(100, 116))
    results: dict = {"gpu": torch.cuda.get_device_name(), "read_bandwidth_gb_s": round(bandwidth / 1e9, 1), "runs": []}
    for eager in (False, True):
        llm = LLM(model, device="cuda", dtype="bfloat16", quantization="none", max_num_seqs=64,
                  enforce_eager=eager, gpu_memory_utilization=0.8, debug_invariants=False)
        weights = sum(p.numel() * p.element_size() for p in llm.engine.loaded.model.parameters())
        cfg = llm.engine.model_config
        kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
        mean_context = len(prompt) + args.tokens / 2
        roofline = bandwidth / (weights + kv_per_token * mean_context)
        single = decode_rate(llm, [prompt], args.tokens)
        many = decode_rate(llm, [[100 + i] + prompt for i in range(64)], args.tokens // 2)
        graphs = llm.engine.runner.graphs
        results["runs"].append({
            "cuda_graphs": not eager, "capture_seconds": round(graphs.capture_seconds, 2) if graphs else None,
            "weights_gb": round(weights / 1e9, 3), "batch1_tok_s": round(single, 1),
            "roofline_tok_s": round(roofline, 1), "fraction_of_roofline": round(single / roofline, 3),
            "c64_output_tok_s": round(many, 1)})
        print(json.dumps(results["runs"][-1]), flush=True)
        del llm
        torch.cuda.empty_cache()
    command = "python benchmarks/gpu_decode.py" + (f" --model {args.model}" if args.model else "")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, **results}, indent=1))
    else:
        from benchmarks.common import record

        record("gpu_decode", command, results)


if __name__ == "__main__":
    main()
