"""A MoE model behind a real server: per-expert routing counts on /metrics
(`tierlm:moe_expert_tokens_total{layer,expert}`), read with Prometheus' own parser."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ServerProcess


def expert_tokens(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.labels["layer"], s.labels["expert"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "tierlm:moe_expert_tokens_total"}


@pytest.fixture(scope="module")
def moe_server(tiny_checkpoint, cache_dir):
    path, hf = tiny_checkpoint("mixtral")
    srv = ServerProcess(cache_dir, model=str(path))
    yield srv, hf.config
    srv.stop()


def test_every_routed_token_is_counted_per_layer_and_expert(moe_server):
    import openai

    srv, cfg = moe_server
    before = expert_tokens(srv.url)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
    r = client.completions.create(model=client.models.list().data[0].id, prompt=[5, 6, 7, 8, 9, 10, 11],
                                  max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    # Each computed token (the prompt, then every sampled token but the last) visits top_k experts per layer.
    routed = (r.usage.prompt_tokens + r.usage.completion_tokens - 1) * cfg.num_experts_per_tok
    deadline = time.time() + 10
    while True:  # the engine thread publishes its counters after the step
        after = expert_tokens(srv.url)
        layers = {layer for layer, _ in after}
        delta = {layer: sum(v - before.get((la, e), 0) for (la, e), v in after.items() if la == layer)
                 for layer in layers}
        if all(d == routed for d in delta.values()) or time.time() > deadline:
            break
        time.sleep(0.1)
    assert layers == {str(i) for i in range(cfg.num_hidden_layers)}
    assert {e for _, e in after} == {str(i) for i in range(cfg.num_local_experts)}
    assert delta == {layer: routed for layer in layers}
