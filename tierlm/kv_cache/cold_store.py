"""Cold KV tier: cached blocks on disk, bounded in size, surviving restarts.

On-disk format (version 1). Directory `<root>/<fingerprint>/`, one file per block named
`<group:02x><block hash hex>.kvb`:

    b"TLKV" | u16 version | u32 header length | header (UTF-8 JSON: fingerprint, group,
    hash, dtype, shape) | payload (the block's K/V pages, raw little-endian) |
    16-byte blake2b of everything before it

The fingerprint names the model file, its size and the compute dtype, and the block hash
chains the tokens from position 0 (kv_cache/prefix_hash.py), so a file can only ever be
read back for the same KV. A file whose magic, version, fingerprint, key, shape, dtype,
length or checksum does not match is deleted and reported as a miss: never loaded.
When the directory would exceed its budget the least recently written files go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import OrderedDict
from pathlib import Path

import torch

from tierlm.kv_cache.block_pool import CacheKey

MAGIC, VERSION = b"TLKV", 1
_PREFIX = struct.Struct("<4sHI")
_SUM = 16


def fingerprint(model_key: str) -> str:
    return hashlib.blake2b(model_key.encode(), digest_size=8).hexdigest()


class ColdStore:
    def __init__(self, root: Path, model_key: str, shape: tuple[int, ...], dtype: torch.dtype,
                 max_bytes: int) -> None:
        self.fp = fingerprint(model_key)
        self.dir = Path(root) / self.fp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shape, self.dtype, self.max_bytes = tuple(shape), dtype, max_bytes
        self.num_rejected = 0
        self.bytes_used = 0
        self._files: OrderedDict[str, int] = OrderedDict()  # name -> size, oldest first
        for path in sorted(self.dir.glob("*.kvb"), key=lambda p: p.stat().st_mtime):
            self._files[path.name] = path.stat().st_size
            self.bytes_used += path.stat().st_size
        self._shrink(0)

    @staticmethod
    def _name(key: CacheKey) -> str:
        return f"{key[0]:02x}{key[1].hex()}.kvb"

    def has(self, key: CacheKey) -> bool:
        return self._name(key) in self._files

    def put(self, key: CacheKey, data: torch.Tensor) -> None:
        header = json.dumps({"fingerprint": self.fp, "group": key[0], "hash": key[1].hex(),
                             "dtype": str(self.dtype), "shape": list(self.shape)}).encode()
        body = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + _raw(data)
        blob = body + hashlib.blake2b(body, digest_size=_SUM).digest()
        if len(blob) > self.max_bytes:
            return
        name = self._name(key)
        self._drop(name)
        self._shrink(len(blob))
        tmp = self.dir / f".{name}.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, self.dir / name)  # readers never see a half-written file
        self._files[name] = len(blob)
        self.bytes_used += len(blob)

    def get(self, key: CacheKey) -> torch.Tensor | None:
        """The block's pages, or None (missing, or rejected and deleted)."""
        name = self._name(key)
        if name not in self._files:
            return None
        try:
            blob = (self.dir / name).read_bytes()
            data = self._parse(blob, key)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            data = None
        if data is None:
            self.num_rejected += 1
            self._drop(name)
        else:
            self._files.move_to_end(name)
        return data

    def _parse(self, blob: bytes, key: CacheKey) -> torch.Tensor | None:
        if len(blob) < _PREFIX.size + _SUM:
            return None
        body, checksum = blob[:-_SUM], blob[-_SUM:]
        if hashlib.blake2b(body, digest_size=_SUM).digest() != checksum:
            return None
        magic, version, hlen = _PREFIX.unpack_from(body)
        if magic != MAGIC or version != VERSION:
            return None
        header = json.loads(body[_PREFIX.size : _PREFIX.size + hlen])
        if (header["fingerprint"], header["group"], header["hash"]) != (self.fp, key[0], key[1].hex()) or \
                header["dtype"] != str(self.dtype) or tuple(header["shape"]) != self.shape:
            return None
        payload = body[_PREFIX.size + hlen :]
        expected = torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()
        if len(payload) != expected:
            return None
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(self.dtype).reshape(self.shape)

    def _drop(self, name: str) -> None:
        size = self._files.pop(name, None)
        if size is not None:
            self.bytes_used -= size
            (self.dir / name).unlink(missing_ok=True)

    def _shrink(self, incoming: int) -> None:
        while self._files and self.bytes_used + incoming > self.max_bytes:
            self._drop(next(iter(self._files)))

    def check_integrity(self) -> None:
        assert self.bytes_used == sum(self._files.values()) <= self.max_bytes


def _raw(data: torch.Tensor) -> bytes:
    return data.contiguous().view(torch.uint8).numpy().tobytes()
