"""GGUF-built tokenizer vs llama.cpp's ids (recorded by tests/fixtures/make_llamacpp_tokens.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierlm.loader import tokenizer
from tierlm.loader.bundled import resolve
from tierlm.loader.gguf import GGUFFile

FIXTURES = Path(__file__).parents[1] / "fixtures"
MODELS = ("smollm2-135m", "gemma3-270m")  # byte-level BPE and SentencePiece vocabularies
CASES = {m: json.loads((FIXTURES / f"llamacpp_tokens-{m}.json").read_text())["cases"] for m in MODELS}


@pytest.fixture(scope="module")
def tok(smollm2_path, cache_dir):
    return tokenizer.from_gguf(GGUFFile(smollm2_path), cache_dir)


@pytest.fixture(scope="module")
def gemma_tok(cache_dir):
    return tokenizer.from_gguf(GGUFFile(resolve("gemma3-270m", cache_dir)), cache_dir)


def test_enough_varied_cases():
    assert all(len(CASES[m]) >= 20 for m in MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_ids_match_llama_cpp(model, tok, gemma_tok):
    t = tok if model == "smollm2-135m" else gemma_tok
    mismatched = [c["text"] for c in CASES[model] if t.encode(c["text"], add_special_tokens=False) != c["ids"]]
    assert not mismatched


def test_sentencepiece_specials_bos_and_end_of_turn(gemma_tok):
    assert gemma_tok.encode("Hi")[0] == gemma_tok.bos_token_id == 2  # add_bos_token is set in the GGUF
    assert 106 in gemma_tok.eos_token_ids  # <end_of_turn> stops generation like EOS
    text = "Straße 🤖  two spaces"
    assert gemma_tok.decode(gemma_tok.encode(text)) == text


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


def test_gemma_builtin_chat_template(gemma_tok):
    """The GGUF ships no template: the built-in one follows Gemma's turn format."""
    text = gemma_tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello!"},
                                          {"role": "user", "content": "Bye"}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
                    "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = gemma_tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [2, 105] and ids.count(106) == 3  # one <bos>; turn markers as special tokens
