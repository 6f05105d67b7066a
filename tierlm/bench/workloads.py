"""The standard benchmark workloads: prompt and output lengths, request count, concurrency.

W1-W3 are the CPU-performance workloads (single stream, long prompt, batched
throughput); every request uses temperature 0 and ignores end-of-sequence, so each one
produces exactly `output_tokens` tokens whatever the model says.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    prompt_tokens: int
    output_tokens: int
    requests: int  # per concurrency level
    concurrency: tuple[int, ...]


STANDARD = {
    "w1": Workload("w1", "single stream", 32, 256, 1, (1,)),
    "w2": Workload("w2", "long prompt", 1000, 16, 1, (1,)),
    "w3": Workload("w3", "throughput", 200, 128, 64, (1, 8, 32)),
}

_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards",
          "quietly", "judge", "boxing", "matches", "in", "distant", "valleys", "of", "ancient", "kingdoms",
          "near", "rivers")


def prompt_ids(tokenizer, n_tokens: int, salt: int) -> list[int]:
    """Exactly `n_tokens` ids of varied text; the salt makes prompts differ from their start
    (so no two requests share a cached prefix)."""
    text = " ".join(_WORDS[(i * 7 + salt) % len(_WORDS)] for i in range(n_tokens * 2))
    ids = tokenizer.encode(f"Story {salt}: {text}", add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"could not make a {n_tokens}-token prompt")
    return ids[:n_tokens]
