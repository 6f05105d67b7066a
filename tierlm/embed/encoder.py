"""An encoder model ready to embed: its tokenizer, weights and the pooling its
sentence-transformers config names, loaded from a checkpoint directory.

A sentence-transformers directory says how vectors are made: `modules.json` lists the
steps (Transformer, Pooling, Normalize), `1_Pooling/config.json` the pooling mode and
`sentence_bert_config.json` the longest input. A plain HF BERT directory (no
modules.json) embeds with mean pooling, normalized. Any other step (a Dense projection,
say) is refused at load rather than silently skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tierlm.config import ConfigError
from tierlm.embed import pooling
from tierlm.loader import weights
from tierlm.models.bert import BertConfig, BertEncoder, load_weights

ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                 "pooling_mode_lasttoken": "last"}
_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class EmbeddingSpec:
    """How vectors are made and what inputs they take."""

    pooling: str
    normalize: bool
    max_input_tokens: int
    dimensions: int  # the vectors' native length
    matryoshka: bool = False  # trained so that leading components are embeddings too (`dimensions` allowed)


class InputTooLong(ValueError):
    """An input over the model's maximum length (the API's `context_length_exceeded`)."""


def check_input(ids: list[int], max_tokens: int, vocab_size: int) -> None:
    """ValueError for an input an embedding model cannot take: empty, too long
    (InputTooLong), or a token id outside its vocabulary."""
    if not ids:
        raise ValueError("an input is empty")
    if len(ids) > max_tokens:
        raise InputTooLong(f"an input has {len(ids)} tokens; this model embeds at most {max_tokens}")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def token_batches(inputs: list[list[int]], budget: int) -> Iterator[list[list[int]]]:
    """`inputs` in order, grouped into batches of at most `budget` tokens (an input longer
    than that alone)."""
    batch, tokens = [], 0
    for ids in inputs:
        if batch and tokens + len(ids) > budget:
            yield batch
            batch, tokens = [], 0
        batch.append(ids)
        tokens += len(ids)
    if batch:
        yield batch


def is_encoder(path: Path) -> bool:
    """Whether `path` is a checkpoint directory of an encoder architecture tierlm embeds with."""
    config = path / "config.json"
    if not (path.is_dir() and config.exists()):
        return False
    try:
        hf = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return any(a in ENCODER_ARCHITECTURES for a in hf.get("architectures") or ())


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def read_spec(path: Path, hf: dict) -> EmbeddingSpec:
    """The embedding recipe of checkpoint directory `path` (see the module docstring)."""
    mode, normalize, max_len = "mean", True, hf["max_position_embeddings"]
    if (path / "modules.json").exists():
        steps = {m["type"].rsplit(".", 1)[-1]: m for m in _read_json(path / "modules.json")}
        unknown = sorted(set(steps) - _MODULES)
        if unknown:
            raise ConfigError(f"{path}: sentence-transformers module {unknown[0]} is not supported "
                              f"(supported: {', '.join(sorted(_MODULES))})")
        normalize = "Normalize" in steps
        if "Pooling" in steps:
            cfg = _read_json(path / steps["Pooling"]["path"] / "config.json")
            modes = [name for key, name in _POOLING_KEYS.items() if cfg.get(key)]
            if len(modes) != 1:
                raise ConfigError(f"{path}: pooling must name exactly one mode, got {modes or 'none'}")
            mode = modes[0]
    if (path / "sentence_bert_config.json").exists():
        max_len = min(max_len, int(_read_json(path / "sentence_bert_config.json").get("max_seq_length", max_len)))
    return EmbeddingSpec(mode, normalize, max_len, hf["hidden_size"],
                         matryoshka=bool(hf.get("is_matryoshka") or hf.get("matryoshka_dimensions")))


class TokenizerView:
    """The encoder's tokenizer as /tokenize and /detokenize call a model's tokenizer."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class Encoder:
    """Tokenizer + encoder + pooling. `embed` is batch-invariant: an input's vector has the
    same bits whatever else is in its batch."""

    def __init__(self, path: Path, deterministic: bool = True) -> None:
        hf = _read_json(path / "config.json")
        self.path = path
        self.config = BertConfig.from_hf(hf)
        self.spec = read_spec(path, hf)
        if not (path / "tokenizer.json").exists():
            raise ConfigError(f"{path} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        # Its file may pad and truncate to a fixed length; inputs are sized by us (limits below).
        self._tok.no_padding()
        self._tok.no_truncation()
        self.tokenizer = TokenizerView(self._tok)
        self.model = BertEncoder(self.config, deterministic)
        load_weights(self.model, dict(weights.hf_weights(path)))

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def encode(self, text: str, truncate: int | None = None) -> list[int]:
        """Text -> token ids with the model's special tokens ([CLS] ... [SEP]); with
        `truncate`, the text's tokens are cut at the end to fit that many with the special
        ones (as sentence-transformers truncates at its max_seq_length)."""
        if truncate is None:
            return self._tok.encode(text).ids
        enc = self._tok.encode(text, add_special_tokens=False)
        enc.truncate(max(0, truncate - self._tok.num_special_tokens_to_add(False)))
        return self._tok.post_process(enc).ids

    def check(self, ids: list[int]) -> None:
        """ValueError for an input the model cannot embed."""
        check_input(ids, self.spec.max_input_tokens, self.vocab_size)

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]], max_batch_tokens: int = 8192) -> torch.Tensor:
        """Token ids of each input -> [N, dimensions] float32, in input order."""
        for ids in inputs:
            self.check(ids)
        out = [self._run(batch) for batch in token_batches(inputs, max_batch_tokens)]
        return torch.cat(out) if out else torch.empty(0, self.spec.dimensions)

    def _run(self, batch: list[list[int]]) -> torch.Tensor:
        lens = [len(ids) for ids in batch]
        hidden = self.model(torch.tensor([t for ids in batch for t in ids]), lens)
        vectors = pooling.pool(hidden, lens, self.spec.pooling)
        return pooling.normalize(vectors) if self.spec.normalize else vectors
