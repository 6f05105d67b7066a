"""The gRPC services (`--grpc-port`) on a real server process, through grpcio clients:
streaming Generate equals the HTTP API's output for the same request, KServe OIP v2
health, metadata and inference (text and embeddings, raw and typed tensors) equal the
HTTP API's, keys/tenants/quotas hold, errors are the mapped status codes with the HTTP
error's details in trailers, a cancelled call aborts its engine request, the server keeps
serving after every refusal, and the committed modules match the .proto files."""

from __future__ import annotations

import base64
import concurrent.futures
import filecmp
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ServerProcess, free_port, http_client, openai_client, wait_for
from tierlm.rpc.proto import generate_pb2 as gen
from tierlm.rpc.proto import generate_pb2_grpc as gen_grpc
from tierlm.rpc.proto import oip_v2_pb2 as oip
from tierlm.rpc.proto import oip_v2_pb2_grpc as oip_grpc

CONFIG = """\
default_tier = "text"

[tiers.text]
model = "smollm2-135m"
max_num_seqs = 8

[tiers.embed]
model = "all-minilm-l6-v2"

[tenants.ops]
api_keys = ["key-ops"]
metrics = true

[tenants.textonly]
api_keys = ["key-text"]
tiers = ["text"]

[tenants.small]
api_keys = ["key-small"]
tokens_per_minute = 100
"""
OPS = (("authorization", "Bearer key-ops"),)


@pytest.fixture(scope="module")
def srv(cache_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("grpc-config") / "tiers.toml"
    path.write_text(CONFIG)
    s = ServerProcess(cache_dir, "--config", str(path), "--grpc-port", str(free_port()), model=None)
    s.grpc = int(s.proc.args[s.proc.args.index("--grpc-port") + 1])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(srv):
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc}") as ch:
        yield ch


@pytest.fixture(scope="module")
def generation(channel):
    return gen_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def inference(channel):
    return oip_grpc.GRPCInferenceServiceStub(channel)


def stream(generation, metadata=OPS, **fields) -> list[gen.GenerateResponse]:
    return list(generation.Generate(gen.GenerateRequest(model="text", **fields), metadata=metadata))


def refusal(call) -> tuple[grpc.StatusCode, str, dict]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    e = info.value
    return e.code(), e.details(), dict(e.trailing_metadata() or ())


def test_generate_streams_what_http_returns(srv, generation):
    client = openai_client(srv, "key-ops")
    prompt = "The three primary colors are"
    replies = stream(generation, text=prompt, max_tokens=24, temperature=0, ignore_eos=True)
    ref = client.completions.create(model="text", prompt=prompt, max_tokens=24, temperature=0)
    assert "".join(r.text for r in replies) == ref.choices[0].text
    assert all(r.model == "text" and r.id == replies[0].id for r in replies)
    assert [r.finish_reason for r in replies[:-1]] == [""] * (len(replies) - 1)
    last = replies[-1]
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (ref.usage.prompt_tokens, 24)
    ids = [t for r in replies for t in r.token_ids]
    assert len(ids) == 24
    http = http_client(srv, "key-ops")
    assert http.post("/detokenize", json={"model": "text", "tokens": ids}).json()["prompt"] == ref.choices[0].text
    # Token ids in: the same tokens out.
    prompt_ids = http.post("/tokenize", json={"model": "text", "prompt": prompt}).json()["tokens"]
    by_ids = stream(generation, token_ids=gen.TokenIds(ids=prompt_ids), max_tokens=24, temperature=0)
    assert [t for r in by_ids for t in r.token_ids] == ids
    # Sampling fields reach the sampler: a seeded sample equals HTTP's with that seed.
    seeded = stream(generation, text=prompt, max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    ref = client.completions.create(model="text", prompt=prompt, max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    assert "".join(r.text for r in seeded) == ref.choices[0].text
    # A stop string ends it as over HTTP.
    stopped = stream(generation, text="Count: 1, 2, 3,", max_tokens=30, temperature=0, stop=[" 6"])
    ref = client.completions.create(model="text", prompt="Count: 1, 2, 3,", max_tokens=30, temperature=0, stop=[" 6"])
    assert "".join(r.text for r in stopped) == ref.choices[0].text
    assert stopped[-1].finish_reason == ref.choices[0].finish_reason == "stop"


def test_chat_messages_use_the_template(srv, generation):
    messages = [{"role": "user", "content": "Name a fruit."}]
    replies = stream(generation, chat=gen.Messages(messages=[gen.ChatMessage(**m) for m in messages]),
                     max_tokens=16, temperature=0)
    ref = openai_client(srv, "key-ops").chat.completions.create(model="text", messages=messages, max_tokens=16,
                                                                temperature=0)
    assert "".join(r.text for r in replies) == ref.choices[0].message.content
    assert replies[-1].usage.prompt_tokens == ref.usage.prompt_tokens
    # Guided choice constrains the output as over HTTP.
    picked = stream(generation, chat=gen.Messages(messages=[gen.ChatMessage(**m) for m in messages]),
                    guided_choice=["apple", "pear"], temperature=0)
    assert "".join(r.text for r in picked) in ("apple", "pear")


def test_initial_metadata_names_the_tier_and_quota(generation, inference):
    call = generation.Generate(gen.GenerateRequest(model="text", text="Hi", max_tokens=2), metadata=OPS)
    headers = dict(call.initial_metadata())
    list(call)
    assert headers["x-tierlm-tier"] == "text"
    small = (("authorization", "Bearer key-small"),)
    _, call = inference.ModelInfer.with_call(infer_request("embed", ["Hi there"]), metadata=small)
    headers = dict(call.initial_metadata())
    assert headers["x-tierlm-tier"] == "embed"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 100  # the tenant's bucket, charged the input tokens


def test_concurrent_streams_equal_each_alone(generation):
    prompts = [f"Story {i}: once upon a time" for i in range(6)]
    alone = ["".join(r.text for r in stream(generation, text=p, max_tokens=16, temperature=0)) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: "".join(r.text for r in stream(generation, text=p, max_tokens=16,
                                                                            temperature=0)), prompts))
    assert together == alone


def test_oip_health_and_metadata(inference):
    assert inference.ServerLive(oip.ServerLiveRequest()).live  # probes need no key
    assert inference.ServerReady(oip.ServerReadyRequest()).ready
    assert inference.ModelReady(oip.ModelReadyRequest(name="text")).ready
    assert inference.ModelReady(oip.ModelReadyRequest(name="embed")).ready
    code, details, trailers = refusal(lambda: inference.ModelReady(oip.ModelReadyRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "does not exist" in details and trailers["tierlm-error-param"] == "model"
    meta = inference.ServerMetadata(oip.ServerMetadataRequest(), metadata=OPS)
    assert meta.name == "tierlm" and meta.version
    text = inference.ModelMetadata(oip.ModelMetadataRequest(name="text"), metadata=OPS)
    assert [(t.name, t.datatype) for t in text.inputs] == [("text_input", "BYTES")]
    assert [(t.name, t.datatype) for t in text.outputs] == [("text_output", "BYTES"), ("finish_reason", "BYTES")]
    embed = inference.ModelMetadata(oip.ModelMetadataRequest(name="embed"), metadata=OPS)
    assert [(t.name, t.datatype, list(t.shape)) for t in embed.outputs] == [("embedding", "FP32", [-1, 384])]


def bytes_tensor(raw: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def infer_request(model: str, texts: list[str], raw: bool = False, **parameters) -> oip.ModelInferRequest:
    req = oip.ModelInferRequest(model_name=model, id="req-1")
    tensor = req.inputs.add(name="text_input", datatype="BYTES", shape=[len(texts)])
    if raw:
        req.raw_input_contents.append(b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts))
    else:
        tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    for name, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(req.parameters[name], field, value)
    return req


def test_model_infer_text_equals_http(srv, inference):
    prompts = ["The sky is", "One, two, three,"]
    reply = inference.ModelInfer(infer_request("text", prompts, max_tokens=10, temperature=0.0), metadata=OPS)
    assert reply.model_name == "text" and reply.id == "req-1"
    outputs = {o.name: bytes_tensor(raw) for o, raw in zip(reply.outputs, reply.raw_output_contents)}
    ref = openai_client(srv, "key-ops").completions.create(model="text", prompt=prompts, max_tokens=10, temperature=0)
    assert [t.decode() for t in outputs["text_output"]] == [c.text for c in ref.choices]
    assert [t.decode() for t in outputs["finish_reason"]] == [c.finish_reason for c in ref.choices]
    assert reply.parameters["prompt_tokens"].int64_param == ref.usage.prompt_tokens
    assert reply.parameters["completion_tokens"].int64_param == ref.usage.completion_tokens
    # Raw input contents are the same request; one requested output only.
    raw = infer_request("text", prompts, raw=True, max_tokens=10, temperature=0.0)
    raw.outputs.add(name="text_output")
    again = inference.ModelInfer(raw, metadata=OPS)
    assert [o.name for o in again.outputs] == ["text_output"]
    assert bytes_tensor(again.raw_output_contents[0]) == outputs["text_output"]


def test_model_infer_embedding_equals_http(srv, inference):
    sentences = ["A man is eating food.", "A monkey is playing drums."]
    reply = inference.ModelInfer(infer_request("embed", sentences, raw=True), metadata=OPS)
    (out,) = reply.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("embedding", "FP32", [2, 384])
    vectors = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 384)
    ref = openai_client(srv, "key-ops").embeddings.create(model="embed", input=sentences, encoding_format="base64")
    expected = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in ref.data])
    assert np.array_equal(vectors, expected)
    assert reply.parameters["prompt_tokens"].int64_param == ref.usage.prompt_tokens


@pytest.mark.parametrize("case,code,param", [
    ("temperature", grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("no_prompt", grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("unknown_model", grpc.StatusCode.NOT_FOUND, "model"),
    ("embed_tier", grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ("no_key", grpc.StatusCode.UNAUTHENTICATED, None),
    ("wrong_key", grpc.StatusCode.UNAUTHENTICATED, None),
    ("tier_forbidden", grpc.StatusCode.PERMISSION_DENIED, "model"),
    ("too_long", grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("bad_token", grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("two_constraints", grpc.StatusCode.INVALID_ARGUMENT, "response_format"),
    ("infer_parameter", grpc.StatusCode.INVALID_ARGUMENT, "beam_width"),
    ("infer_shape", grpc.StatusCode.INVALID_ARGUMENT, "text_input"),
    ("infer_utf8", grpc.StatusCode.INVALID_ARGUMENT, "text_input"),
    ("infer_output", grpc.StatusCode.INVALID_ARGUMENT, "outputs"),
    ("infer_version", grpc.StatusCode.NOT_FOUND, "model_version"),
    ("infer_tensor", grpc.StatusCode.INVALID_ARGUMENT, "text_input"),
])
def test_refusals_are_mapped_status_codes(generation, inference, case, code, param):
    text_key = (("authorization", "Bearer key-text"),)
    calls = {
        "temperature": lambda: stream(generation, text="x", temperature=-1.0),
        "no_prompt": lambda: stream(generation),
        "unknown_model": lambda: list(generation.Generate(gen.GenerateRequest(model="nope", text="x"), metadata=OPS)),
        "embed_tier": lambda: list(generation.Generate(gen.GenerateRequest(model="embed", text="x"), metadata=OPS)),
        "no_key": lambda: stream(generation, metadata=(), text="x"),
        "wrong_key": lambda: stream(generation, metadata=(("authorization", "Bearer nope"),), text="x"),
        "tier_forbidden": lambda: inference.ModelInfer(infer_request("embed", ["x"]), metadata=text_key),
        "too_long": lambda: stream(generation, text="x", max_tokens=100_000),
        "bad_token": lambda: stream(generation, token_ids=gen.TokenIds(ids=[10**9])),
        "two_constraints": lambda: stream(generation, text="x", guided_regex="a+", guided_choice=["a"]),
        "infer_parameter": lambda: inference.ModelInfer(infer_request("text", ["x"], beam_width=2), metadata=OPS),
        "infer_shape": lambda: inference.ModelInfer(_reshaped(infer_request("text", ["x", "y"]), [3]), metadata=OPS),
        "infer_utf8": lambda: inference.ModelInfer(_bad_utf8(), metadata=OPS),
        "infer_output": lambda: inference.ModelInfer(_with_output(infer_request("text", ["x"]), "logits"),
                                                     metadata=OPS),
        "infer_version": lambda: inference.ModelInfer(_versioned(infer_request("text", ["x"])), metadata=OPS),
        "infer_tensor": lambda: inference.ModelInfer(oip.ModelInferRequest(model_name="text"), metadata=OPS),
    }
    got, details, trailers = refusal(calls[case])
    assert got == code, details
    assert trailers.get("tierlm-error-param") == param, trailers
    assert details and "Traceback" not in details
    assert inference.ServerReady(oip.ServerReadyRequest()).ready  # still serving


def _reshaped(req, shape):
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend(shape)
    return req


def _bad_utf8():
    req = infer_request("text", ["x"])
    req.inputs[0].contents.bytes_contents[0] = b"\xff\xfe"
    return req


def _with_output(req, name):
    req.outputs.add(name=name)
    return req


def _versioned(req):
    req.model_version = "2"
    return req


def test_quota_is_shared_with_http_and_429_maps_to_resource_exhausted(srv, generation):
    small = (("authorization", "Bearer key-small"),)
    # ~95 of 100 tokens a minute; the next request's 91 come back only after ~85 s.
    stream(generation, metadata=small, text="Hello", max_tokens=90, ignore_eos=True)
    code, details, trailers = refusal(lambda: stream(generation, metadata=small, text="Hello", max_tokens=90))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in details
    assert trailers["tierlm-http-status"] == "429" and int(trailers["retry-after"]) >= 1
    # The HTTP API sees the same quota.
    r = http_client(srv, "key-small").post("/v1/completions", json={"model": "text", "prompt": "Hi", "max_tokens": 90})
    assert r.status_code == 429


def samples(http, name: str) -> dict[tuple, float]:
    """Every sample of `name` by its label values (Prometheus' own parser)."""
    return {tuple(sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(http.get("/metrics").text)
            for s in fam.samples if s.name == name}


def test_cancelled_call_aborts_its_request(srv, generation):
    http = http_client(srv, "key-ops")
    text_tier = (("model_name", "text"),)

    def aborted() -> float:
        return samples(http, "tierlm:requests_aborted_total").get(text_tier, 0.0)

    before = aborted()
    call = generation.Generate(gen.GenerateRequest(model="text", text="Tell a long story.", max_tokens=4000,
                                                   ignore_eos=True), metadata=OPS)
    first = [next(call), next(call)]
    assert all(r.token_ids for r in first)
    call.cancel()
    wait_for(lambda: aborted() == before + 1, timeout=10)
    wait_for(lambda: samples(http, "vllm:num_requests_running")[text_tier] == 0, timeout=10)
    calls = samples(http, "tierlm:grpc_requests_total")
    assert calls[(("code", "CANCELLED"), ("method", "Generate"))] >= 1
    assert calls[(("code", "OK"), ("method", "Generate"))] >= 1


def test_busy_grpc_port_is_a_one_line_error(capsys):
    from tierlm.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        status = main(["serve", "--port", str(free_port()), "--grpc-port", str(port)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], lines


def test_generated_modules_match_the_protos(tmp_path):
    root = Path(__file__).resolve().parents[2]
    protos = sorted(str(p.relative_to(root)) for p in (root / "tierlm/rpc/proto").glob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos], cwd=root, check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert len(generated) == 3 * len(protos)
    for rel in generated:
        assert filecmp.cmp(tmp_path / rel, root / rel, shallow=False), f"{rel} is stale: run `make proto`"


@pytest.mark.parametrize("method,body", [
    # GenerateRequest.text (field 2) holding bytes that are not UTF-8: proto3 refuses to parse them.
    ("/tierlm.v1.Generation/Generate", b"\x0a\x04text\x12\x02\xff\xfe"),
    ("/inference.GRPCInferenceService/ModelInfer", b"\x0a\x02\xff\xfe"),  # ModelInferRequest.model_name
    ("/inference.GRPCInferenceService/ServerReady", b"\xff\xff\xff"),  # not a message at all
])
def test_undecodable_requests_are_invalid_argument(channel, inference, method, body):
    """Bytes that do not parse as the method's message are the caller's error, as malformed
    JSON is on HTTP: INVALID_ARGUMENT with the parser's reason, and the server keeps serving."""
    if method.endswith("Generate"):
        call = channel.unary_stream(method, request_serializer=None, response_deserializer=gen.GenerateResponse.FromString)
        run = lambda: list(call(body, metadata=OPS))
    else:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=lambda b: b)
        run = lambda: call(body, metadata=OPS)
    code, details, trailers = refusal(run)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "not a valid" in details and trailers.get("tierlm-error-code") == "invalid_request", trailers
    assert inference.ServerReady(oip.ServerReadyRequest()).ready


def test_drain_refuses_new_calls_and_finishes_running_ones(srv, generation, inference):
    """Last in this file: it stops the module's server (SIGTERM, as a supervisor would)."""
    running = generation.Generate(gen.GenerateRequest(model="text", text="Once", max_tokens=150, ignore_eos=True),
                                  metadata=OPS)
    first = next(running)
    srv.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not inference.ServerReady(oip.ServerReadyRequest()).ready, timeout=10)
    code, _, trailers = refusal(lambda: stream(generation, text="x", max_tokens=2))
    assert code == grpc.StatusCode.UNAVAILABLE and trailers["tierlm-error-code"] == "shutting_down"
    rest = list(running)
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 150
    assert rest[-1].finish_reason == "length"
    assert srv.proc.wait(timeout=30) == 0
