"""Sampler: filters, penalties, bias, min_tokens, seeded draws and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tierlm.sampling import sampler
from tierlm.sampling.sampler import SamplingRow, filter_top_k_top_p_min_p, sample
from tierlm.sampling_params import SamplingParams, SamplingParamsError


def row(**kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), seed=kw.get("seed") or 0, prompt_token_ids=[1, 2], output_token_ids=[])


def test_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    keep = lambda x: torch.isfinite(x).nonzero().flatten().tolist()
    assert keep(filter_top_k_top_p_min_p(logits, 2, 1.0, 0.0)) == [0, 1]
    assert keep(filter_top_k_top_p_min_p(logits, 0, 0.6, 0.0)) == [0, 1]  # 0.5 < 0.6 -> need the 2nd
    assert keep(filter_top_k_top_p_min_p(logits, 0, 0.5, 0.0)) == [0]
    assert keep(filter_top_k_top_p_min_p(logits, 0, 1.0, 0.3)) == [0, 1, 2]  # >= 0.3 * 0.5


def test_greedy_bias_and_min_tokens():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0]])
    assert sample(logits.clone(), [row(temperature=0)], (1,))[0][0] == 1
    assert sample(logits.clone(), [row(temperature=0, logit_bias={2: 10.0})], (1,))[0][0] == 2
    assert sample(logits.clone(), [row(temperature=0, min_tokens=1)], (1,))[0][0] == 2  # EOS 1 banned


def test_batched_greedy_rows_match_one_at_a_time():
    """Greedy rows share one argmax: ties go to the first maximum as for a single row, and
    seeded rows in the same batch still draw on their own."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 300, generator=g).round(decimals=1)  # rounding makes ties likely
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # an exact tie
    rows = [row(temperature=0), row(temperature=0.9, seed=3), row(temperature=0), row(temperature=0),
            row(temperature=0.7, seed=4), row(temperature=0, repetition_penalty=1.3)]
    batched = [t for t, _ in sample(logits.clone(), rows, (1,))]
    alone = [sample(logits[i : i + 1].clone(), [r], (1,))[0][0] for i, r in enumerate(rows)]
    assert batched == alone and batched[2] == 7


def test_penalties():
    logits = torch.tensor([[2.0, 2.0, -1.0, 0.5]])
    r = SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0), 0, [0], [2])
    sampler.apply_penalties(logits, [r])
    assert logits.tolist() == [[1.0, 2.0, -2.0, 0.5]]
    logits = torch.tensor([[2.0, 2.0, 0.0]])
    r = SamplingRow(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), 0, [], [0, 0, 2])
    sampler.apply_penalties(logits, [r])
    assert logits.tolist() == [[2.0 - 1.0 - 0.25, 2.0, -0.5 - 0.25]]


def test_seeded_draws_are_reproducible_and_match_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()
    draws = [sampler.sample_row(logits.clone(), SamplingParams(temperature=1.0), seed=5, index=i) for i in range(3000)]
    again = [sampler.sample_row(logits.clone(), SamplingParams(temperature=1.0), seed=5, index=i) for i in range(3000)]
    assert draws == again
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_logprobs_are_raw_model_logprobs():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    [(tok, lp)] = sample(logits.clone(), [row(temperature=0, logprobs=2, logit_bias={0: 100.0})], ())
    ref = torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    assert tok == 0 and math.isclose(lp.logprob, ref[0].item(), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [2, 1]


def test_tied_logprobs_list_the_greedy_token_first():
    """bf16 logits tie often: the top list orders equal values by token id, as greedy's
    argmax (the first maximum) picks, so the chosen token is the top-1."""
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, 3.0, 3.0, 1.0]])
    [(tok, lp)] = sample(logits.clone(), [row(temperature=0, logprobs=4)], ())
    assert tok == 2 and [t for t, _ in lp.top] == [2, 4, 5, 3]
    assert sampler.top_tokens(torch.tensor([5.0, 5.0, 5.0]), 2) == [(0, 5.0), (1, 5.0)]


def test_top_k_and_top_p_break_ties_by_token_id():
    logits = torch.tensor([1.0, 3.0, 0.0, 3.0, 3.0])
    kept = filter_top_k_top_p_min_p(logits, 2, 1.0, 0.0)
    assert torch.isfinite(kept).tolist() == [False, True, False, True, False]
    kept = filter_top_k_top_p_min_p(logits, 0, 1e-9, 0.0)
    assert torch.isfinite(kept).tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("kw,param", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                      ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
                                      ({"presence_penalty": 3}, "presence_penalty"), ({"logprobs": 21}, "logprobs")])
def test_params_validation(kw, param):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kw)
    assert e.value.param == param
