"""Gated MLP activations over a fused [gate | up] projection, batch-invariant.

A CPU elementwise kernel over more than its grain of elements (16,384 for GELU, 32,768
for most) is split across threads at a point set by the tensor's size, and the elements
just before a split take the scalar path, whose exp/tanh differ from the vector path in
the last bit. So a row's activation would depend on how many tokens share its step.
Applying the activation to row tiles below the smallest grain (one row when a single row
is larger: then every row splits alike) keeps each row's bits independent of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_MAX_TILE_ELEMENTS = 16383  # below GELU's parallel grain, the smallest of these kernels'


def row_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out_width: int) -> torch.Tensor:
    """fn (row-wise elementwise, [n, *] -> [n, out_width]) over row tiles of x [T, *] small
    enough that no tile is split across threads (or single rows, which all split alike)."""
    tokens = x.shape[0]
    rows = max(1, _MAX_TILE_ELEMENTS // out_width)
    if tokens <= rows or x.is_cuda:  # a GPU computes every element alike: no split to avoid
        return fn(x)
    out = x.new_empty(tokens, out_width)
    for i in range(0, tokens, rows):
        out[i : i + rows] = fn(x[i : i + rows])
    return out


# Below the elementwise kernels' grain a call runs on one thread, and a length divisible by
# 32 (two AVX-512 float vectors, four AVX2 ones) leaves no scalar tail.
_VECTOR_SLICE = 16384


def vector_path(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn (elementwise) with every element on the kernel's vector path. Past the last full
    vector an elementwise kernel falls back to its scalar function (exp, sigmoid: other
    last bits), and which elements those are depends on the tensor's size, i.e. on the
    batch. So the elements go through in zero-padded slices of _VECTOR_SLICE: each call
    one thread, whole vectors only."""
    flat = x.reshape(-1)
    n = flat.numel()
    slices = -(-n // _VECTOR_SLICE)
    padded = flat.new_zeros(slices * _VECTOR_SLICE)
    padded[:n] = flat
    rows = padded.view(slices, _VECTOR_SLICE)
    out = torch.empty_like(rows)
    for i in range(slices):
        out[i] = fn(rows[i])
    return out.view(-1)[:n].view(x.shape)


def _gated(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return fn(gate) * up

    return lambda gate_up: row_tiled(apply, gate_up, gate_up.shape[-1] // 2)


silu_and_mul = _gated(F.silu)  # SwiGLU: silu(gate) * up
gelu_tanh_and_mul = _gated(lambda g: F.gelu(g, approximate="tanh"))  # GeGLU (Gemma)

GATED_ACTIVATIONS = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}
