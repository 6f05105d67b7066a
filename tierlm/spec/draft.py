"""Draft-model proposer: a smaller model with the target's vocabulary drafts each decoding
request's next tokens, the target verifies them in one forward (runner `_verify`).

The drafts are the draft model's greedy continuation, so the proposal q is a point mass
and the standard rejection rule (accept x with probability min(1, p(x) / q(x)) = p(x),
else sample from p with x removed) is exactly what verification does: keep a draft while
it equals the token the target samples there with the request's own seeded draw. The
output is therefore the one decoding without drafts gives, greedy or sampled; the draft
model only decides how many tokens each target forward yields.

The draft model keeps its own paged KV cache (its own KVCacheManager and ModelRunner).
Per request it remembers which tokens that cache holds; a step first feeds what it has
not seen (the prompt on the first step, then the tokens accepted since: rejected drafts
are overwritten), then drafts k tokens in k - 1 more batched forwards. It runs without
batch-invariant kernels: its choices can change with the batch, the output cannot.
The engine releases a request's draft KV when the request finishes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tierlm.config import CacheConfig, ConfigError
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.kv_cache.sizing import layout_for, num_kv_blocks
from tierlm.loader import model_loader
from tierlm.runner.model_runner import ModelRunner
from tierlm.scheduler.output import ScheduledRequest, SchedulerOutput


class DraftModelProposer:
    def __init__(self, model: str, *, vocab_size: int, dtype: torch.dtype, block_size: int, kv_cache_gb: float,
                 cache_dir: Path, quantization: str = "auto", dense_dtype: torch.dtype | None = None) -> None:
        loaded = model_loader.load(model, dtype=dtype, block_size=block_size, deterministic=False,
                                   cache_dir=cache_dir, quantization=quantization, dense_dtype=dense_dtype)
        cfg = loaded.config
        if cfg.vocab_size != vocab_size:
            raise ConfigError(f"draft model {model!r} has a vocabulary of {cfg.vocab_size} tokens, the target "
                             f"{vocab_size}: a draft model must share the target's tokenizer")
        self.config = cfg
        num_blocks = num_kv_blocks(cfg, CacheConfig(block_size=block_size, kv_cache_gb=kv_cache_gb), dtype)
        self.kv = KVCacheManager(num_blocks, block_size, layout_for(cfg).windows)
        self.runner = ModelRunner(loaded.model, cfg, num_blocks, block_size, dtype, deterministic=False,
                                  kernels=loaded.kernels)
        self._held: dict[str, list[int]] = {}  # request id -> tokens whose KV the draft cache holds

    def propose(self, batch: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
        """Drafts for (request id, all its tokens, at most k) entries. A request the draft
        cache cannot hold gets none."""
        feeds: dict[str, list[int]] = {}  # tokens to feed, ending with the sequence's last
        wants: dict[str, int] = {}
        for rid, tokens, k in batch:
            # Draft j sits at position len(tokens) + j - 1: stay inside the draft model's context.
            k = min(k, self.config.max_position_embeddings - len(tokens))
            if k <= 0:
                continue
            held = self._held.get(rid, [])
            common = _common_prefix(held, tokens)
            common = min(common, len(tokens) - 1)  # the last token is always fed: its logits draft
            if not self.kv.allocate(rid, len(tokens) + k - 1, common):
                self.release(rid)
                continue
            self._held[rid] = tokens[:common]
            feeds[rid], wants[rid] = tokens[common:], k
        drafts: dict[str, list[int]] = {rid: [] for rid in feeds}
        while feeds:
            picked = self._step(feeds)
            nxt = {}
            for rid, tok in picked.items():
                self._held[rid] = self._held[rid] + feeds[rid]
                drafts[rid].append(tok)
                if len(drafts[rid]) < wants[rid]:
                    nxt[rid] = [tok]
            feeds = nxt
        return {rid: d for rid, d in drafts.items() if d}

    def _step(self, feeds: dict[str, list[int]]) -> dict[str, int]:
        """One batched forward of each request's new tokens; the greedy next token of each."""
        # Tokens before the last run as prompt rows (tall attention tiles), the last as a decode.
        scheduled = [ScheduledRequest(rid, toks, len(self._held[rid]), self.kv.block_tables(rid), True,
                                      len(self._held[rid]) + len(toks) - 1)
                     for rid, toks in feeds.items()]
        logits, ids = self.runner.compute_logits(SchedulerOutput(scheduled))
        return dict(zip(ids, logits.argmax(dim=-1).tolist()))

    def release(self, request_id: str) -> None:
        self._held.pop(request_id, None)
        self.kv.free(request_id)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
