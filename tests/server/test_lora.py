"""LoRA adapters through a real server and the official client, as vLLM users drive them:
--lora-modules listed by /v1/models with their parent and chosen by `model`; runtime
load/unload (--allow-runtime-lora; operator keys only where tenants are declared); a
mixed concurrent batch of three adapters (two slots) and the base model whose every
response equals its solo run; TierSet adapter tiers; errors as the OpenAI envelope; the
LoRA metrics read with Prometheus' parser."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lora.adapters import make_adapter, smollm2_skeleton
from tests.server.conftest import API_KEY, ServerProcess, http_client, openai_client

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-adapters")
    base = smollm2_skeleton()
    dirs = {}
    for i, name in enumerate(("a", "b", "c")):
        make_adapter(base, root / name, seed=60 + i, b_scale=0.5)
        dirs[name] = root / name
    make_adapter(base, root / "wide", seed=70, r=32)
    make_adapter(base, root / "head", seed=71, targets=("lm_head",))
    return dirs | {"wide": root / "wide", "head": root / "head", "missing": root / "missing",
                   "too_long": root / ("n" * 300)}


@pytest.fixture(scope="module")
def lora_server(cache_dir, adapter_dirs):
    srv = ServerProcess(cache_dir, "--api-key", API_KEY, "--enable-lora", "--lora-modules",
                        f"a={adapter_dirs['a']}", f"b={adapter_dirs['b']}", "--max-loras", "2",
                        "--max-lora-rank", "16", "--allow-runtime-lora")
    yield srv
    srv.stop()


@pytest.fixture()
def lc(lora_server):
    return openai_client(lora_server)


@pytest.fixture()
def lhttp(lora_server):
    with http_client(lora_server) as c:
        yield c


def _complete(client, model, prompt=PROMPT):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0.7, seed=11,
                                  logprobs=2)
    assert r.model == model
    return r.choices[0].text, r.choices[0].logprobs.token_logprobs, r.choices[0].logprobs.top_logprobs


def test_adapters_are_listed_with_their_parent(lc, adapter_dirs):
    models = {m.id: m for m in lc.models.list().data}
    assert {"smollm2-135m", "a", "b"} <= set(models)
    assert models["a"].parent == "smollm2-135m" and models["a"].root == str(adapter_dirs["a"])
    assert models["smollm2-135m"].parent is None


def test_runtime_load_then_mixed_batch_equals_solo_runs(lc, lhttp, adapter_dirs):
    r = lhttp.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapter_dirs["c"])})
    assert r.status_code == 200, r.text
    try:
        jobs = [("smollm2-135m", PROMPT), ("a", PROMPT), ("b", PROMPT), ("c", PROMPT),
                ("a", "Once upon a time,"), ("c", "def fibonacci(n):"), ("smollm2-135m", "Once upon a time,")]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # three adapters, two slots
            together = list(pool.map(lambda job: _complete(lc, *job), jobs))
        for job, got in zip(jobs, together):
            assert _complete(lc, *job) == got, job
        firsts = {together[i][1][0] for i in range(4)}
        assert len(firsts) == 4  # the base and each adapter give different numbers
        chat = lc.chat.completions.create(model="c", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert chat.model == "c" and chat.choices[0].message.content is not None
    finally:
        assert lhttp.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    with pytest.raises(openai.NotFoundError) as e:
        _complete(lc, "c")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    assert "c" not in {m.id for m in lc.models.list().data}


@pytest.mark.parametrize("body,status,param,match", [
    ({"lora_name": "x", "lora_path": "missing"}, 400, "lora_path", "not a directory"),
    ({"lora_name": "x", "lora_path": "too_long"}, 400, "lora_path", "cannot be read (File name too long)"),
    ({"lora_name": "x", "lora_path": "wide"}, 400, "lora_path", "rank 32, over --max-lora-rank 16"),
    ({"lora_name": "x", "lora_path": "head"}, 400, "lora_path", "'lm_head' is not supported"),
    ({"lora_name": "a", "lora_path": "b"}, 400, "lora_name", "already served"),
    ({"lora_name": "x", "lora_path": "b", "base_model_name": "nope"}, 404, "base_model_name", "not a tier"),
    ({"lora_name": "x"}, 400, "lora_path", "required"),
])
def test_load_errors_are_openai_envelopes(lhttp, lc, adapter_dirs, body, status, param, match):
    if "lora_path" in body:
        body = {**body, "lora_path": str(adapter_dirs[body["lora_path"]])}
    r = lhttp.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"]
    assert "x" not in {m.id for m in lc.models.list().data}
    assert _complete(lc, "a")[0]  # and the server keeps serving


def test_unknown_names_are_404(lhttp):
    r = lhttp.post("/v1/unload_lora_adapter", json={"lora_name": "never"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = lhttp.post("/v1/completions", json={"model": "never", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_lora_metrics(lc, lhttp):
    _complete(lc, "b")
    families = {f.name: f for f in text_string_to_metric_families(lhttp.get("/metrics").text)}
    info = families["vllm:lora_requests_info"].samples
    assert info and all(s.labels["max_lora"] == "2" and s.labels["model_name"] == "smollm2-135m" for s in info)
    done = {s.labels["lora_name"]: s.value for s in families["tierlm:lora_requests"].samples
            if s.name.endswith("_total")}
    assert done.get("b", 0) >= 1 and done.get("a", 0) >= 1
    tokens = {(s.labels["lora_name"], s.labels["kind"]): s.value for s in families["tierlm:lora_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens[("b", "completion")] >= 10
    assert sum(s.value for s in families["tierlm:lora_slot_loads"].samples if s.name.endswith("_total")) >= 2


def test_runtime_loading_is_off_without_the_flag(http, adapter_dirs):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapter_dirs["a"])})
    assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]


TIERSET = """\
default_tier = "small"

[tiers.small]
model = "smollm2-135m"
max_lora_rank = 16

[tiers.support]
adapter = "{a}"
base = "small"
quality = 2
completion_price_per_mtok = 5

[tenants.ops]
api_keys = ["ops-key"]
metrics = true

[tenants.user]
api_keys = ["user-key"]
tiers = ["support"]
"""


def test_tierset_adapter_tier_and_operator_only_loading(cache_dir, adapter_dirs, tmp_path):
    cfg = tmp_path / "tierset.toml"
    cfg.write_text(TIERSET.format(a=adapter_dirs["a"]))
    srv = ServerProcess(cache_dir, "--config", str(cfg), "--allow-runtime-lora", model=None)
    try:
        user = openai_client(srv, "user-key")
        ops = http_client(srv, "ops-key")
        listed = {m.id: m for m in user.models.list().data}
        assert set(listed) == {"support"} and listed["support"].parent == "small"
        assert _complete(user, "support")[0]
        with pytest.raises(openai.PermissionDeniedError):
            _complete(user, "small")
        body = {"lora_name": "b", "lora_path": str(adapter_dirs["b"])}
        r = httpx.post(f"{srv.url}/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer user-key"})
        assert r.status_code == 403 and "operator" in r.json()["error"]["message"]
        assert ops.post("/v1/load_lora_adapter", json=body).status_code == 200
        assert "b" in {m["id"] for m in ops.get("/v1/models").json()["data"]}
        r = ops.post("/v1/completions", json={"model": "b", "prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == "b"
        ops.close()
    finally:
        srv.stop()
