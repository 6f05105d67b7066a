"""Embeddings against their references: the bundled all-MiniLM-L6-v2 against
sentence-transformers on the same inputs, tiny random BERT checkpoints' pooling modes and
decoders' `task="embed"` against transformers' hidden states; batch invariance."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tierlm import LLM
from tierlm.loader.bundled import resolve

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Numbers like 12345 and émigré café naïve ÜBER tokens.",
]


@pytest.fixture(scope="module")
def minilm(cache_dir):
    return LLM("all-minilm-l6-v2", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def sentence_transformer(cache_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve("all-minilm-l6-v2", cache_dir)), device="cpu")


def vectors(outs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outs])


def test_minilm_matches_sentence_transformers(minilm, sentence_transformer):
    long_text = "The quick brown fox jumps over the lazy dog. " * 40  # > 256 tokens: both truncate
    inputs = [*SENTENCES, long_text]
    ours = vectors(minilm.embed(inputs, truncate_prompt_tokens=-1))
    ref = sentence_transformer.encode(inputs, convert_to_tensor=True, batch_size=4)
    cos = F.cosine_similarity(ours, ref.float())
    assert cos.min() >= 0.9999, cos
    assert ours.shape == (len(inputs), 384)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(inputs)), atol=1e-5)  # its config normalizes
    # Same token ids as the reference's tokenizer, special tokens included.
    out = minilm.embed(SENTENCES[9])[0]
    assert out.prompt_token_ids == sentence_transformer.tokenizer(SENTENCES[9])["input_ids"]


def test_minilm_retrieval_ranks_paraphrases_first(minilm):
    queries = ["How do I bake bread at home?", "What is the capital of France?", "My laptop will not turn on."]
    docs = ["Paris is the capital and largest city of France.",
            "A simple recipe for baking a loaf of bread in your own kitchen.",
            "Troubleshooting a computer that does not power up.",
            "The stock market closed higher on Tuesday.",
            "Cats sleep for most of the day."]
    q, d = vectors(minilm.embed(queries)), vectors(minilm.embed(docs))
    best = (q @ d.T).argmax(dim=1).tolist()
    assert best == [1, 0, 2]


def test_minilm_is_batch_invariant(minilm):
    together = vectors(minilm.embed(SENTENCES))
    alone = torch.cat([vectors(minilm.embed(s)) for s in SENTENCES])
    assert torch.equal(together, alone)
    reordered = vectors(minilm.embed(SENTENCES[::-1]))
    assert torch.equal(reordered, together.flip(0))
    # Split across forward passes by the token budget: still the same bits.
    split = minilm.embedder.embed([minilm.embedder.encode(s) for s in SENTENCES], max_batch_tokens=20)
    assert torch.equal(split, together)


def test_minilm_token_ids_and_refusals(minilm):
    ids = minilm.embed("A man is eating food.")[0].prompt_token_ids
    assert vectors(minilm.embed([ids])).equal(vectors(minilm.embed("A man is eating food.")))
    assert vectors(minilm.embed({"prompt_token_ids": ids})).equal(vectors(minilm.embed([ids])))
    for bad, match in [("", "empty"), ([], "non-empty"), ([[30522]], "outside the vocabulary"),
                       ("word " * 300, "at most 256")]:
        with pytest.raises(ValueError, match=match):
            minilm.embed(bad)
    with pytest.raises(ValueError, match="does not support a different `dimensions`"):
        minilm.embed("x", dimensions=128)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        minilm.embed("x", truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="LLM.embed"):
        minilm.generate("hello")
    cut = minilm.embed("word " * 300, truncate_prompt_tokens=10)[0].prompt_token_ids
    assert len(cut) == 10 and cut[0] == 101 and cut[-1] == 102  # [CLS] ... [SEP] kept, as sentence-transformers


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, cache_dir):
    """A random BertModel saved by transformers, with MiniLM's tokenizer (same vocabulary)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=128)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    d = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(d)
    shutil.copy(resolve("all-minilm-l6-v2", cache_dir) / "tokenizer.json", d / "tokenizer.json")
    return d, model


@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len"])
def test_bert_pooling_modes_match_transformers(tiny_bert, tmp_path, mode):
    src, hf = tiny_bert
    d = tmp_path / "st"
    shutil.copytree(src, d)
    (d / "1_Pooling").mkdir()
    key = {"cls": "cls_token", "max": "max_tokens", "mean": "mean_tokens", "mean_sqrt_len": "mean_sqrt_len_tokens"}
    (d / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{key[mode]}": True}))
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    llm = LLM(str(d))
    inputs = SENTENCES[:4]
    ours = vectors(llm.embed(inputs))
    for i, text in enumerate(inputs):
        ids = llm.embed(text)[0].prompt_token_ids
        with torch.no_grad():
            h = hf(torch.tensor([ids])).last_hidden_state[0]
        ref = {"cls": h[0], "max": h.max(0).values, "mean": h.mean(0), "mean_sqrt_len": h.sum(0) / len(ids) ** 0.5}[mode]
        assert F.cosine_similarity(ours[i], ref, dim=0) >= 0.9999
        assert torch.allclose(ours[i], ref, atol=1e-4, rtol=1e-4)  # not normalized: no Normalize module


def test_unsupported_sentence_transformers_module_is_refused(tiny_bert, tmp_path):
    d = tmp_path / "dense"
    shutil.copytree(tiny_bert[0], d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    from tierlm.config import ConfigError

    with pytest.raises(ConfigError, match="module Dense is not supported"):
        LLM(str(d))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_embeddings_match_transformers_hidden_states(tiny_checkpoint, pooling):
    path, hf = tiny_checkpoint("llama")
    llm = LLM(str(path), dtype="float32", task="embed", pooling=pooling)
    inputs = [[5, 9, 44, 12, 7], list(range(3, 60)), [100, 101]]
    ours = vectors(llm.embed(inputs))
    base = hf.model  # the decoder stack without its output layer: final-normed hidden states
    for i, ids in enumerate(inputs):
        with torch.no_grad():
            h = base(torch.tensor([ids])).last_hidden_state[0]
        ref = F.normalize(h[-1] if pooling == "last" else h.mean(0), dim=0)
        assert F.cosine_similarity(ours[i], ref, dim=0) >= 0.9999
    alone = torch.cat([vectors(llm.embed([ids])) for ids in inputs])
    assert torch.equal(alone, ours)
    # Several sequences in one scoring forward, some rows generated: each gets its own rows
    # (the tiled layout puts every prompt row first).
    engine = LLM(str(path), dtype="float32").engine
    many = engine.many_prompt_logits(inputs[:2], prompt_len=4)
    for ids, got in zip(inputs[:2], many):
        assert torch.equal(got, engine.prompt_logits(ids, prompt_len=4))
    with pytest.raises(ValueError, match="task='embed'"):
        LLM(str(path), dtype="float32").embed("hello")


@pytest.mark.slow
def test_smollm2_embeddings_match_transformers(hf_gguf, cache_dir):
    """The bundled GGUF decoder embedding (mean pooling) on its kernels against transformers'
    float32 hidden states of the same file (bf16 activations and int8 products here)."""
    llm = LLM("smollm2-135m", task="embed", pooling="mean", cache_dir=cache_dir)
    inputs = [[1, 504, 3, 88, 1234, 42, 9, 77], list(range(100, 180))]
    ours = vectors(llm.embed(inputs))
    for i, ids in enumerate(inputs):
        with torch.no_grad():
            h = hf_gguf("smollm2-135m").model(torch.tensor([ids])).last_hidden_state[0]
        assert F.cosine_similarity(ours[i], F.normalize(h.mean(0), dim=0), dim=0) >= 0.999
    assert torch.equal(vectors(llm.embed(inputs[::-1])), ours.flip(0))
