"""Prefix caching at admission: a request's chained block hashes, and starting it on the
longest cached prefix of its tokens (kv_cache/manager.py holds the blocks)."""

from __future__ import annotations

from tierlm.kv_cache import prefix_hash
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.request import Request


def hash_full_blocks(req: Request, block_size: int, split_formats: bool) -> None:
    """Extend `req.block_hashes` to its full blocks (no token-list copy when nothing is new).
    `split_formats`: prompt and generated tokens ran on different weight formats, so their
    blocks are hashed apart."""
    if req.num_tokens // block_size > len(req.block_hashes):
        generated_from = len(req.prompt_token_ids) if split_formats else None
        prefix_hash.extend(req.block_hashes, req.all_token_ids, block_size, req.cache_root, generated_from)


def adopt_cached_prefix(kv: KVCacheManager, req: Request, split_formats: bool) -> tuple[int, int]:
    """Start `req` (nothing computed yet) on its longest cached prefix.

    Returns (its tokens, blocks of it found in the hot pool)."""
    if not kv.enable_caching or req.prompt_logprobs is not None:  # scoring needs every position
        return 0, 0
    bs = kv.block_size
    hash_full_blocks(req, bs, split_formats)
    k = kv.lookup_prefix(req.block_hashes, (req.num_tokens - 1) // bs)  # leave >= 1 to compute
    hot = 0
    if k:
        k, hot = kv.adopt_prefix(req.request_id, req.block_hashes, k)
        req.num_computed_tokens = k * bs
    return k * bs, hot
