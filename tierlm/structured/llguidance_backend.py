"""llguidance adapter: GuidedSpec -> llguidance grammar, and per-request matchers;
`check` compiles a spec without a vocabulary, to validate it where no model is at hand.

The llguidance tokenizer is built once per model from our `tokenizers` model (its JSON),
with the model's stop tokens as EOS, so masks cover exactly the model's vocabulary.
JSON is generated compactly (no free whitespace), so a small model cannot wander into
endless blank space.
"""

from __future__ import annotations

import json

import llguidance
import torch

from tierlm.loader.tokenizer import TextTokenizer
from tierlm.structured.grammar import GrammarError
from tierlm.structured.spec import GuidedSpec

_BITS = torch.arange(8, dtype=torch.uint8)


class LLGuidanceBackend:
    def __init__(self, tokenizer: TextTokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size,
                                                eos_token=list(tokenizer.eos_token_ids))

    def compile(self, spec: GuidedSpec) -> str:
        return _compile(spec, self.tokenizer)

    def new_state(self, compiled: str) -> LLGuidanceState:
        return LLGuidanceState(llguidance.LLMatcher(self.tokenizer, compiled, log_level=0), self.vocab_size)


def check(spec: GuidedSpec) -> None:
    """Compile `spec` without a model's vocabulary: catches every schema and grammar error
    that does not depend on the tokens (GrammarError), for checks that have no model at hand."""
    _compile(spec, None)


def _compile(spec: GuidedSpec, tokenizer: llguidance.LLTokenizer | None) -> str:
    try:
        grammar = _grammar(spec)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid {spec.kind} constraint: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise GrammarError(f"invalid {spec.kind} constraint: {error.strip()}")
    return grammar


def _grammar(spec: GuidedSpec) -> str:
    if spec.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(
            spec.source, defaults={"whitespace_flexible": False})
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        options = json.loads(spec.source)
        if not options or not all(isinstance(o, str) for o in options):
            raise ValueError("choices must be a non-empty list of strings")
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o) for o in options))
    if spec.kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(spec.source)
    raise ValueError(f"unknown constraint kind {spec.kind!r}")


class LLGuidanceState:
    _executor: llguidance.LLExecutor | None = None  # shared thread pool for batched masks

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        return _unpack(packed.view(1, -1), self.vocab_size)[0]

    @classmethod
    def allowed_batch(cls, states: list[LLGuidanceState]) -> torch.Tensor:
        """Masks [R, vocab] for many states at once, on llguidance's threads (GIL released)."""
        if cls._executor is None:
            cls._executor = llguidance.LLExecutor()
        vocab = states[0].vocab_size
        words = torch.zeros((len(states), -(-vocab // 32)), dtype=torch.int32)
        cls._executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)], words.data_ptr(),
                                              words.shape[1] * 4, len(states))
        return _unpack(words.view(torch.uint8), vocab)

    def accept(self, token_id: int) -> bool:
        return self.matcher.consume_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        if not self.matcher.rollback(num_tokens):
            raise GrammarError(f"cannot roll back {num_tokens} tokens: {self.matcher.get_error()}")

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()


def _unpack(packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """Little-endian bitmask bytes [R, B] -> bool [R, vocab] (bit j of byte b is token 8b + j)."""
    return ((packed[:, :, None] >> _BITS) & 1).flatten(1)[:, :vocab].bool()
