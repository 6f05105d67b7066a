"""Incremental detokenization with stop strings that may span tokens.

Text is produced by decoding a short window of recent tokens (prefix/read offsets),
so each step costs O(1) in the output length, and an incomplete UTF-8 sequence is
held back until the token that completes it. Text that could still become the start
of a stop string is held back too, so streamed text never has to be retracted.
"""

from __future__ import annotations

from tierlm.loader.tokenizer import TextTokenizer

_WINDOW = 6  # tokens of left context re-decoded so merges/spaces render correctly


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True, include_stop_str: bool = False) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids[-_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.skip_special = skip_special_tokens
        self.include_stop = include_stop_str
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all output text so far (stop string excluded unless asked)
        self.emitted = 0  # chars of `text` already handed out as deltas
        self.stopped_on: str | None = None
        self._stop_at = 0  # index in `text` where `stopped_on` begins

    def add(self, token_id: int) -> None:
        """Append one output token; sets `stopped_on` when a stop string appears."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # incomplete character: wait for more tokens
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - self.hold)
        self.text += new
        for s in self.stop:
            at = self.text.find(s, start)
            if at != -1 and (self.stopped_on is None or at < self._stop_at):
                self.stopped_on, self._stop_at = s, at
        if self.stopped_on is not None:
            end = self._stop_at + (len(self.stopped_on) if self.include_stop else 0)
            self.text = self.text[:end]

    def delta(self, final: bool) -> str:
        """Text not yet handed out; keeps back a possible stop-string prefix unless final."""
        limit = len(self.text) if (final or self.stopped_on) else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : limit]
        self.emitted = limit
        return out
