"""GGUF container reader: header, metadata and tensor directory, plus dequantization.

Owns parsing of the GGUF file format (v2/v3). The file is memory-mapped once; every
tensor is exposed as a `GGUFTensor` whose `raw` bytes are a zero-copy view of the map,
so later layers (int4/int8 kernels) can repack the quantized blocks without re-reading
the file. Dequantization uses torch for the common block formats (fast, vectorised)
and `gguf.quants` for the rest.

The `gguf` package's own reader walks tokenizer arrays one element at a time (~10 s for
a 49k-entry vocabulary); this parser reads numeric arrays with one `np.frombuffer` and
strings with a tight loop, so opening a file takes milliseconds.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> (struct format, numpy dtype) for scalars.
_SCALAR_TYPES: dict[int, tuple[str, Any]] = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file. `shape` is in PyTorch order (outermost first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    raw: np.ndarray  # uint8 view into the memory map: the quantized blocks as stored

    @property
    def type_name(self) -> str:
        from gguf.constants import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name

    def dequantize(self) -> torch.Tensor:
        """The tensor as float32 with `shape`."""
        return dequantize(self.raw, self.ggml_type, self.shape)


class _Cursor:
    """Sequential little-endian reader over a buffer."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_TYPES:
            return self.scalar(_SCALAR_TYPES[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        raise GGUFError(f"unknown GGUF metadata type {vtype}")

    def array(self) -> Any:
        etype = self.scalar("<I")
        count = self.scalar("<Q")
        if etype in _SCALAR_TYPES:
            dtype = np.dtype(_SCALAR_TYPES[etype][1])
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr.tolist()
        if etype == _STRING:
            return self._string_array(count)
        return [self.value(etype) for _ in range(count)]

    def _string_array(self, count: int) -> list[str]:
        buf, pos, out = self.buf, self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            out.append(str(buf[pos : pos + n], "utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A memory-mapped GGUF file: `metadata` (dict) and `tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = memoryview(self._map)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (bad magic)")
        cur = _Cursor(buf)
        cur.pos = 4
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors = cur.scalar("<Q")
        n_kv = cur.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            ggml_type = cur.scalar("<I")
            offset = cur.scalar("<Q")
            infos.append((name, dims, ggml_type, offset))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (cur.pos + align - 1) // align * align
        whole = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ggml_type, offset in infos:
            shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
            nbytes = _byte_size(ggml_type, shape)
            start = data_start + offset
            if start + nbytes > len(whole):
                raise GGUFError(f"{self.path}: tensor {name} runs past the end of the file")
            self.tensors[name] = GGUFTensor(name, ggml_type, shape, whole[start : start + nbytes])

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        """Metadata key under the architecture prefix, e.g. `arch_get("block_count")`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def _byte_size(ggml_type: int, shape: tuple[int, ...]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as e:
        raise GGUFError(f"unknown ggml tensor type {ggml_type}") from e
    n = int(np.prod(shape)) if shape else 1
    if shape[-1] % block:
        raise GGUFError(f"row length {shape[-1]} is not a multiple of block size {block}")
    return n // block * type_size


# ---- dequantization --------------------------------------------------------------------
# ggml type ids of the formats dequantized with torch here; others go through gguf.quants.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


def _blocks(raw: np.ndarray, type_size: int) -> torch.Tensor:
    return torch.from_numpy(raw.reshape(-1, type_size).copy())


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4 block layout: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).float()


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize a tensor's raw bytes to float32 with `shape` (PyTorch order)."""
    if ggml_type == F32:
        return torch.from_numpy(raw.view(np.float32).copy()).reshape(shape)
    if ggml_type == F16:
        return torch.from_numpy(raw.view(np.float16).astype(np.float32)).reshape(shape)
    if ggml_type == BF16:
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float().reshape(shape)
    if ggml_type == Q4_0:
        b = _blocks(raw, 18)
        return ((_nibbles(b[:, 2:]) - 8.0) * _f16(b, 0)).reshape(shape)
    if ggml_type == Q4_1:
        b = _blocks(raw, 20)
        return (_nibbles(b[:, 4:]) * _f16(b, 0) + _f16(b, 2)).reshape(shape)
    if ggml_type == Q8_0:
        b = _blocks(raw, 34)
        return (b[:, 2:].view(torch.int8).float() * _f16(b, 0)).reshape(shape)
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ggml_type)
        data = quants.dequantize(raw.reshape(-1), qtype)
    except (ValueError, NotImplementedError) as e:
        raise GGUFError(f"cannot dequantize ggml type {ggml_type}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(shape)
