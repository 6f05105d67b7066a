"""The `tierlm` CLI as a user runs it: real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def tierlm(*args, stdin: str | None = None, cache_dir=None):
    env = dict(os.environ, HOME=str(cache_dir), TIERLM_CACHE_DIR=str(cache_dir)) if cache_dir else None
    return subprocess.run([sys.executable, "-m", "tierlm.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, env=env)


@pytest.fixture(scope="module")
def smollm(cache_dir):
    """The offline engine the CLI runs (same model, defaults and cache dir)."""
    from tierlm import LLM

    llm = LLM("smollm2-135m", cache_dir=cache_dir)
    yield llm
    llm.close()


def test_generate_prints_what_llm_generates(cache_dir, smollm):
    from tierlm import SamplingParams

    r = tierlm("generate", "--temperature", "0.8", "--seed", "7", "--top-k", "40", "--max-tokens", "16",
               "The sky is", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    want = smollm.generate("The sky is", SamplingParams(temperature=0.8, seed=7, top_k=40, max_tokens=16))
    assert r.stdout == want[0].outputs[0].text + "\n"
    r = tierlm("generate", "--chat", "--temperature", "0", "--max-tokens", "12", "What is 2+2?", cache_dir=cache_dir)
    want = smollm.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(temperature=0, max_tokens=12))
    assert r.returncode == 0 and r.stdout == want[0].outputs[0].text + "\n", r.stderr


def test_chat_turns_equal_llm_chat(cache_dir, smollm):
    from tierlm import SamplingParams

    r = tierlm("chat", "--system", "Be brief.", "--temperature", "0", "--max-tokens", "8",
               stdin="Hi there\nAnd again\n", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    params = SamplingParams(temperature=0, max_tokens=8)
    messages = [{"role": "system", "content": "Be brief."}]
    expected = ""
    for line in ("Hi there", "And again"):
        messages.append({"role": "user", "content": line})
        reply = smollm.chat(messages, params)[0].outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        expected += f"> {reply}\n"
    assert r.stdout == expected + "> "  # the prompt for a third turn, answered by end of input


def test_models_lists_bundled():
    r = tierlm("models")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "gemma3-270m" in r.stdout


# argparse's own checks (marked slow) are covered once by "frobnicate" in the fast gate.
@pytest.mark.parametrize("args,needle", [
    (["generate", "--model", "no-such-model", "hi"], "unknown model"),
    (["generate", "--temperature", "-1", "hi"], "temperature"),
    pytest.param(["generate", "--max-tokens", "abc", "hi"], "invalid int", marks=pytest.mark.slow),
    (["frobnicate"], "invalid choice"),
    (["generate", "--max-tokens", "100000", "hi"], "context"),
    (["generate", "--quantization", "int4", "--dtype", "float32", "hi"], "needs dtype bfloat16"),
    pytest.param(["generate", "--quantization", "int3", "hi"], "invalid choice", marks=pytest.mark.slow),
    (["generate", "--quantization", "q8_0", "hi"], "a GGUF file runs its own block formats"),
    pytest.param(["generate", "--dense-dtype", "float16", "hi"], "invalid choice", marks=pytest.mark.slow),
    (["generate", "--dense-dtype", "bfloat16", "--dtype", "float32", "hi"], "dense_dtype bfloat16 needs dtype bfloat16"),
    (["generate", "--speculative", "draft", "hi"], "--draft-model"),
    (["bench", "--runs", "0"], "--runs"),
    (["serve", "--lora-modules", "a=/x"], "--lora-modules needs --enable-lora"),
    (["serve", "--allow-runtime-lora"], "--allow-runtime-lora needs --enable-lora"),
    (["serve", "--enable-lora", "--lora-modules", "no-equals-sign"], "NAME=PATH"),
    (["serve", "--enable-lora", "--max-loras", "0"], "max_loras must be > 0"),
    (["serve", "--enable-lora", "--lora-modules", "a=/no/such/adapter", "--port", "0"], "not a directory"),
    (["serve", "--enable-lora", "--max-loras", "100000", "--max-lora-rank", "512", "--port", "0"],
     "lower --max-loras or --max-lora-rank"),
    (["generate", "--model", "all-minilm-l6-v2", "hi"], "runs as an embedding model"),
    (["generate", "--model", "all-minilm-l6-v2", "--task", "generate", "hi"], "it embeds (task embed)"),
    (["generate", "--pooling", "mean", "hi"], "pooling applies to embedding models"),
    (["serve", "--model", "all-minilm-l6-v2", "--enable-lora", "--port", "0"], "LoRA adapters are not supported"),
    (["serve", "--port", "8123", "--grpc-port", "8123"], "--grpc-port must be a port in [1, 65535] other than"),
    (["generate", "--device", "cuda", "hi"], "device cuda: this PyTorch build has no CUDA (use --device cpu)"),
    (["generate", "--device", "tpu", "hi"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["generate", "--gpu-memory-utilization", "1.5", "hi"], "gpu_memory_utilization must be in (0, 1]"),
    pytest.param(["bench", "--workloads", "w9"], "invalid choice", marks=pytest.mark.slow),
    (["bench", "--url", "http://127.0.0.1:9", "--workloads", "w2", "--runs", "1", "--no-plots"], "127.0.0.1:9"),
])
def test_bad_arguments_one_line_error(args, needle, capsys):
    """In this process (the CLI's own entry point; a new interpreter per case would cost ~5 s
    of imports each): exit status 2 and one line. The real process is checked below."""
    from tierlm.cli import main

    status = main(list(args))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and needle in lines[0] and lines[0].startswith("tierlm: error:"), err


@pytest.mark.parametrize("args,needle", [(["frobnicate"], "invalid choice"),
                                         (["generate", "--model", "no-such-model", "hi"], "unknown model")])
def test_a_real_process_exits_2_with_one_line(args, needle):
    r = tierlm(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0] and lines[0].startswith("tierlm: error:")


def test_draft_model_with_another_vocabulary_is_refused(tiny_checkpoint):
    draft, _ = tiny_checkpoint("qwen2")
    r = tierlm("generate", "--speculative", "draft", "--draft-model", str(draft), "hi")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("tierlm: error:") and "vocabulary of 320 tokens" in r.stderr, r.stderr


@pytest.mark.slow
def test_chat_with_gemma3_matches_offline_api(cache_dir):
    """`tierlm chat --model gemma3-270m`: Gemma's built-in template, same reply as LLM.chat."""
    from tierlm import LLM, SamplingParams

    question = "What is the capital of France?"
    r = tierlm("chat", "--model", "gemma3-270m", "--temperature", "0", "--max-tokens", "8",
               stdin=question + "\n", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    llm = LLM("gemma3-270m", cache_dir=cache_dir)
    expected = llm.chat([{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=8))
    assert expected[0].outputs[0].text.strip() and r.stdout == f"> {expected[0].outputs[0].text}\n> "


def test_unsupported_architecture_fails_fast_listing_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["FalconForCausalLM"], "model_type": "falcon", '
                                          '"vocab_size": 10}')
    r = tierlm("generate", "--model", str(tmp_path), "hi")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "unsupported architecture 'FalconForCausalLM'" in line
    assert all(a in line for a in ("Gemma3ForCausalLM", "MixtralForCausalLM", "Qwen3ForCausalLM", "gemma3"))


def test_serve_config_errors_are_one_line_with_file_and_line(tmp_path):
    bad = tmp_path / "tiers.toml"
    bad.write_text('[tiers.fast]\nmodel = "smollm2-135m"\nquality = "best"\n')
    r = tierlm("serve", "--config", str(bad), "--port", "0")
    (line,) = r.stderr.strip().splitlines()
    assert r.returncode == 2 and line == f"tierlm: error: {bad}:3: tiers.fast.quality: Input should be a valid number"
    r = tierlm("serve", "--config", str(bad), "--model", "smollm2-135m")
    (line,) = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "drop --model" in line


def test_sample_tierset_config_is_valid():
    from pathlib import Path

    from tierlm.config import EngineConfig
    from tierlm.tenancy.config_file import load

    ts = load(Path(__file__).parents[2] / "configs" / "tierset.toml", EngineConfig())
    assert {t.name: t.engine.model for t in ts.tiers} == {"fast": "smollm2-135m", "deep": "gemma3-270m"}
    assert [t.name for t in ts.tenants] == ["team-a", "team-b", "trial"]


@pytest.mark.parametrize("env,message", [
    ({"TIERLM_ISA": "amx"}, "tierlm: error: TIERLM_ISA='amx': this machine runs reference"),
    ({"TIERLM_SPIN_US": "-5"}, "tierlm: error: TIERLM_SPIN_US must be a whole number of microseconds, got '-5'"),
])
def test_bad_kernel_settings_are_one_line(cache_dir, env, message):
    r = subprocess.run([sys.executable, "-m", "tierlm.cli", "generate", "--model", "smollm2-135m", "Hi",
                        "--max-tokens", "2"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HOME=str(cache_dir), TIERLM_CACHE_DIR=str(cache_dir), **env))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), r.stderr
