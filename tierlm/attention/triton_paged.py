"""Paged attention as one Triton kernel (imported on CUDA only; `triton` comes with
PyTorch's CUDA wheels).

One program per (query row, KV head): it loads the row's G query heads of that KV head
(padded to 16, tl.dot's smallest tile), walks the row's visible key blocks of its block
table in ascending order, one cache block (block_size keys) at a time, with an online
softmax in float32, and writes the G outputs. Nothing a program computes depends on
another program, the grid size or the row's role: the same row gives the same bits alone,
in a batch of 64, as a prompt token or as a decode step (no split-K, no atomics). The
walk starts at the first block holding a visible key, so the running maximum is finite
after the first block, and later blocks are never entirely masked (a window is contiguous).

Prompt rows each read their whole context: prefill costs O(rows x context) key reads
(fine for the lengths tested; a tiled prefill in the same per-row order is future work).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention(q_ptr, k_ptr, v_ptr, tables_ptr, seq_ptr, pos_ptr, out_ptr, scale, window,
                     stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     stride_tb, stride_ot, stride_oh,
                     GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.load(seq_ptr + row)
    pos = tl.load(pos_ptr + row).to(tl.int32)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    dim_ok = d < HEAD_DIM
    q_mask = (g[:, None] < GROUP) & dim_ok[None, :]
    q = tl.load(q_ptr + row * stride_qt + (kvh * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)
    start = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    offs = tl.arange(0, BLOCK)
    for b in range(start // BLOCK, pos // BLOCK + 1):
        block = tl.load(tables_ptr + s * stride_tb + b).to(tl.int64)
        kpos = b * BLOCK + offs
        k = tl.load(k_ptr + block * stride_kb + offs[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=dim_ok[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK] float32
        seen = (kpos <= pos) & (kpos >= start)
        scores = tl.where(seen[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + block * stride_vb + offs[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + row * stride_ot + (kvh * GROUP + g)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
              seq: torch.Tensor, positions: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """q [T, H, D]; caches [blocks, block_size, Hkv, D]; tables int32 [S, max blocks]; seq int32
    [T]; positions int64 [T]. Returns [T, H, D] in q's dtype (see attention/paged.py `reference`)."""
    t, h, d = q.shape
    _, block, hkv, _ = k_cache.shape
    group = h // hkv
    out = torch.empty_like(q)
    if t == 0:
        return out
    q = q.contiguous()
    _paged_attention[(t, hkv)](
        q, k_cache, v_cache, tables, seq, positions, out, scale, window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        DIM_PAD=max(16, triton.next_power_of_2(d)), BLOCK=block,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # float32 stays float32 (no TF32)
    return out
