"""tierlm's CPU kernels: integer-exact quantized matmul over GGUF blocks (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q6_K) and paged attention with one fixed arithmetic per query row.

The compiled extension (`tierlm._kernels`, built from csrc/ by `make install`) runs the
best ISA path this CPU has: scalar, AVX2 (+FMA, F16C) or AVX-512 VNNI. Every path, and
the PyTorch reference in reference.py, computes the same bits (see its docstring), so a
row's result does not depend on the batch, the tiling, the thread count or the path.
`TIERLM_ISA=reference|scalar|avx2|avx512_vnni` forces a lower path (reference: the
PyTorch definition); without the extension the reference runs, after one warning.
"""

from __future__ import annotations

import logging
import os

import torch

from tierlm.config import ConfigError
from tierlm.kernels import reference

log = logging.getLogger("tierlm.kernels")

ISAS = ("scalar", "avx2", "avx512_vnni")
_ISA_INDEX = {name: i for i, name in enumerate(ISAS)}

try:
    from tierlm import _kernels as _ext
except ImportError as e:  # not built: the reference computes the same numbers, slowly
    _ext = None
    _why = str(e)


class KernelError(ConfigError):
    """A kernel setting (TIERLM_ISA, TIERLM_SPIN_US, threads) this machine cannot take."""


def supported() -> list[str]:
    """The paths this machine can run, slowest first: "reference" (PyTorch) and, with the
    extension built, the ISA paths this CPU has."""
    return ["reference"] + ([ISAS[i] for i in _ext.supported_isas()] if _ext is not None else [])


def _choose() -> str:
    have = supported()
    forced = os.environ.get("TIERLM_ISA")
    if forced:
        if forced not in have:
            raise KernelError(f"TIERLM_ISA={forced!r}: this machine runs {', '.join(have)}")
        return forced
    if _ext is None:
        log.warning("tierlm: compiled kernels unavailable (%s); running the PyTorch reference kernels", _why)
    return have[-1]


_ISA: str | None = None


def isa() -> str:
    """The path in use (chosen once per process)."""
    global _ISA
    if _ISA is None:
        _ISA = _choose()
    return _ISA


_THREADS: int | None = None


def spin_us() -> int:
    """How long idle workers spin before sleeping (TIERLM_SPIN_US, default 100): longer
    than a step's gaps between products."""
    raw = os.environ.get("TIERLM_SPIN_US", "100")
    if not raw.isdigit():
        raise KernelError(f"TIERLM_SPIN_US must be a whole number of microseconds, got {raw!r}")
    return int(raw)


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, e.g. a container's CPU set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def use_threads(threads: int | None = None) -> int:
    """Run the kernels on `threads` threads (default: torch's intra-op count before this
    first call) and set torch's own intra-op threads to 1, so one pool does the parallel
    work: two spinning pools on the same cores slow each other ~10x, and OpenMP regions
    opened from two threads (the server's engine thread and the main one) cost ~50 us
    each. Called when a model loads onto the kernels; returns the pool size."""
    global _THREADS
    if threads is None:
        threads = _THREADS or torch.get_num_threads()
    if threads < 1:
        raise KernelError(f"threads must be >= 1, got {threads}")
    isa()  # a bad TIERLM_ISA is reported now, before a model loads onto the kernels
    if _ext is not None:
        _ext.set_threads(threads, spin_us())
    torch.set_num_threads(1)
    _THREADS = threads
    return threads


def pack(raw: torch.Tensor, ggml_type: int, n: int, k: int) -> reference.Packed:
    """GGUF blocks -> the kernels' row-interleaved layout (done once, at load)."""
    return reference.pack(raw, ggml_type, n, k)


def _native() -> bool:
    return _ext is not None and isa() != "reference"


def quantize_rows(x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, ...]:
    """Activations [M, K] -> (int8 codes, block scales, d * sum(q), sum(q), sums of 16);
    `path` overrides the process's ISA path (every path gives the same bits)."""
    path = path or isa()
    if path == "reference":
        return reference.quantize_rows(x)
    return tuple(_ext.quantize_rows(x, _ISA_INDEX[path]))


def gemm(x: torch.Tensor | tuple, w: reference.Packed, path: str | None = None) -> torch.Tensor:
    """y = x W^T as fp32 [M, N]; `x` fp32/bf16 [M, K] or already quantized by
    `quantize_rows`. `path` overrides the process's ISA path."""
    qx, dx, sx, sq, sq16 = quantize_rows(x) if isinstance(x, torch.Tensor) else x
    path = path or isa()
    if path == "reference":
        return reference.gemm(qx, dx, sx, w)
    return _ext.gemm(qx, dx, sx, sq, sq16, w.qs, w.high, w.sub, w.d, w.mins, w.out_features, w.ggml_type,
                     _ISA_INDEX[path])


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Write k, v [T, kv_heads, D] at flat cache slots; K [blocks, kv_heads, D, block_size]
    (transposed per block), V [blocks, block_size, kv_heads, D]."""
    if not _native():
        reference.kv_write(k, v, k_cache, v_cache, slots)
        return
    _ext.kv_write(k, v, k_cache, v_cache, slots)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
              seq: torch.Tensor, pos: torch.Tensor, window: int, scale: float, path: str | None = None
              ) -> torch.Tensor:
    """Paged attention [T, H * D] of q [T, H, D] (csrc/attention.cpp has the numerics):
    `tables` int32 [S, max blocks], `seq` int32 [T] each token's table row, `pos` int64 [T]
    its position (a sequence's tokens consecutive), `window` 0 for full causal attention."""
    path = path or isa()
    if path == "reference":
        return reference.attention(q, k_cache, v_cache, tables, seq, pos, window, scale)
    return _ext.attention(q, k_cache, v_cache, tables, seq, pos, window, scale, _ISA_INDEX[path])


class Parts:
    """Packed matrices stacked by rows, with the extension's arguments built once (a step
    makes ~120 products: rebuilding them per call costs more than a small product)."""

    def __init__(self, parts: list[reference.Packed]) -> None:
        self.parts = parts
        self.args = [(p.qs, p.high, p.sub, p.d, p.mins, p.out_features, p.ggml_type) for p in parts]


def linear(x: torch.Tensor, parts: list[reference.Packed] | Parts) -> torch.Tensor:
    """fp32 [M, sum N]: x (fp32/bf16 [M, K]) quantized once, times every packed matrix,
    their outputs side by side (a fused q/k/v or gate/up in one call)."""
    if not isinstance(parts, Parts):
        parts = Parts(parts)
    if not _native():
        q = reference.quantize_rows(x)
        ys = [reference.gemm(q[0], q[1], q[2], p) for p in parts.parts]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
    return _ext.linear(x, parts.args, isa_index())


def residual_norm(x: torch.Tensor, y: torch.Tensor | None, post_w: torch.Tensor | None, w: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """x (fp32 [T, H] residual stream) += y (first RMS-normed by post_w, Gemma's post-norms,
    when given), in place; returns RMSNorm(x) * w. Weights fp32, effective (1 + w for Gemma)."""
    if not _native():
        return reference.residual_norm(x, y, post_w, w, eps)
    return _ext.residual_norm(x, y, post_w, w, eps, isa_index())


GATED = {"silu": 0, "gelu_tanh": 1}


def decoder(heads: int, eps: float, scale: float, act: str):
    """The C++ whole-step decoder (csrc/decoder.cpp) that `models/fused.py` fills with a
    model's layers, or None where the kernels run as the PyTorch reference."""
    if not _native():
        return None
    return _ext.Decoder(heads, eps, scale, GATED[act])


def lora_add(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             ends: torch.Tensor, active: torch.Tensor, path: str | None = None) -> None:
    """y (fp32 [T, N], in place) += each row's adapter product (csrc/lora.cpp has the
    numerics): `slots` int32 [T] (-1: no adapter), A transposed fp32 [slots, K, P * R], B
    transposed fp32 [slots, R, N] (scale folded in), `ends` int64 [P] each fused part's end
    in N, `active` bool [slots] the slots whose adapter targets this projection."""
    path = path or isa()
    if path == "reference":
        reference.lora_add(y, x, slots, a, b, ends, active)
        return
    _ext.lora_add(y, x, slots, a, b, ends, active, _ISA_INDEX[path])


def isa_index() -> int:
    """The extension's index of the process's ISA path (for `decoder(...).forward`)."""
    return _ISA_INDEX[isa()]


def gated(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up over fp32 rows [T, 2I] (gate first) -> [T, I]."""
    if not _native():
        return reference.gated(gate_up, GATED[act])
    return _ext.gated(gate_up, GATED[act], isa_index())


def rope_attention(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                   q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, seq: torch.Tensor,
                   pos: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """The attention sub-layer after a fused q/k/v projection (fp32 [T, (H + 2 Hkv) D]):
    q/k norms when given, RoPE from cos/sin tables [positions, D], K/V into the cache, then
    `attention`. Returns fp32 [T, H * D]."""
    if not _native():
        return reference.rope_attention(qkv, heads, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, tables,
                                        seq, pos, window, scale)
    return _ext.rope_attention(qkv, heads, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, tables, seq, pos,
                               window, scale, isa_index())


def embedding(ids: torch.Tensor, w: reference.Packed) -> torch.Tensor:
    """Rows `ids` of a packed matrix as fp32 [T, K]: an embedding lookup on the GGUF blocks."""
    if not _native():
        return reference.dequantize_rows(w, ids)
    return _ext.dequant_rows(ids, w.qs, w.high, w.sub, w.d, w.mins, w.out_features, w.ggml_type)


class BlockEmbedding(torch.nn.Module):
    """An embedding table kept as the file's GGUF blocks (no dense copy): a lookup
    dequantizes the rows it needs. A tied output layer runs on the same blocks."""

    def __init__(self, weight: BlockWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.blocks = weight
        self.dtype = dtype

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 [T, hidden]."""
        return embedding(ids.reshape(-1), self.blocks.parts[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).to(self.dtype)


class Blocks:
    """One weight matrix as its GGUF file stores it (raw blocks, rows independent), until
    a layer packs it: row order and row concatenation (fused q/k/v, gate/up) are done on
    the raw bytes, so the values stay exactly the file's."""

    def __init__(self, raw: torch.Tensor, ggml_type: int, n: int, k: int) -> None:
        self.raw, self.ggml_type, self.n, self.k = raw.reshape(n, -1), ggml_type, n, k

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @staticmethod
    def join(parts: list[Blocks]) -> list[Blocks]:
        """Stack matrices by rows, runs of one format as one matrix (one kernel call each)."""
        out: list[Blocks] = []
        for p in parts:
            if out and out[-1].ggml_type == p.ggml_type and out[-1].k == p.k:
                last = out.pop()
                p = Blocks(torch.cat([last.raw, p.raw]), p.ggml_type, last.n + p.n, p.k)
            out.append(p)
        return out

    def rows(self, index: torch.Tensor) -> Blocks:
        return Blocks(self.raw[index], self.ggml_type, self.n, self.k)

    def packed(self) -> reference.Packed:
        return pack(self.raw.reshape(-1).contiguous(), self.ggml_type, self.n, self.k)

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize(self.packed())


class BlockWeight:
    """A layer's weight as one or more packed GGUF matrices stacked by rows (a fused q/k/v
    may mix formats); every row of every batch runs on the same kernels."""

    bits = 0  # reported as its GGUF formats

    def __init__(self, parts: list[Blocks]) -> None:
        self.parts = [p.packed() for p in parts]
        self.kernel_parts = Parts(self.parts)  # the extension's arguments, built once
        self.out_features = sum(p.out_features for p in self.parts)
        self.in_features = parts[0].k

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.kernel_parts).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([reference.dequantize(p) for p in self.parts])

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)
