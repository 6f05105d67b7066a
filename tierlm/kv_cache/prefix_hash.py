"""Chained block hashes for prefix caching. Pure functions, no state.

A full block's hash covers its parent's hash, its own token ids and the request's
extra keys (model identity, dtype, tenant salt; adapter ids later), so equal hashes
mean equal KV: the same tokens at the same positions after the same prefix, computed
by the same model. Requests with different salts never share entries, so one tenant
cannot learn another's prompts from time-to-first-token.
"""

from __future__ import annotations

import hashlib
from array import array


def root_hash(*extra_keys: str) -> bytes:
    """The chain's starting value for one model + salt combination."""
    h = hashlib.blake2b(digest_size=16, person=b"tierlm-root")
    for key in extra_keys:
        h.update(key.encode())
        h.update(b"\0")
    return h.digest()


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def extend(hashes: list[bytes], token_ids: list[int], block_size: int, root: bytes) -> None:
    """Append the hashes of the full blocks of `token_ids` not hashed yet (in place)."""
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else root
        hashes.append(block_hash(parent, token_ids[i * block_size : (i + 1) * block_size]))
