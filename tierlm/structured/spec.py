"""GuidedSpec: the output constraint a request asks for (plain data, no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GuidedSpec:
    kind: str  # one of KINDS
    source: str  # JSON schema (JSON text), regex, JSON list of choices, or Lark grammar
    # The constraint starts after the output's first occurrence of this token (a reasoning
    # model's `</think>`: its thinking is free, its answer constrained); None: from the start.
    after_token: int | None = None

    @staticmethod
    def json_schema(schema: dict | bool | None) -> GuidedSpec:
        """None means any JSON object (`response_format: json_object`). Keys keep the
        caller's order: the grammar emits properties in schema order."""
        return GuidedSpec("json", json.dumps({"type": "object"} if schema is None else schema))

    @staticmethod
    def choice(options: list[str]) -> GuidedSpec:
        return GuidedSpec("choice", json.dumps(list(options)))
