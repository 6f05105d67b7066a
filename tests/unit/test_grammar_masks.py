"""llguidance masks: batched masks equal per-state ones, and rollback restores a state
(what speculative decoding needs when draft tokens are rejected)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tierlm.loader.tokenizer import TextTokenizer
from tierlm.structured.grammar import GrammarCompiler, allowed_masks
from tierlm.structured.llguidance_backend import LLGuidanceBackend
from tierlm.structured.spec import GuidedSpec


def backend() -> LLGuidanceBackend:
    chars = ['{', '}', '"', ':', ',', 'a', 'b', '1', '2', 'Ġ', 'ab', '12', '"a"', '</s>']  # byte-level alphabet
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[("a", "b"), ("1", "2")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = TextTokenizer(tok, bos_token_id=None, eos_token_ids=(13,), add_bos=False, chat_template_source="")
    return LLGuidanceBackend(text, len(chars))


def test_batched_masks_equal_single_masks_and_rollback_restores():
    compiler = GrammarCompiler(backend())
    specs = [GuidedSpec("regex", r"(ab|12)+"), GuidedSpec("regex", r"a1b2"), GuidedSpec.choice(["ab", "12"])]
    states = [compiler.state_for(s) for s in specs]
    states[0].accept(10)  # "ab"
    batch = allowed_masks(states)
    assert batch.shape == (3, 14) and batch.dtype == torch.bool
    for row, s in zip(batch, states):
        assert torch.equal(row, s.allowed())
    s = states[1]  # a1b2: exactly one token allowed at each point
    assert s.allowed().nonzero().flatten().tolist() == [5]
    assert s.accept(5) and s.accept(7)
    assert s.allowed().nonzero().flatten().tolist() == [6]
    s.rollback(2)
    assert s.allowed().nonzero().flatten().tolist() == [5]
