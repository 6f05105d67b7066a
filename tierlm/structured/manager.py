"""StructuredOutputs: one model's output constraints: compiling specs (cached, thread-safe:
the server checks them on its event loop, the engine thread starts them) and the live
grammar state of every constrained request, keyed by request id.

The model runner owns the states: it starts one when a constrained request first runs,
masks that request's logits with it, feeds it every token sampled, reports when the
grammar is complete, and forgets it when the scheduler says the request finished. A spec
with `after_token` waits, unmasked, until that token is sampled, and only then starts
its grammar. The grammar engine (llguidance) is built on the first constrained request.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tierlm.structured import grammar
from tierlm.structured.grammar import GrammarCompiler, GrammarError, GrammarState
from tierlm.structured.spec import GuidedSpec


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._states: dict[str, GrammarState] = {}  # engine thread only
        self._waiting: dict[str, GuidedSpec] = {}  # constrained once their spec's after_token is sampled
        self._worker: ThreadPoolExecutor | None = None

    def _state_for(self, spec: GuidedSpec) -> GrammarState:
        spec = dataclasses.replace(spec, after_token=None)  # one compiled grammar, however it starts
        with self._lock:
            if self._compiler is None:  # the grammar engine's view of the tokenizer, built once
                from tierlm.structured.llguidance_backend import LLGuidanceBackend

                self._compiler = GrammarCompiler(LLGuidanceBackend(self._tokenizer, self._vocab_size))
            return self._compiler.state_for(spec)

    def check(self, spec: GuidedSpec) -> None:
        """Compile (and cache) a spec; GrammarError if it cannot be."""
        self._state_for(spec)

    def start(self, request_id: str, spec: GuidedSpec) -> None:
        if spec.after_token is not None:
            self._waiting[request_id] = spec
        else:
            self._states[request_id] = self._state_for(spec)

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self._waiting.pop(request_id, None)

    def constrained(self, request_id: str) -> bool:
        return request_id in self._states or request_id in self._waiting

    def masks(self, request_ids: list[str]) -> Future | None:
        """Start computing the token masks ({row: bool [V]}) of the rows whose request is
        constrained, on a worker thread, so they overlap the forward pass (the grammar
        engine releases the GIL). None when no row is constrained."""
        rows = [(k, self._states[rid]) for k, rid in enumerate(request_ids) if rid in self._states]
        if not rows:
            return None
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierlm-grammar")

        def compute() -> dict[int, torch.Tensor]:
            masks = grammar.allowed_masks([g for _, g in rows])
            return {k: masks[j] for j, (k, _) in enumerate(rows)}

        return self._worker.submit(compute)

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advance a constrained request's grammar by a sampled token (the mask offered only
        tokens it allows); True when the grammar is complete (nothing may follow)."""
        waiting = self._waiting.get(request_id)
        if waiting is not None:
            if token_id == waiting.after_token:
                del self._waiting[request_id]
                self._states[request_id] = self._state_for(waiting)
            return False
        state = self._states[request_id]
        state.accept(token_id)
        return state.is_finished()


__all__ = ["GrammarError", "StructuredOutputs"]
