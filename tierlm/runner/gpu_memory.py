"""The KV pool's size on a GPU: what `gpu_memory_utilization` leaves after the weights and
a profiled peak step, as vLLM sizes it.

Profile: with the weights loaded, one forward of the largest step the scheduler can send
(max_num_batched_tokens prompt tokens) on a throwaway pool, measuring the peak of
PyTorch's allocator. Memory other processes or the CUDA context hold is counted as used.
The arithmetic (`kv_budget`) is pure and tested on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tierlm.config import ConfigError

log = logging.getLogger("tierlm.gpu_memory")


@dataclass(frozen=True)
class MemoryProfile:
    total: int  # the device's memory
    peak: int  # PyTorch's peak allocation over load + profiled step (weights included)
    others: int  # held outside PyTorch's allocator (CUDA context, other processes) at the profile
    activations: int = 0  # the step's own peak above the weights: the bound reserved for CUDA graphs' pools


def kv_budget(profile: MemoryProfile, utilization: float, block_bytes: int, graph_reserve: int = 0) -> int:
    """KV blocks that fit in `utilization` of the device once the profiled peak, the
    others' memory and `graph_reserve` (CUDA graphs' pools) are taken (ConfigError below 2)."""
    budget = int(profile.total * utilization) - profile.peak - profile.others - graph_reserve
    blocks = max(0, budget) // block_bytes
    if blocks < 2:
        raise ConfigError(
            f"gpu_memory_utilization {utilization}: {profile.total * utilization / 2**30:.2f} GiB leaves no room for "
            f"the KV cache after the weights and a peak step ({(profile.peak + profile.others) / 2**30:.2f} GiB): "
            f"raise it or lower max_num_batched_tokens")
    return blocks


def peak_step(make_runner, block_size: int, tokens: int) -> torch.Tensor:
    """The profiled step, device-neutral: one `tokens`-token prompt (sampling its last row) on
    `make_runner(num_blocks)`'s throwaway pool of just enough blocks; returns its logits."""
    from tierlm.scheduler.output import ScheduledRequest, SchedulerOutput

    blocks = -(-tokens // block_size)
    runner = make_runner(blocks + 1)  # block 0 is the null block
    table = list(range(1, blocks + 1))
    groups = len(runner.layout.windows)
    step = ScheduledRequest("profile", [0] * tokens, 0, [table] * groups, True, tokens)
    return runner.compute_logits(SchedulerOutput([step]))[0]


def profile_step(make_runner, block_size: int, tokens: int, device: torch.device) -> MemoryProfile:
    """Run `peak_step` on the GPU and measure it (the throwaway runner is gone on return)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device)
    peak_step(make_runner, block_size, tokens)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    others = max(0, (total - free) - torch.cuda.memory_reserved(device))
    torch.cuda.empty_cache()
    log.info("profiled a %d-token step: peak %.2f GiB of %.2f GiB, %.2f GiB held outside PyTorch",
             tokens, peak / 2**30, total / 2**30, others / 2**30)
    return MemoryProfile(total, peak, others, peak - weights)
