"""One data-parallel replica: a whole engine (AsyncEngine over LLMEngine) inside a Ray
actor process, with its own kernel threads, KV pool and prefix cache.

The front end (replica_set.py) owns everything about a request except computing it:
validation, tenants, quotas and routing stay in the server process, so a replica only
prepares, generates, reports its load and exchanges cached prefix blocks. Outputs stream
back through Ray's generator returns; cancelling that stream aborts the request here.

This class is plain Python; replica_set.py makes it a Ray actor (`ray.remote`), so
importing tierlm never imports Ray.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from tierlm.config import EngineConfig
from tierlm.engine.async_engine import AsyncEngine, EngineStats
from tierlm.kv_cache import exchange
from tierlm.outputs import RequestOutput
from tierlm.sampling_params import SamplingParams


class EngineReplica:
    def __init__(self, config: EngineConfig, threads: int, max_queued_requests: int) -> None:
        import torch

        from tierlm import kernels

        torch.set_num_threads(threads)
        kernels.use_threads(threads)  # before the load: the kernels' pool is sized once per process
        self.config = config
        self.engine = AsyncEngine(self._build, max_queued_requests=max_queued_requests)

    def _build(self):
        from tierlm.engine.builder import build_engine

        return build_engine(self.config)

    async def start(self) -> dict:
        """Load the model (on the engine thread); what the front end needs to route to it."""
        llm = await asyncio.to_thread(self.engine.start)
        kv, page = llm.kv, llm.runner.read_block(0)
        warm = kv.tiers.warm_capacity if kv.tiers is not None else 0
        return {"pid": os.getpid(), "model_key": llm.model_key, "block_size": kv.block_size,
                "split_formats": llm.scheduler.split_formats, "caching": kv.enable_caching,
                "capacity_blocks": kv.pool.num_usable + warm, "block_bytes": page.numel() * page.element_size(),
                "tokenizer": llm.tokenizer, "max_model_len": llm.max_model_len,
                "vocab_size": llm.model_config.vocab_size}

    def prepare(self, ids: list[int], params: SamplingParams) -> None:
        self.engine.prepare(ids, params)

    async def generate(self, request_id: str, ids: list[int], params: SamplingParams, priority: int,
                       cache_salt: str | None, session_id: str | None, tenant: str) -> AsyncIterator[RequestOutput]:
        async for out in self.engine.generate(request_id, ids, params, priority, cache_salt, session_id, tenant):
            yield out

    def stats(self) -> tuple[EngineStats, bool, str | None]:
        """The last step's snapshot, whether the engine is healthy, and why not."""
        return self.engine.stats, self.engine.healthy, self.engine.error

    def cancel_all(self, message: str) -> None:
        self.engine.cancel_all(message)

    async def export_prefix(self, hashes: list[bytes]) -> exchange.PrefixPages | None:
        return await self.engine.call(lambda llm: exchange.export_prefix(llm.kv, llm.runner.read_block, hashes))

    async def import_prefix(self, pages: exchange.PrefixPages | None) -> int:
        """Take another replica's blocks into the warm tier; returns how many were new."""
        if pages is None:
            return 0

        def take(llm) -> int:
            page = llm.runner.read_block(0)
            return exchange.import_prefix(llm.kv, pages, tuple(page.shape), page.dtype)

        return await self.engine.call(take)

    def shutdown(self) -> None:
        self.engine.shutdown()  # flushes cached KV to the cold tier, if one is configured

    # ---- the transfer-bandwidth probe (replica_set.py times blob -> sink between two replicas)
    def blob(self, nbytes: int):
        import numpy as np

        return np.zeros(nbytes, dtype=np.uint8)

    def sink(self, data) -> int:
        return int(data.nbytes)
