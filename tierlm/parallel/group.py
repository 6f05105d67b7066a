"""Tensor-parallel ranks: rank 0 is the engine (scheduler, sampler, everything else); ranks
1..N-1 are worker processes started here, each holding its shard and its KV cache.

One scheduler drives every rank: each step rank 0 broadcasts the step's contract (the
SchedulerOutput, or a scoring call) as one object, and every rank runs the same runner
code on it, meeting in the collectives inside the model (torch.distributed; gloo on CPU).
Workers keep their runner's per-request state from the same contracts, as rank 0 does,
and never sample. A worker that fails takes the group down: its peers' collectives fail
(gloo timeout) and rank 0's engine rebuilds itself, starting a new group.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import traceback

import torch
import torch.distributed as dist

from tierlm.config import ConfigError, EngineConfig

_TIMEOUT = datetime.timedelta(seconds=120)  # a collective waits this long for a silent rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorGroup:
    """Rank 0's handle on the group: start the workers, broadcast calls, stop."""

    def __init__(self, config: EngineConfig, threads: int) -> None:
        if dist.is_initialized():  # torch.distributed has one default group per process
            raise ConfigError("one tensor-parallel engine per process: close the other one first (LLM.close())")
        self.size = config.tensor_parallel_size
        self._threads_before = torch.get_num_threads()  # this process's, given back at close
        torch.set_num_threads(threads)
        address = f"tcp://127.0.0.1:{_free_port()}"
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or locks
        self.workers = [ctx.Process(target=_worker_main, args=(config, rank, address, threads), daemon=True,
                                    name=f"tierlm-tp{rank}") for rank in range(1, self.size)]
        for w in self.workers:
            w.start()
        dist.init_process_group("gloo", init_method=address, rank=0, world_size=self.size, timeout=_TIMEOUT)

    def send(self, method: str, *args) -> None:
        """Have every worker call `runner.method(*args)` (rank 0 then makes the same call)."""
        dist.broadcast_object_list([(method, args)], src=0)

    def close(self) -> None:
        if not dist.is_initialized():
            return
        try:
            self.send("stop")
        except RuntimeError:  # a worker is gone already
            pass
        for w in self.workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
        dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)


def _worker_main(config: EngineConfig, rank: int, address: str, threads: int) -> None:
    try:
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=config.tensor_parallel_size,
                                timeout=_TIMEOUT)
        from tierlm.engine.builder import load_shard, shard_runner

        model, local = load_shard(config, rank)  # while rank 0 loads its own
        runner = None
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            method, args = box[0]
            if method == "stop":
                break
            if method == "start":  # (num_blocks,): rank 0 sized the KV pool
                runner = shard_runner(config, model, local, *args)
                continue
            getattr(runner, method)(*args)
    except Exception:  # noqa: BLE001 - this process has nobody to raise to
        traceback.print_exc()
        os._exit(1)
    dist.destroy_process_group()
