"""A real `tierlm serve` subprocess on a free loopback port, shared by the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

API_KEY = "test-key-123"
MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, cache_home, *args: str, model: str | None = MODEL) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HOME=str(cache_home), TIERLM_CACHE_DIR=str(cache_home))
        # A file, not a pipe: an unread pipe fills up and blocks the server's logging.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="tierlm-serve-", suffix=".log", delete=False)
        model_args = ["--model", model] if model is not None else []  # None: a --config names the tiers
        self.proc = subprocess.Popen([sys.executable, "-m", "tierlm.cli", "serve", *model_args,
                                      "--port", str(self.port), *args],
                                     stdout=self.log, stderr=self.log, text=True, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def server(cache_dir):
    srv = ServerProcess(cache_dir, "--api-key", API_KEY, "--max-num-seqs", "32")
    yield srv
    srv.stop()


def openai_client(srv: ServerProcess, key: str = API_KEY):
    import openai

    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=120)


def http_client(srv: ServerProcess, key: str = API_KEY) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


@pytest.fixture()
def client(server):
    return openai_client(server)


@pytest.fixture()
def http(server):
    with http_client(server) as c:
        yield c


def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll until `condition()` holds: the engine thread publishes its counters a moment
    after the response, and the server's state moves on its own. The timeout only guards
    against a hang."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.05)


def metric(http_client, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = http_client.get("/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


@pytest.fixture(scope="session")
def offline(cache_dir):
    """The offline engine the `server` fixture runs (same model, flags and cache dir): the
    reference its responses must equal."""
    from tierlm import LLM

    llm = LLM(MODEL, cache_dir=cache_dir)
    yield llm
    llm.close()
