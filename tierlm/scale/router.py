"""Which replica runs a request: session stickiness, then the longest cached prefix unless
that replica is overloaded, else the least loaded. Pure bookkeeping, no I/O (the block
hashes come from BlockKeys, the prefix cache's own chain).

What each replica holds is tracked here, not asked of it: the block hashes of every prompt
(and, once it finishes, every computed output block) sent to a replica are recorded
against it, newest last, up to that replica's capacity in blocks; older ones are
forgotten first, as its own LRU would evict them. The table can be wrong (a replica evicts
sooner under pressure, a replacement starts empty): a wrong guess costs a prefill, never
a wrong result, because the replica's own cache decides what is reused.

The rule, for a request with block hashes H and (optionally) a session id:
1. a session already bound to a live replica goes there (`session`);
2. else the live replica matching the longest run of H goes there (`prefix`), unless its
   outstanding tokens exceed the least loaded replica's by more than `overload_tokens`;
3. else the least loaded replica (`balance`; ties go round robin).
Outstanding tokens: prompt plus max_tokens of every request routed there and not finished.
A replica chosen with a shorter match than another's may pull the rest (a `transfer`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from tierlm.kv_cache import prefix_hash

ROUTINGS = ("prefix", "round_robin")


@dataclass(frozen=True)
class BlockKeys:
    """A replica model's prefix-cache block hashes, computed here exactly as its engine does
    (kv_cache/prefix_hash.py: the chain starts from the model key and the request's salt)."""

    model_key: str
    block_size: int
    caching: bool  # prefix caching on: otherwise nothing is ever held
    split_formats: bool  # generated blocks hashed apart (prefix_hash.extend)

    def of_prompt(self, ids: list[int], cache_salt: str | None) -> list[bytes]:
        return self._chain(ids, cache_salt, None)

    def of_output(self, ids: list[int], output_ids, cache_salt: str | None) -> list[bytes]:
        """The blocks a finished request leaves cached: prompt and output but the last token
        (its KV is never computed)."""
        return self._chain(ids + list(output_ids)[:-1], cache_salt, len(ids) if self.split_formats else None)

    def _chain(self, tokens: list[int], cache_salt: str | None, generated_from: int | None) -> list[bytes]:
        hashes: list[bytes] = []
        if self.caching:
            root = prefix_hash.root_hash(self.model_key, cache_salt or "")
            prefix_hash.extend(hashes, tokens, self.block_size, root, generated_from)
        return hashes


@dataclass(frozen=True)
class Decision:
    replica: int
    reason: str  # "session", "prefix", "balance" or "round_robin"
    matched: int  # leading blocks the chosen replica is believed to hold
    holder: int | None = None  # another replica believed to hold more of the prefix
    holder_matched: int = 0


@dataclass
class _Replica:
    capacity: int  # blocks it can keep (hot + warm)
    live: bool = True
    outstanding: int = 0
    held: OrderedDict = field(default_factory=OrderedDict)  # block hash -> None, oldest first


class PrefixRouter:
    def __init__(self, num_replicas: int, capacity_blocks: int, *, routing: str = "prefix",
                 overload_tokens: int = 2048, max_sessions: int = 65536) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        if overload_tokens < 0:
            raise ValueError("overload_tokens must be >= 0")
        self.routing, self.overload_tokens = routing, overload_tokens
        self.replicas = [_Replica(capacity_blocks) for _ in range(num_replicas)]
        self.sessions: OrderedDict[str, int] = OrderedDict()
        self.max_sessions = max_sessions
        self._turn = itertools.count()

    def live(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if r.live]

    def matched(self, replica: int, hashes: list[bytes]) -> int:
        held = self.replicas[replica].held
        n = 0
        while n < len(hashes) and hashes[n] in held:
            n += 1
        return n

    def choose(self, hashes: list[bytes], session_id: str | None = None,
               exclude: frozenset[int] = frozenset()) -> Decision:
        """The replica for a request (ValueError when none is live outside `exclude`)."""
        live = [i for i in self.live() if i not in exclude]
        if not live:
            raise ValueError("no live replica")
        if self.routing == "round_robin":
            return Decision(self._rotate(live), "round_robin", 0)
        matches = {i: self.matched(i, hashes) for i in live}
        best = max(live, key=lambda i: (matches[i], -self.replicas[i].outstanding))
        least = min(self.replicas[i].outstanding for i in live)
        bound = self.session_replica(session_id)
        if bound is not None and bound in live:
            chosen, reason = bound, "session"
        elif matches[best] and self.replicas[best].outstanding - least <= self.overload_tokens:
            chosen, reason = best, "prefix"
        else:
            chosen, reason = self._rotate([i for i in live if self.replicas[i].outstanding == least]), "balance"
        holder = best if matches[best] > matches[chosen] else None
        return Decision(chosen, reason, matches[chosen], holder, matches[best] if holder is not None else 0)

    def _rotate(self, candidates: list[int]) -> int:
        return candidates[next(self._turn) % len(candidates)]

    def session_replica(self, session_id: str | None) -> int | None:
        if session_id is None:
            return None
        replica = self.sessions.get(session_id)
        if replica is not None:
            self.sessions.move_to_end(session_id)
        return replica

    def routed(self, replica: int, hashes: list[bytes], tokens: int, session_id: str | None = None) -> None:
        """A request went to `replica`: its prompt blocks will be cached there."""
        r = self.replicas[replica]
        r.outstanding += tokens
        self.record(replica, hashes)
        if session_id is not None:
            self.sessions[session_id] = replica
            self.sessions.move_to_end(session_id)
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)

    def record(self, replica: int, hashes: list[bytes]) -> None:
        """`replica` now holds these blocks (newest use last; the oldest beyond capacity are forgotten)."""
        held = self.replicas[replica].held
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.replicas[replica].capacity:
            held.popitem(last=False)

    def progressed(self, replica: int, tokens: int) -> None:
        """`tokens` of a request's outstanding budget are done (or will never run)."""
        r = self.replicas[replica]
        r.outstanding = max(0, r.outstanding - tokens)

    def outstanding(self, replica: int) -> int:
        return self.replicas[replica].outstanding

    def lost(self, replica: int) -> None:
        """The replica died: out of routing, its table and sessions forgotten."""
        r = self.replicas[replica]
        r.live, r.outstanding = False, 0
        r.held.clear()
        for sid in [s for s, i in self.sessions.items() if i == replica]:
            del self.sessions[sid]

    def joined(self, replica: int) -> None:
        """A (replacement) replica is serving: back in routing, holding nothing yet."""
        r = self.replicas[replica]
        r.live, r.outstanding = True, 0
        r.held.clear()
