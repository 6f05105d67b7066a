"""/v1/embeddings on a real server (a TierSet of an embedding tier and a text tier)
through the official client: vectors equal sentence-transformers', base64 equals float,
concurrent requests batched together equal each alone, `auto` and tier/tenant rules,
every refusal a 4xx envelope, and the metrics read with Prometheus' parser."""

from __future__ import annotations

import base64
import concurrent.futures

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ServerProcess, http_client, openai_client
from tierlm.loader.bundled import resolve

CONFIG = """\
default_tier = "text"

[tiers.text]
model = "smollm2-135m"
max_num_seqs = 4

[tiers.embed]
model = "all-minilm-l6-v2"
prompt_price_per_mtok = 10

[tenants.ops]
api_keys = ["key-ops"]
metrics = true

[tenants.textonly]
api_keys = ["key-text"]
tiers = ["text"]
"""

SENTENCES = ["A man is eating food.", "A man is riding a horse.", "The girl is carrying a baby.",
             "A monkey is playing drums.", "Two men pushed carts through the woods."]


@pytest.fixture(scope="module")
def srv(cache_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("embed-config") / "tiers.toml"
    path.write_text(CONFIG)
    s = ServerProcess(cache_dir, "--config", str(path), model=None)
    yield s
    s.stop()


def floats(resp) -> torch.Tensor:
    return torch.tensor([d.embedding for d in resp.data])


def test_vectors_match_sentence_transformers(srv, cache_dir):
    from sentence_transformers import SentenceTransformer

    client = openai_client(srv, "key-ops")
    resp = client.embeddings.create(model="embed", input=SENTENCES, encoding_format="float")
    ref = SentenceTransformer(str(resolve("all-minilm-l6-v2", cache_dir)), device="cpu").encode(
        SENTENCES, convert_to_tensor=True)
    assert F.cosine_similarity(floats(resp), ref.float()).min() >= 0.9999
    assert [d.index for d in resp.data] == list(range(len(SENTENCES)))
    assert resp.model == "embed"
    tokens = http_client(srv, "key-ops").post("/tokenize", json={"model": "embed", "prompt": SENTENCES[0]}).json()["count"]
    one = client.embeddings.create(model="embed", input=SENTENCES[0], encoding_format="float")
    assert one.usage.prompt_tokens == one.usage.total_tokens == tokens
    # base64 (little-endian float32): the same bits as the float list.
    b64 = client.embeddings.create(model="embed", input=SENTENCES, encoding_format="base64")
    raw = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in b64.data])
    assert np.array_equal(raw, floats(resp).numpy())
    # Token-id input embeds the same as its text.
    ids = http_client(srv, "key-ops").post("/tokenize", json={"model": "embed", "prompt": SENTENCES[1]}).json()["tokens"]
    by_ids = client.embeddings.create(model="embed", input=[ids], encoding_format="float")
    assert torch.equal(floats(by_ids)[0], floats(resp)[1])


def test_concurrent_requests_equal_each_alone(srv):
    client = openai_client(srv, "key-ops")
    alone = [floats(client.embeddings.create(model="embed", input=s, encoding_format="float"))[0] for s in SENTENCES]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.embeddings.create, model="auto", input=SENTENCES[i % 5], encoding_format="float")
                   for i in range(24)]
        results = [floats(f.result())[0] for f in futures]
    for i, v in enumerate(results):
        assert torch.equal(v, alone[i % 5])


def test_refusals_are_envelopes_and_the_server_keeps_serving(srv):
    client = openai_client(srv, "key-ops")
    cases = [({"model": "embed", "input": ""}, 400, "input"),
             ({"model": "embed", "input": []}, 400, "input"),
             ({"model": "embed", "input": "word " * 300}, 400, "input"),
             ({"model": "embed", "input": [[101, 40000, 102]]}, 400, "input"),
             ({"model": "embed", "input": "x", "dimensions": 64}, 400, "dimensions"),
             ({"model": "embed", "input": ["x"] * 2049}, 400, "input"),
             ({"model": "embed", "input": "x", "extra_body": {"truncate_prompt_tokens": 0}}, 400, None),
             ({"model": "text", "input": "x"}, 400, "model"),
             ({"model": "nope", "input": "x"}, 404, "model")]
    for kwargs, status, param in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.embeddings.create(encoding_format="float", **kwargs)
        assert e.value.status_code == status, (kwargs, e.value.body)
        if param is not None:
            assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError):
        openai_client(srv, "key-text").embeddings.create(model="embed", input="x")
    with pytest.raises(openai.PermissionDeniedError, match="may not use any tier that is an embedding model"):
        openai_client(srv, "key-text").embeddings.create(model="auto", input="x")
    # Long input cut instead of refused on request; text tier still answers.
    cut = client.embeddings.create(model="embed", input="word " * 300, encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": -1})
    assert cut.usage.prompt_tokens == 256
    out = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.model == "text"


def test_metrics_count_embedding_inputs_and_tokens(srv):
    client = openai_client(srv, "key-ops")
    http = http_client(srv, "key-ops")

    def sample(name: str, **labels) -> float:
        for family in text_string_to_metric_families(http.get("/metrics").text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    inputs0 = sample("tierlm:embedding_inputs_total", model_name="embed")
    tokens0 = sample("vllm:prompt_tokens_total", model_name="embed")
    tenant0 = sample("tierlm:tenant_tokens_total", tenant="ops", kind="prompt")
    resp = client.embeddings.create(model="embed", input=SENTENCES[:3])
    assert sample("tierlm:embedding_inputs_total", model_name="embed") == inputs0 + 3
    assert sample("vllm:prompt_tokens_total", model_name="embed") == tokens0 + resp.usage.prompt_tokens
    assert sample("tierlm:tenant_tokens_total", tenant="ops", kind="prompt") == tenant0 + resp.usage.prompt_tokens
    models = {m.id for m in client.models.list().data}
    assert {"text", "embed"} <= models
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["EmbeddingRequest"]["properties"]["model"]["enum"] == ["embed", "all-minilm-l6-v2", "auto"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["text", "smollm2-135m", "auto"]


def test_a_text_only_server_refuses_embeddings(server):
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError, match="no tier of this server is an embedding model"):
        client.embeddings.create(model="auto", input="x")
    with pytest.raises(openai.BadRequestError, match="text generation model"):
        client.embeddings.create(model="smollm2-135m", input="x")
