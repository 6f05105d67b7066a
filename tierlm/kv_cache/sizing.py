"""KV cache sizing: a model's KV groups (kv_cache/layout.py), the bytes and page shape of
one block, how many blocks a memory budget holds, and the pool tensors themselves
(committed page by page as they are written)."""

from __future__ import annotations

import math
import mmap

import torch

from tierlm.config import CacheConfig, ModelConfig
from tierlm.kv_cache import layout as kv_layout


def layout_for(cfg: ModelConfig) -> kv_layout.KVLayout:
    return kv_layout.plan([cfg.layer_window(i) for i in range(cfg.num_layers)])


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block: one page in each slot of a KV group."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layout_for(cfg).group_size * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def kv_page_shape(cfg: ModelConfig, block_size: int) -> tuple[int, int]:
    """Shape of one block's pages as `read_block` returns them: [2 * group_size, page elements]."""
    return 2 * layout_for(cfg).group_size, block_size * cfg.num_kv_heads * cfg.head_dim


def num_kv_blocks(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(2, int(cache.kv_cache_gb * 2**30) // kv_block_bytes(cfg, cache.block_size, dtype))


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor whose memory is committed page by page on first write.

    Zeros, because padding reads of never-written slots must be finite (they are masked);
    lazily, because the pool is sized for the worst case: torch.zeros would write (and so
    commit) every page up front. A private anonymous mapping is zero pages from the OS,
    each committed when first written, so resident memory grows with the KV actually
    held (calloc gives that only while the allocator hands out fresh mappings).
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    pages = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)  # keeps `pages`
