"""GGUF-built tokenizer vs llama.cpp's ids (recorded by tests/fixtures/make_llamacpp_tokens.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierlm.loader import tokenizer
from tierlm.loader.gguf import GGUFFile

CASES = json.loads((Path(__file__).parents[1] / "fixtures" / "llamacpp_tokens.json").read_text())["cases"]


@pytest.fixture(scope="module")
def tok(smollm2_path, cache_dir):
    return tokenizer.from_gguf(GGUFFile(smollm2_path), cache_dir)


def test_enough_varied_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_ids_match_llama_cpp(tok, case):
    assert tok.encode(case["text"]) == case["ids"]


def test_round_trip_and_cache(tok, smollm2_path, cache_dir):
    text = "Round trip: ünïcödé, 12345, and code `x = y + 1`."
    assert tok.decode(tok.encode(text)) == text
    assert list((cache_dir / "tokenizers").glob("*.json"))  # cached tokenizer.json written
    again = tokenizer.from_gguf(GGUFFile(smollm2_path), cache_dir)  # loads from the cache
    assert again.encode(text) == tok.encode(text)


def test_chat_template_renders_model_template(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids.count(1) == 3  # <|im_start|> parsed as the special token, not as text
