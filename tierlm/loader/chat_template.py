"""Chat templates: the model's own jinja template, rendered in a sandbox.

Rendering follows HF conventions (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`) so templates written for transformers work here.
Files that ship without a template get a built-in one for their family.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma's turn format; system content is folded into the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"gemma3": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma": GEMMA_TEMPLATE}


class ChatTemplateError(ValueError):
    """The template failed to render for these messages (message says why)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


@lru_cache(maxsize=16)
def references(source: str, name: str) -> bool:
    """Whether the template reads the variable `name` (e.g. renders `tools` itself).
    A template that does not compile references nothing; rendering reports its error."""
    try:
        return name in meta.find_undeclared_variables(_environment().parse(source))
    except jinja2.TemplateError:
        return False


# What render sets itself (and the globals templates call): a caller's extra variables may not.
RESERVED = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools", "raise_exception",
                      "strftime_now"})


def render(source: str, messages: list[dict], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", tools: list[dict] | None = None,
           extra: dict | None = None) -> str:
    """The template's text; `extra` are further template variables (e.g. `enable_thinking`)."""
    clash = sorted(set(extra or ()) & RESERVED)
    if clash:
        raise ChatTemplateError(f"chat_template_kwargs may not set {clash[0]!r} (set by the server)")
    try:
        return _compile(source).render(**(extra or {}), messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token, tools=tools)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, KeyError, IndexError) as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
