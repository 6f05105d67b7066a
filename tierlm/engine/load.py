"""Live step-time measurements of one engine, the inputs of tier selection's latency
estimates (tenancy/routing.py). Fed by the engine thread after every step; read from
the event loop (plain floats: a torn read is impossible in CPython).

Until the warm-up request has been measured the figures are deliberately pessimistic
guesses, so a cold tier is not preferred for a tight latency budget by accident.
"""

from __future__ import annotations

from tierlm.tenancy.routing import TierLoad

_ALPHA = 0.3  # weight of the newest step: reacts within a few steps, smooths single outliers
# The idle step is the best case: a faster single-request step replaces it at once, a slower
# one (another tier busy on the same cores, a noisy neighbour) moves it up only slowly, so
# "impossible even idle" (a 400) never comes from someone else's load.
_IDLE_RISE = 0.02
_PREFILL_MIN_TOKENS = 32  # steps this big are prefill-dominated: they price a prompt token


class LoadTracker:
    def __init__(self) -> None:
        self.step_s = 0.1  # a recent step, whatever its batch
        self.idle_step_s = 0.1  # one request decoding alone
        self.prefill_s_per_token = 0.005

    @staticmethod
    def _ewma(old: float, new: float) -> float:
        return old + _ALPHA * (new - old)

    def observe(self, seconds: float, tokens: int, requests: int) -> None:
        if requests == 0:
            return
        self.step_s = self._ewma(self.step_s, seconds)
        if requests == 1 and tokens == 1:
            rise = _IDLE_RISE * (seconds - self.idle_step_s)
            self.idle_step_s = seconds if seconds < self.idle_step_s else self.idle_step_s + rise
        if tokens >= _PREFILL_MIN_TOKENS:
            self.prefill_s_per_token = self._ewma(self.prefill_s_per_token, seconds / tokens)

    def load(self, running: int, backlog_tokens: int) -> TierLoad:
        return load_of(self.step_s, self.idle_step_s, self.prefill_s_per_token, running, backlog_tokens)


def load_of(step_s: float, idle_step_s: float, prefill_s_per_token: float, running: int,
            backlog_tokens: int) -> TierLoad:
    """An engine's load now: an idle engine steps at its idle pace, not at the last busy one."""
    return TierLoad(step_s if running else idle_step_s, idle_step_s, prefill_s_per_token, backlog_tokens,
                    busy=running > 0)
