"""ModelRunner: owns the model's KV cache tensors and runs one scheduled step.

SchedulerOutput -> forward_batch.build -> model forward -> sampler -> draft verification
(speculative decoding) -> StepResult.
"""

from __future__ import annotations

import math
import mmap
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from tierlm.attention import torch_ref
from tierlm.config import CacheConfig, ModelConfig
from tierlm.kv_cache import layout as kv_layout
from tierlm.models.fused import FusedDecoder
from tierlm.outputs import SampledToken, StepResult
from tierlm.request import TokenLogprob
from tierlm.runner import forward_batch
from tierlm.sampling import sampler
from tierlm.sampling_params import SamplingParams
from tierlm.scheduler.output import ScheduledRequest, SchedulerOutput
from tierlm.structured import grammar


def layout_for(cfg: ModelConfig) -> kv_layout.KVLayout:
    return kv_layout.plan([cfg.layer_window(i) for i in range(cfg.num_layers)])


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block: one page in each slot of a KV group."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layout_for(cfg).group_size * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def num_kv_blocks(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(2, int(cache.kv_cache_gb * 2**30) // kv_block_bytes(cfg, cache.block_size, dtype))


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor whose memory is committed page by page on first write.

    Zeros, because padding reads of never-written slots must be finite (they are masked);
    lazily, because the pool is sized for the worst case: torch.zeros would write (and so
    commit) every page up front. A private anonymous mapping is zero pages from the OS,
    each committed when first written, so resident memory grows with the KV actually
    held (calloc gives that only while the allocator hands out fresh mappings).
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    pages = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)  # keeps `pages`


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, deterministic: bool = True, kernels: bool = False) -> None:
        self.model = model
        # Deterministic: a row's weight format follows its role (prompt rows dense, generated
        # rows quantized); otherwise each layer picks by its row count. A model on the
        # kernels (`kernels`) is deterministic by construction: one format, one layout.
        self.deterministic = deterministic
        self.kernels = kernels
        self.cfg = cfg
        self.block_size = block_size
        self.layout = layout_for(cfg)
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # The kernels' attention reads K transposed per block (attention/kernel.py).
        k_shape = (num_blocks, cfg.num_kv_heads, cfg.head_dim, block_size) if kernels else shape
        slots = [(lazily_zeroed(k_shape, dtype), lazily_zeroed(shape, dtype)) for _ in range(self.layout.group_size)]
        places = [self.layout.place(i) for i in range(cfg.num_layers)]
        self.kv_caches = [slots[slot] for _, slot in places]
        self.layer_group = [group for group, _ in places]
        self._pages = [t for pair in slots for t in pair]  # every tensor a block id indexes
        # Decode attention layout: probed for batch invariance, or the cheapest when not asked for.
        group = cfg.num_heads // cfg.num_kv_heads
        self.decode_layout = (torch_ref.decode_layout(group, cfg.num_kv_heads, cfg.head_dim, dtype)
                              if deterministic and not kernels else (1, True))
        self._mask_worker: ThreadPoolExecutor | None = None
        # On the kernels, a whole step runs on the fused kernels where the model allows it.
        self.fused = (FusedDecoder(model, self.kv_caches, self.layer_group)
                      if kernels and FusedDecoder.supports(model) else None)

    def read_block(self, block: int) -> torch.Tensor:
        """A copy of one block's K/V pages, flat: [2 * group_size, page elements]."""
        return torch.stack([t[block].reshape(-1) for t in self._pages])

    def write_block(self, block: int, data: torch.Tensor) -> None:
        for t, page in zip(self._pages, data):
            t[block].copy_(page.view(t[block].shape))

    def _build(self, out: SchedulerOutput) -> forward_batch.ForwardBatch:
        if self.kernels:
            return forward_batch.build_flat(out, self.block_size, self.layout.windows)
        return forward_batch.build(out, self.block_size, self.layout.windows,
                                   self.cfg.num_heads // self.cfg.num_kv_heads, self.kv_caches[0][0].dtype,
                                   self.decode_layout)

    def _forward(self, batch: forward_batch.ForwardBatch, logits_indices: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused.forward(batch.input_ids, batch.attn, logits_indices)
        metas = [batch.attn[g] for g in self.layer_group]
        dense_rows = 0 if self.kernels else batch.prompt_rows if self.deterministic else None
        return self.model(batch.input_ids, batch.positions, self.kv_caches, metas, logits_indices, dense_rows)

    @torch.inference_mode()
    def compute_logits(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[str]]:
        batch = self._build(out)
        return self._forward(batch, batch.logits_indices), batch.sample_request_ids

    @torch.inference_mode()
    def all_logits(self, ids: list[int], block_tables: list[list[int]], prompt_len: int | None = None
                   ) -> torch.Tensor:
        """Logits [len(ids), vocab] for a whole sequence computed from position 0, the
        positions from `prompt_len` on as generated tokens."""
        cut = len(ids) if prompt_len is None else prompt_len
        sched = ScheduledRequest("score", ids, 0, block_tables, False, SamplingParams(), 0, ids[:cut], ids[cut:])
        batch = self._build(SchedulerOutput([sched]))
        return self._forward(batch, torch.arange(len(ids)))

    def _grammar_masks(self, states: list) -> Future | None:
        """Start computing the constrained rows' token masks ({row: bool [V]}) on a worker
        thread, so they overlap the forward pass (the grammar engine releases the GIL)."""
        constrained = [(k, g) for k, g in enumerate(states) if g is not None]
        if not constrained:
            return None
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierlm-grammar")

        def compute() -> dict[int, torch.Tensor]:
            masks = grammar.allowed_masks([g for _, g in constrained])
            return {k: masks[j] for j, (k, _) in enumerate(constrained)}

        return self._mask_worker.submit(compute)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (every page a block id indexes): forked requests' partial blocks."""
        for src, dst in copies:
            for t in self._pages:
                t[dst].copy_(t[src])

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        self.copy_blocks(out.block_copies)  # before the forward writes either block
        if not out.scheduled:
            return StepResult()
        batch = self._build(out)
        ids = batch.sample_request_ids
        by_id = {s.request_id: s for s in out.scheduled}
        masks = self._grammar_masks([by_id[i].grammar for i in ids])
        score_rows, targets = _prompt_scoring_rows(out, batch.prompt_row_starts)
        logits = self._forward(batch, torch.cat([batch.logits_indices, torch.tensor(score_rows, dtype=torch.long)]))
        scored = _score_prompt(logits[len(ids):], targets)
        logits = logits[: len(ids)]
        allowed = masks.result() if masks is not None else {}
        # A draft row samples as if the drafts before it were already output (same history,
        # same draw index), i.e. exactly what decoding without drafts would do there.
        rows = [sampler.SamplingRow(by_id[i].sampling_params, by_id[i].seed, by_id[i].prompt_token_ids,
                                    by_id[i].output_token_ids + list(by_id[i].draft_token_ids[:j]), allowed.get(k))
                for k, (i, j) in enumerate(zip(ids, batch.sample_offsets))]
        drawn = sampler.sample(logits, rows, self.cfg.eos_token_ids)
        sampled, accepted = _verify(ids, drawn, by_id)
        return StepResult(sampled, scored, accepted)


def _verify(ids: list[str], drawn: list, by_id: dict[str, ScheduledRequest]
            ) -> tuple[list[SampledToken], dict[str, int]]:
    """Keep each request's drafts while they equal the token sampled before them, plus the
    sampled token after the last kept one (a correction, or a bonus when all are kept).
    For a point-mass draft this is the speculative rejection rule (spec/ngram.py)."""
    sampled: list[SampledToken] = []
    accepted: dict[str, int] = {}
    k = 0
    while k < len(ids):
        rid = ids[k]
        draft = by_id[rid].draft_token_ids
        group = drawn[k : k + len(draft) + 1]
        a = 0
        while a < len(draft) and group[a][0] == draft[a]:
            a += 1
        sampled.extend(SampledToken(rid, tok, lp) for tok, lp in group[: a + 1])
        if draft:
            accepted[rid] = a
        k += len(draft) + 1
    return sampled, accepted


def _prompt_scoring_rows(out: SchedulerOutput, starts: tuple[int, ...]
                         ) -> tuple[list[int], list[tuple[str, int, int, int]]]:
    """Rows whose logits score the next prompt token, and per row (request id, position of
    the scored token, its id, top-N). Position p's logits score prompt token p + 1; the
    scored positions are prompt positions, each request's consecutive from `starts`."""
    rows: list[int] = []
    targets: list[tuple[str, int, int, int]] = []
    for s, row0 in zip(out.scheduled, starts):
        if s.prompt_logprobs is not None:
            end = min(s.start + len(s.token_ids), len(s.prompt_token_ids) - 1)
            for p in range(s.start, end):
                rows.append(row0 + p - s.start)
                targets.append((s.request_id, p + 1, s.prompt_token_ids[p + 1], s.prompt_logprobs))
    return rows, targets


def _score_prompt(logits: torch.Tensor, targets: list[tuple[str, int, int, int]]
                  ) -> dict[str, list[tuple[int, TokenLogprob]]]:
    if not targets:
        return {}
    lps = torch.log_softmax(logits.float(), dim=-1)
    chosen = lps.gather(1, torch.tensor([t[2] for t in targets]).unsqueeze(1)).squeeze(1)
    ranks = (lps > chosen.unsqueeze(1)).sum(1) + 1
    scored: dict[str, list[tuple[int, TokenLogprob]]] = {}
    for r, (rid, pos, _, n) in enumerate(targets):
        top = sampler.top_tokens(lps[r], n)
        scored.setdefault(rid, []).append((pos, TokenLogprob(float(chosen[r]), top, int(ranks[r]))))
    return scored
