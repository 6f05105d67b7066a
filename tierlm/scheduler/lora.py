"""Which adapter each of the runner's LoRA slots holds, and which slot a request takes.

A request with an adapter (`Request.lora`) is admitted only with a slot: the one already
holding its adapter, else a free one, else the least recently used slot whose adapter no
running request uses (evicted). With none to take, the request waits; requests behind it
that need a slot wait too (so the slots drain and it is not starved), while requests for
the base model go ahead. A slot that changes hands is loaded by the runner before the
step's forward (`SchedulerOutput.lora_loads`); the scheduler only keeps the books.
"""

from __future__ import annotations

from tierlm.request import Request

NO_SLOT = -1  # a row of the base model


class LoRASlotTable:
    def __init__(self, max_loras: int) -> None:
        self.held: list[str | None] = [None] * max_loras  # each slot's adapter key
        self._used = [0] * max_loras  # when each slot last took a request (for LRU)
        self._clock = 0
        self._loads: list[tuple[int, object]] = []  # (slot, adapter) since the last take
        self.loads_total = 0  # adapters loaded into a slot since start

    def slot_for(self, req: Request, running: list[Request]) -> int | None:
        """The slot `req` would take now (NO_SLOT for the base model), or None: it must wait."""
        if req.lora is None:
            return NO_SLOT
        key = req.lora.key
        if key in self.held:
            return self.held.index(key)
        if None in self.held:
            return self.held.index(None)
        busy = {r.lora.key for r in running if r.lora is not None}
        free = [s for s, k in enumerate(self.held) if k not in busy]
        return min(free, key=lambda s: self._used[s]) if free else None

    def bind(self, req: Request, slot: int) -> None:
        """`req` runs on `slot` (from slot_for); a slot taking a new adapter is loaded."""
        req.lora_slot = slot
        if slot == NO_SLOT:
            return
        self._clock += 1
        self._used[slot] = self._clock
        if self.held[slot] != req.lora.key:
            self.held[slot] = req.lora.key
            self._loads.append((slot, req.lora))
            self.loads_total += 1

    def take_loads(self) -> list[tuple[int, object]]:
        out, self._loads = self._loads, []
        return out
