"""LLMEngine: the synchronous core. add_request / abort_request / step.

Owns the loaded model, the KV cache manager, the scheduler and one detokenizer per
sequence. A request with `n > 1` (or `best_of`) fans out into that many sequences (seeds
seed, seed+1, ...): the first computes the prompt, the others fork its KV (shared blocks),
each is then scheduled independently, and they are reported together under the caller's
id (with best_of > n: only the n with the highest cumulative logprob, at the end). Beam
search grows and prunes its beams each round here (engine/beam.py holds the rule).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tierlm import kernels
from tierlm.config import CacheConfig, EngineConfig
from tierlm.engine import beam
from tierlm.engine.detokenizer import IncrementalDetokenizer
from tierlm.kv_cache import prefix_hash
from tierlm.kv_cache.cold_store import ColdStore
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.kv_cache.tiers import KVTiers
from tierlm.loader import model_loader
from tierlm.outputs import CompletionOutput, RequestOutput
from tierlm.request import Request, RequestStatus
from tierlm.runner import kernel_probe
from tierlm.runner.model_runner import ModelRunner, kv_block_bytes, kv_page_shape, layout_for, num_kv_blocks
from tierlm.sampling_params import SamplingParams
from tierlm.scheduler.scheduler import Scheduler
from tierlm.spec.draft import DraftModelProposer
from tierlm.spec.proposer import NgramProposer, Proposer, attach_drafts
from tierlm.structured.manager import GrammarError, StructuredOutputs

Prompt = str | list[int] | dict
log = logging.getLogger("tierlm.engine")


class InvalidRequest(ValueError):
    """The request cannot be served as given; `param` and `code` follow OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class _Parent:
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[str]
    requests: dict[str, Request]
    detoks: dict[str, IncrementalDetokenizer]
    finished: set[str] = field(default_factory=set)
    new_tokens: dict[str, list[int]] = field(default_factory=dict)
    n: int = 1  # sequences returned (of len(children) generated)
    hide_logprobs: bool = False  # logprobs were only computed to rank best_of samples
    beam: beam.BeamState | None = None


def default_cache_dir() -> Path:
    """Where tokenizers, assembled bundled models and kernel probes are kept:
    $TIERLM_CACHE_DIR, else ~/.cache/tierlm."""
    env = os.environ.get("TIERLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tierlm"


def model_key(path: Path, config: EngineConfig, dense_dtype: torch.dtype, on_kernels: bool = False) -> str:
    """What a block's KV depends on besides its tokens: the weights (files by name, size
    and mtime), the compute dtypes and the kernel mode. Part of every prefix-cache hash."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return (f"{path.resolve()}|{stamp}|{config.dtype}|quantization={config.quantization}"
            f"|dense={str(dense_dtype).removeprefix('torch.')}|deterministic={config.deterministic}"
            # every compiled path computes the same bits; the PyTorch reference does not
            + (f"|kernels={'reference' if kernels.isa() == 'reference' else 'compiled'}" if on_kernels else ""))


class LLMEngine:
    def __init__(self, config: EngineConfig, *, cache_dir: Path | None = None, progress: bool = False) -> None:
        self.config = config
        t0 = time.perf_counter()
        cache_dir = cache_dir or default_cache_dir()
        # Asked only for a model off the kernels (they have no dense products): the one-off probe.
        probe = lambda: kernel_probe.dense_dtype(config.dense_dtype, config.torch_dtype, cache_dir)
        self.loaded = model_loader.load(config.model, dtype=config.torch_dtype, block_size=config.cache.block_size,
                                        deterministic=config.deterministic, cache_dir=cache_dir, progress=progress,
                                        quantization=config.quantization, dense_dtype=probe)
        self.dense_dtype = self.loaded.dense_dtype
        if config.deterministic and not self.loaded.kernels:
            kernel_probe.ensure_probed(self.loaded.model, cache_dir)
        self.load_seconds = time.perf_counter() - t0
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        ctx = self.model_config.max_position_embeddings
        self.max_model_len = min(config.scheduler.max_model_len or ctx, ctx)
        blocks = num_kv_blocks(self.model_config, config.cache, config.torch_dtype)
        self._model_key = model_key(self.loaded.path, config, self.dense_dtype, self.loaded.kernels)
        tiers = self._kv_tiers(config.cache) if config.cache.enable_prefix_caching else None
        self.kv = KVCacheManager(blocks, config.cache.block_size, layout_for(self.model_config).windows,
                                 enable_caching=config.cache.enable_prefix_caching, tiers=tiers,
                                 session_ttl=config.cache.session_ttl)
        split_formats = config.deterministic and not self.loaded.kernels and any(
            k != "dense" for k in self.loaded.formats)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.model_config.eos_token_ids, split_formats)
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size)
        self.runner = ModelRunner(self.loaded.model, self.model_config, blocks, config.cache.block_size,
                                  config.torch_dtype, config.deterministic, kernels=self.loaded.kernels,
                                  structured=self.structured)
        self.proposer: Proposer | None = NgramProposer() if config.scheduler.num_speculative_tokens else None
        if config.draft_model:  # its KV pool: a quarter of the target's (committed only as written)
            self.proposer = DraftModelProposer(
                config.draft_model, vocab_size=self.model_config.vocab_size, dtype=config.torch_dtype,
                block_size=config.cache.block_size, kv_cache_gb=config.cache.kv_cache_gb / 4, cache_dir=cache_dir,
                quantization=config.quantization, dense_dtype=self.dense_dtype)
        self._rng = random.Random(config.seed)
        self._seq = 0
        self.last_step_size = (0, 0)  # (tokens, requests) the last step computed
        self.debug_invariants = config.debug_invariants or os.environ.get("TIERLM_DEBUG_INVARIANTS") == "1"
        self._parents: dict[str, _Parent] = {}
        self._child_parent: dict[str, str] = {}

    def _kv_tiers(self, cache: CacheConfig) -> KVTiers:
        """The warm (and, with a directory, cold) tiers behind the prefix cache."""
        dtype = self.config.torch_dtype
        cold = None
        if cache.kv_cold_dir:
            cold = ColdStore(Path(cache.kv_cold_dir), self._model_key,
                             kv_page_shape(self.model_config, cache.block_size), dtype, int(cache.kv_cold_gb * 2**30))
        return KVTiers(kv_block_bytes(self.model_config, cache.block_size, dtype), int(cache.kv_warm_gb * 2**30), cold)

    # ---- requests --------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def validate(self, ids: list[int], params: SamplingParams) -> int:
        """Check a tokenized request against the model; returns its total-token cap."""
        vocab = self.model_config.vocab_size
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        for name, tokens in (("logit_bias", params.logit_bias.keys()), ("stop_token_ids", params.stop_token_ids)):
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in tokens):
                raise InvalidRequest(f"{name} token ids must be integers in [0, {vocab})", param=name)
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} "
                                 "tokens, which must also hold at least one generated token",
                                 param="prompt", code="context_length_exceeded")
        total = self.max_model_len if params.max_tokens is None else len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"context length of {self.max_model_len}", param="max_tokens",
                                 code="context_length_exceeded")
        need = self.kv.max_blocks(total, self.scheduler.chunk)
        if need > self.kv.pool.num_usable:
            raise InvalidRequest(f"the request needs {need} blocks of KV cache ({total} tokens); the cache "
                                 f"holds {self.kv.pool.num_usable}", param="max_tokens")
        return total

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    priority: int = 0, cache_salt: str | None = None, session_id: str | None = None,
                    tenant: str = "default") -> None:
        """Queue a request. Requests share prefix-cache entries only with equal `cache_salt`;
        a `session_id` keeps the request's KV in the warm tier for the session TTL; under
        the "fair" policy `tenant` names whose share it uses."""
        params = params or SamplingParams()
        if request_id in self._parents:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        total = self.validate(ids, params)
        hide_logprobs = params.num_sequences > params.n and params.logprobs is None and not params.use_beam_search
        if hide_logprobs:  # best_of ranks samples by cumulative logprob
            params = dataclasses.replace(params, logprobs=0)
        count = 1 if params.use_beam_search else params.num_sequences  # beams fork as they grow
        if params.guided is not None:  # compiled before anything is queued: a bad constraint leaves no trace
            self.check_guided(params)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        children = [request_id] if params.num_sequences == 1 else [f"{request_id}#{i}" for i in range(count)]
        parent = _Parent(text, ids, children, {}, {}, n=params.n, hide_logprobs=hide_logprobs)
        if params.use_beam_search:
            parent.beam = beam.BeamState(params.num_sequences, params.length_penalty, {children[0]: 0.0},
                                         skip_special_tokens=params.skip_special_tokens)
        root = prefix_hash.root_hash(self._model_key, cache_salt or "")
        reqs = []
        for i, child in enumerate(children):
            self._seq += 1
            req = Request(child, ids, params, seed=seed + i, arrival_seq=self._seq, priority=priority,
                          max_total_tokens=total, cache_root=root, session_id=session_id, tenant=tenant,
                          # the samples share the prompt: the first one scores it for all
                          prompt_logprobs=[None] * len(ids) if params.prompt_logprobs is not None and i == 0
                          else None)
            self._track(parent, req, request_id)
            reqs.append(req)
        self.scheduler.add(reqs[0])
        if len(reqs) > 1:
            self.scheduler.add_forks(reqs[0], reqs[1:])
        self._parents[request_id] = parent

    def _track(self, parent: _Parent, req: Request, parent_id: str) -> None:
        if parent.beam is None:
            parent.detoks[req.request_id] = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, req.sampling_params.stop,
                req.sampling_params.skip_special_tokens, req.sampling_params.include_stop_str_in_output)
        self._child_parent[req.request_id] = parent_id
        parent.requests[req.request_id] = req

    def check_guided(self, params: SamplingParams) -> None:
        """Compile (and cache) a request's output constraint; InvalidRequest if it cannot."""
        try:
            self.structured.check(params.guided)
        except GrammarError as e:
            raise InvalidRequest(str(e), param="response_format") from None

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for child in parent.requests:
            self.scheduler.abort(child)
            self._child_parent.pop(child, None)
        self._release_drafts()

    def _release_drafts(self) -> None:
        """The proposer forgets requests that ended (its draft KV goes back at once)."""
        if self.proposer is not None:
            for rid in self.scheduler.ended:
                self.proposer.release(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def prompt_logits(self, ids: list[int], prompt_len: int | None = None) -> torch.Tensor:
        """float32 logits at every position of `ids` (one paged forward, outside the scheduler).

        Used for scoring (perplexity, numerics checks); the blocks are borrowed and returned.
        Positions from `prompt_len` on are computed as generated tokens (their weight
        format), so scoring a request's prompt + output repeats the numbers it was sampled from.
        """
        probe = f"__score-{self._seq}"
        self.validate(ids, SamplingParams(max_tokens=1))
        if not self.kv.allocate(probe, len(ids)):
            raise InvalidRequest("not enough free KV cache to score this prompt now")
        self.kv.saved(self.runner.transfer(*self.kv.take_transfers()))  # blocks it evicted keep their pages
        try:
            return self.runner.all_logits(ids, self.kv.block_tables(probe), prompt_len)
        finally:
            self.kv.free(probe)

    def close(self) -> None:
        """Flush cached KV to the cold tier (if configured) so a restart finds it."""
        if self.kv.tiers is not None:
            self.kv.saved(self.runner.transfer(*self.kv.take_transfers()))  # saves planned after the last step
            self.kv.tiers.flush_to_cold(dict(self.kv.pool.cached), self.runner.read_block)

    def kv_tier_stats(self) -> dict[str, dict[str, int]]:
        """KV tiers: block hits and bytes moved (running totals) and bytes held now, keyed by
        tier or direction (empty without prefix caching)."""
        tiers = self.kv.tiers
        if tiers is None:
            return {}
        s, used = tiers.stats, self.kv.pool.num_usable - self.kv.pool.num_free
        return {"hits": {"hot": self.kv.hot_block_hits, "warm": s.warm_hits, "cold": s.cold_hits},
                "moved": {"hot_to_warm": s.bytes_hot_to_warm, "warm_to_hot": s.bytes_warm_to_hot,
                          "to_cold": s.bytes_to_cold, "from_cold": s.bytes_from_cold},
                "usage": {"hot": used * tiers.block_bytes, "warm": tiers.warm_bytes_used,
                          "cold": tiers.cold.bytes_used if tiers.cold else 0}}

    def moe_expert_tokens(self) -> dict[int, list[int]]:
        """Tokens routed to each expert since load, per MoE layer (empty for dense models)."""
        return self.runner.moe_expert_tokens()

    # ---- stepping ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns outputs for every request that changed."""
        if self.proposer is not None:
            attach_drafts(self.scheduler, self.proposer)
        out = self.scheduler.schedule()
        self.last_step_size = (sum(len(s.token_ids) for s in out.scheduled), len(out.scheduled))
        result = self.runner.execute(out)
        finished = self.scheduler.update(out, result)
        # Per-request work from here on is guarded: a request whose own state fails (its
        # stop strings, detokenizer, beams, grammar) ends alone with an error.
        failures: dict[str, Exception] = {}
        for rid, e in self.scheduler.failed.items():
            if rid in self._child_parent:
                failures.setdefault(self._child_parent[rid], e)
        # Requests that end without a token (max_tokens 0: the prompt is scored) report too.
        touched: dict[str, None] = {self._child_parent[r.request_id]: None for r in finished
                                    if r.request_id in self._child_parent}
        beams: dict[str, None] = {}
        stopped: set[str] = set()
        for tok in self.scheduler.applied:  # the sampled tokens the scheduler kept, in order
            pid = self._child_parent.get(tok.request_id)
            if pid is None or pid in failures:
                continue
            try:
                kind = self._apply_output_token(self._parents[pid], tok, stopped)
            except Exception as e:  # noqa: BLE001 - see above
                failures[pid] = e
                continue
            if kind == "beam":
                beams[pid] = None
            elif kind == "text":
                touched[pid] = None
        outputs = []
        for pid in beams:
            outputs += self._guarded(pid, failures, lambda p: self._beam_output(p) if self._beam_round(p) else None)
        for pid in touched:
            outputs += self._guarded(pid, failures, self._output)
        outputs += [self._fail(pid, e) for pid, e in failures.items() if pid in self._parents]
        self._release_drafts()
        if self.debug_invariants:
            self.check_integrity()
        return outputs

    def check_integrity(self) -> None:
        """The scheduler's, KV cache's and the engine's own bookkeeping invariants (AssertionError)."""
        self.scheduler.check_integrity()
        live = {c for p in self._parents.values() for c in p.requests}
        assert set(self.scheduler.requests) <= live, "the scheduler holds a request no caller owns"
        assert set(self._child_parent) == live, "child -> parent index disagrees with the parents"

    def _apply_output_token(self, parent: _Parent, tok, stopped: set[str]) -> str | None:
        """Detokenize one kept token and apply stop strings. Returns "beam" (the round
        decides), "text" (the parent has news) or None (a draft after a stop string)."""
        if tok.request_id in stopped:  # a draft after a stop string: not part of the output
            parent.requests[tok.request_id].drop_last_output()
            return None
        if parent.beam is not None:
            return "beam"
        detok = parent.detoks[tok.request_id]
        detok.add(tok.token_id)
        parent.new_tokens.setdefault(tok.request_id, []).append(tok.token_id)
        if detok.stopped_on is not None and tok.request_id in self.scheduler.requests:
            self.scheduler.finish(tok.request_id, RequestStatus.FINISHED_STOPPED, detok.stopped_on)
            stopped.add(tok.request_id)
        return "text"

    def _guarded(self, pid: str, failures: dict[str, Exception], make) -> list[RequestOutput]:
        """`make(pid)` as a list (empty for None); a failure is recorded for `pid` instead."""
        if pid in failures or pid not in self._parents:
            return []
        try:
            out = make(pid)
        except Exception as e:  # noqa: BLE001 - one request's failure is that request's alone
            failures[pid] = e
            return []
        return [out] if out is not None else []

    def _fail(self, pid: str, error: Exception) -> RequestOutput:
        """End request `pid` with an error: its sequences are aborted and their blocks freed."""
        log.error("request %s failed: %s: %s", pid, type(error).__name__, error,
                  exc_info=(type(error), error, error.__traceback__))
        parent = self._parents[pid]
        self.abort_request(pid)
        return RequestOutput(pid, parent.prompt, parent.prompt_token_ids, [], True,
                             error=f"{type(error).__name__}: {error}")

    def _output(self, pid: str) -> RequestOutput | None:
        """The request's state now; None while best_of > n samples are still running (only
        the finished set can be ranked)."""
        parent = self._parents[pid]
        outs = []
        for i, child in enumerate(parent.children):
            req = parent.requests[child]
            detok = parent.detoks[child]
            done = req.status.finished
            delta = detok.delta(final=done)
            lps = req.sampling_params.logprobs is not None
            outs.append(CompletionOutput(
                index=i, text=detok.text[: detok.emitted], token_ids=list(req.output_token_ids),
                logprobs=list(req.output_logprobs) if lps and not parent.hide_logprobs else None,
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                cumulative_logprob=sum(lp.logprob for lp in req.output_logprobs) if lps else None,
                delta_text=delta, delta_token_ids=parent.new_tokens.pop(child, [])))
            if done:
                parent.finished.add(child)
        finished = len(parent.finished) == len(parent.children)
        if len(outs) > parent.n:
            if not finished:
                return None
            outs = sorted(outs, key=lambda o: (-o.cumulative_logprob, o.index))[: parent.n]
            for i, o in enumerate(outs):
                o.index = i
        if finished:
            self._forget(pid)
        first = parent.requests[parent.children[0]]
        scored = first.prompt_logprobs
        return RequestOutput(pid, parent.prompt, parent.prompt_token_ids, outs, finished,
                             list(scored) if scored is not None else None,
                             num_cached_tokens=first.num_cached_tokens or 0)

    def _forget(self, pid: str) -> None:
        parent = self._parents.pop(pid)
        for child in parent.requests:
            self._child_parent.pop(child, None)

    # ---- beam search -------------------------------------------------------------------
    def _beam_round(self, pid: str) -> bool:
        """Once every live beam has its candidates: keep the best extensions (forking a
        beam that continues more than one way), drop the rest. Returns True when done."""
        parent = self._parents[pid]
        st = parent.beam
        reqs = [parent.requests[c] for c in st.live]
        if any(r.beam_candidates is None for r in reqs):
            return False
        p = reqs[0].sampling_params
        eos = set() if p.ignore_eos else set(self.model_config.eos_token_ids)
        at_limit = ((p.max_tokens is not None and reqs[0].num_output_tokens + 1 >= p.max_tokens)
                    or reqs[0].num_tokens + 1 >= reqs[0].max_total_tokens)
        live = st.plan([r.output_token_ids for r in reqs], [r.beam_candidates for r in reqs],
                       eos | set(p.stop_token_ids), eos, at_limit)
        targets, used = [], set()
        for e in live:  # forks first: they copy their source before it grows
            src = reqs[e.source]
            if e.source in used:
                st.next_id += 1
                dst = dataclasses.replace(src, request_id=f"{pid}#b{st.next_id}",
                                          output_token_ids=list(src.output_token_ids), block_hashes=[],
                                          num_computed_tokens=0, beam_candidates=None)
                self._track(parent, dst, pid)
                self.scheduler.fork(src, dst, src.num_computed_tokens)
                src = dst
            used.add(e.source)
            targets.append((src, e))
        st.live = {}
        for req, e in targets:
            req.output_token_ids.append(e.token)
            req.beam_candidates = None
            st.live[req.request_id] = e.cum_logprob
        for r in reqs:
            if r.request_id not in st.live:
                self.scheduler.finish(r.request_id, RequestStatus.FINISHED_ABORTED)
                del parent.requests[r.request_id]
                self._child_parent.pop(r.request_id, None)
        parent.children = list(st.live)
        return not st.live

    def _beam_output(self, pid: str) -> RequestOutput:
        parent = self._parents[pid]
        st = parent.beam
        self._forget(pid)
        best = beam.ranked(st.finished, st.length_penalty)[: parent.n]
        outs = [CompletionOutput(index=i, text=self.tokenizer.decode(h.token_ids, st.skip_special_tokens),
                                 token_ids=list(h.token_ids), logprobs=None, finish_reason=h.finish_reason,
                                 stop_reason=h.stop_reason, cumulative_logprob=h.cum_logprob)
                for i, h in enumerate(best)]
        return RequestOutput(pid, parent.prompt, parent.prompt_token_ids, outs, True)
