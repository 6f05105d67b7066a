"""Beam search: the pure selection rule, and the state of one beam-search request.

Each round, every live beam's last logits give its 2 x width best next tokens
(sampling/sampler.py `beam_candidates`). `select` ranks all (beam, token) extensions by
cumulative logprob: extensions ending in a stop token among the best `width` become
finished hypotheses, and the best `width` others continue. The search ends at the length
limit, or once `width` hypotheses are finished and no live beam scores above the worst of
them (the usual early-stopping heuristic, which assumes a live beam's score only falls).
Hypotheses are ranked by cum_logprob / output_length ** length_penalty, compared in the
log domain (`badness`) so that no finite length_penalty can divide by zero or overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Extension:
    source: int  # index of the live beam it extends
    token: int
    cum_logprob: float


@dataclass(frozen=True)
class Hypothesis:
    token_ids: list[int]
    cum_logprob: float
    finish_reason: str  # "stop" | "length"
    stop_reason: int | None = None


def score(cum_logprob: float, length: int, length_penalty: float) -> float:
    """cum_logprob / length ** length_penalty; at extreme penalties it saturates to 0 or -inf
    (rank with `badness`, which keeps the order there)."""
    try:
        scale = max(length, 1) ** length_penalty
    except OverflowError:
        return -0.0
    return cum_logprob / scale if scale > 0.0 else (-math.inf if cum_logprob < 0.0 else 0.0)


def badness(cum_logprob: float, length: int, length_penalty: float) -> float:
    """log(-score): orders hypotheses exactly as `score` does (lower is better), finite for
    any finite inputs. A cumulative logprob is <= 0; 0 (certainty) is the best score."""
    if cum_logprob >= 0.0:
        return -math.inf
    return math.log(-cum_logprob) - length_penalty * math.log(max(length, 1))


def select(beams: list[tuple[float, list[tuple[int, float]]]], width: int,
           is_stop: Callable[[int], bool]) -> tuple[list[Extension], list[Extension]]:
    """beams: (cumulative logprob, candidates (token, logprob)) per live beam.

    Returns (continuing, stopping) extensions, each best first; ties break by beam index
    then token id, so the choice is deterministic.
    """
    extensions = sorted((Extension(i, tok, cum + lp) for i, (cum, cands) in enumerate(beams) for tok, lp in cands),
                        key=lambda e: (-e.cum_logprob, e.source, e.token))
    live: list[Extension] = []
    stopping: list[Extension] = []
    for rank, e in enumerate(extensions):
        if is_stop(e.token):
            if rank < width:  # a stop only counts if it is among the best `width`
                stopping.append(e)
        else:
            live.append(e)
            if len(live) == width:
                break
    return live, stopping


def ranked(hyps: list[Hypothesis], length_penalty: float) -> list[Hypothesis]:
    """Hypotheses best first (ties: earlier finished first)."""
    order = sorted(range(len(hyps)), key=lambda i: (badness(hyps[i].cum_logprob, len(hyps[i].token_ids),
                                                            length_penalty), i))
    return [hyps[i] for i in order]


@dataclass
class BeamState:
    """One beam-search request: its live beams (request id -> cumulative logprob, in
    rank order) and finished hypotheses."""

    width: int
    length_penalty: float
    live: dict[str, float]
    skip_special_tokens: bool = True
    finished: list[Hypothesis] = field(default_factory=list)
    next_id: int = 0

    def plan(self, outputs: list[list[int]], candidates: list[list[tuple[int, float]]], stops: set[int],
             eos: set[int], at_limit: bool) -> list[Extension]:
        """One round over the live beams (their output tokens and candidates, in `live`
        order): record the hypotheses that end and return the extensions to continue
        (empty when the search is over)."""
        beams = [(cum, [(t, lp) for t, lp in cands if lp != float("-inf")])
                 for cum, cands in zip(self.live.values(), candidates)]
        live, ending = select(beams, self.width, stops.__contains__)
        for e in ending:
            self.finished.append(Hypothesis(outputs[e.source] + [e.token], e.cum_logprob, "stop",
                                            None if e.token in eos else e.token))
        if at_limit:
            self.finished += [Hypothesis(outputs[e.source] + [e.token], e.cum_logprob, "length") for e in live]
            return []
        if live and self.done_early(live[0].cum_logprob, len(outputs[0]) + 1):
            return []
        return live

    def done_early(self, best_live_cum: float, length: int) -> bool:
        """Enough hypotheses, and the best live beam cannot beat the worst kept one."""
        if len(self.finished) < self.width:
            return False
        worst = ranked(self.finished, self.length_penalty)[self.width - 1]
        return (badness(best_live_cum, length, self.length_penalty)
                >= badness(worst.cum_logprob, len(worst.token_ids), self.length_penalty))
