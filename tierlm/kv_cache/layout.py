"""KV layout: which layers share a block table, and where each layer's pages live.

Layers that see the same span of keys (the whole context, or one sliding-window size)
can share block tables. Sliding layers must not share tables with full layers: their
blocks die once they fall out of the window and go back to the pool, while a full
layer still needs the same positions. So layers are grouped by window, and every group
has the same number of layers (the gcd of the per-window counts), which makes a block
id mean the same bytes whoever owns it: one page in each of `group_size` slot tensors.
All groups draw from one pool, so memory a window frees is free for any request.

Gemma-3-270M (15 sliding + 3 full layers) becomes six groups of three layers; a plain
Llama is one group holding every layer (one table, exactly the classic paged layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KVGroup:
    window: int | None  # None = full attention
    layers: tuple[int, ...]


@dataclass(frozen=True)
class KVLayout:
    groups: tuple[KVGroup, ...]
    group_size: int  # layers per group = page slots per block

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(g.window for g in self.groups)

    def place(self, layer: int) -> tuple[int, int]:
        """(group index, slot index) of a layer."""
        for gi, g in enumerate(self.groups):
            if layer in g.layers:
                return gi, g.layers.index(layer)
        raise KeyError(layer)


def plan(layer_windows: list[int | None]) -> KVLayout:
    """Group layers by window (in layer order), in groups of equal size."""
    by_window: dict[int | None, list[int]] = {}
    for layer, w in enumerate(layer_windows):
        by_window.setdefault(w, []).append(layer)
    size = math.gcd(*(len(v) for v in by_window.values()))
    groups = tuple(KVGroup(w, tuple(layers[i : i + size]))
                   for w, layers in by_window.items() for i in range(0, len(layers), size))
    return KVLayout(groups, size)
