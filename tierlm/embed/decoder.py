"""Embeddings from a decoder model (`--task embed`): its final-normed hidden states,
pooled (last token or mean) and normalized, as vLLM's embedding mode of decoders does.

The model keeps its layers and loses its output layer (embed/head.py), so
the engine's scoring forward (`LLMEngine.many_prompt_logits`: one paged pass over whole
inputs, blocks borrowed and returned) yields hidden states instead of logits, on every
compute path the model has. Inputs share forwards up to the step's token budget; the
kernels make each input's rows the same bits as alone.
"""

from __future__ import annotations

import torch

from tierlm.embed import pooling
from tierlm.embed.encoder import EmbeddingSpec, check_input, token_batches
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
        check_input(ids, self.spec.max_input_tokens, self.vocab_size)

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]], max_batch_tokens: int = 0) -> torch.Tensor:
        """Vectors of `inputs`, run in forwards of up to `max_batch_tokens` tokens (the
        scheduler's step budget by default; a longer input runs alone)."""
        for ids in inputs:
            self.check(ids)
        budget = max_batch_tokens or self.engine.scheduler.config.max_num_batched_tokens
        vectors = []
        for batch in token_batches(inputs, budget):
            try:
                hidden = self.engine.many_prompt_logits(batch)
            except InvalidRequest as e:
                raise ValueError(str(e)) from None
            vectors.append(pooling.pool(torch.cat(hidden), [len(ids) for ids in batch], self.spec.pooling))
        if not vectors:
            return torch.empty(0, self.spec.dimensions)
        return pooling.normalize(torch.cat(vectors))
