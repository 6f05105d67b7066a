"""Tier selection: which tier of the TierSet serves a request.

A pure function of the request's demand, the tiers a tenant may use, each tier's live
load and the tenant's remaining cost: the same inputs always give the same choice.

Estimates, per tier:
- TTFT = one step + (prompt tokens queued ahead + this prompt) x prefill time per token;
- latency = TTFT + (output tokens - 1) x the tier's current step time (a busy tier's
  steps are longer: the batch is bigger and prefill chunks share them);
- cost = the worst case, prompt + every token the request may generate, at the tier's
  prices: a budget or a ceiling is never passed, whatever the output turns out to be.
The tiers of one server share its CPU cores (`shared_cores`): an idle tier's steps run
beside every busy tier's, so its step and prefill times are scaled by 1 + the busy
others (a busy tier's measured times already include them).

Modes (`tier_mode`, with `model: "auto"`), policies over whatever tiers the tenant may
use, whatever their names; "fits" means every estimate is within every budget:
- `fixed`: the tenant's default tier, budgets only checked (never a switch);
- `max`: the highest quality (ties: faster, cheaper, name), budgets only checked;
- `deep`: the highest quality that fits;
- `balanced` (default): among the tiers that fit, the highest
      value = quality / cost ** cost_weight
  (cost: the request's worst-case cost on that tier; `balanced_cost_weight` in the file,
  default 1: quality per dollar; 0 makes it `deep`), ties to the higher quality, then
  faster, then name. A free tier's value is infinite, so free tiers win and quality picks
  among them. At weight 1 a tier 5x dearer must be over 5x better to win.
A request naming a tier takes that one tier, budgets checked. No tier fitting ->
`NoTierFits`: 400 when no tier could fit even idle (the budget is impossible), 429 when
load or the tenant's spent cost is the reason, naming the budget and the fastest and
cheapest options. The reason reported with a choice: explicit | fixed | preferred (the
mode's first choice fits) | latency | cost (why the first choice did not).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tierlm.config import TierConfig

MODES = ("fixed", "balanced", "deep", "max")


@dataclass(frozen=True)
class TierLoad:
    """Live measurements of one tier's engine."""

    step_s: float  # time per engine step now (0 running: the idle step time)
    idle_step_s: float  # one request alone
    prefill_s_per_token: float
    backlog_tokens: int = 0  # prompt tokens queued or part-way through prefill
    busy: bool = False  # it has requests running or submitted
    contention: float = 1.0  # its step and prefill times under the other tiers' load (shared_cores)


@dataclass(frozen=True)
class Demand:
    """What the request needs, per tier (tokenizers differ): prompt tokens, the output
    tokens the latency estimate assumes, and the most it may generate (for cost)."""

    prompt_tokens: Mapping[str, int]
    output_tokens: Mapping[str, int]
    max_output_tokens: Mapping[str, int]


@dataclass(frozen=True)
class Budgets:
    max_latency_ms: float | None = None  # end to end
    max_ttft_ms: float | None = None
    max_cost_usd: float | None = None  # the request's own budget
    cost_left_usd: float | None = None  # what the tenant's cost ceiling still allows


@dataclass(frozen=True)
class Estimate:
    ttft_s: float
    latency_s: float
    cost_usd: float
    idle_ttft_s: float  # the same with no load: a budget failed even idle is impossible
    idle_latency_s: float


@dataclass(frozen=True)
class Choice:
    tier: str
    reason: str  # explicit | fixed | preferred | latency | cost (why not the preferred one)
    estimate: Estimate


class NoTierFits(Exception):
    def __init__(self, status: int, param: str, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.status, self.param, self.retry_after = status, param, retry_after


def shared_cores(loads: Mapping[str, TierLoad]) -> dict[str, TierLoad]:
    """Loads of tiers that share the cores: an idle tier runs beside the busy ones."""
    busy = sum(load.busy for load in loads.values())
    return {name: load if load.busy or not busy else dataclasses.replace(load, contention=1.0 + busy)
            for name, load in loads.items()}


def estimate(tier: TierConfig, load: TierLoad, prompt: int, output: int, max_output: int) -> Estimate:
    decode = max(0, output - 1)
    step = load.step_s * load.contention
    ttft = step + (load.backlog_tokens + prompt) * load.prefill_s_per_token * load.contention
    idle_ttft = load.idle_step_s + prompt * load.prefill_s_per_token
    return Estimate(ttft, ttft + decode * step, tier.cost_usd(prompt, max_output),
                    idle_ttft, idle_ttft + decode * load.idle_step_s)


def _failures(e: Estimate, b: Budgets) -> list[tuple[str, bool]]:
    """Budgets this estimate breaks, as (budget, static: broken even with no load)."""
    out = []
    if b.max_cost_usd is not None and e.cost_usd > b.max_cost_usd:
        out.append(("max_cost_usd", True))
    if b.cost_left_usd is not None and e.cost_usd > b.cost_left_usd:
        out.append(("cost_ceiling", False))
    if b.max_ttft_ms is not None and e.ttft_s * 1e3 > b.max_ttft_ms:
        out.append(("max_ttft_ms", e.idle_ttft_s * 1e3 > b.max_ttft_ms))
    if b.max_latency_ms is not None and e.latency_s * 1e3 > b.max_latency_ms:
        out.append(("max_latency_ms", e.idle_latency_s * 1e3 > b.max_latency_ms))
    return out


def value(quality: float, cost_usd: float, cost_weight: float) -> float:
    """`balanced`'s figure of merit: quality per cost ** cost_weight (a free tier: infinite)."""
    if cost_weight == 0:
        return quality
    scale = cost_usd ** cost_weight if cost_usd > 0 else 0.0
    return math.inf if scale == 0 else quality / scale  # 0: free, or a cost too small to weigh


def select(tiers: Sequence[TierConfig], loads: Mapping[str, TierLoad], demand: Demand, budgets: Budgets,
           mode: str = "balanced", fixed: str | None = None, default: str | None = None,
           cost_weight: float = 1.0) -> Choice:
    """Pick a tier among `tiers` (those the tenant may use; never empty: the caller answers
    403 first). `fixed` names the one tier a request asked for (mode is then ignored and
    the reason is "explicit"); `default` is the tenant's default tier (`fixed` mode; the
    first tier when not given or not among `tiers`)."""
    if mode not in MODES:
        raise NoTierFits(400, "tier_mode", f"tier_mode must be one of {', '.join(MODES)}, got {mode!r}", None)
    est = {t.name: estimate(t, loads[t.name], demand.prompt_tokens[t.name], demand.output_tokens[t.name],
                            demand.max_output_tokens[t.name]) for t in tiers}
    by_quality = sorted(tiers, key=lambda t: (-t.quality, est[t.name].latency_s, est[t.name].cost_usd, t.name))
    if fixed is not None or mode == "fixed":
        name = fixed or next((t.name for t in tiers if t.name == default), tiers[0].name)
        candidates = [next(t for t in tiers if t.name == name)]
    elif mode == "max":
        candidates = by_quality[:1]
    elif mode == "deep":
        candidates = by_quality
    else:  # balanced: best value first; quality, speed and name break ties
        candidates = sorted(tiers, key=lambda t: (-value(t.quality, est[t.name].cost_usd, cost_weight), -t.quality,
                                                  est[t.name].latency_s, t.name))
    preferred = candidates[0]
    failed = {t.name: _failures(est[t.name], budgets) for t in candidates}
    for t in candidates:
        if not failed[t.name]:
            if fixed is not None:
                reason = "explicit"
            elif mode == "fixed":
                reason = "fixed"
            elif t is preferred:
                reason = "preferred"
            else:
                first = failed[preferred.name][0][0]
                reason = "cost" if first in ("max_cost_usd", "cost_ceiling") else "latency"
            return Choice(t.name, reason, est[t.name])
    raise _no_fit(candidates, est, failed, budgets)


def _no_fit(candidates: list[TierConfig], est: dict[str, Estimate], failed: dict[str, list[tuple[str, bool]]],
            b: Budgets) -> NoTierFits:
    fastest = min(candidates, key=lambda t: (est[t.name].latency_s, t.name))
    cheapest = min(candidates, key=lambda t: (est[t.name].cost_usd, t.name))
    broken = [name for name in ("max_cost_usd", "cost_ceiling", "max_ttft_ms", "max_latency_ms")
              if any(name == f for fs in failed.values() for f, _ in fs)]
    limits = {"max_cost_usd": f"max_cost_usd={b.max_cost_usd:g}" if b.max_cost_usd is not None else "",
              "cost_ceiling": f"the tenant's cost ceiling (${b.cost_left_usd or 0:.6f} left)",
              "max_ttft_ms": f"max_ttft_ms={b.max_ttft_ms:g}" if b.max_ttft_ms is not None else "",
              "max_latency_ms": f"max_latency_ms={b.max_latency_ms:g}" if b.max_latency_ms is not None else ""}
    fe, ce = est[fastest.name], est[cheapest.name]
    message = (f"no tier fits {' and '.join(limits[n] for n in broken)}: fastest is '{fastest.name}' "
               f"(estimated TTFT {fe.ttft_s * 1e3:.0f} ms, latency {fe.latency_s * 1e3:.0f} ms), cheapest is "
               f"'{cheapest.name}' (up to ${ce.cost_usd:.6f})")
    # Impossible whatever the load (a cost budget, or latency even on an idle tier): 400.
    static = all(any(s for _, s in failed[t.name]) for t in candidates)
    if static:
        return NoTierFits(400, broken[0], message, None)
    # Load passes; the tenant's spent cost waits for its period (the caller knows when).
    return NoTierFits(429, broken[0], message, None if broken == ["cost_ceiling"] else 1.0)
