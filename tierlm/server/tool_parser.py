"""Tool calls read back out of generated text, whole (a response) or as it streams.

The format is the one `tools` teaches a template-less model: `<tool_call>` blocks holding
a JSON object (or a list of them) with "name" and "arguments" ("parameters" is accepted
too; arguments may be an object or a JSON string), or a whole output that is such JSON
(which is what `tool_choice: required` generates). A block that does not parse, or names
a function the request did not define, stays in the content: bad model output is text,
never an error.

`ChoiceStream` turns one choice's text deltas into OpenAI chat deltas; what its deltas
add up to always equals the non-streamed message for the same text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class Parsed:
    content: str | None
    calls: list[Call]


def parse(text: str, names: frozenset[str], parallel: bool = True) -> Parsed:
    """Calls in `text` and the text around them (None when that is only whitespace).
    Without calls the content is `text` unchanged."""
    calls: list[Call] | None = None
    if text.lstrip()[:1] in ("{", "["):
        calls = _calls(text.strip(), names)
    if calls is not None:
        return Parsed(None, calls[:1] if not parallel else calls)
    calls, outside, pos = [], [], 0
    while (start := text.find(TAG_OPEN, pos)) >= 0:
        end = text.find(TAG_CLOSE, start)
        stop = end + len(TAG_CLOSE) if end >= 0 else len(text)  # an unclosed block runs to the end
        found = _calls(text[start + len(TAG_OPEN):end if end >= 0 else len(text)].strip(), names)
        outside.append(text[pos:start] if found is not None else text[pos:stop])
        calls += found or []
        pos = stop
    if not calls:
        return Parsed(text, [])
    content = "".join(outside) + text[pos:]
    return Parsed(content if content.strip() else None, calls[:1] if not parallel else calls)


def _calls(payload: str, names: frozenset[str]) -> list[Call] | None:
    """The calls a JSON payload describes; None unless every one is well formed."""
    try:
        value = json.loads(payload)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item["name"] not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        out.append(Call(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return out or None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def message(content: str | None, calls: list[Call]) -> dict:
    """The assistant message of a response."""
    out: dict = {"role": "assistant", "content": content}
    if calls:
        out["tool_calls"] = [{"id": call_id(), "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return out


def finish_reason(reason: str | None, called: bool) -> str | None:
    # A call cut short by max_tokens still reports "length", so the client knows it is partial.
    return "tool_calls" if called and reason == "stop" else reason


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that could begin TAG_OPEN."""
    for k in range(min(len(TAG_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(TAG_OPEN[:k]):
            return k
    return 0


class ChoiceStream:
    """One choice's deltas. mode "none" passes text through; "named" streams the text as the
    arguments of `function`; "auto" / "required" stream content until a call may begin, then
    send each call once its block closes (a whole-output JSON call list at the end)."""

    def __init__(self, mode: str, names: frozenset[str] = frozenset(), function: str | None = None,
                 parallel: bool = True) -> None:
        self.mode, self.names, self.function, self.parallel = mode, names, function, parallel
        self.text = ""
        self.sent_content = ""  # always a prefix of the final content
        self.sent_calls = 0
        self.calls_from = -1  # where the first TAG_OPEN is, once seen
        self.closed_at = -1  # end of the last TAG_CLOSE parsed so far

    def feed(self, delta: str, final: bool = False) -> list[dict]:
        if self.mode == "none":
            return [{"content": delta}] if delta else []
        if self.mode == "named":
            return self._named(delta)
        self.text += delta
        out = self._content(self._safe_text()) if not final else []
        if self.calls_from >= 0 and not final:
            end = self.text.rfind(TAG_CLOSE)
            if end > self.closed_at:
                self.closed_at = end
                out += self._calls(parse(self.text[:end + len(TAG_CLOSE)], self.names, self.parallel).calls)
        if final:
            whole = parse(self.text, self.names, self.parallel)
            out += self._content((whole.content or "") if whole.calls else self.text, at_end=True)
            out += self._calls(whole.calls)
        return out

    @property
    def called(self) -> bool:
        return self.sent_calls > 0

    def _named(self, delta: str) -> list[dict]:
        if self.sent_calls:
            return [{"tool_calls": [{"index": 0, "function": {"arguments": delta}}]}] if delta else []
        self.sent_calls = 1
        return [{"tool_calls": [{"index": 0, "id": call_id(), "type": "function",
                                 "function": {"name": self.function, "arguments": delta}}]}]

    def _safe_text(self) -> str:
        """The text that is content whatever comes next."""
        if not self.sent_content and self.text.lstrip()[:1] in ("{", "["):
            return ""  # may be a whole-output JSON call: hold it to the end
        if self.calls_from < 0:
            self.calls_from = self.text.find(TAG_OPEN)
        if self.calls_from >= 0:
            return self.text[:self.calls_from]
        return self.text[:len(self.text) - _partial_tag(self.text)]

    def _content(self, text: str, at_end: bool = False) -> list[dict]:
        if not at_end and not self.sent_content and not text.strip():
            return []  # leading whitespace is no content if a call follows
        new = text[len(self.sent_content):]
        self.sent_content = text if new else self.sent_content
        return [{"content": new}] if new else []

    def _calls(self, calls: list[Call]) -> list[dict]:
        new = calls[self.sent_calls:]
        deltas = [{"tool_calls": [{"index": self.sent_calls + k, "id": call_id(), "type": "function",
                                   "function": {"name": c.name, "arguments": c.arguments}}]}
                  for k, c in enumerate(new)]
        self.sent_calls += len(new)
        return deltas
