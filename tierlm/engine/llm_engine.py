"""LLMEngine: the synchronous core. add_request / abort_request / step.

One step: the proposer drafts (speculative decoding), the scheduler plans (data only),
the runner computes, the scheduler applies the tokens and stop rules, and the output
processor (engine/output_processor.py) turns them into RequestOutputs. A request with
`n > 1` (or `best_of`) fans out into that many sequences (seeds seed, seed+1, ...): the
first computes the prompt, the others fork its KV (shared blocks), each is then
scheduled independently, and they are reported together under the caller's id; beam
search grows and prunes its beams each round in the output processor.
"""

from __future__ import annotations

import dataclasses
import logging
import random

import torch

from tierlm.config import EngineConfig
from tierlm.engine import beam
from tierlm.engine.builder import EngineParts
from tierlm.engine.output_processor import OutputProcessor, Parent
from tierlm.kv_cache import prefix_hash
from tierlm.lora.adapter import LoRAAdapter, LoRAError
from tierlm.lora.registry import LoRARequest
from tierlm.outputs import RequestOutput
from tierlm.request import Request
from tierlm.sampling_params import SamplingParams
from tierlm.spec.proposer import attach_drafts
from tierlm.structured.manager import GrammarError

Prompt = str | list[int] | dict
log = logging.getLogger("tierlm.engine")


class InvalidRequest(ValueError):
    """The request cannot be served as given; `param` and `code` follow OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class LLMEngine:
    """Built by `engine/builder.py` (`build_engine`), which loads the model and makes the
    parts; the engine only wires requests through them."""

    def __init__(self, config: EngineConfig, parts: EngineParts) -> None:
        self.config = config
        self.loaded = parts.loaded
        self.dense_dtype = parts.loaded.dense_dtype
        self.load_seconds = parts.load_seconds
        self.model_config = parts.loaded.config
        self.tokenizer = parts.loaded.tokenizer
        self.max_model_len = config.max_model_len(self.model_config)
        self._model_key = parts.model_key
        self.kv, self.scheduler, self.runner = parts.kv, parts.scheduler, parts.runner
        self.structured, self.proposer = parts.structured, parts.proposer
        self.adapters = parts.adapters  # LoRA adapters by name; None when LoRA is not enabled
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler, self.model_config.eos_token_ids)
        self._rng = random.Random(config.seed)
        self._seq = 0
        self.last_step_size = (0, 0)  # (tokens, requests) the last step computed
        self.debug_invariants = config.debug_invariants

    # ---- requests --------------------------------------------------------------------
    @property
    def model_key(self) -> str:
        """The model's identity in prefix hashes and cold-store names (weights, format, KV dtype)."""
        return self._model_key

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
                    tenant: str = "default", lora: str | LoRARequest | LoRAAdapter | None = None) -> None:
        """Queue a request. Requests share prefix-cache entries only with equal `cache_salt`
        and adapter; a `session_id` keeps the request's KV in the warm tier for the session
        TTL; under the "fair" policy `tenant` names whose share it uses; `lora` runs it with
        a LoRA adapter (a registered name, or a LoRARequest loaded on first use)."""
        params = params or SamplingParams()
        if self.outputs.has(request_id):
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        adapter = self.resolve_adapter(lora) if lora is not None else None
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
        parent = Parent(text, ids, children, {}, {}, n=params.n, hide_logprobs=hide_logprobs)
        if params.use_beam_search:
            parent.beam = beam.BeamState(params.num_sequences, params.length_penalty, {children[0]: 0.0},
                                         skip_special_tokens=params.skip_special_tokens)
        # A prompt's KV under one adapter is never another's (or the base model's).
        key = self._model_key if adapter is None else f"{self._model_key}|lora={adapter.key}"
        root = prefix_hash.root_hash(key, cache_salt or "")
        reqs = []
        for i, child in enumerate(children):
            self._seq += 1
            req = Request(child, ids, params, seed=seed + i, arrival_seq=self._seq, priority=priority,
                          max_total_tokens=total, cache_root=root, session_id=session_id, tenant=tenant,
                          lora=adapter,
                          # the samples share the prompt: the first one scores it for all
                          prompt_logprobs=[None] * len(ids) if params.prompt_logprobs is not None and i == 0
                          else None)
            reqs.append(req)
        self.outputs.add(request_id, parent, reqs)
        self.scheduler.add(reqs[0])
        if len(reqs) > 1:
            self.scheduler.add_forks(reqs[0], reqs[1:])

    def resolve_adapter(self, lora: str | LoRARequest | LoRAAdapter) -> LoRAAdapter:
        """The adapter a request names; InvalidRequest when LoRA is off, the name unknown or
        the adapter unusable."""
        if self.adapters is None:
            raise InvalidRequest("LoRA adapters are not enabled on this engine (enable_lora / --enable-lora)",
                                 param="model")
        try:
            return self.adapters.resolve(lora)
        except KeyError:
            raise InvalidRequest(f"no LoRA adapter named {lora!r} is loaded", param="model",
                                 code="model_not_found") from None
        except LoRAError as e:
            raise InvalidRequest(str(e), param="lora_request") from None

    def check_guided(self, params: SamplingParams) -> None:
        """Compile (and cache) a request's output constraint; InvalidRequest if it cannot."""
        try:
            self.structured.check(params.guided)
        except GrammarError as e:
            raise InvalidRequest(str(e), param="response_format") from None

    def abort_request(self, request_id: str) -> None:
        if self.outputs.abort(request_id):
            self._release_drafts()

    def _release_drafts(self) -> None:
        """The proposer forgets requests that ended (its draft KV goes back at once)."""
        if self.proposer is not None:
            for rid in self.scheduler.ended:
                self.proposer.release(rid)

    def has_unfinished_requests(self) -> bool:
        return self.outputs.has_unfinished()

    def prompt_logits(self, ids: list[int], prompt_len: int | None = None) -> torch.Tensor:
        """float32 logits at every position of `ids` (one paged forward, outside the scheduler).

        Used for scoring (perplexity, numerics checks); the blocks are borrowed and returned.
        Positions from `prompt_len` on are computed as generated tokens (their weight
        format), so scoring a request's prompt + output repeats the numbers it was sampled from.
        """
        return self.many_prompt_logits([ids], prompt_len)[0]

    def many_prompt_logits(self, seqs: list[list[int]], prompt_len: int | None = None) -> list[torch.Tensor]:
        """prompt_logits of several sequences in one forward (an embedding model's batch)."""
        probes = []
        try:
            for ids in seqs:
                self.validate(ids, SamplingParams(max_tokens=1))
                probe = f"__score-{self._seq}-{len(probes)}"
                if not self.kv.allocate(probe, len(ids)):
                    raise InvalidRequest("not enough free KV cache to score this prompt now")
                probes.append(probe)
            self._carry_out_transfers()  # blocks it evicted keep their pages
            cut = [len(ids) if prompt_len is None else prompt_len for ids in seqs]
            return self.runner.many_logits([(ids, self.kv.block_tables(p), c) for ids, p, c in zip(seqs, probes, cut)])
        finally:
            for probe in probes:
                self.kv.free(probe)

    def close(self) -> None:
        """Flush cached KV to the cold tier (if configured) so a restart finds it; stop the
        tensor-parallel workers."""
        if self.kv.tiers is not None:
            self._carry_out_transfers()  # saves planned after the last step
            self.kv.tiers.flush_to_cold(dict(self.kv.pool.cached), self.runner.read_block)
        self.runner.close()

    def _carry_out_transfers(self) -> None:
        """KV tier saves and loads planned outside a step (allocations there evict too)."""
        self.kv.saved(self.runner.transfer(*self.kv.take_transfers()))

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
        outputs = self.outputs.process(finished, self.scheduler.applied, self.scheduler.failed)
        self._release_drafts()
        if self.debug_invariants:
            self.check_integrity()
        return outputs

    def check_integrity(self) -> None:
        """The scheduler's, KV cache's and the engine's own bookkeeping invariants (AssertionError)."""
        self.scheduler.check_integrity()
        self.outputs.check_integrity()

