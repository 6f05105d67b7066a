"""KV cache sizing: a model's KV groups (kv_cache/layout.py), the bytes and page shape of
one block, how many blocks a memory budget holds, and the pool tensors themselves
(committed page by page as they are written).

An int8 cache (`kv_cache_dtype = "int8"`) stores each token's K and V per KV head as
head_dim 8-bit codes plus 4 bytes of parameters per 64 dimensions, inside the same page
(the rule and layout are in kernels/csrc/attention.cpp): a head is `head_width` elements
(17/16 of head_dim for multiples of 64), and block copies (warm tier, cold store) move the parameters
with the codes."""

from __future__ import annotations

import math
import mmap

import torch

from tierlm.config import CacheConfig, ModelConfig
from tierlm.kernels.reference import kv_width
from tierlm.kv_cache import layout as kv_layout


def kv_dtype(cache: CacheConfig, compute: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype: the model's compute dtype, or int8."""
    return torch.int8 if cache.kv_cache_dtype == "int8" else compute


def head_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements a KV head takes per token in a cache of `dtype` (an int8 cache's codes and parameters)."""
    return kv_width(head_dim) if dtype == torch.int8 else head_dim


def layout_for(cfg: ModelConfig) -> kv_layout.KVLayout:
    return kv_layout.plan([cfg.layer_window(i) for i in range(cfg.num_layers)])


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block: one page in each slot of a KV group."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layout_for(cfg).group_size * block_size * cfg.num_kv_heads * head_width(cfg.head_dim, dtype) * elem


def kv_page_shape(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """Shape of one block's pages as `read_block` returns them: [2 * group_size, page elements]."""
    return 2 * layout_for(cfg).group_size, block_size * cfg.num_kv_heads * head_width(cfg.head_dim, dtype)


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
