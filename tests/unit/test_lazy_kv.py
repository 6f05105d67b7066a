"""The KV pool commits memory as blocks are written, not when the engine starts."""

from __future__ import annotations

import torch

from tierlm.kv_cache.sizing import lazily_zeroed


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_pool_memory_is_committed_on_write():
    mib = 2**20
    before = _rss_bytes()
    pool = lazily_zeroed((2048, 16, 64, 64), torch.bfloat16)  # 256 MiB, 128 KiB per block
    assert pool.shape == (2048, 16, 64, 64) and pool.dtype == torch.bfloat16
    assert _rss_bytes() - before < 16 * mib
    # Unwritten slots read as zeros (attention reads padding slots under a mask).
    assert pool[::97].abs().sum().item() == 0
    assert _rss_bytes() - before < 16 * mib
    pool[:256] = 1.0  # 32 MiB of blocks written: only those are committed
    grown = _rss_bytes() - before
    assert 28 * mib < grown < 48 * mib
    assert pool[:256].eq(1).all() and pool[256:].abs().sum().item() == 0
