"""AsyncEngine: outputs reach the caller's loop; a failing step fails callers instead of hanging."""

from __future__ import annotations

import asyncio

import pytest

from tierlm import LLM, SamplingParams
from tierlm.engine.async_engine import AsyncEngine, EngineDeadError


@pytest.fixture(scope="module")
def engine(tiny_llama):
    path, _ = tiny_llama
    return LLM(str(path), dtype="float32").engine


def test_streams_outputs_and_counts(engine):
    finished = []
    ae = AsyncEngine(lambda: engine, on_finish=finished.append)
    ae.start()

    async def run():
        outs = [o async for o in ae.generate("r1", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True,
                                                                              temperature=0))]
        return outs

    try:
        outs = asyncio.run(run())
    finally:
        ae.shutdown()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
    assert sum(len(o.outputs[0].delta_token_ids) for o in outs) == 4
    assert ae.num_inflight == 0 and finished[0].timing.num_output_tokens == 4


def test_step_failure_fails_callers_and_marks_unhealthy(engine, monkeypatch):
    ae = AsyncEngine(lambda: engine)

    def boom():
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine, "step", boom)  # the fault being handled, not the code under test
    ae.start()

    async def run():
        async for _ in ae.generate("r2", [5, 6], SamplingParams(max_tokens=3)):
            pass

    with pytest.raises(EngineDeadError, match="kernel exploded"):
        asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert not ae.healthy
    with pytest.raises(EngineDeadError):
        ae.check_admission()
    monkeypatch.undo()
    engine.abort_request("r2")


def test_load_failure_surfaces_in_start():
    def broken():
        raise ValueError("unknown model 'x'")

    with pytest.raises(ValueError, match="unknown model"):
        AsyncEngine(broken).start()
