"""No request can stop the server: every bad input is a 4xx with the OpenAI envelope, work
per request is bounded before anything is allocated, slow or silent clients are dropped,
and after each case the engine still serves a normal request."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, ServerProcess, metric
from tests.server.test_errors import assert_envelope

OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
SURROGATE = "\ud800"


def post_raw(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": "application/json"})


def assert_alive(http: httpx.Client) -> None:
    """A normal request succeeds, /health is 200, and no KV block stays in use."""
    r = http.post("/v1/completions", json={**OK, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    assert http.get("/health").status_code == 200
    deadline = time.monotonic() + 30
    while metric(http, "vllm:kv_cache_usage_perc") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(http, "vllm:kv_cache_usage_perc") == 0


@pytest.mark.parametrize("penalty", [-2000, 2000, -1e300])
def test_extreme_length_penalty_ranks_beams(http, penalty):
    """Used to divide by zero inside a step and kill the engine for everyone."""
    body = {**OK, "max_tokens": 4, "use_beam_search": True, "best_of": 3, "n": 3, "length_penalty": penalty}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3
    assert_alive(http)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                   "repetition_penalty", "length_penalty", "max_latency_ms", "max_ttft_ms",
                                   "max_cost_usd"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers(http, field, value):
    body = json.dumps({**OK, field: 0.5})[:-1] + f', "{field}": {value}}}'  # the last key wins
    assert_envelope(post_raw(http, "/v1/completions", body.encode()), 400, field)


def test_non_finite_logit_bias_and_chat(http):
    assert_envelope(post_raw(http, "/v1/completions", json.dumps(OK)[:-1].encode() + b', "logit_bias": {"5": NaN}}'),
                    400, "logit_bias.5")
    assert_envelope(post_raw(http, "/v1/chat/completions",
                             json.dumps(CHAT)[:-1].encode() + b', "temperature": Infinity}'), 400, "temperature")
    assert_alive(http)


@pytest.mark.parametrize("patch,param", [
    ({"temperature": 1e300}, "temperature"), ({"repetition_penalty": 1e308}, "repetition_penalty"),
    ({"seed": 2**64}, "seed"), ({"priority": 2**40}, "priority"), ({"top_k": 2**40}, "top_k"),
    ({"n": 2**31}, "n"), ({"best_of": 65}, "best_of"), ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": 2**63}, "max_tokens"), ({"min_tokens": 2**40}, "min_tokens"),
    ({"stop": ["x"] * 17}, "stop"), ({"stop": "y" * 1025}, "stop"), ({"stop_token_ids": [1] * 1025}, "stop_token_ids"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"), ({"model": "m" * 257}, "model"),
    ({"prompt": ["a"] * 257}, "prompt"), ({"prompt": ["a"] * 200, "n": 2}, "n"),
])
def test_out_of_bounds_values(http, patch, param):
    assert_envelope(http.post("/v1/completions", json={**OK, **patch}), 400, param)


def test_chat_bounds(http):
    assert_envelope(http.post("/v1/chat/completions", json={**CHAT, "n": 2147483648}), 400, "n")
    tool = {"type": "function", "function": {"name": "f"}}
    assert_envelope(http.post("/v1/chat/completions", json={**CHAT, "tools": [tool] * 129}), 400, "tools")
    assert_alive(http)


def test_fan_out_does_not_take_the_queue(http):
    """A request's prompts count against its own limit (256 sequences), and the next
    unrelated request is served, not refused with 503."""
    assert_envelope(http.post("/v1/completions", json={**OK, "prompt": ["a"] * 3000}), 400, "prompt")
    r = http.post("/v1/completions", json={**OK, "prompt": ["a"] * 64, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 64
    assert_alive(http)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {**OK, "prompt": SURROGATE}, "prompt"),
    ("/v1/completions", {**OK, "prompt": ["ok", "x" + SURROGATE]}, "prompt.1"),
    ("/v1/completions", {**OK, "model": SURROGATE}, "model"),
    ("/v1/completions", {**OK, "cache_salt": SURROGATE}, "cache_salt"),
    ("/v1/completions", {**OK, "session_id": SURROGATE}, "session_id"),
    ("/v1/completions", {**OK, "stop": [SURROGATE]}, "stop.0"),
    ("/v1/completions", {**OK, "user": SURROGATE}, "user"),
    ("/v1/completions", {**OK, "guided_regex": SURROGATE}, "guided_regex"),
    ("/v1/completions", {**OK, "guided_json": {"type": "object", "title": SURROGATE}}, "guided_json.title"),
    ("/v1/completions", {**OK, "logit_bias": {SURROGATE: 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": SURROGATE}}]},
     "tools.0.function.name"),
    ("/tokenize", {"prompt": SURROGATE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
    ("/detokenize", {"model": SURROGATE, "tokens": [1]}, "model"),
])
@pytest.mark.parametrize("encoding", ["escaped", "raw-bytes"])
def test_lone_surrogates_are_a_400_naming_the_field(http, path, body, param, encoding):
    data = json.dumps(body).encode()  # "\ud800" as a JSON escape
    if encoding == "raw-bytes":  # the same code point as (invalid) UTF-8 bytes ED A0 80
        data = data.replace(b"\\ud800", b"\xed\xa0\x80")
    r = post_raw(http, path, data)
    assert_envelope(r, 400, param)
    assert "lone surrogate" in r.json()["error"]["message"]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_chunked_body_is_limited_as_it_arrives(server, http):
    def chunks():
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(50):  # 50 MiB, no Content-Length
            yield b"a " * (512 * 1024)
        yield b'"}'

    before = _rss_mb(server.proc.pid)
    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_envelope(r, 413)
    # Read up to the limit, not buffered (or parsed, or tokenized) in full.
    assert _rss_mb(server.proc.pid) - before < 40
    assert_alive(http)


def test_long_tokenize_does_not_block_the_event_loop(server, http):
    """The tokenizer runs off the event loop with the GIL released: /health answers many
    times while one long prompt is tokenized (a blocked loop answers once, afterwards)."""
    import threading

    three = http.post("/tokenize", json={"prompt": "word " * 3}).json()["count"]
    text = "word " * 1_500_000  # 7.5 MB: seconds of tokenizing
    done = threading.Event()
    result = {}

    def tokenize():
        result["r"] = httpx.post(f"{server.url}/tokenize", json={"prompt": text},
                                 headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
        done.set()

    threading.Thread(target=tokenize).start()
    answered_while_busy = 0
    while not done.is_set():
        ok = httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        answered_while_busy += ok and not done.is_set()
        time.sleep(0.02)
    assert result["r"].status_code == 200 and result["r"].json()["count"] == three + 1_500_000 - 3
    assert answered_while_busy >= 5


def test_disconnects_log_one_line(server, http):
    body = {**OK, "max_tokens": 2000, "ignore_eos": True}
    with httpx.Client(timeout=0.5, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with pytest.raises(httpx.ReadTimeout):  # gives up waiting: the connection closes
            c.post(f"{server.url}/v1/completions", json=body)
        with c.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    break  # leaving the block closes the stream mid-way
    assert_alive(http)
    log = server.output()
    assert "client disconnected: POST /v1/completions aborted" in log
    assert "Traceback" not in log and "CancelledError" not in log


def test_openapi_documents_statuses_and_models(http):
    doc = http.get("/openapi.json").json()
    responses = {(m, p): set(op["responses"]) for p, ops in doc["paths"].items() for m, op in ops.items()}
    assert responses[("post", "/v1/completions")] == {"200", "400", "401", "403", "404", "408", "413", "415",
                                                      "429", "500", "503"}
    assert not any("422" in r for r in responses.values())
    schemas = doc["components"]["schemas"]
    assert schemas["CompletionRequest"]["properties"]["model"]["enum"] == [MODEL]
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 64
    error = doc["paths"]["/v1/completions"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/ErrorResponse")
    ok = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}


@pytest.fixture(scope="module")
def strict_server(cache_dir):
    srv = ServerProcess(cache_dir, "--header-timeout", "1", "--keep-alive-timeout", "1", "--body-timeout", "1",
                        "--max-connections", "64")
    yield srv
    srv.stop()


def _read_until_closed(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends before it closes the connection (a reply may span packets)."""
    sock.settimeout(within)
    chunks = []
    while data := sock.recv(4096):
        chunks.append(data)
    return b"".join(chunks)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_trickling_and_slow_body_connections_are_dropped(strict_server):
    host, port = "127.0.0.1", strict_server.port
    idle = [socket.create_connection((host, port)) for _ in range(20)]
    trickle = socket.create_connection((host, port))
    trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    slow_body = socket.create_connection((host, port))
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    slow_body.sendall(head + b'{"model": ')  # the body stops arriving
    reply = _read_until_closed(slow_body, 10)
    assert reply.startswith(b"HTTP/1.1 408") and b'"code": "request_timeout"' in reply
    assert all(_closed_by_server(s, 10) for s in [*idle, trickle])
    with httpx.Client(base_url=strict_server.url, timeout=60) as http:
        assert_alive(http)
