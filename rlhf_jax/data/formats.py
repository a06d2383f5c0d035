"""The dataset formats of TRL, each as a validator, and the prompt split of implicit preferences.

A row is *standard* (text fields are strings) or *conversational* (the same fields are lists of
``{"role", "content"}`` messages, rendered with the chat template). The types:

======================  ==============================================  =====================
format                  fields                                          stages
======================  ==============================================  =====================
``text``                ``text``                                        SFT, distillation
``messages``            ``messages`` (a conversation)                   SFT, distillation, RL
``prompt``              ``prompt``                                      RL, best-of-n
``prompt_completion``   ``prompt``, ``completion``                      SFT, distillation, RL
``preference``          ``chosen``, ``rejected`` [, ``prompt``]         reward model, DPO, RL
``unpaired_preference`` ``prompt``, ``completion``, ``label`` (bool)    KTO-style, RL
======================  ==============================================  =====================

A preference row without ``prompt`` has an *implicit* prompt: the longest shared prefix of
``chosen`` and ``rejected`` (the shared leading messages of a conversation; the shared leading
characters of strings, a separating space left to the responses), as TRL's ``extract_prompt``.
Within a row every text field is a string or every one is a conversation: mixing is an error.
Unknown extra fields pass through (``answer`` for a verifier, say).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class RowError(Exception):
    """A validator's complaint about one field of a row (located by the caller)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def is_conversation(value: Any) -> bool:
    """A list (of messages): the conversational form of a text field."""
    return isinstance(value, list)


def _check_str(value: Any, field: str) -> None:
    if not isinstance(value, str):
        raise RowError(field, f"expected a non-empty string or a list of messages, got "
                              f"{type_name(value)}")
    if not value:
        raise RowError(field, "expected a non-empty string, got an empty string")


def _check_conversation(value: list, field: str, *, assistant: bool | None) -> None:
    """Messages with a known role and string content (empty only for system messages).

    ``assistant``: True, every message must be the assistant's (a completion); False, the last
    must not be (a prompt); None, anything.
    """
    if not value:
        raise RowError(field, "expected a non-empty list of messages, got []")
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, f"expected an object with 'role' and 'content', got "
                                  f"{type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise RowError(f"{where}.{key}", "missing")
        role = message["role"]
        if role not in ROLES:
            raise RowError(f"{where}.role", f"expected one of {list(ROLES)}, got {role!r}")
        content = message["content"]
        if not isinstance(content, str) or (not content and role != "system"):
            got = "an empty string" if content == "" else type_name(content)
            raise RowError(f"{where}.content", f"expected a non-empty string, got {got}")
        if assistant and role != "assistant":
            raise RowError(f"{where}.role", f"a completion holds assistant messages only, "
                                            f"got {role!r}")
    if assistant is False and value[-1]["role"] == "assistant":
        raise RowError(field, "a prompt conversation must end with a user, system or tool "
                              "message, not an assistant one (the model writes the next turn)")


def _field(row: Mapping[str, Any], field: str) -> Any:
    if field not in row:
        raise RowError(field, f"missing (the row has fields {sorted(row)})")
    return row[field]


def _check_fields(row: Mapping[str, Any], roles: Mapping[str, bool | None]) -> None:
    """Each field in ``roles`` a string, or each a conversation (``assistant`` rule per field)."""
    values = {f: _field(row, f) for f in roles}
    kinds = {f: is_conversation(v) for f, v in values.items()}
    if len(set(kinds.values())) > 1:
        conv = [f for f, k in kinds.items() if k]
        text = [f for f, k in kinds.items() if not k]
        # located at the odd one out: the fewer kind, or on a tie the later field's
        odd = min((conv, text), key=lambda fs: (len(fs), -list(roles).index(fs[0])))
        raise RowError(odd[0], f"mixes strings ({text}) with conversations ({conv}); give "
                               "every text field as a string or every one as a list of "
                               "messages")
    for f, value in values.items():
        if kinds[f]:
            _check_conversation(value, f, assistant=roles[f])
        else:
            _check_str(value, f)


# --------------------------------------------------------------------------- validators
def validate_text(row: Mapping[str, Any]) -> None:
    """``{"text": str}``: language modelling on every token."""
    _check_str(_field(row, "text"), "text")


def validate_messages(row: Mapping[str, Any]) -> None:
    """``{"messages": [{"role", "content"}, ...]}``. SFT needs an assistant message (checked
    when encoding); as a prompt, the final assistant turn (if any) is dropped."""
    value = _field(row, "messages")
    if not is_conversation(value):
        raise RowError("messages", f"expected a list of messages, got {type_name(value)}")
    _check_conversation(value, "messages", assistant=None)


def validate_prompt(row: Mapping[str, Any]) -> None:
    """``{"prompt": str | conversation}``; other fields (``answer``, ...) pass through."""
    _check_fields(row, {"prompt": False})


def validate_prompt_completion(row: Mapping[str, Any]) -> None:
    """``{"prompt", "completion"}``: both strings, or a prompt conversation and assistant
    messages."""
    _check_fields(row, {"prompt": False, "completion": True})


def validate_preference(row: Mapping[str, Any]) -> None:
    """``{"prompt"?, "chosen", "rejected"}``: explicit prompt (responses are the assistant's) or
    implicit (whole conversations / texts sharing their prompt as a prefix)."""
    if "prompt" in row:
        _check_fields(row, {"prompt": False, "chosen": True, "rejected": True})
    else:
        _check_fields(row, {"chosen": None, "rejected": None})
        extract_prompt(row["chosen"], row["rejected"])


def validate_unpaired_preference(row: Mapping[str, Any]) -> None:
    """``{"prompt", "completion", "label": bool}``: one response judged good or bad."""
    _check_fields(row, {"prompt": False, "completion": True})
    label = _field(row, "label")
    if not isinstance(label, bool):
        raise RowError("label", f"expected true or false, got {type_name(label)}")


FORMATS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "text": validate_text,
    "messages": validate_messages,
    "prompt": validate_prompt,
    "prompt_completion": validate_prompt_completion,
    "preference": validate_preference,
    "unpaired_preference": validate_unpaired_preference,
}
"""Format name -> validator; a validator raises ``RowError`` on the first bad field of a row."""

_SIGNATURES = (  # (fields that decide the format, format), most specific first
    (("messages",), "messages"),
    (("chosen", "rejected"), "preference"),
    (("completion", "label"), "unpaired_preference"),
    (("completion",), "prompt_completion"),
    (("text",), "text"),
    (("prompt",), "prompt"),
)


def detect_format(row: Mapping[str, Any]) -> str:
    """The format whose fields ``row`` has (see the module table).

    Raises:
      RowError: the fields match no format (a typo such as ``promt`` is named with the row's
        fields and every format's).
    """
    for fields, fmt in _SIGNATURES:
        if all(f in row for f in fields):
            return fmt
    formats = "; ".join("+".join(f) for f, _ in _SIGNATURES)
    raise RowError(None, f"the row's fields {sorted(row)} match no dataset format (field "
                         f"sets: {formats})")


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """``(prompt, chosen_response, rejected_response)`` of an implicit-prompt preference.

    Conversations: the leading messages both share (which must end before an assistant turn).
    Strings: the shared leading characters; a space right before the divergence goes to the
    responses. Both responses must be non-empty and the prompt too.
    """
    if is_conversation(chosen):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, a, b = chosen[:n], chosen[n:], rejected[n:]
        if a and b and any(m.get("role") != "assistant" for m in a + b):
            raise RowError("chosen", "after the shared prompt messages, chosen and rejected "
                                     "must hold assistant messages only")
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
            n -= 1
        prompt, a, b = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        raise RowError("chosen", "chosen and rejected share no prompt prefix; give an explicit "
                                 "'prompt' field")
    if not a or not b:
        raise RowError("rejected" if a else "chosen", "is the other response's prefix: after "
                                                     "the shared prompt one response is empty")
    return prompt, a, b


def preference_parts(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a validated preference row (explicit or implicit)."""
    if "prompt" in row:
        return row["prompt"], row["chosen"], row["rejected"]
    return extract_prompt(row["chosen"], row["rejected"])


def prompt_of(row: Mapping[str, Any], fmt: str) -> Any:
    """The prompt of a validated row of any format but ``text``: a string or a conversation
    ending before the model's turn (a ``messages`` row loses its trailing assistant turns)."""
    if fmt == "messages":
        messages = list(row["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise RowError("messages", "no prompt: the conversation holds assistant messages "
                                       "only")
        return messages
    if fmt == "preference":
        return preference_parts(row)[0]
    if fmt == "text":
        raise RowError("text", "a 'text' row has no prompt; give prompt rows for generation")
    return row["prompt"]
