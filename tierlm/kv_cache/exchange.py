"""Cached prefix blocks moved between engines of one model (data-parallel replicas).

`export_prefix` reads what an engine holds of a chain of block hashes (hot pool pages,
or warm copies) into one flat byte buffer; `import_prefix` puts such a buffer into
another engine's warm tier, where its next prefix lookup finds the blocks and restores
them like any warm hit. Both run on the engine's own thread, between steps.

The pages are the ones the holder computed, bit for bit, under the same chained hashes
(the hash covers the model identity, salt and every earlier token), so a request that
starts on imported blocks computes exactly what it would have computed on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tierlm.kv_cache.block_pool import CacheKey
from tierlm.kv_cache.manager import KVCacheManager


@dataclass(frozen=True)
class PrefixPages:
    """Blocks of one prefix, in chain order: `data` holds each key's pages, one block's
    `shape` and `dtype` each, back to back (a numpy buffer: Ray moves it without a copy)."""

    keys: list[CacheKey]
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8


def _held(kv: KVCacheManager, read_block, key: CacheKey) -> torch.Tensor | None:
    block = kv.pool.lookup(key)
    if block is not None:
        return read_block(block)
    data = kv.tiers.warm.get(key) if kv.tiers is not None else None
    return data if isinstance(data, torch.Tensor) else None  # a pending save has no pages yet


def _held_blocks(kv: KVCacheManager, read_block, h: bytes) -> list[tuple[CacheKey, torch.Tensor]] | None:
    """Every KV group's block of hash `h` that is held; None when a full-attention group lacks it."""
    found = []
    for g, window in enumerate(kv.windows):
        data = _held(kv, read_block, (g, h))
        if data is not None:
            found.append(((g, h), data))
        elif window is None:
            return None
    return found


def export_prefix(kv: KVCacheManager, read_block, hashes: list[bytes]) -> PrefixPages | None:
    """What `kv` holds of the chain `hashes`: every group's block for each leading hash,
    up to the first one a full-attention group lacks (sliding-window groups may lack early
    blocks: a lookup never asks for them). None when nothing of it is held."""
    if not kv.enable_caching:
        return None
    keys: list[CacheKey] = []
    pages: list[torch.Tensor] = []
    for h in hashes:
        found = _held_blocks(kv, read_block, h)
        if found is None:
            break
        keys += [k for k, _ in found]
        pages += [d for _, d in found]
    if not keys:
        return None
    flat = torch.stack(pages).contiguous()
    return PrefixPages(keys, str(flat.dtype).removeprefix("torch."), tuple(flat.shape[1:]),
                       flat.view(torch.uint8).reshape(-1).numpy())


def import_prefix(kv: KVCacheManager, pages: PrefixPages, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Put the blocks `kv` cannot find yet into its warm tier; returns how many. `shape`
    and `dtype`: this engine's own block pages (a mismatch is a different model: refused)."""
    if kv.tiers is None:
        return 0
    if tuple(pages.shape) != tuple(shape) or pages.dtype != str(dtype).removeprefix("torch."):
        raise ValueError(f"KV pages {pages.dtype}{list(pages.shape)} do not fit this engine's "
                         f"{dtype}{list(shape)}")
    flat = torch.from_numpy(np.array(pages.data, copy=True)).view(getattr(torch, pages.dtype))
    blocks = flat.reshape(len(pages.keys), *pages.shape)
    taken = 0
    for key, block in zip(pages.keys, blocks):
        if kv.pool.lookup(key) is None and not kv.tiers.has(key):
            kv.tiers.put_warm(key, block.clone())
            taken += 1
    return taken
