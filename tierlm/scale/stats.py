"""One tier's engine stats from its replicas' snapshots: gauges over the live replicas,
running totals over every replica that ever served (a replacement starts from zero, and
the counters the server exports must never go back)."""

from __future__ import annotations

from tierlm.engine.async_engine import EngineStats

_COUNTERS = ("preemptions", "prefix_queries", "prefix_hits", "kv_evictions", "spec_draft_tokens",
             "spec_accepted_tokens")


def add_totals(into: EngineStats, s: EngineStats) -> None:
    """Add `s`'s running totals (counters, KV tier hits and bytes moved) to `into`."""
    for name in _COUNTERS:
        setattr(into, name, getattr(into, name) + getattr(s, name))
    for group in ("hits", "moved"):
        mine = into.kv_tiers.setdefault(group, {})
        for k, v in s.kv_tiers.get(group, {}).items():
            mine[k] = mine.get(k, 0) + v


def combined(live: list[EngineStats], retired: EngineStats) -> EngineStats:
    """The tier's stats: live replicas' gauges summed (KV usage and step times averaged),
    running totals over every replica that ever served."""
    n = max(1, len(live))
    out = EngineStats(running=sum(s.running for s in live), waiting=sum(s.waiting for s in live),
                      backlog_tokens=sum(s.backlog_tokens for s in live),
                      kv_usage=sum(s.kv_usage for s in live) / n, step_s=sum(s.step_s for s in live) / n,
                      idle_step_s=sum(s.idle_step_s for s in live) / n,
                      prefill_s_per_token=sum(s.prefill_s_per_token for s in live) / n)
    for s in [*live, retired]:
        add_totals(out, s)
    usage: dict[str, int] = {}
    for s in live:
        for k, v in s.kv_tiers.get("usage", {}).items():
            usage[k] = usage.get(k, 0) + v
    if usage:
        out.kv_tiers["usage"] = usage
    return out
