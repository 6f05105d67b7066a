"""AsyncEngine: outputs reach the caller's loop; a failing step fails its callers (never hangs them), the
engine is rebuilt, and repeated failures leave it dead for the server to exit."""

from __future__ import annotations

import asyncio
import threading
import time

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


def _failing_factory(path, builds: list, fail_builds: int, monkeypatch):
    """Builds real engines; the first `fail_builds` of them fail every step (the injected fault)."""

    def build():
        engine = LLM(str(path), dtype="float32").engine
        if len(builds) < fail_builds:
            def boom():
                raise RuntimeError("kernel exploded")

            monkeypatch.setattr(engine, "step", boom)
        builds.append(engine)
        return engine

    return build


async def _generate(ae: AsyncEngine, rid: str) -> list[int]:
    outs = [o async for o in ae.generate(rid, [5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))]
    return outs[-1].outputs[0].token_ids


def _wait_rebuilt(ae: AsyncEngine, builds: list, count: int) -> None:
    deadline = time.monotonic() + 60
    while (len(builds) < count or ae.restarting) and ae.healthy and time.monotonic() < deadline:
        time.sleep(0.01)


def test_step_failure_fails_callers_then_engine_is_rebuilt(tiny_llama, monkeypatch):
    builds: list = []
    ae = AsyncEngine(_failing_factory(tiny_llama[0], builds, 1, monkeypatch))
    ae.start()
    try:
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            asyncio.run(asyncio.wait_for(_generate(ae, "r1"), timeout=30))
        _wait_rebuilt(ae, builds, 2)
        assert len(builds) == 2 and ae.healthy and ae.num_inflight == 0
        assert len(asyncio.run(asyncio.wait_for(_generate(ae, "r2"), timeout=30))) == 3  # serving again
        builds[1].scheduler.check_integrity()
    finally:
        ae.shutdown()


def test_repeated_step_failures_leave_the_engine_dead(tiny_llama, monkeypatch):
    builds: list = []
    ae = AsyncEngine(_failing_factory(tiny_llama[0], builds, 10, monkeypatch), max_restarts=2)
    ae.start()
    try:
        for i in range(3):  # the first build and two rebuilds each fail one request
            _wait_rebuilt(ae, builds, i + 1)
            with pytest.raises(EngineDeadError, match="kernel exploded"):
                asyncio.run(asyncio.wait_for(_generate(ae, f"r{i}"), timeout=30))
        _wait_rebuilt(ae, builds, 4)
        assert len(builds) == 3 and not ae.healthy and "3 failures" in ae.error
        with pytest.raises(EngineDeadError):
            ae.check_admission()
    finally:
        ae.shutdown()


def test_load_failure_surfaces_in_start():
    def broken():
        raise ValueError("unknown model 'x'")

    with pytest.raises(ValueError, match="unknown model"):
        AsyncEngine(broken).start()


def test_submitted_requests_count_in_the_load_before_the_engine_takes_them(tiny_llama, monkeypatch):
    """Routing prices a burst by the requests that arrive with it: a request submitted while
    the engine thread is inside a long step is in the tier's load at once, not a step later."""
    engine = LLM(str(tiny_llama[0]), dtype="float32").engine
    in_step, release = threading.Event(), threading.Event()
    real_step = engine.step

    def slow_step():
        in_step.set()
        release.wait(30)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    ae = AsyncEngine(lambda: engine)
    ae.start()
    idle = ae.current_load()
    assert idle.backlog_tokens == 0 and idle.step_s == idle.idle_step_s

    async def run():
        first = asyncio.create_task(_generate(ae, "a"))
        await asyncio.to_thread(in_step.wait, 30)  # the engine thread is now blocked inside a step
        burst = [asyncio.create_task(_collect(ae, f"b{i}", list(range(5, 45)))) for i in range(3)]
        await asyncio.sleep(0.05)  # the three are submitted; the engine has not seen them
        during = ae.current_load()
        release.set()
        await asyncio.gather(first, *burst)
        return during

    try:
        during = asyncio.run(asyncio.wait_for(run(), timeout=60))
    finally:
        release.set()
        ae.shutdown()
    assert during.backlog_tokens >= 3 * 40  # the burst's prompts, though no snapshot holds them yet
    after = ae.current_load()
    assert after.backlog_tokens == 0 and ae.num_inflight == 0


async def _collect(ae: AsyncEngine, rid: str, ids: list[int]) -> list[int]:
    outs = [o async for o in ae.generate(rid, ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))]
    return outs[-1].outputs[0].token_ids
