"""Tiny random checkpoints of every supported architecture (made by transformers'
save_pretrained) against transformers itself, fp32: logits through one paged forward,
and greedy tokens alone, chunked + batched, and past the sliding window."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ARCHITECTURES, SLIDING_WINDOW
from tierlm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """Plain argmax loop over transformers' full forward (no EOS handling, like ignore_eos)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_and_greedy_match_transformers(arch, tiny_checkpoint):
    assert_matches_transformers(*tiny_checkpoint(arch))


def assert_matches_transformers(path, hf, **engine) -> LLM:
    """Logits within 1e-4 of transformers' (fp32), greedy tokens equal alone and chunked in a
    batch of five; `engine`: further LLM arguments. Returns the first engine."""
    ids = random_ids(80, 7)  # longer than the sliding window
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=256, **engine)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    diff = (llm.engine.prompt_logits(ids) - ref).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff}"

    expected = hf_greedy(hf, ids, 32)
    assert llm.generate({"prompt_token_ids": ids}, GREEDY)[0].outputs[0].token_ids == expected

    # Chunked prefill (13-token budget) inside a batch of five requests of varied lengths.
    chunked = LLM(str(path), dtype="float32", max_num_batched_tokens=13, **engine)
    others = [{"prompt_token_ids": random_ids(n, n)} for n in (5, 40, 17, 90)]
    outs = chunked.generate(others[:2] + [{"prompt_token_ids": ids}] + others[2:], GREEDY)
    assert outs[2].outputs[0].token_ids == expected
    chunked.engine.scheduler.check_integrity()
    return llm


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_long_context_releases_out_of_window_blocks(arch, tiny_checkpoint):
    """A 300-token prompt: key tiles behind the window are skipped and its blocks freed,
    and the output still equals transformers'."""
    path, hf = tiny_checkpoint(arch)
    ids = random_ids(300, 11)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=64)
    eng = llm.engine
    eng.add_request("long", {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    bs, chunk = eng.kv.block_size, eng.scheduler.chunk
    live_limit = -(-(SLIDING_WINDOW + chunk) // bs) + 1
    most_live = 0
    outputs = []
    while eng.has_unfinished_requests():
        outputs += eng.step()
        eng.scheduler.check_integrity()
        for table, window in zip(eng.kv.block_tables("long"), eng.kv.windows):
            if window is not None:
                live = sum(b != 0 for b in table)
                most_live = max(most_live, live)
                assert live <= live_limit
    assert 0 < most_live and eng.kv.pool.num_free == eng.kv.pool.num_usable
    assert outputs[-1].outputs[0].token_ids == hf_greedy(hf, ids, 12)


def test_sharded_checkpoint_and_tokenizer_load(tiny_llama):
    path, _ = tiny_llama
    assert len(list(path.glob("*.safetensors"))) > 1  # the loader really walks several shards
    llm = LLM(str(path), dtype="float32")
    ids = llm.tokenizer.encode("hello world")
    assert ids[0] == 1 and llm.tokenizer.decode(ids) == "hello world"
