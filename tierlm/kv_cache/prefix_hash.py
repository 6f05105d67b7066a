"""Chained block hashes for prefix caching. Pure functions, no state.

A full block's hash covers its parent's hash, its own token ids and the request's
extra keys (model identity, dtype, tenant salt; adapter ids later), so equal hashes
mean equal KV: the same tokens at the same positions after the same prefix, computed
by the same model. When prompt and generated tokens run on different weight formats
(layers/linear.py), a block holding generated tokens is hashed apart too: a later
prompt with the same tokens computes them in the prompt format, and must not read KV
computed in the other one. Requests with different salts never share entries, so one tenant
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


def block_hash(parent: bytes, tokens: list[int], generated: bool = False) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes() + (b"g" if generated else b""),
                           digest_size=16).digest()


def extend(hashes: list[bytes], token_ids: list[int], block_size: int, root: bytes,
           generated_from: int | None = None) -> None:
    """Append the hashes of the full blocks of `token_ids` not hashed yet (in place);
    blocks reaching position `generated_from` or beyond are marked as generated."""
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else root
        generated = generated_from is not None and (i + 1) * block_size > generated_from
        hashes.append(block_hash(parent, token_ids[i * block_size : (i + 1) * block_size], generated))
