"""--debug-invariants: a bookkeeping slip fails the step that finds it, loudly."""

from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams


@pytest.mark.parametrize("on", [True, False])
def test_a_corrupted_block_count_fails_the_next_step_only_when_checking(tiny_llama, on):
    engine = LLM(str(tiny_llama[0]), dtype="float32", debug_invariants=on).engine
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    engine.check_integrity()  # consistent so far
    (table,) = engine.kv.block_tables("a")
    engine.kv.pool.ref_counts[table[0]] += 1  # a reference nobody holds
    if on:
        with pytest.raises(AssertionError, match="reference counts disagree"):
            engine.step()
    else:
        engine.step()  # unchecked: the slip goes unnoticed
