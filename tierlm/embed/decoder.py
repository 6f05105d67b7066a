"""Embeddings from a decoder model (`--task embed`): its final-normed hidden states,
pooled (last token or mean) and normalized, as vLLM's embedding mode of decoders does.

The model keeps its layers and loses its output layer (embed/head.py), so
the engine's scoring forward (`LLMEngine.prompt_logits`: one paged pass over a whole
input, blocks borrowed and returned) yields hidden states instead of logits, on every
compute path the model has. Each input runs alone, so its vector never depends on the
others in a request.
"""

from __future__ import annotations

import torch

from tierlm.embed import pooling
from tierlm.embed.encoder import EmbeddingSpec
from tierlm.engine.llm_engine import InvalidRequest, LLMEngine


class DecoderEncoder:
    """The Encoder interface (`spec`, `encode`, `check`, `embed`) over a decoder's engine."""

    def __init__(self, engine: LLMEngine, mode: str) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        # The context less one token: the engine keeps room for a generated token it never makes.
        self.spec = EmbeddingSpec(mode, True, engine.max_model_len - 1, engine.model_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def encode(self, text: str, truncate: int | None = None) -> list[int]:
        """Text -> token ids as the model's tokenizer adds special tokens (BOS where it has
        one), the first `truncate` of them when given."""
        return self.tokenizer.encode(text)[:truncate]

    def check(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("an input is empty")
        if len(ids) > self.spec.max_input_tokens:
            raise ValueError(f"an input has {len(ids)} tokens; this model embeds at most {self.spec.max_input_tokens}")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]], max_batch_tokens: int = 0) -> torch.Tensor:
        for ids in inputs:
            self.check(ids)
        vectors = []
        for ids in inputs:
            try:
                hidden = self.engine.prompt_logits(ids)
            except InvalidRequest as e:
                raise ValueError(str(e)) from None
            vectors.append(pooling.pool(hidden, [len(ids)], self.spec.pooling))
        if not vectors:
            return torch.empty(0, self.spec.dimensions)
        return pooling.normalize(torch.cat(vectors))
