"""Chat templates: sandboxed Jinja2 rendering and the split of a conversation into segments.

Why a sandbox: a chat template is code that ships inside a downloaded tokenizer directory, so it
is rendered the way Hugging Face renders it (``ImmutableSandboxedEnvironment``, ``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, the ``raise_exception`` / ``strftime_now`` helpers and a
non-escaping ``tojson``), except that touching an unsafe attribute raises ``SecurityError`` at
once instead of rendering as an empty string: a template that tries is broken or hostile.

Why segments: the rendered string mixes the template's structure (``<|im_start|>user\\n``) with
message text a dataset wrote. Tokenising the whole string would turn a literal ``<|im_end|>``
inside a message into the control token. So the template is rendered a second time with each
message content replaced by a unique placeholder; splitting that string at the placeholders
gives structural pieces (tokenised with control tokens) and content pieces (tokenised as plain
text), and tells which pieces belong to assistant messages (for the SFT loss mask). The split
is checked: substituting the contents back must reproduce the real rendering exactly, else an
error is raised rather than a silently wrong mask.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The default template of train_bpe_tokenizer: ChatML, as Qwen2 and others use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The HF sandbox, but an unsafe attribute access raises instead of yielding Undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"chat template accessed the unsafe attribute {attribute!r} of a "
            f"{type(obj).__name__!r} object; refusing to render it"
        )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<' and '&'; chat templates want the plain JSON (as HF).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per template string; the environment is immutable, so sharing is safe."""
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages`` is a non-empty list of dicts with string ``role`` and ``content``.

    Errors name the message index and the field, so a bad dataset row is easy to find.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise ValueError(f"messages[{i}] has no {field!r} field")
            if not isinstance(message[field], str):
                raise TypeError(f"messages[{i}][{field!r}] must be a str, "
                                f"got {type(message[field]).__name__}")
        if not message["role"]:
            raise ValueError(f"messages[{i}]['role'] is empty")
        out.append(dict(message))
    return out


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
           special_tokens: Mapping[str, str], extra: Mapping[str, Any]) -> str:
    """Render ``template`` as HF does: special-token strings first, then caller extras."""
    kwargs = {**special_tokens, **extra}
    return compile_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)


class Segment(NamedTuple):
    """One piece of a rendered conversation.

    ``message`` is None for template structure, else the index of the message whose content
    this piece is (tokenised as plain text, never as control tokens).
    """

    text: str
    message: int | None


def _marker_pair(rendered: str) -> tuple[str, str]:
    # Private-use characters absent from the real rendering cannot collide with any content.
    for code in range(0xE000, 0xF8FF, 2):
        a, b = chr(code), chr(code + 1)
        if a not in rendered and b not in rendered:
            return a, b
    raise ValueError("could not find a free placeholder character for the chat template")


def split_segments(template: str, messages: list[dict[str, Any]], *,
                   add_generation_prompt: bool, special_tokens: Mapping[str, str],
                   extra: Mapping[str, Any]) -> list[Segment]:
    """Split the rendered conversation into structure and message-content segments.

    Raises:
      ValueError: if the template transforms message content in a way (other than the common
        ``| trim``) that makes the placeholder rendering disagree with the real one.
    """
    kw = dict(add_generation_prompt=add_generation_prompt, special_tokens=special_tokens,
              extra=extra)
    real = render(template, messages, **kw)
    left, right = _marker_pair(real)
    masked = [{**m, "content": f"{left}{i}{right}"} for i, m in enumerate(messages)]
    parts = re.split(f"{left}([0-9]+){right}", render(template, masked, **kw))
    for transform in (lambda s: s, str.strip):
        segments = []
        for k, part in enumerate(parts):
            if k % 2 == 0:
                segments.append(Segment(part, None))
            else:
                i = int(part)
                segments.append(Segment(transform(messages[i]["content"]), i))
        if "".join(s.text for s in segments) == real:
            return [s for s in segments if s.text or s.message is not None]
    raise ValueError(
        "the chat template changes message content beyond trimming whitespace (or branches on "
        "it), so its control tokens cannot be separated safely from message text; simplify "
        "the template or pre-process the messages"
    )
