"""Incremental detokenizer: equals a full decode, holds partial UTF-8, stops across tokens."""

from __future__ import annotations

import pytest

from tierlm.engine.detokenizer import IncrementalDetokenizer
from tierlm.loader import tokenizer
from tierlm.loader.gguf import GGUFFile


@pytest.fixture(scope="module")
def tok(smollm2_path, cache_dir):
    return tokenizer.from_gguf(GGUFFile(smollm2_path), cache_dir)


def run(tok, text, stop=(), prompt="Q:"):
    d = IncrementalDetokenizer(tok, tok.encode(prompt), list(stop))
    deltas = []
    for t in tok.encode(text):
        d.add(t)
        deltas.append(d.delta(final=False))
        if d.stopped_on:
            break
    deltas.append(d.delta(final=True))
    return d, deltas


@pytest.mark.parametrize("text", ["Hello world, this is a test.", "Emoji 😀🎉 and 日本語 text",
                                  "  spaced\n\tcode = 1 + 2  "])
def test_streamed_text_equals_full_decode(tok, text):
    d, deltas = run(tok, text)
    assert "".join(deltas) == d.text == tok.decode(tok.encode(text))
    assert all("\ufffd" not in x for x in deltas)


def test_stop_string_spanning_tokens_is_excluded(tok):
    d, deltas = run(tok, "The answer is 42. END OF STORY and more", stop=["END OF"])
    assert d.stopped_on == "END OF"
    assert d.text == "The answer is 42. " and "".join(deltas) == d.text
    assert not any("END" in x for x in deltas)  # never streamed, then retracted
