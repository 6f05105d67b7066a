"""Where benchmark requests go: a local engine (in this process) or an OpenAI-compatible URL.

Both send one greedy request of token ids, stream it, and report when the request was
sent, when its first token arrived, when its last token arrived and how many there were.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from tierlm.sampling_params import SamplingParams


@dataclass(frozen=True)
class Timing:
    sent: float
    first: float
    last: float
    tokens: int

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.last - self.first) / max(1, self.tokens - 1)


class BenchError(RuntimeError):
    """The target could not serve a benchmark request."""


class LocalTarget:
    """An engine in this process (its own thread), reached through the AsyncEngine API."""

    def __init__(self, config) -> None:
        from tierlm.engine.async_engine import AsyncEngine
        from tierlm.engine.builder import build_engine

        self.name = f"local:{config.model}"
        self.engine = AsyncEngine(lambda: build_engine(config))
        self.tokenizer = self.engine.start().tokenizer

    async def stream(self, ids: list[int], max_tokens: int) -> Timing:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.prepare(ids, params)
        sent = time.perf_counter()
        first, tokens = None, 0
        async for out in self.engine.generate(uuid.uuid4().hex, ids, params):
            n = len(out.outputs[0].token_ids)
            if n > tokens:
                first = first or time.perf_counter()
                tokens = n
        return Timing(sent, first or time.perf_counter(), time.perf_counter(), tokens)

    async def close(self) -> None:
        self.engine.shutdown()


class HTTPTarget:
    """`/v1/completions` of an OpenAI-compatible server, streamed; token ids as the prompt."""

    def __init__(self, url: str, model: str, api_key: str | None, tokenizer) -> None:
        import httpx

        self.name = url
        self.url = url.rstrip("/").removesuffix("/v1") + "/v1/completions"
        self.model = model
        self.tokenizer = tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A fresh connection per request: llama-server sometimes drops a kept-alive one
        # between requests ("Server disconnected without sending a response").
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), headers=headers,
                                        limits=httpx.Limits(max_keepalive_connections=0))

    async def stream(self, ids: list[int], max_tokens: int) -> Timing:
        import httpx

        body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        first = last = None
        chunks, usage = 0, None
        try:
            async with self.client.stream("POST", self.url, json=body) as r:
                if r.status_code != 200:
                    raise BenchError(f"{self.url} answered {r.status_code}: {(await r.aread()).decode()[:200]}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    usage = data.get("usage") or usage
                    if any(c.get("text") for c in data.get("choices", [])):
                        last = time.perf_counter()
                        first = first or last
                        chunks += 1
        except httpx.HTTPError as e:
            raise BenchError(f"{self.url}: {e}") from e
        if first is None:
            raise BenchError(f"{self.url} streamed no tokens")
        # A chunk may carry several tokens (text held back at a UTF-8 boundary): prefer the count.
        tokens = usage.get("completion_tokens", chunks) if usage else chunks
        return Timing(sent, first, last, tokens)

    async def close(self) -> None:
        await self.client.aclose()
