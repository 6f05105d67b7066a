"""EmbeddingEngine (the batching behind /v1/embeddings) on the bundled encoder: concurrent
requests share forward passes and get their own rows, a failing batch fails only its
requests, queue limits and drain cancel with the engine's errors."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tierlm.embed.encoder import Encoder
from tierlm.embed.engine import EmbeddingEngine
from tierlm.engine.async_engine import QueueFullError, ShuttingDownError
from tierlm.loader.bundled import resolve

TEXTS = ["A man is eating food.", "The girl is carrying a baby.", "A monkey is playing drums.", "Hello."]


class FailsOnPoison(Encoder):
    """The real encoder, failing any batch that holds token id 999 (a fault inside a forward)."""

    def embed(self, inputs, max_batch_tokens=8192):
        if any(999 in ids for ids in inputs):
            raise RuntimeError("poisoned batch")
        return super().embed(inputs, max_batch_tokens)


@pytest.fixture(scope="module")
def encoder(cache_dir):
    return FailsOnPoison(resolve("all-minilm-l6-v2", cache_dir))


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_batch_and_match_solo(encoder):
    steps = []
    engine = EmbeddingEngine(lambda: encoder, on_step=steps.append)
    engine.start()
    ids = [[encoder.encode(t)] for t in TEXTS]
    solo = [encoder.embed(i) for i in ids]

    async def together():
        return await asyncio.gather(*(engine.embed(i) for i in ids * 4))

    try:
        outs = run(together())
    finally:
        engine.shutdown()
    for k, v in enumerate(outs):
        assert torch.equal(v, solo[k % len(ids)])
    assert sum(s.running for s in steps) == len(outs) and len(steps) < len(outs)  # several per pass
    assert engine.num_inflight == 0 and engine.current_load().backlog_tokens == 0


def test_a_failed_batch_fails_its_requests_and_the_engine_goes_on(encoder):
    engine = EmbeddingEngine(lambda: encoder)
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="poisoned"):
            run(engine.embed([[101, 999, 102]]))
        assert engine.healthy
        assert run(engine.embed([encoder.encode("still serving")])).shape == (1, 384)
    finally:
        engine.shutdown()


def test_queue_limit_and_cancel_all(encoder):
    engine = EmbeddingEngine(lambda: encoder, max_queued_requests=2)
    engine.start()
    gate = engine._lock  # hold the worker: jobs stay queued while the test looks at them

    async def scenario():
        with gate:
            first = asyncio.ensure_future(engine.embed([encoder.encode("one")]))
            second = asyncio.ensure_future(engine.embed([encoder.encode("two")]))
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFullError):
                await engine.embed([encoder.encode("three")])
        engine.cancel_all("draining")
        return await asyncio.gather(first, second, return_exceptions=True)

    try:
        results = run(scenario())
    finally:
        engine.shutdown()
    # Each either ran before the cancel or was cancelled with the drain's message.
    for r in results:
        assert isinstance(r, torch.Tensor) or (isinstance(r, ShuttingDownError) and "draining" in str(r))
