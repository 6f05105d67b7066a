"""The Ray instance replicas run on: a local one started for this server (and stopped with
it), or an existing cluster (`--ray-address auto` or `ray://host:port`), left running."""

from __future__ import annotations

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

