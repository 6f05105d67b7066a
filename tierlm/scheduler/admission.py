"""Admission: may a waiting request join the running batch now?

"greedy" admits whenever the blocks for its first chunk are free; running requests
then grow by a token a step, and when the pool runs dry one of them is preempted and
recomputed later (work thrown away).

"past_future" (after LightLLM's scheduler) looks ahead instead. The past: the output
lengths of requests that finished give, for a request that has generated g tokens, a
prediction of how many more it will produce (a high quantile of the finished lengths
above g, capped by its max_tokens). The future: with every running request's current
length c and predicted remainder r, the blocks held t steps from now are
sum over requests with r >= t of blocks(c + t); it peaks just before a request finishes,
so checking t = each r is enough. A request is admitted only if that peak, with it
included, fits the pool. Predictions that turn out short still end in preemption, so
the rule is a heuristic on top of a correct scheduler, never a condition for it.

Pure functions, a small history object, and the two rules as strategies (`Greedy`,
`PastFuture`) the scheduler asks before admitting.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable

MODES = ("greedy", "past_future")


class OutputLengthHistory:
    """Output lengths of recently finished requests (a sliding window, kept sorted)."""

    def __init__(self, window: int = 512, quantile: float = 0.9, min_samples: int = 8) -> None:
        self.quantile, self.min_samples = quantile, min_samples
        self._order: deque[int] = deque(maxlen=window)
        self._sorted: list[int] = []

    def record(self, length: int) -> None:
        if len(self._order) == self._order.maxlen:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._order[0]))
        self._order.append(length)
        bisect.insort(self._sorted, length)

    def remaining(self, generated: int, cap: int) -> int:
        """Predicted further output of a request that has generated `generated` tokens and may
        generate `cap` more: the quantile of finished lengths beyond `generated`; the cap
        itself until there is enough history (or none that long)."""
        if cap <= 0:
            return 0
        longer = self._sorted[bisect.bisect_right(self._sorted, generated):]
        if len(self._sorted) < self.min_samples or not longer:
            return cap
        total = longer[min(len(longer) - 1, int(self.quantile * len(longer)))]
        return max(1, min(cap, total - generated))


def peak_blocks(seqs: list[tuple[int, int]], blocks: Callable[[int], int]) -> int:
    """Most KV blocks held at once from now on. `seqs` are (current tokens, predicted
    remaining tokens); `blocks(n)` is what one request of n tokens holds."""
    peak = sum(blocks(c) for c, _ in seqs)
    for t in sorted({r for _, r in seqs if r > 0}):
        peak = max(peak, sum(blocks(c + t) for c, r in seqs if r >= t))
    return peak


class Greedy:
    """Admit whenever the blocks for the first chunk are free (the scheduler checks those)."""

    def fits(self, req, running: list, kv, chunk: int) -> bool:
        return True

    def record(self, output_len: int) -> None:
        pass


class PastFuture:
    """Admit only when the predicted peak KV use, with the request included, fits the pool."""

    def __init__(self) -> None:
        self.history = OutputLengthHistory()  # finished output lengths

    def record(self, output_len: int) -> None:
        self.history.record(output_len)

    def remaining(self, req) -> int:
        """Predicted further output tokens of `req`."""
        p = req.sampling_params
        cap = req.max_total_tokens - req.num_tokens
        if p.max_tokens is not None:
            cap = min(cap, p.max_tokens - req.num_output_tokens)
        return self.history.remaining(req.num_output_tokens, cap)

    def fits(self, req, running: list, kv, chunk: int) -> bool:
        if not running:  # alone it always fits (validation checked its worst case)
            return True
        seqs = [(r.num_tokens, self.remaining(r)) for r in running]
        seqs.append((req.num_tokens, self.remaining(req)))
        return peak_blocks(seqs, lambda n: kv.max_blocks(n, chunk)) <= kv.pool.num_usable


def make_admission(mode: str) -> Greedy | PastFuture:
    return PastFuture() if mode == "past_future" else Greedy()
