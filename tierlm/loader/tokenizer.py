"""Tokenizers for GGUF files and HF checkpoint directories, plus the chat template.

GGUF: a `tokenizers` model is built from the file's vocabulary so ids match llama.cpp's:
a byte-level BPE with the pre-tokenizer regexes llama.cpp uses for `tokenizer.ggml.pre`
("gpt2" vocabularies), or a score-ranked BPE for SentencePiece ones ("llama", see
spm.py). Building takes 1-5 s, so the result is cached as tokenizer.json under the
cache dir, keyed by a hash of the vocabulary metadata.
HF directories use their own tokenizer.json and tokenizer_config.json.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from tierlm.loader import chat_template, spm
from tierlm.loader.gguf import GGUFFile

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer regex sequences, by `tokenizer.ggml.pre`.
PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": [_GPT2],
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "refact": [r"\p{N}", _GPT2],
    "llama3": [_LLAMA3],
    "llama-bpe": [_LLAMA3],
    "qwen2": [_QWEN2],
}
_CONTROL, _USER_DEFINED = 3, 4
# Control tokens that end a turn: generation stops on them as on EOS (llama.cpp does the same).
_END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")
_VOCAB_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
               "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.add_space_prefix")


class TokenizerError(ValueError):
    pass


class TokenizerInputError(ValueError):
    """The tokenizer failed on this input (a Rust panic inside `tokenizers`, surfaced by pyo3
    as a BaseException): the input is refused, the process goes on."""


@contextmanager
def _no_panic(what: str):
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise TokenizerInputError(f"the tokenizer could not {what} this input ({e})") from None


class TextTokenizer:
    """Text <-> token ids and chat rendering for one model."""

    def __init__(self, tok: Tokenizer, *, bos_token_id: int | None, eos_token_ids: tuple[int, ...],
                 add_bos: bool, chat_template_source: str) -> None:
        self._tok = tok
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.chat_template_source = chat_template_source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The batch entry point releases the GIL (plain `encode` holds it: a megabyte prompt
        # stalled the server's event loop for seconds); the fast one skips offsets, ~3x quicker.
        with _no_panic("encode"):
            ids = self._encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        with _no_panic("decode"):
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str:
        """The underlying `tokenizers` model as JSON (grammar engines build their own view of it)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def single_token(self, text: str) -> int | None:
        """The id of the one token that `text` is in this vocabulary, else None."""
        ids = self.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def token_text(self, token_id: int) -> str:
        """The text of one token as it would print (special tokens included)."""
        with _no_panic("decode"):
            return self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, extra: dict | None = None) -> str:
        """The conversation as the model's template renders it; `extra`: further template
        variables (chat_template_kwargs, e.g. enable_thinking)."""
        def name(i: int | None) -> str:
            return (self._tok.id_to_token(i) or "") if i is not None else ""

        return chat_template.render(
            self.chat_template_source, messages, add_generation_prompt=add_generation_prompt,
            bos_token=name(self.bos_token_id), eos_token=name(self.eos_token_ids[0] if self.eos_token_ids else None),
            tools=tools, extra=extra)


def _build_bpe(g: GGUFFile) -> Tokenizer:
    pre = str(g.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    tokens: list[str] = g.get("tokenizer.ggml.tokens")
    types: list[int] = g.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


def _build_spm(g: GGUFFile) -> Tokenizer:
    tokens: list[str] = g.get("tokenizer.ggml.tokens")
    unk = g.get("tokenizer.ggml.unknown_token_id")
    return spm.build(tokens, g.get("tokenizer.ggml.scores"), g.get("tokenizer.ggml.token_type"),
                     add_space_prefix=bool(g.get("tokenizer.ggml.add_space_prefix", True)),
                     unk_token=tokens[unk] if unk is not None else None)


def _metadata_hash(g: GGUFFile) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in _VOCAB_KEYS:
        h.update(key.encode())
        h.update(json.dumps(g.get(key)).encode())
    return h.hexdigest()


def from_gguf(g: GGUFFile, cache_dir: Path | None) -> TextTokenizer:
    kind = g.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported "
                             "(supported: gpt2 byte-level BPE, llama SentencePiece)")
    tok = None
    cached = cache_dir / "tokenizers" / f"{_metadata_hash(g)}.json" if cache_dir else None
    if cached and cached.exists():
        tok = Tokenizer.from_file(str(cached))
    if tok is None:
        tok = _build_bpe(g) if kind == "gpt2" else _build_spm(g)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tok.save(str(tmp))
            tmp.replace(cached)  # atomic: concurrent loaders never read a half-written file
    eos = [g.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    tokens, types = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.token_type") or []
    eos += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == _CONTROL and t in _END_OF_TURN]
    template = g.get("tokenizer.chat_template") or chat_template.BUILTIN_TEMPLATES.get(
        g.architecture, chat_template.CHATML_TEMPLATE)
    return TextTokenizer(tok, bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
                         eos_token_ids=tuple(sorted({int(e) for e in eos if e is not None})),
                         add_bos=bool(g.get("tokenizer.ggml.add_bos_token", False)),
                         chat_template_source=template)


def from_hf_dir(model_dir: Path, eos_token_ids: tuple[int, ...], bos_token_id: int | None) -> TextTokenizer:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise TokenizerError(f"{model_dir} has no tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    template = cfg.get("chat_template")
    if (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)

    def token_id(key: str) -> int | None:
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return tok.token_to_id(value) if value else None

    eos = token_id("eos_token")
    eos_ids = tuple(sorted(set(eos_token_ids) | ({eos} if eos is not None else set())))
    bos = bos_token_id if bos_token_id is not None else token_id("bos_token")
    return TextTokenizer(tok, bos_token_id=bos, eos_token_ids=eos_ids,
                         add_bos=bool(cfg.get("add_bos_token", False)),
                         chat_template_source=template or chat_template.CHATML_TEMPLATE)
