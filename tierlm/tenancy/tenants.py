"""Tenants at run time: API key -> tenant, each with its quota state.

Keys live only as SHA-256 digests (from the config file or `--api-key`); a presented key
is hashed and looked up, so neither the keys nor a comparison on them ever touch plain
text after startup. Nothing here logs a key.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from tierlm.config import TenantConfig
from tierlm.tenancy.quotas import TenantQuota


@dataclass
class Tenant:
    config: TenantConfig
    quota: TenantQuota

    @property
    def name(self) -> str:
        return self.config.name

    def may_use(self, tier: str) -> bool:
        return not self.config.tiers or tier in self.config.tiers


class Tenants:
    """The server's tenants. `authenticate` maps an Authorization header to one."""

    def __init__(self, configs: tuple[TenantConfig, ...], clock: Callable[[], float] = time.monotonic,
                 metrics_keys: tuple[str, ...] = ()) -> None:
        self.all = {c.name: Tenant(c, TenantQuota(c.limits, clock)) for c in configs}
        self._by_hash = {h: self.all[c.name] for c in configs for h in c.key_hashes}
        self.anonymous = next((t for t in self.all.values() if t.config.anonymous), None)
        self._metrics_hashes = frozenset(_digest(k) for k in metrics_keys)

    @property
    def keyed(self) -> bool:
        """Whether any key is configured (then every route but health and readiness needs one)."""
        return bool(self._by_hash or self._metrics_hashes)

    def metrics_key(self, authorization: str) -> bool:
        """Whether the header carries a `--metrics-api-key` (reads all of /metrics, nothing else)."""
        return _presented(authorization) in self._metrics_hashes

    @property
    def configs(self) -> tuple[TenantConfig, ...]:
        return tuple(t.config for t in self.all.values())

    @classmethod
    def open(cls, metrics_keys: tuple[str, ...] = ()) -> Tenants:
        """Today's default without a config: one unlimited tenant that needs no key."""
        return cls((TenantConfig("default", anonymous=True),), metrics_keys=metrics_keys)

    @classmethod
    def with_keys(cls, keys: tuple[str, ...], metrics_keys: tuple[str, ...] = ()) -> Tenants:
        """`--api-key` without a config: one unlimited tenant behind those keys."""
        return cls((TenantConfig("default", tuple(_digest(k) for k in keys)),), metrics_keys=metrics_keys)

    def authenticate(self, authorization: str) -> Tenant | None:
        """The tenant for a header value ('Bearer KEY'); no header -> the anonymous tenant
        (if any); None = refuse with 401. Where keys exist, a wrong key is refused even
        when anonymous access exists, so a typo never silently runs on another quota."""
        if not authorization or not self.keyed:  # an open server ignores whatever key a client sends
            return self.anonymous
        return self._by_hash.get(_presented(authorization))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _presented(authorization: str) -> bytes | None:
    """The digest of the key in an 'Authorization: Bearer KEY' value; None for any other form."""
    if not authorization.lower().startswith("bearer "):
        return None
    return _digest(authorization[7:].strip())
