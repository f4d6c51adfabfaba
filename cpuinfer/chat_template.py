"""Chat templates: render a conversation into the prompt text a model was trained on.

GGUF files carry the Hugging Face Jinja template as ``tokenizer.chat_template``. It is rendered
the way ``transformers``' ``apply_chat_template`` does — same environment options
(``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension), same helpers
(``raise_exception``, ``strftime_now``, a ``tojson`` filter that keeps non-ASCII text) — but in
Jinja's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`: a template comes from a
downloaded file, so it may not reach Python internals (``''.__class__``…) or mutate the caller's
objects. Files without a template get ChatML.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import CpuinferError

#: Used when a file has no ``tokenizer.chat_template`` (the format of most instruct models).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _TemplateError(Exception):
    """What ``raise_exception(...)`` raises inside a template."""


def _raise_exception(message: str):
    raise _TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    # Like transformers: no HTML escaping (Jinja's built-in tojson escapes <, >, & and ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with unsafe attribute access an error rather than an empty value.

    Jinja's sandbox answers ``''.__class__`` with an undefined value that renders as nothing;
    a template that tries it is hostile or broken either way, so it is refused outright.
    """

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe")


def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile once per distinct template text (a chat compiles the same one every turn)."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise CpuinferError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def _validate(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise CpuinferError(f"chat messages must be a list of {{'role', 'content'}} dicts, "
                            f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise CpuinferError(f"chat message {i} must be a dict with 'role' and 'content', "
                                f"got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise CpuinferError(f"chat message {i}: {key!r} must be a string, "
                                    f"got {type(m.get(key)).__name__}")
    return list(messages)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with ``template``.

    ``template`` None or empty selects :data:`CHATML_TEMPLATE`. ``extra`` variables (for example
    ``tools`` or ``enable_thinking``) are passed to the template as they are. Template syntax
    errors, ``raise_exception`` calls, sandbox violations and other render errors raise
    :class:`CpuinferError` with a one-line message.
    """
    messages = _validate(messages)
    tmpl = _compile(template if template else CHATML_TEMPLATE)
    try:
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **extra)
    except _TemplateError as e:
        raise CpuinferError(f"chat template refused the conversation: {_one_line(e)}") from None
    except SecurityError as e:
        raise CpuinferError(f"chat template tried an unsafe operation: {_one_line(e)}") from None
    except jinja2.TemplateError as e:
        raise CpuinferError(f"chat template failed: {_one_line(e)}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise CpuinferError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
