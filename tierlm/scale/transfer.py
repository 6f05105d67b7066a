"""When pulling cached KV from another replica beats computing it: a transfer costs a fixed
latency plus bytes over the measured bandwidth; a prefill costs tokens times the receiving
replica's measured prefill time per token. Pure; the measurements are moving averages
seeded by a probe at start and updated by every transfer."""

from __future__ import annotations

_ALPHA = 0.3  # weight of the newest measurement


class TransferModel:
    def __init__(self, latency_s: float, bytes_per_s: float) -> None:
        if latency_s < 0 or bytes_per_s <= 0:
            raise ValueError("a transfer needs latency >= 0 and bandwidth > 0")
        self.latency_s, self.bytes_per_s = latency_s, bytes_per_s

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s

    def worth_it(self, nbytes: int, tokens: int, prefill_s_per_token: float) -> bool:
        """True when moving `nbytes` is expected to take less time than computing `tokens`."""
        return self.seconds(nbytes) < tokens * prefill_s_per_token

    def observe(self, nbytes: int, seconds: float) -> None:
        """A transfer of `nbytes` took `seconds` end to end: refine the bandwidth (the part
        beyond the latency; transfers too small to tell refine the latency)."""
        beyond = seconds - self.latency_s
        if nbytes and beyond > 0.1 * seconds:
            self.bytes_per_s += _ALPHA * (nbytes / beyond - self.bytes_per_s)
        else:
            self.latency_s += _ALPHA * (max(0.0, seconds - nbytes / self.bytes_per_s) - self.latency_s)

    @classmethod
    def from_probe(cls, small_s: float, big_s: float, big_bytes: int) -> TransferModel:
        """From the times of a near-empty and a `big_bytes` transfer between two replicas."""
        return cls(small_s, big_bytes / max(big_s - small_s, 1e-6))
