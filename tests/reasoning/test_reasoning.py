"""Reasoning output: the parsers on hand-made outputs, whole and streamed in every
chunking; and a real server (`--reasoning-parser qwen3`) on a scripted tiny Qwen3 that
writes `<think>hm</think>ok`, through the official client: reasoning_content vs content,
streamed deltas, chat_template_kwargs, and structured output / tool calls applying to the
content only."""

from __future__ import annotations

import json
import random

import openai
import pytest

from tests.reasoning.scripted import CONTENT, REASONING, make_scripted_qwen3
from tests.server.conftest import ServerProcess, http_client, openai_client
from tierlm.server.reasoning import PARSERS, ReasoningStream, split

CASES = {
    # text: (deepseek_r1, qwen3)
    "<think>\nlet me see\n</think>\n\nFour.": (("\nlet me see\n", "\n\nFour."), ("\nlet me see\n", "\n\nFour.")),
    "thinking already</think>answer": (("thinking already", "answer"), (None, "thinking already</think>answer")),
    "no markers": (("no markers", None), (None, "no markers")),
    "<think>cut short": (("cut short", None), ("cut short", None)),
    "  <think>a</think>b": (("a", "b"), ("a", "b")),
    "<think></think>": ((None, None), (None, None)),
    "<think>a</think>b</think>c": (("a", "b</think>c"), ("a", "b</think>c")),
    "x<think>y</think>z": (("x<think>y", "z"), (None, "x<think>y</think>z")),
    "<th": (("<th", None), (None, "<th")),
}


@pytest.mark.parametrize("text", list(CASES))
@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
def test_split_and_every_streamed_chunking_agree(name, text):
    want = CASES[text][0 if name == "deepseek_r1" else 1]
    assert split(text, PARSERS[name]) == want
    rng = random.Random(0)
    chunkings = [[text[i:i + 1] for i in range(len(text))], [text]]
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 4)))) if len(text) > 1 else []
        chunkings.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    for chunks in chunkings:
        stream, got = ReasoningStream(PARSERS[name]), {"reasoning": "", "content": ""}
        for i, chunk in enumerate(chunks):
            for kind, piece in stream.feed(chunk, final=i == len(chunks) - 1):
                got[kind] += piece
        assert (got["reasoning"] or None, got["content"] or None) == want, chunks


def test_stream_holds_back_a_split_marker():
    stream = ReasoningStream(PARSERS["qwen3"])
    assert stream.feed("<thi") == []  # may still open the reasoning
    assert stream.feed("nk>ab</th") == [("reasoning", "ab")]  # "</th" held back
    assert stream.feed("ink>c") == [("content", "c")]
    assert stream.feed("", final=True) == []


@pytest.fixture(scope="module")
def srv(cache_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("scripted-qwen3")
    make_scripted_qwen3(d)
    s = ServerProcess(cache_dir, "--dtype", "float32", "--reasoning-parser", "qwen3", "--served-model-name", "qwen",
                      model=str(d))
    yield s
    s.stop()


HI = [{"role": "user", "content": "hi"}]


def test_reasoning_content_whole_and_streamed(srv):
    client = openai_client(srv)
    out = client.chat.completions.create(model="qwen", messages=HI, temperature=0, max_tokens=20)
    msg = out.choices[0].message
    assert (msg.reasoning_content, msg.content) == (REASONING, CONTENT)
    assert out.choices[0].finish_reason == "stop"
    reasoning = content = ""
    for chunk in client.chat.completions.create(model="qwen", messages=HI, temperature=0, max_tokens=20,
                                                stream=True):
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert (reasoning, content) == (REASONING, CONTENT)
    # Cut short while thinking: all reasoning, no content.
    cut = client.chat.completions.create(model="qwen", messages=HI, temperature=0, max_tokens=2).choices[0]
    assert (cut.message.reasoning_content, cut.message.content, cut.finish_reason) == ("h", None, "length")


def test_chat_template_kwargs_reach_the_template(srv):
    http = http_client(srv)

    def prompt(**kw) -> list[int]:
        return http.post("/tokenize", json={"model": "qwen", "messages": HI, **kw}).json()["tokens"]

    off = prompt(chat_template_kwargs={"enable_thinking": False})
    assert len(off) > len(prompt()) and off[:len(prompt())] == prompt()
    closed = http.post("/detokenize", json={"model": "qwen", "tokens": off[len(prompt()):]}).json()["prompt"]
    assert closed == "<think>\n\n</think>\n\n"
    client = openai_client(srv)
    out = client.chat.completions.create(model="qwen", messages=HI, temperature=0, max_tokens=20,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert out.usage.prompt_tokens == len(off)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen", messages=HI, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"messages": []}})
    assert e.value.body["param"] == "chat_template_kwargs"


def test_structured_output_and_tool_calls_apply_to_the_content(srv):
    client = openai_client(srv)
    # A choice the model would not make on its own: the thinking stays free, the answer is forced.
    out = client.chat.completions.create(model="qwen", messages=HI, temperature=0, max_tokens=20,
                                         extra_body={"guided_choice": ["no"]})
    msg = out.choices[0].message
    assert (msg.reasoning_content, msg.content) == (REASONING, "no")
    pieces = {"reasoning": "", "content": ""}
    for chunk in client.chat.completions.create(model="qwen", messages=HI, temperature=0, max_tokens=20, stream=True,
                                                extra_body={"guided_choice": ["no"]}):
        for c in chunk.choices:
            pieces["reasoning"] += getattr(c.delta, "reasoning_content", None) or ""
            pieces["content"] += c.delta.content or ""
    assert pieces == {"reasoning": REASONING, "content": "no"}
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 3}}, "required": ["q"],
        "additionalProperties": False}}}
    out = client.chat.completions.create(model="qwen", messages=HI, temperature=0, max_tokens=60, tools=[tool],
                                         tool_choice="required", parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.message.reasoning_content == REASONING
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "lookup"
    assert set(json.loads(choice.message.tool_calls[0].function.arguments)) == {"q"}
    # tools offered but not required: the content is read for calls; "ok" is none.
    out = client.chat.completions.create(model="qwen", messages=HI, temperature=0, max_tokens=20, tools=[tool])
    assert (out.choices[0].message.reasoning_content, out.choices[0].message.content) == (REASONING, CONTENT)
