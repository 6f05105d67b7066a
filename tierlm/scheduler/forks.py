"""Samples parked until a sibling has computed the shared prompt: the extra samples of an
n > 1 / best_of request wait here and are then forked from the first one's KV."""

from __future__ import annotations

from tierlm.request import Request


class Parking:
    def __init__(self) -> None:
        self.parked: dict[str, list[Request]] = {}  # source id -> requests to fork from its prompt

    def park(self, src_id: str, children: list[Request]) -> None:
        self.parked[src_id] = children

    def holds_for(self, src_id: str) -> bool:
        return src_id in self.parked

    def release(self, src_id: str) -> list[Request]:
        return self.parked.pop(src_id, [])

    def discard(self, req: Request) -> None:
        """Forget a parked request that ended before its source released it."""
        for children in self.parked.values():
            if req in children:
                children.remove(req)

    def __len__(self) -> int:
        return sum(len(c) for c in self.parked.values())
