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
    copy: bool = False  # the prompt asks to copy a code listing (speculative decoding's case)


STANDARD = {
    "w1": Workload("w1", "single stream", 32, 256, 1, (1,)),
    "w2": Workload("w2", "long prompt", 1000, 16, 1, (1,)),
    "w3": Workload("w3", "throughput", 200, 128, 64, (1, 8, 32)),
    "w4": Workload("w4", "copy-heavy (speculative)", 0, 128, 1, (1,), copy=True),
}

LISTING = '''def merge_intervals(intervals):
    """Merge overlapping [start, end] intervals; returns them sorted by start."""
    if not intervals:
        return []
    ordered = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return merged


def total_covered(intervals):
    """Length of the union of the intervals."""
    return sum(end - start for start, end in merge_intervals(intervals))


if __name__ == "__main__":
    spans = [(1, 3), (2, 6), (8, 10), (15, 18), (17, 20)]
    print(merge_intervals(spans))
    print(total_covered(spans))
'''

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


def copy_prompt_ids(tokenizer) -> list[int]:
    """A chat request to reproduce LISTING with one name changed: most of the answer copies
    the prompt. Always the same prompt (how much a small model copies depends on the exact
    words), so repeats may reuse its cached prefix: W4 measures decoding."""
    ask = f"Rename `total_covered` to `covered_length` in this code and give the whole file:\n\n```python\n{LISTING}```"
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": ask}]),
                            add_special_tokens=False)
