"""Tool calling on the request side: validating `tools` and `tool_choice`, the grammar that
forces a call (`required` or a named function), and how tools, assistant tool calls and
tool results reach the chat template.

Templates that render `tools` themselves get them with messages in the Hugging Face
convention. Others (SmolLM2's, the built-in Gemma one) get a Hermes-style system prompt
listing the functions, assistant calls as `<tool_call>` blocks and results as a user turn
of `<tool_response>` blocks, the format `tool_parser` reads back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from tierlm.server.errors import bad_request
from tierlm.server.protocol import ChatCompletionRequest, ChatMessage, Tool
from tierlm.structured.grammar import GrammarError
from tierlm.structured.llguidance_backend import check
from tierlm.structured.spec import GuidedSpec

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# What a function without `parameters` accepts: OpenAI's "empty parameter list".
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolPlan:
    """What a request does with tools. `mode` is "none", "auto", "required" or "named"
    (then `function` is the name); `parameters` maps each function to its arguments schema."""

    mode: str
    tools: tuple[dict, ...] = ()
    parameters: dict[str, dict] | None = None
    function: str | None = None
    parallel: bool = True

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.parameters or ())

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


NO_TOOLS = ToolPlan("none")


def plan(req: ChatCompletionRequest) -> ToolPlan:
    """Validate the request's tools and tool_choice (APIError 400 on the first problem)."""
    tools = req.tools or []
    parameters: dict[str, dict] = {}
    for i, t in enumerate(tools):
        if t.function.name in parameters:
            raise bad_request(f"function names must be unique; {t.function.name!r} is defined twice", "tools")
        parameters[t.function.name] = arguments_schema(t, i)
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    function = None if isinstance(choice, str) else choice.function.name
    if choice == "required" or function is not None:
        if not tools:
            raise bad_request("tool_choice requires tools; this request has none", "tool_choice")
        if function is not None and function not in parameters:
            raise bad_request(f"tool_choice names the function {function!r}, which is not in tools",
                              "tool_choice")
    mode = "named" if function is not None else choice
    if mode == "auto" and not tools:
        mode = "none"
    shown = tuple(t.model_dump(exclude_none=True) for t in tools)
    return ToolPlan(mode, shown, parameters, function, req.parallel_tool_calls)


def arguments_schema(tool: Tool, index: int) -> dict:
    """The JSON schema of a function's arguments object, checked by compiling it."""
    name, schema = tool.function.name, tool.function.parameters
    where = f"tools[{index}].function"
    if not NAME_RE.match(name):
        raise bad_request(f"{where}.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}", "tools")
    if not schema:
        return NO_ARGUMENTS
    if schema.get("type") != "object":
        raise bad_request(f"{where}.parameters must be a JSON schema of type \"object\" (function {name!r})",
                          "tools")
    error = _compile_error(GuidedSpec.json_schema(schema))
    if error:
        raise bad_request(f"{where}.parameters (function {name!r}): {error}", "tools")
    return schema


@lru_cache(maxsize=256)
def _compile_error(spec: GuidedSpec) -> str | None:
    # Clients send the same tools with every request of a conversation.
    try:
        check(spec)
    except GrammarError as e:
        return str(e)
    return None


def guided(p: ToolPlan) -> GuidedSpec | None:
    """The output constraint that forces a call: a named function's arguments object, or
    (required) a list of {"name", "arguments"} objects, one alternative per function."""
    # The grammar emits properties in schema order: "name" comes before "arguments", so
    # the model picks the function first.
    if p.mode == "named":
        return GuidedSpec.json_schema(p.parameters[p.function])
    if p.mode != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, schema in p.parameters.items()]
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not p.parallel:
        schema["maxItems"] = 1
    return GuidedSpec.json_schema(schema)


def system_prompt(p: ToolPlan) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in p.tools)
    how_many = "one or more functions" if p.parallel else "one function"
    return (f"# Tools\n\nYou may call {how_many} to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def template_input(messages: list[ChatMessage], p: ToolPlan, native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for the chat template. `native`: the template renders tools itself."""
    calls = [_parsed_calls(m, i) for i, m in enumerate(messages)]
    if native:
        plain = [_hf_message(m, c) for m, c in zip(messages, calls)]
        return plain, list(p.tools) if p.mode != "none" and p.tools else None
    plain: list[dict] = []
    for k, (m, c) in enumerate(zip(messages, calls)):
        if m.role == "tool":
            block = f"<tool_response>\n{m.text()}\n</tool_response>"
            if k and messages[k - 1].role == "tool":  # consecutive results share one user turn
                plain[-1]["content"] += "\n" + block
            else:
                plain.append({"role": "user", "content": block})
        elif c:
            blocks = "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}"
                               "\n</tool_call>" for _, n, a in c)
            plain.append({"role": "assistant", "content": f"{m.text()}\n{blocks}" if m.text() else blocks})
        else:
            plain.append({"role": _role(m), "content": m.text()})
    if p.mode != "none" and p.tools:
        if plain and plain[0]["role"] == "system":
            plain[0]["content"] = f"{plain[0]['content']}\n\n{system_prompt(p)}"
        else:
            plain.insert(0, {"role": "system", "content": system_prompt(p)})
    return plain, None


def _role(m: ChatMessage) -> str:
    return "system" if m.role == "developer" else m.role


def _hf_message(m: ChatMessage, calls: list[tuple[str, str, dict]]) -> dict:
    out = {"role": _role(m), "content": m.text()}
    if calls:
        out["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                             for i, n, a in calls]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
        if m.name:
            out["name"] = m.name
    return out


def _parsed_calls(m: ChatMessage, index: int) -> list[tuple[str, str, dict]]:
    """(id, name, arguments) of an assistant turn's calls; checks the turn's tool fields."""
    if m.tool_calls and m.role != "assistant":
        raise bad_request(f"messages[{index}]: only assistant messages carry tool_calls", "messages")
    if m.role == "tool" and not m.tool_call_id:
        raise bad_request(f"messages[{index}]: a tool message needs tool_call_id", "messages")
    out = []
    for j, call in enumerate(m.tool_calls or []):
        try:  # "" is how some clients write a call without arguments
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise bad_request(f"messages[{index}].tool_calls[{j}].function.arguments must be a JSON object",
                              "messages")
        out.append((call.id, call.function.name, arguments))
    return out
