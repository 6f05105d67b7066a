"""N-gram prompt-lookup proposer: draft the tokens that followed the last occurrence of
the sequence's current suffix (its last `n` tokens, longest n first) earlier in the
prompt or output. Free (no model), and right often when the output copies its input:
code edits, quoting, extraction, summaries that reuse phrases.

The draft is a point mass, so verifying it by "accept while the token the target would
sample equals the draft" is exactly the standard speculative rejection rule (accept with
probability p(draft), else sample from p without the draft), and with the per-position
seeded draws (sampling/sampler.py) the output is the one decoding without drafts gives.
"""

from __future__ import annotations

from array import array


def propose(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to `k` draft tokens continuing `tokens`, or [] when no suffix recurs."""
    if k <= 0 or len(tokens) < min_n + 1:
        return []
    data = array("q", tokens)
    raw = data.tobytes()
    size = data.itemsize
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        needle = raw[-n * size:]
        end = len(raw) - size  # the match must end before the last token: something follows it
        while True:
            at = raw.rfind(needle, 0, end)
            if at < 0:
                break
            if at % size == 0:  # a whole-token match, not bytes straddling two tokens
                start = at // size + n
                return tokens[start : start + k]
            end = at + len(needle) - 1
    return []
