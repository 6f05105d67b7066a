"""LLM: the offline API, shaped like vLLM's.

    llm = LLM("smollm2-135m")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)

    vectors = LLM("all-minilm-l6-v2").embed(["A sentence.", "Another one."])
    print(vectors[0].outputs.embedding[:4])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tierlm.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig, debug_invariants_default
from tierlm.embed import pooling
from tierlm.embed.builder import build_embedder, task_of
from tierlm.embed.decoder import DecoderEncoder
from tierlm.embed.encoder import Encoder
from tierlm.embed.inputs import check_dimensions, token_lists, truncation
from tierlm.engine.builder import build_engine, default_cache_dir
from tierlm.engine.llm_engine import LLMEngine, Prompt
from tierlm.lora.registry import LoRARequest
from tierlm.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from tierlm.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2-135m", *, dtype: str = "bfloat16", quantization: str = "auto",
                 dense_dtype: str = "auto", deterministic: bool = True,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512, max_model_len: int | None = None,
                 block_size: int = 16, kv_cache_gb: float = 1.0, num_kv_blocks: int | None = None,
                 enable_prefix_caching: bool = True, kv_warm_gb: float = 0.5, kv_cold_dir: str | None = None,
                 kv_cold_gb: float = 4.0, session_ttl: float = 600.0, kv_cache_dtype: str = "auto", seed: int = 0,
                 admission: str = "past_future", num_speculative_tokens: int = 0, draft_model: str | None = None,
                 cache_dir: str | Path | None = None, progress: bool = False,
                 debug_invariants: bool | None = None, enable_lora: bool = False, max_loras: int = 1,
                 max_lora_rank: int = 16, task: str = "auto", pooling: str | None = None,
                 tensor_parallel_size: int = 1, device: str = "cpu", gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, attention_backend: str = "auto",
                 config: EngineConfig | None = None) -> None:
        if config is None:
            config = EngineConfig(
                model=model, dtype=dtype, quantization=quantization, dense_dtype=dense_dtype,
                deterministic=deterministic, seed=seed,
                cache=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks, kv_cache_gb=kv_cache_gb,
                                  enable_prefix_caching=enable_prefix_caching, kv_warm_gb=kv_warm_gb,
                                  kv_cold_dir=str(kv_cold_dir) if kv_cold_dir else None, kv_cold_gb=kv_cold_gb,
                                  session_ttl=session_ttl, kv_cache_dtype=kv_cache_dtype),
                scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                          max_model_len=max_model_len, admission=admission,
                                          num_speculative_tokens=num_speculative_tokens),
                draft_model=draft_model,
                lora=LoRAConfig(enabled=enable_lora, max_loras=max_loras, max_lora_rank=max_lora_rank),
                debug_invariants=debug_invariants_default() if debug_invariants is None else debug_invariants,
                task=task, pooling=pooling, tensor_parallel_size=tensor_parallel_size, device=device,
                gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                attention_backend=attention_backend)
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        self.task = task_of(config, cache)
        self.engine: LLMEngine | None = None  # generate
        self.embedder: Encoder | DecoderEncoder | None = None  # embed
        if self.task == "embed":
            self.embedder = build_embedder(config, cache_dir=cache, progress=progress)
            self.tokenizer = self.embedder.tokenizer
        else:
            self.engine = build_engine(config, cache_dir=cache, progress=progress)
            self.tokenizer = self.engine.tokenizer
        self._counter = 0
        self._model = config.model

    def close(self) -> None:
        """Write cached KV to the cold tier (`kv_cold_dir`) so the next process can reuse it, and
        stop the tensor-parallel workers (`tensor_parallel_size` > 1)."""
        if self.engine is not None:
            self.engine.close()

    def _generating(self) -> LLMEngine:
        if self.engine is None:
            raise ValueError(f"{self._model} runs as an embedding model (task embed): use LLM.embed")
        return self.engine

    def embed(self, prompts, *, dimensions: int | None = None,
              truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        """One vector per input (a string, token ids, or a list of either), in input order.
        `dimensions`: fewer leading components (Matryoshka models only); `truncate_prompt_tokens`:
        cut inputs longer than that many tokens (-1: the model's maximum) instead of refusing them."""
        if self.embedder is None:
            raise ValueError(f"{self._model} runs as a text model: start it with task='embed' to embed")
        check_dimensions(self.embedder.spec, dimensions)
        ids = token_lists(self.embedder, prompts, truncation(self.embedder, truncate_prompt_tokens))
        vectors = pooling.shorten(self.embedder.embed(ids), dimensions, self.embedder.spec.normalize)
        outs = []
        for i, v in zip(ids, vectors):
            self._counter += 1
            outs.append(EmbeddingRequestOutput(f"embed-{self._counter}", i, EmbeddingOutput(v.tolist())))
        return outs

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in prompt order. `lora_request`: one
        adapter for every prompt, or one per prompt (None: the base model); needs
        `enable_lora=True`."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(sampling_params, Sequence):
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        loras = list(lora_request) if isinstance(lora_request, Sequence) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError("lora_request must be one LoRARequest or one per prompt")
        engine = self._generating()
        ids = []
        for prompt, p, lora in zip(prompts, params, loras):
            self._counter += 1
            rid = f"offline-{self._counter}"
            engine.add_request(rid, prompt, p, lora=lora)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = False,
             lora_request: LoRARequest | None = None, chat_template_kwargs: dict | None = None
             ) -> list[RequestOutput]:
        """One conversation (list of messages) or a batch of them, rendered with the model's
        template (`chat_template_kwargs`: further template variables, e.g. enable_thinking)."""
        self._generating()
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.tokenizer.encode(
            self.tokenizer.apply_chat_template(c, extra=chat_template_kwargs), add_special_tokens=False)}
            for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]


__all__ = ["LLM", "LoRARequest"]
