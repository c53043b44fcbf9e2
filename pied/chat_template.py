"""Chat templates applied as transformers applies them: ``--chat-template`` loaded, a template checked,
a conversation rendered into a prompt (``continue_final_message`` included), every failure a
:class:`ChatTemplateError`. The render itself runs in the sandbox of ``pied/template_sandbox.py``.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2.exceptions import SecurityError, TemplateSyntaxError

from pied.template_sandbox import (
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_TIMEOUT_S,
    LimitExceeded,
    TemplateRaised,
    compile_template,
    render,
)

# vLLM's rule for --chat-template: a value with none of these characters is meant as a file name.
_JINJA_CHARACTERS = "{}\n"


class ChatTemplateError(ValueError):
    """A chat template that cannot be loaded or rendered; the message says why."""


# ---------------------------------------------------------------- what templates see


def _plain(value: Any) -> Any:
    """Only plain JSON-like data reaches a template (as transformers does): a rich object's methods
    are outside what the sandbox knows to be safe. Anything else becomes an inert placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    to_builtins = getattr(type(value), "__struct_fields__", None)
    if to_builtins is not None:  # a msgspec Struct
        return {name: _plain(getattr(value, name)) for name in to_builtins}
    return f"<{type(value).__name__}>"


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


# ---------------------------------------------------------------- public API


def load_chat_template(value: str | os.PathLike[str]) -> str:
    """``--chat-template``: the contents of a file, or the value itself when it is a template.

    vLLM's rule: a value that cannot be opened but contains ``{``, ``}`` or a newline is the
    template itself (with backslash escapes such as ``\\n`` decoded); otherwise it was meant as a
    file and the error names it.
    """
    path = Path(value)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        if isinstance(value, os.PathLike) or not any(c in value for c in _JINJA_CHARACTERS):
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise ChatTemplateError(f"cannot read the chat template file {str(value)!r}: {reason}.") from None
    literal = str(value)
    # Decode escapes typed on a command line; non-Latin-1 text survives as \\u escapes first.
    return codecs.decode(literal.encode("latin-1", "backslashreplace"), "unicode_escape")


def check_chat_template(source: str) -> None:
    """Raise :class:`ChatTemplateError` if ``source`` is not valid Jinja (for loading at start)."""
    try:
        compile_template(source)
    except TemplateSyntaxError as error:
        raise ChatTemplateError(_syntax_message(error)) from None


def _syntax_message(error: TemplateSyntaxError) -> str:
    return f"the chat template is not valid Jinja (line {error.lineno}): {error.message}"


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    /,
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
    variables: Mapping[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
) -> str:
    """Render ``template`` for one conversation, as transformers' ``apply_chat_template`` does.

    ``variables`` are extra template variables (special tokens such as ``bos_token``,
    ``chat_template_kwargs`` such as ``enable_thinking``); they come apart from the limits, so a
    request's variables cannot lift them. With ``continue_final_message`` the prompt ends inside
    the last message, so the model continues it (incompatible with ``add_generation_prompt``).
    Raises :class:`ChatTemplateError` for any failure, including a render that takes longer than
    ``timeout_s`` or builds more than ``max_output_chars``.
    """
    variables = dict(variables or {})
    shadowed = sorted(set(variables) & {"messages", "tools", "documents", "add_generation_prompt"})
    if shadowed:
        raise ChatTemplateError(f"extra chat template variables cannot set {', '.join(shadowed)}.")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true.")
    messages = _plain(list(messages))
    if any(not isinstance(message, dict) for message in messages):
        raise ChatTemplateError("every chat message must be an object with a role and content.")
    final_content: str | None = None
    if continue_final_message:
        final_content = _tag_final_message(messages)

    try:
        rendered = render(
            template,
            {
                "messages": messages,
                "tools": _plain(tools),
                "documents": _plain(documents),
                "add_generation_prompt": add_generation_prompt,
                **_plain(variables),
            },
            timeout_s,
            max_output_chars,
        )
    except LimitExceeded as error:
        raise ChatTemplateError(str(error)) from None
    except TemplateSyntaxError as error:
        raise ChatTemplateError(_syntax_message(error)) from None
    except TemplateRaised as error:
        raise ChatTemplateError(error.message or "the chat template raised an exception.") from None
    except SecurityError as error:
        raise ChatTemplateError(f"the chat template tried something unsafe: {error}") from None
    except RecursionError:
        raise ChatTemplateError("the chat template recursed too deeply.") from None
    except MemoryError:
        raise ChatTemplateError("the chat template ran out of memory.") from None
    except Exception as error:  # anything a template can raise: a TypeError, a missing include, ...
        raise ChatTemplateError(f"the chat template failed: {type(error).__name__}: {error}") from None

    if final_content is not None:
        rendered = _cut_at_tag(rendered, final_content)
    return rendered


def _tag_final_message(messages: list[dict[str, Any]]) -> str:
    """Mark the end of the last message's text, to cut the render there (transformers' approach)."""
    if not messages:
        raise ChatTemplateError("continue_final_message needs a message to continue.")
    final = messages[-1]
    content = final.get("content")
    if isinstance(content, str):
        final["content"] = content + _CONTINUE_TAG
        return content
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                return text
    raise ChatTemplateError("continue_final_message is set but the final message has no text to continue.")


def _cut_at_tag(rendered: str, final_content: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in rendered or final_content.strip() not in rendered:
        raise ChatTemplateError(
            "continue_final_message is set but the chat template does not render the final message's text."
        )
    position = rendered.rindex(tag)
    if rendered[position : position + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:position]
    # The template trimmed the tag's trailing space, so it may have trimmed the message too.
    return rendered[:position].rstrip()
