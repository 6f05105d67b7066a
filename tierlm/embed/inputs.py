"""Embedding inputs in every form the APIs take (a string, token ids, a list of either, or
`{"prompt_token_ids": [...]}`) -> one list of token ids per input, checked and, when asked,
truncated. Shared by `LLM.embed` and `/v1/embeddings` so both accept and refuse the same."""

from __future__ import annotations

from typing import Protocol

from tierlm.embed.encoder import EmbeddingSpec


class Embedder(Protocol):
    spec: EmbeddingSpec

    def encode(self, text: str, truncate: int | None = None) -> list[int]: ...

    def check(self, ids: list[int]) -> None: ...


def truncation(embedder: Embedder, truncate_prompt_tokens: int | None) -> int | None:
    """The token limit `truncate_prompt_tokens` asks for: -1 = the model's maximum, k >= 1 = k
    (ValueError past the maximum or below -1/0)."""
    if truncate_prompt_tokens is None:
        return None
    most = embedder.spec.max_input_tokens
    if truncate_prompt_tokens == -1:
        return most
    if not 1 <= truncate_prompt_tokens <= most:
        raise ValueError(f"truncate_prompt_tokens must be -1 or in [1, {most}], got {truncate_prompt_tokens}")
    return truncate_prompt_tokens


def check_dimensions(spec: EmbeddingSpec, dimensions: int | None) -> None:
    """ValueError unless `dimensions` is unset, the native length, or (Matryoshka models) shorter."""
    if dimensions is None or dimensions == spec.dimensions:
        return
    if not spec.matryoshka:
        raise ValueError(f"this model makes vectors of {spec.dimensions} dimensions and does not support "
                         f"a different `dimensions` ({dimensions})")
    if not 1 <= dimensions <= spec.dimensions:
        raise ValueError(f"dimensions must be in [1, {spec.dimensions}], got {dimensions}")


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def token_lists(embedder: Embedder, prompts, limit: int | None = None) -> list[list[int]]:
    """Token ids per input (ValueError naming what is wrong; InputTooLong past the model's
    maximum). Text gets the model's special tokens; token ids are taken as given. With
    `limit` (see `truncation`) inputs are cut at the end to that many tokens."""
    if isinstance(prompts, (str, dict)) or _is_ids(prompts):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("input must be a non-empty string, list of strings, or token ids")
    out = []
    for p in prompts:
        if isinstance(p, dict):
            p = p.get("prompt_token_ids", p.get("prompt"))
        if isinstance(p, str):
            if not p:
                raise ValueError("an input is an empty string")
            ids = embedder.encode(p, limit)
        elif _is_ids(p):
            ids = p[:limit]
        else:
            raise ValueError("each input must be a non-empty string or a non-empty list of token ids")
        embedder.check(ids)
        out.append(ids)
    return out
