"""The Ray instance replicas run on: a local one started for this server (and stopped with
it), or an existing cluster (`--ray-address auto` or `ray://host:port`), left running."""

from __future__ import annotations

import dataclasses
import logging

_OBJECT_STORE_BYTES = 1 << 30  # local instance: KV transfers and outputs in flight, not a cache


class RayUnavailable(RuntimeError):
    """Ray is not installed or the cluster cannot be reached (shown as one line)."""


def connect(address: str | None, num_cpus: int) -> None:
    """Join `address`, or start a local instance with `num_cpus` CPUs."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("replicas run on Ray, which is not installed: pip install 'tierlm[scale]'") from None
    if ray.is_initialized():
        return
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=_OBJECT_STORE_BYTES,
                     logging_level=logging.WARNING, log_to_driver=True)
        else:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayUnavailable(f"cannot connect to Ray at {address or 'a local instance'}: {e}") from None


def disconnect() -> None:
    """Leave Ray: a local instance stops with its driver; a cluster keeps running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()



def gpus_per_replica(config) -> int:
    """1 when an EngineConfig's replicas run on CUDA (an explicit cuda, or auto on a node that
    has a GPU and options CUDA runs), else 0. Ray gives each such replica its own GPU."""
    from tierlm.device import cuda_refusal

    if config.device == "cpu":
        return 0
    if config.device == "auto":
        import torch

        return int(torch.cuda.is_available() and cuda_refusal(config) is None)
    return 1


def replica_config(config):
    """The config a replica process runs: on its one visible GPU (Ray sets CUDA_VISIBLE_DEVICES),
    so a `cuda:N` naming a device of the whole node becomes that replica's `cuda`."""
    return dataclasses.replace(config, device="cuda") if gpus_per_replica(config) else config


def check_gpus(needed: int, available: float) -> None:
    """Replicas wait for a free GPU forever: refuse at start when the cluster has too few."""
    if needed > available:
        raise RayUnavailable(f"{needed} replicas on CUDA need {needed} GPUs (one each); "
                             f"the Ray cluster has {int(available)}")
