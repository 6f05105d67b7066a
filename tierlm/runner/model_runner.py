"""ModelRunner: owns the model's KV cache tensors and runs one scheduled step.

SchedulerOutput -> (per-request state updated: new requests, new output tokens, finished
ones forgotten; KV tier saves and loads, block copies) -> the attention backend's batch
layout (attention/registry.py) -> model
forward -> sampler (grammar masks) -> draft verification (speculative decoding) ->
grammar states advanced -> StepResult.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from tierlm.attention.base import ForwardBatch
from tierlm.config import ModelConfig
from tierlm.device import CPU
from tierlm.kv_cache.block_pool import NULL_BLOCK
from tierlm.kv_cache.sizing import head_width, layout_for
from tierlm.kv_cache.transfers import BlockLoad, BlockSave
from tierlm.layers.moe import SparseMoE
from tierlm.lora.slots import LoRASlots
from tierlm.models.fused import FusedDecoder
from tierlm.outputs import SampledToken, StepResult, TokenLogprob
from tierlm.runner.cuda_graphs import DecodeGraphs
from tierlm.runner.placement import kv_pool, on_device
from tierlm.sampling import sampler
from tierlm.sampling_params import SamplingParams
from tierlm.scheduler.output import NewRequest, ScheduledRequest, SchedulerOutput
from tierlm.structured.manager import StructuredOutputs


@dataclass
class _RequestState:
    """What the runner keeps per request between steps (from NewRequest and the deltas)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    tables: list[list[int]] = field(default_factory=list)  # block tables per KV group
    dropped: list[int] = field(default_factory=list)  # leading entries released, per group


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, deterministic: bool = True, kernels: bool = False,
                 structured: StructuredOutputs | None = None, lora: LoRASlots | None = None,
                 kv_dtype: torch.dtype | None = None, tp=None, samples: bool = True,
                 device: torch.device = CPU, graphs: tuple[int, int] | None = None) -> None:
        self.model = model
        # Where the model and its KV pool live; batches are built on the CPU and moved there,
        # logits come back to the CPU for sampling (float32 [rows, vocab]: small next to a step).
        self.device = device
        # Tensor parallelism (parallel/group.py): rank 0's runner hands each call to the
        # workers first; a worker's runner (`samples` False) makes the same calls and never samples.
        self.tp = tp
        self.samples = samples
        self.lora = lora  # LoRA adapter slots over the model (None: LoRA not enabled)
        self.structured = structured  # grammar states of constrained requests (None: unconstrained only)
        self._requests: dict[str, _RequestState] = {}
        # Deterministic: a row's weight format follows its role (prompt rows dense, generated
        # rows quantized); otherwise each layer picks by its row count. A model on the
        # kernels (`kernels`) is deterministic by construction: one format, one layout.
        self.deterministic = deterministic
        self.kernels = kernels
        self.cfg = cfg
        self.block_size = block_size
        self.layout = layout_for(cfg)
        self.attention = model.attention  # the model's backend (attention/registry.py) lays out its batches
        self.attention.prepare(dtype, deterministic)  # its one-off probes: a failure is a startup error
        self.compute_dtype = dtype
        kv_dtype = kv_dtype or dtype  # int8: codes and their parameters (kv_cache/sizing.py)
        width = head_width(cfg.head_dim, kv_dtype)
        shape = (num_blocks, block_size, cfg.num_kv_heads, width)
        k_shape = self.attention.k_cache_shape(num_blocks, width)
        slots = [(kv_pool(k_shape, kv_dtype, device), kv_pool(shape, kv_dtype, device))
                 for _ in range(self.layout.group_size)]
        places = [self.layout.place(i) for i in range(cfg.num_layers)]
        self.kv_caches = [slots[slot] for _, slot in places]
        self.layer_group = [group for group, _ in places]
        self._pages = [t for pair in slots for t in pair]  # every tensor a block id indexes
        # On the kernels, a whole step runs on the fused kernels where the model allows it.
        self.fused = (FusedDecoder(model, self.kv_caches, self.layer_group, lora)
                      if kernels and FusedDecoder.supports(model) else None)
        # (layer index, block) of every sparse MoE block, for per-expert load statistics.
        self._moe = [(int(name.split(".")[1]), m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]
        # Decode steps replayed from CUDA graphs (runner/cuda_graphs.py) captured for `graphs`
        # = (largest batch, widest block table); MoE routing syncs with the host: eager.
        self.graphs = None
        if graphs is not None and device.type == "cuda" and not self._moe:
            with torch.cuda.device(device):
                self.graphs = DecodeGraphs(model, self.kv_caches, self.layer_group, self.layout.windows, *graphs,
                                           dense_rows=0 if kernels or deterministic else None, device=device)

    def moe_expert_tokens(self) -> dict[int, list[int]]:
        """Tokens routed to each expert since load, per MoE layer (empty for dense models)."""
        return {layer: m.expert_tokens.tolist() for layer, m in self._moe}

    def read_block(self, block: int) -> torch.Tensor:
        """A host copy of one block's K/V pages, flat: [2 * group_size, page elements]
        (pinned memory when the pool is on a GPU: the warm tier's copies load back by DMA)."""
        pages = torch.stack([t[block].reshape(-1) for t in self._pages])
        if self.device.type == "cpu":
            return pages
        return torch.empty(pages.shape, dtype=pages.dtype, pin_memory=True).copy_(pages)

    def write_block(self, block: int, data: torch.Tensor) -> None:
        for t, page in zip(self._pages, data):
            t[block].copy_(page.view(t[block].shape))

    def _build(self, out: SchedulerOutput) -> ForwardBatch:
        return self.attention.build_batch(out, self.layout.windows, self.compute_dtype, self.deterministic)

    def _forward(self, batch: ForwardBatch, logits_indices: torch.Tensor) -> torch.Tensor:
        """Float32 logits on the CPU of the rows `logits_indices` names."""
        if self.fused is not None:
            return self.fused.forward(batch.input_ids, batch.attn, logits_indices)
        dense_rows = 0 if self.kernels else batch.prompt_rows if self.deterministic else None
        if self.device.type == "cpu":
            metas = [batch.attn[g] for g in self.layer_group]
            return self.model(batch.input_ids, batch.positions, self.kv_caches, metas, logits_indices, dense_rows)
        # Triton launches on the thread's current device: make it this model's.
        with torch.cuda.device(self.device):
            if self.graphs is not None and self.graphs.runs(batch, logits_indices, dense_rows):
                return self.graphs.replay(batch).cpu()
            batch, logits_indices = on_device(batch, self.device), logits_indices.to(self.device)
            metas = [batch.attn[g] for g in self.layer_group]
            logits = self.model(batch.input_ids, batch.positions, self.kv_caches, metas, logits_indices, dense_rows)
            return logits.cpu()

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
        return self.many_logits([(ids, block_tables, cut)])[0]

    @torch.inference_mode()
    def many_logits(self, seqs: list[tuple[list[int], list[list[int]], int]]) -> list[torch.Tensor]:
        """all_logits for several sequences (ids, block tables, prompt length) in one forward;
        each sequence's rows are what it would get alone (the batch-invariant kernels)."""
        if self.tp is not None:
            self.tp.send("many_logits", seqs)
        scheds = [ScheduledRequest(f"score-{k}", ids, 0, tables, False, cut)
                  for k, (ids, tables, cut) in enumerate(seqs)]
        batch = self._build(SchedulerOutput(scheds))
        if self.lora is not None:
            self.lora.set_rows(None)  # scoring runs the base model
        logits = self._forward(batch, torch.arange(len(batch.input_ids)))
        if len(seqs) == 1:
            return [logits]
        if batch.row_request is None:
            raise RuntimeError(f"the {self.attention.name} batch layout does not give rows' requests")
        # A layout may put every prompt row before the generated ones: gather each sequence's
        # rows (its prompt rows, then its generated ones: position order).
        owner = batch.row_request.long()
        return [logits[owner == k] for k in range(len(seqs))]

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any."""
        if self.tp is not None:
            self.tp.close()
            self.tp = None

    def transfer(self, saves: list[BlockSave], loads: list[BlockLoad]) -> dict:
        """Carry out KV tier traffic: read the saved blocks' pages first (nothing has written
        them since they were evicted), then write the loads (a load without data takes the
        pages a save of its key just read). Returns the saved pages by cache key."""
        saved = {s.key: self.read_block(s.block) for s in saves}
        for load in loads:
            self.write_block(load.block, load.data if load.data is not None else saved[load.key])
        return saved

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (every page a block id indexes): forked requests' partial blocks."""
        for src, dst in copies:
            for t in self._pages:
                t[dst].copy_(t[src])

    def _track(self, out: SchedulerOutput) -> SchedulerOutput:
        """Bring the per-request state up to date with this step's contract; returns the
        step with every request's whole block tables filled in."""
        for rid in out.finished:
            self._requests.pop(rid, None)
            if self.structured is not None:
                self.structured.forget(rid)
        for new in out.new_requests:
            self._start(new)
        for slot, adapter in out.lora_loads:
            if self.lora is None:
                raise RuntimeError("an adapter reached a runner without LoRA slots")
            self.lora.load(slot, adapter)
        resolved = []
        for s in out.scheduled:
            st = self._requests[s.request_id]
            if s.new_output_token_ids:
                st.output_token_ids.extend(s.new_output_token_ids)
            if s.blocks is not None:
                _apply_blocks(st, s.blocks)
                s = dataclasses.replace(s, block_tables=st.tables)
            resolved.append(s)
        return dataclasses.replace(out, scheduled=resolved)

    def _lora_rows(self, out: SchedulerOutput, batch: ForwardBatch) -> None:
        """Tell the adapter slots each row's slot for this step (None: no adapter rows)."""
        per_request = [s.lora_slot for s in out.scheduled]
        if max(per_request) < 0:
            self.lora.set_rows(None)
            return
        if batch.row_request is None:
            raise RuntimeError(f"the {self.attention.name} batch layout does not give rows' requests (LoRA needs them)")
        self.lora.set_rows(torch.tensor(per_request, dtype=torch.int32)[batch.row_request.long()])

    def _start(self, new: NewRequest) -> None:
        p = new.sampling_params
        self._requests[new.request_id] = _RequestState(new.prompt_token_ids, list(new.output_token_ids), p, new.seed)
        if p.guided is not None and self.samples:
            if self.structured is None:
                raise RuntimeError("a constrained request reached a runner without structured outputs")
            self.structured.start(new.request_id, p.guided)

    def _prepare(self, out: SchedulerOutput) -> tuple[SchedulerOutput, dict, ForwardBatch | None]:
        """A step's bookkeeping before its forward: request state, KV tier traffic, block
        copies, the batch (None when nothing is scheduled)."""
        out = self._track(out)
        saved = self.transfer(out.block_saves, out.block_loads)
        self.copy_blocks(out.block_copies)  # before the forward writes either block
        if not out.scheduled:
            return out, saved, None
        batch = self._build(out)
        if self.lora is not None:
            self._lora_rows(out, batch)
        return out, saved, batch

    def _rows_wanted(self, out: SchedulerOutput, batch: ForwardBatch) -> tuple[torch.Tensor, list]:
        """The rows whose logits a step needs: sampled rows, then prompt-scoring rows."""
        score_rows, targets = _prompt_scoring_rows(out, batch.prompt_row_starts, self._requests)
        return torch.cat([batch.logits_indices, torch.tensor(score_rows, dtype=torch.long)]), targets

    @torch.inference_mode()
    def forward_step(self, out: SchedulerOutput) -> None:
        """A tensor-parallel worker's share of `execute`: the same state and forward, no sampling."""
        out, _, batch = self._prepare(out)
        if batch is not None:
            self._forward(batch, self._rows_wanted(out, batch)[0])

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        if self.tp is not None:
            self.tp.send("forward_step", out)
        out, saved, batch = self._prepare(out)
        if batch is None:
            return StepResult(saved_blocks=saved)
        ids = batch.sample_request_ids
        by_id = {s.request_id: s for s in out.scheduled}
        masks = self.structured.masks(ids) if self.structured is not None else None
        rows_wanted, targets = self._rows_wanted(out, batch)
        logits = self._forward(batch, rows_wanted)
        scored = _score_prompt(logits[len(ids):], targets)
        logits = logits[: len(ids)]
        allowed = masks.result() if masks is not None else {}
        # A draft row samples as if the drafts before it were already output (same history,
        # same draw index), i.e. exactly what decoding without drafts would do there.
        rows = []
        for k, (i, j) in enumerate(zip(ids, batch.sample_offsets)):
            st = self._requests[i]
            # The sampler only reads the history: the runner's own list unless drafts precede the row.
            history = st.output_token_ids + list(by_id[i].draft_token_ids[:j]) if j else st.output_token_ids
            rows.append(sampler.SamplingRow(st.sampling_params, st.seed, st.prompt_token_ids, history, allowed.get(k)))
        drawn = sampler.sample(logits, rows, self.cfg.eos_token_ids)
        sampled, accepted = _verify(ids, drawn, by_id)
        complete, failed = self._advance_grammars(sampled)
        return StepResult(sampled, scored, accepted, complete, failed, saved)

    def _advance_grammars(self, sampled: list[SampledToken]) -> tuple[set[str], dict[str, Exception]]:
        """Feed each constrained request's sampled token to its grammar: the requests whose
        grammar is now complete, and those whose grammar state failed (they end alone)."""
        complete: set[str] = set()
        failed: dict[str, Exception] = {}
        if self.structured is None:
            return complete, failed
        for tok in sampled:
            if not self.structured.constrained(tok.request_id):
                continue
            try:
                if self.structured.accept(tok.request_id, tok.token_id):
                    complete.add(tok.request_id)
            except Exception as e:  # noqa: BLE001 - one request's own state failed
                failed[tok.request_id] = e
        return complete, failed


def _apply_blocks(st: _RequestState, delta) -> None:
    """Follow a request's block tables by what changed (scheduler/output.py BlockDelta)."""
    if delta.reset:
        st.tables, st.dropped = [[] for _ in delta.appended], [0] * len(delta.appended)
    for g, (table, new, dropped) in enumerate(zip(st.tables, delta.appended, delta.dropped)):
        table.extend(new)
        if dropped > st.dropped[g]:  # released out of every future query's window
            table[st.dropped[g]:dropped] = [NULL_BLOCK] * (dropped - st.dropped[g])
            st.dropped[g] = dropped


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


def _prompt_scoring_rows(out: SchedulerOutput, starts: tuple[int, ...], states: dict[str, _RequestState]
                         ) -> tuple[list[int], list[tuple[str, int, int, int]]]:
    """Rows whose logits score the next prompt token, and per row (request id, position of
    the scored token, its id, top-N). Position p's logits score prompt token p + 1; the
    scored positions are prompt positions, each request's consecutive from `starts`."""
    rows: list[int] = []
    targets: list[tuple[str, int, int, int]] = []
    for s, row0 in zip(out.scheduled, starts):
        if s.prompt_logprobs is not None:
            prompt = states[s.request_id].prompt_token_ids
            end = min(s.start + len(s.token_ids), len(prompt) - 1)
            for p in range(s.start, end):
                rows.append(row0 + p - s.start)
                targets.append((s.request_id, p + 1, prompt[p + 1], s.prompt_logprobs))
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
