"""SamplingParams: the user's generation knobs, validated on construction. No torch here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tierlm.structured.spec import GuidedSpec

# Temperatures below this sample greedily: dividing float32 logits by less overflows them
# to infinities (NaN probabilities), and the distribution is one-hot long before.
GREEDY_BELOW = 1e-5


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None = up to the context length; 0 only to score the prompt
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per token (0 = chosen token only)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    guided: GuidedSpec | None = None  # constrain the output (JSON schema, regex, choice, grammar)
    # Generate best_of sequences (default n) and return the n with the highest cumulative
    # logprob; with use_beam_search, best_of is the beam width and sequences are ranked by
    # cumulative logprob / output length ** length_penalty.
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        floats = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                  "length_penalty")
        for name in floats:  # NaN and infinities turn into NaN logits or scores deep inside a step
            if not math.isfinite(getattr(self, name)):
                raise SamplingParamsError(name, f"{name} must be a finite number")
        if not all(math.isfinite(v) and -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
            raise SamplingParamsError("logit_bias", "logit_bias values must be in [-100, 100]")
        checks = [
            ("n", self.n >= 1, "n must be >= 1"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1
             or (self.max_tokens == 0 and self.prompt_logprobs is not None),
             "max_tokens must be >= 1 (0 only when scoring the prompt with prompt logprobs)"),
            ("min_tokens", self.min_tokens >= 0, "min_tokens must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "min_tokens must be <= max_tokens"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "top_k must be -1, 0 (off) or a positive integer"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 100.0, "repetition_penalty must be in (0, 100]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "prompt_logprobs must be in [0, 20]"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0"),
            ("best_of", self.best_of is None or self.best_of >= self.n, "best_of must be >= n"),
            ("best_of", self.best_of is None or self.best_of <= 64, "best_of must be <= 64"),
        ]
        if self.use_beam_search:
            checks += [
                ("temperature", self.temperature == 0.0, "beam search is deterministic: temperature must be 0"),
                ("top_p", self.top_p == 1.0 and self.top_k == 0 and self.min_p == 0.0,
                 "beam search does not use top_p, top_k or min_p"),
                ("stop", not self.stop, "stop strings are not supported with beam search (stop_token_ids are)"),
                ("logprobs", self.logprobs is None and self.prompt_logprobs is None,
                 "logprobs are not supported with beam search"),
                ("response_format", self.guided is None, "structured output is not supported with beam search"),
                ("max_tokens", self.max_tokens != 0, "beam search needs max_tokens >= 1"),
            ]
        for param, ok, message in checks:
            if not ok:
                raise SamplingParamsError(param, message)

    @property
    def num_sequences(self) -> int:
        """Sequences generated: best_of (the beam width with beam search), else n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
