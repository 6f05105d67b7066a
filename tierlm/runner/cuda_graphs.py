"""CUDA graphs for decode steps: one graph per captured batch size, recorded once at start.

A decode step (every scheduled request one token, each sampled: no drafts, no prompt
scoring) of n rows is padded to the smallest captured size >= n and replayed: its inputs
are copied into the graph's static buffers, the graph re-launches the whole forward
(every kernel of every layer) with one host call, and the first n rows of its logits are
the step's. Padded rows are sequences of their own at position 0 whose table is all
NULL_BLOCK: they write and read only the null block's first slot (never a live block),
and attention computes each row alone (attention/paged.py), so they change no real row.
Anything else (prefill chunks, drafts, a wider block table than captured) runs eagerly.
`--enforce-eager` turns graphs off. Only the recording itself (`_record`) needs CUDA: the
padding, static buffers and replay run on the CPU in the tests, with a re-run standing in.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from tierlm.attention.base import AttentionMetadata, ForwardBatch
from tierlm.kv_cache.block_pool import NULL_BLOCK

log = logging.getLogger("tierlm.cuda_graphs")


def capture_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, ... up to `max_batch`, and `max_batch` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def is_decode(batch: ForwardBatch, logits_indices: torch.Tensor) -> bool:
    """Every row is its own request's one token and is sampled (flat layout, in row order)."""
    rows = batch.input_ids.shape[0]
    tables = batch.attn[0].tables
    return (tables is not None and tables.shape[0] == rows and logits_indices.shape[0] == rows
            and (rows == 0 or int(logits_indices[-1]) == rows - 1))


def pad_decode(batch: ForwardBatch, size: int, width: int) -> ForwardBatch:
    """A decode batch of n <= size rows padded to `size` rows and block tables `width` wide:
    padded rows are token 0 at position 0 of sequences whose tables are all NULL_BLOCK
    (block 0: their K/V go to slot 0, the null block's first)."""
    n = batch.input_ids.shape[0]

    def rows(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
        return torch.cat([t, t.new_full((size - n, *t.shape[1:]), fill)])

    def table(t: torch.Tensor) -> torch.Tensor:
        wide = t.new_full((size, width), NULL_BLOCK)
        wide[:n, : t.shape[1]] = t
        return wide

    seq = torch.arange(size, dtype=torch.int32)
    positions = rows(batch.positions)
    metas = tuple(dataclasses.replace(m, slot_mapping=rows(m.slot_mapping), tables=table(m.tables),
                                      seq=seq, positions=positions) for m in batch.attn)
    return dataclasses.replace(batch, input_ids=rows(batch.input_ids), positions=positions, attn=metas,
                               logits_indices=torch.arange(size), row_request=seq)


class DecodeGraphs:
    """The captured decode graphs of one model and KV pool (lifetime: the runner's).

    `dense_rows`: the weight-format argument decode steps run with (runner `_forward`);
    steps asking another one run eagerly."""

    def __init__(self, model: nn.Module, kv_caches: list, layer_group: list[int], windows: tuple[int | None, ...],
                 max_batch: int, max_blocks: int, dense_rows: int | None, device: torch.device) -> None:
        self.sizes = capture_sizes(max_batch)
        self.width = max_blocks
        self.dense_rows = dense_rows
        top = self.sizes[-1]
        self.ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.seq = torch.arange(top, dtype=torch.int32, device=device)
        self.slots = [torch.zeros(top, dtype=torch.long, device=device) for _ in windows]
        self.tables = [torch.zeros(top, max_blocks, dtype=torch.int32, device=device) for _ in windows]
        self.replays: dict[int, Callable[[], None]] = {}  # batch size -> re-launch its graph
        self.outputs: dict[int, torch.Tensor] = {}  # batch size -> the logits its graph writes
        self._pool = None  # the graphs' shared memory pool
        t0 = time.perf_counter()
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
            self._capture(model, kv_caches, layer_group, windows, size)
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode CUDA graphs (batch %s) in %.2f s", len(self.sizes),
                 ", ".join(map(str, self.sizes)), self.capture_seconds)

    @torch.inference_mode()
    def _capture(self, model, kv_caches, layer_group, windows, size: int) -> None:
        """The step of `size` rows over the static buffers, recorded."""
        metas = [AttentionMetadata(self.slots[g][:size], (), torch.empty(0, dtype=torch.long), window,
                                   self.tables[g][:size], self.seq[:size], self.positions[:size])
                 for g, window in enumerate(windows)]
        per_layer = [metas[g] for g in layer_group]
        index = torch.arange(size, device=self.ids.device)
        for m in model.modules():  # a cached lookup would be baked into the graph: start clean
            if hasattr(m, "forget_step"):
                m.forget_step()

        def step() -> torch.Tensor:
            return model(self.ids[:size], self.positions[:size], kv_caches, per_layer, index, self.dense_rows)

        self.replays[size], self.outputs[size] = self._record(step)

    def _record(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record `step` as a CUDA graph: (its replay, the output tensor it writes)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles the Triton kernels, creates cuBLAS handles
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()
        torch.cuda.synchronize()
        self._pool = graph.pool()
        return graph.replay, out

    def runs(self, batch: ForwardBatch, logits_indices: torch.Tensor, dense_rows: int | None) -> bool:
        rows = batch.input_ids.shape[0]
        return (dense_rows == self.dense_rows and 0 < rows <= self.sizes[-1] and is_decode(batch, logits_indices)
                and all(m.tables.shape[1] <= self.width for m in batch.attn))

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [rows, vocab] (on the GPU) of a decode step `runs` accepted."""
        n = batch.input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        padded = pad_decode(batch, size, self.width)
        self.ids[:size].copy_(padded.input_ids, non_blocking=True)
        self.positions[:size].copy_(padded.positions, non_blocking=True)
        for g, meta in enumerate(padded.attn):
            self.slots[g][:size].copy_(meta.slot_mapping, non_blocking=True)
            self.tables[g][:size].copy_(meta.tables, non_blocking=True)
        self.replays[size]()
        return self.outputs[size][:n]
