"""Tool calling without a model: request validation, the forcing grammar, what the chat
template receives, and reading calls back out of text, whole and streamed."""

from __future__ import annotations

import json

import pytest

from tierlm.loader import chat_template
from tierlm.server import tools
from tierlm.server.errors import APIError
from tierlm.server.protocol import ChatCompletionRequest, ChatMessage
from tierlm.server.tool_parser import Call, ChoiceStream, Parsed, parse
from tierlm.structured.llguidance_backend import check

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": CITY}}
NAMES = frozenset({"get_weather", "get_time"})


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def plan(**kw) -> tools.ToolPlan:
    return tools.plan(request(**kw))


def rejected(**kw) -> APIError:
    with pytest.raises(APIError) as e:
        plan(**kw)
    assert e.value.status == 400
    return e.value


def test_tool_choice_defaults_and_modes():
    assert plan().mode == "none"
    assert plan(tools=[WEATHER]).mode == "auto"
    assert plan(tools=[WEATHER], tool_choice="none").mode == "none"
    assert plan(tool_choice="auto").mode == "none"  # nothing to call
    named = plan(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert (named.mode, named.function, named.forced) == ("named", "get_time", True)
    assert plan(tools=[WEATHER], tool_choice="required").forced
    assert plan(tools=[WEATHER, TIME]).names == NAMES


@pytest.mark.parametrize("kw,param,needle", [
    ({"tool_choice": "required"}, "tool_choice", "requires tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "requires tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "must match"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools", "must match"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "defined twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     '"object"'),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools", "nonsense"),
])
def test_bad_tools_are_400(kw, param, needle):
    e = rejected(**kw)
    assert e.param == param and needle in e.message


def test_function_without_parameters_takes_an_empty_object():
    p = plan(tools=[{"type": "function", "function": {"name": "ping"}}], tool_choice="required")
    assert p.parameters["ping"] == tools.NO_ARGUMENTS
    assert json.loads(tools.guided(p).source)["items"]["anyOf"][0]["properties"]["arguments"] == tools.NO_ARGUMENTS


def test_forcing_grammar():
    assert tools.guided(plan(tools=[WEATHER])) is None
    named = tools.guided(plan(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert json.loads(named.source) == CITY
    spec = tools.guided(plan(tools=[WEATHER, TIME], tool_choice="required"))
    schema = json.loads(spec.source)
    assert schema["minItems"] == 1 and "maxItems" not in schema
    first = schema["items"]["anyOf"][0]
    assert list(first["properties"]) == ["name", "arguments"]  # the function is chosen before its arguments
    assert [a["properties"]["name"]["const"] for a in schema["items"]["anyOf"]] == ["get_weather", "get_time"]
    check(spec)
    single = json.loads(tools.guided(plan(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)).source)
    assert single["maxItems"] == 1


def history() -> list[ChatMessage]:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    return [ChatMessage(**m) for m in [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "call_2", "function": {
            "name": "get_time", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain, 8 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    ]]


def test_template_without_tools_gets_prompt_blocks_and_responses():
    p = plan(tools=[WEATHER, TIME])
    msgs, shown = tools.template_input(history(), p, native=False)
    assert shown is None
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "get_time"' in msgs[0]["content"]
    assert msgs[2]["content"].count("<tool_call>") == 2
    assert parse(msgs[2]["content"], NAMES).calls == [Call("get_weather", '{"city": "Oslo"}'),
                                                       Call("get_time", '{"city": "Oslo"}')]
    assert msgs[3]["content"] == "<tool_response>\nrain, 8 C\n</tool_response>\n<tool_response>\n14:05\n</tool_response>"
    # Gemma's template insists on user/model alternation; tool results are user turns.
    text = chat_template.render(chat_template.GEMMA_TEMPLATE, msgs)
    assert "<tool_response>\n14:05" in text and "# Tools" in text
    text = chat_template.render(chat_template.CHATML_TEMPLATE, msgs)
    assert "<|im_start|>system\nBe brief.\n\n# Tools" in text
    assert "<|im_start|>user\n<tool_response>\nrain, 8 C\n</tool_response>\n<tool_response>" in text


def test_tool_prompt_is_a_new_system_message_and_absent_for_none():
    user = [ChatMessage(role="user", content="hi")]
    msgs, _ = tools.template_input(user, plan(tools=[WEATHER]), native=False)
    assert [m["role"] for m in msgs] == ["system", "user"] and "<tools>" in msgs[0]["content"]
    assert "one or more" in msgs[0]["content"]
    assert "one function" in tools.template_input(user, plan(tools=[WEATHER], parallel_tool_calls=False),
                                                  native=False)[0][0]["content"]
    msgs, _ = tools.template_input(user, plan(tools=[WEATHER], tool_choice="none"), native=False)
    assert msgs == [{"role": "user", "content": "hi"}]


def test_template_with_tools_gets_hf_convention():
    source = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
              "{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}({{ c.function.name }} "
              "{{ c.function.arguments.city }}){% endfor %}{{ m.tool_call_id or '' }};{% endfor %}")
    assert chat_template.references(source, "tools")
    msgs, shown = tools.template_input(history(), plan(tools=[WEATHER, TIME]), native=True)
    assert shown == [WEATHER, TIME]
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    text = chat_template.render(source, msgs, tools=shown)
    assert text.startswith("[get_weather][get_time]system:Be brief.;")
    assert "assistant:(get_weather Oslo)(get_time Oslo);tool:rain, 8 Ccall_1;" in text
    assert tools.template_input(history(), plan(tools=[WEATHER], tool_choice="none"), native=True)[1] is None


@pytest.mark.parametrize("message,needle", [
    ({"role": "tool", "content": "x"}, "tool_call_id"),
    ({"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{}"}}]}, "only assistant"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]},
     "JSON object"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{bad"}}]},
     "JSON object"),
])
def test_bad_tool_turns_are_400(message, needle):
    with pytest.raises(APIError) as e:
        tools.template_input([ChatMessage(**message)], tools.NO_TOOLS, native=False)
    assert e.value.status == 400 and needle in e.value.message


W = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
T = '{"name": "get_time", "parameters": "{\\"city\\": \\"Rome\\"}"}'
OSLO, ROME = Call("get_weather", '{"city": "Oslo"}'), Call("get_time", '{"city": "Rome"}')
CASES = [  # text, content, calls
    (f"<tool_call>\n{W}\n</tool_call>", None, [OSLO]),
    (f"Checking.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>{T}</tool_call> done", "Checking.\n\n done",
     [OSLO, ROME]),
    (f"<tool_call>[{W}, {T}]</tool_call>", None, [OSLO, ROME]),
    (f"  {W}  ", None, [OSLO]),
    (f"[{W},{T}]", None, [OSLO, ROME]),
    (f"\n<tool_call>{W}</tool_call>\nDone.", "\n\nDone.", [OSLO]),
    (f"<tool_call>\n{W}", None, [OSLO]),  # cut off before the closing tag
    ("<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>",
     "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>", []),
    (f"<tool_call>{{oops</tool_call> then <tool_call>{W}</tool_call>", "<tool_call>{oops</tool_call> then ",
     [OSLO]),
    (f"<tool_call>{W[:-5]}", f"<tool_call>{W[:-5]}", []),
    ('{"name": "get_weather", "arguments": [1]}', '{"name": "get_weather", "arguments": [1]}', []),
    ("{not json", "{not json", []),
    ("Plain answer <tool", "Plain answer <tool", []),
    ("  \n", "  \n", []),
    ("", "", []),
    ("[]", "[]", []),
]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse(text, content, calls):
    assert parse(text, NAMES) == Parsed(content, calls)


def test_parse_single_call_when_not_parallel():
    text = f"<tool_call>{W}</tool_call><tool_call>{T}</tool_call>"
    assert parse(text, NAMES, parallel=False).calls == [OSLO]


def streamed(text: str, size: int, mode: str = "auto", parallel: bool = True) -> tuple[str | None, list[Call]]:
    view = ChoiceStream(mode, NAMES, "get_weather", parallel)
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    deltas = [d for k, p in enumerate(pieces) for d in view.feed(p, final=k == len(pieces) - 1)]
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            assert ("id" in tc) == (slot["name"] == "")  # the first chunk of a call carries its id and name
            slot["name"] += tc["function"].get("name", "")
            slot["arguments"] += tc["function"].get("arguments", "")
    assert view.called == bool(calls)
    return content or None, [Call(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("text", [c[0] for c in CASES])
def test_streamed_deltas_add_up_to_the_parse(text, size):
    whole = parse(text, NAMES)
    assert streamed(text, size) == (whole.content or None, whole.calls)
    single = parse(text, NAMES, parallel=False)
    assert streamed(text, size, parallel=False) == (single.content or None, single.calls)


def test_stream_holds_back_only_what_may_be_a_call():
    view = ChoiceStream("auto", NAMES)
    assert view.feed("  ") == []  # whitespace before a call is not content
    assert view.feed("Sure <tool") == [{"content": "  Sure "}]
    assert view.feed("_call>") == []
    assert view.feed(W) == []
    assert view.feed("</tool_call>")[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert view.feed(" bye", final=True) == [{"content": " bye"}]


def test_named_stream_sends_arguments_as_they_come():
    view = ChoiceStream("named", function="get_weather")
    first, = view.feed('{"ci')
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert view.feed('ty": "Oslo"}', final=True) == [{"tool_calls": [{"index": 0,
                                                                       "function": {"arguments": 'ty": "Oslo"}'}}]}]
    assert streamed('{"city": "Oslo"}', 3, mode="named") == (None, [Call("get_weather", '{"city": "Oslo"}')])
    assert ChoiceStream("none").feed("<tool_call>") == [{"content": "<tool_call>"}]
