"""The device-neutral path CUDA runs (attention/paged.py, flat layout, runner/cuda_graphs.py
padding), run on the CPU: tiny transformers checkpoints against transformers, batch
invariance, and a padded decode batch giving its real rows the same bits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.model.test_hf_numerics import GREEDY, assert_matches_transformers, random_ids
from tierlm import LLM, SamplingParams
from tierlm.attention.flat_batch import build_flat
from tierlm.runner.cuda_graphs import DecodeGraphs, is_decode, pad_decode
from tierlm.scheduler.output import ScheduledRequest, SchedulerOutput


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_paged_backend_matches_transformers(arch, tiny_checkpoint):
    """Mistral and Gemma 3 have sliding windows shorter than the prompt, Qwen2 q/k/v biases."""
    llm = assert_matches_transformers(*tiny_checkpoint(arch), attention_backend="paged")
    assert llm.engine.runner.attention.name == "paged"


def test_paged_backend_is_batch_invariant(tiny_checkpoint):
    """bf16: a request's sampled tokens and logprobs are the same bits alone and in a batch."""
    path, _ = tiny_checkpoint("llama")
    llm = LLM(str(path), attention_backend="paged", max_num_batched_tokens=32)
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=24, logprobs=2, ignore_eos=True)
    ids = random_ids(50, 3)
    alone = llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0]
    batch = [{"prompt_token_ids": random_ids(n, n)} for n in (9, 70, 33)]
    together = llm.generate(batch[:1] + [{"prompt_token_ids": ids}] + batch[1:], params)[1].outputs[0]
    assert together.token_ids == alone.token_ids
    assert [lp.logprob for lp in together.logprobs] == [lp.logprob for lp in alone.logprobs]


class RerunGraphs(DecodeGraphs):
    """DecodeGraphs whose "recording" runs the step again at each replay, writing the same
    output tensor: a CPU stand-in for the CUDA graph, so what is under test is everything
    around it (static buffers, padding, the size chosen, the rows returned)."""

    def _record(self, step):
        out = step()
        return (lambda: out.copy_(step())), out


def decoding(tiny_checkpoint, rows: int):
    """A tiny Gemma 3 (two KV groups: sliding-window and full layers) on the paged backend with
    `rows` prompts prefilled: (runner, the decode step of one token each, its batch)."""
    path, _ = tiny_checkpoint("gemma3")
    llm = LLM(str(path), dtype="float32", attention_backend="paged", num_kv_blocks=100)
    runner = llm.engine.runner
    groups = len(runner.layout.windows)  # each KV group its own blocks (kv_cache/layout.py)
    assert groups <= 4
    prompts = [(random_ids(20 + 7 * i, i), [[b + 4 * i + 24 * g for b in (1, 2, 3, 4)] for g in range(groups)])
               for i in range(rows)]  # <= 49 tokens with the decode token: four blocks each
    runner.compute_logits(SchedulerOutput([ScheduledRequest(f"r{i}", ids, 0, tables, False, len(ids))
                                           for i, (ids, tables) in enumerate(prompts)]))
    step = SchedulerOutput([ScheduledRequest(f"r{i}", [11 + i], len(ids), tables, True, len(ids))
                            for i, (ids, tables) in enumerate(prompts)])
    return runner, step, build_flat(step, runner.block_size, runner.layout.windows)


def eager(runner, batch):
    metas = [batch.attn[g] for g in runner.layer_group]
    with torch.inference_mode():
        return runner.model(batch.input_ids, batch.positions, runner.kv_caches, metas, batch.logits_indices, 0)


def test_padded_decode_batch_keeps_real_rows(tiny_checkpoint):
    """The CUDA-graph padding (pad_decode) on the CPU: three decode rows padded to 8 rows and
    a 6-block table give the three rows the same logits bits as the unpadded batch, and the
    padded rows write nothing outside the null block."""
    runner, _, batch = decoding(tiny_checkpoint, 3)
    assert is_decode(batch, batch.logits_indices)
    live_before = [t[1:].clone() for t in runner._pages]
    plain = eager(runner, batch)
    live_after_plain = [t[1:].clone() for t in runner._pages]
    padded = pad_decode(batch, 8, 6)
    assert padded.input_ids.shape == (8,) and padded.attn[0].tables.shape == (8, 6)
    assert torch.equal(eager(runner, padded)[:3], plain)
    # Padded rows wrote nothing outside the null block.
    assert all(torch.equal(t[1:], a) for t, a in zip(runner._pages, live_after_plain))
    assert not all(torch.equal(t[1:], b) for t, b in zip(runner._pages, live_before))  # the decode rows wrote


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_graph_replay_gives_the_eager_step(tiny_checkpoint, rows):
    """Decode graphs for batches 1, 2, 4, 8 over static buffers: a step of `rows` rows is copied
    into the smallest graph that holds it and returns the eager step's logits, bit for bit."""
    runner, step, batch = decoding(tiny_checkpoint, rows)
    with torch.inference_mode():
        graphs = RerunGraphs(runner.model, runner.kv_caches, runner.layer_group, runner.layout.windows, 8, 6,
                             dense_rows=0, device=torch.device("cpu"))
    assert graphs.sizes == (1, 2, 4, 8)
    assert graphs.runs(batch, batch.logits_indices, 0)
    assert not graphs.runs(batch, batch.logits_indices, None)  # another weight-format mode
    prefill = build_flat(SchedulerOutput([dataclasses.replace(s, token_ids=[3, 4], sample=True)
                                          for s in step.scheduled]), runner.block_size, runner.layout.windows)
    assert not graphs.runs(prefill, prefill.logits_indices, 0)
    with torch.inference_mode():
        replayed = graphs.replay(batch).clone()
    assert replayed.shape == (rows, runner.cfg.vocab_size)
    assert torch.equal(replayed, eager(runner, batch))


def test_prefill_and_decode_rows_agree(tiny_checkpoint):
    """A generated token's KV is what the same token gives as a prompt token: the per-row
    attention does not depend on the row's role, so a follow-up turn reusing the cached
    blocks scores exactly as a fresh computation."""
    path, _ = tiny_checkpoint("qwen2")
    llm = LLM(str(path), attention_backend="paged")
    ids = random_ids(30, 4)
    out = llm.generate({"prompt_token_ids": ids}, GREEDY)[0].outputs[0].token_ids
    seq = ids + out
    as_prompt = llm.engine.prompt_logits(seq)
    as_generated = llm.engine.prompt_logits(seq, prompt_len=len(ids))
    assert torch.equal(as_prompt, as_generated)
