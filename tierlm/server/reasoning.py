"""Reasoning output: the text a model writes between its think markers, moved out of the
reply's `content` into `reasoning_content` (vLLM's `--reasoning-parser` and field names).

Two formats, by vLLM's parser names:
- `deepseek_r1`: DeepSeek-R1's templates open `<think>` in the prompt, so the output
  usually starts inside the reasoning; everything before `</think>` is reasoning (an
  output `<think>` is dropped), and an output without `</think>` is all reasoning (cut
  short while thinking).
- `qwen3`: Qwen3 writes `<think>` itself when it thinks (with `enable_thinking: false`
  its template closes an empty block in the prompt); an output without `</think>` is
  content unless it opened `<think>` (cut short while thinking: all reasoning).

`split` reads a whole output; `ReasoningStream` the same output as it streams, in pieces
that add up to exactly what `split` returns (markers split across chunks are held back
until they can be told apart from text).
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    starts_inside: bool  # the output begins inside the reasoning (the prompt opened it)


PARSERS = {"deepseek_r1": ReasoningFormat("deepseek_r1", True), "qwen3": ReasoningFormat("qwen3", False)}


def _or_none(text: str) -> str | None:
    return text or None


def _body(text: str, fmt: ReasoningFormat) -> str | None:
    """The output after an opening `<think>` (leading whitespace before it dropped), the
    output itself when the prompt opened the reasoning, or None: no reasoning at all."""
    lead = text.lstrip()
    if lead.startswith(START):
        return lead[len(START):]
    return text if fmt.starts_inside else None


def split(text: str, fmt: ReasoningFormat) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; either None when empty."""
    body = _body(text, fmt)
    if body is None:
        return None, _or_none(text)
    reasoning, end, content = body.partition(END)
    return _or_none(reasoning), _or_none(content) if end else None


def _held(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that could begin `marker` (kept back)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningStream:
    """One choice's output as it streams -> ("reasoning" | "content", text) pieces."""

    def __init__(self, fmt: ReasoningFormat) -> None:
        self.fmt = fmt
        self.text = ""
        self.sent = {"reasoning": "", "content": ""}

    def feed(self, delta: str, final: bool = False) -> list[tuple[str, str]]:
        self.text += delta
        reasoning, content = split(self.text, self.fmt) if final else self._settled()
        out = []
        for kind, now in (("reasoning", reasoning or ""), ("content", content or "")):
            new = now[len(self.sent[kind]):]
            if new:
                self.sent[kind] = now
                out.append((kind, new))
        return out

    def _settled(self) -> tuple[str, str]:
        """What `split` will say of the text so far whatever follows: nothing while the
        output may still open with `<think>`, and no suffix that may still become `</think>`."""
        lead = self.text.lstrip()
        if START.startswith(lead):  # empty, or a prefix of <think>: undecided
            return "", ""
        body = _body(self.text, self.fmt)
        if body is None:
            return "", self.text
        reasoning, end, content = body.partition(END)
        if end:
            return reasoning, content
        return body[:len(body) - _held(body, END)], ""
