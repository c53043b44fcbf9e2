"""vLLM request fields pied does not implement: declared on the request structs (so that they are
not dropped unseen, as unknown fields are) and refused here with a 400 naming the field, unless the
request sends the value that means "off". Every other field of vLLM's chat and text completion
requests is honoured; ``tests/test_request_fields.py`` walks vLLM's list.
"""

from __future__ import annotations

from typing import Any

from pied.api.errors import bad_request

# field -> (values that mean "off", why it is refused)
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((None, False), "beam search is not supported"),
    "length_penalty": ((None, 1, 1.0), "length_penalty applies to beam search, which is not supported"),
    "spaces_between_special_tokens": ((None, True), "detokenizing without spaces between special tokens is not supported"),
    "priority": ((None, 0), "priority scheduling is not supported"),
    "request_id": ((None,), "client-chosen request ids are not supported"),
    "logits_processors": ((None, []), "custom logits processors are not supported (pied runs no request code)"),
    "return_tokens_as_token_ids": ((None, False), "return_tokens_as_token_ids is not supported"),
    "return_token_ids": ((None, False), "return_token_ids is not supported"),
    "cache_salt": ((None,), "prefix cache salting is not supported"),
    "kv_transfer_params": ((None,), "disaggregated serving is not supported"),
    "vllm_xargs": ((None, {}), "vllm_xargs is not supported"),
    "mm_processor_kwargs": ((None, {}), "multimodal inputs are not supported"),
    "prompt_embeds": ((None,), "prompt embeddings are not supported"),
    "structural_tag": ((None,), "structural tags are not supported; use structured_outputs or response_format"),
    "guided_whitespace_pattern": ((None,), "a custom JSON whitespace pattern is not supported"),
    "chat_template": ((None,), "a request may not supply its own chat template (it would run request code)"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported"),
    "thinking_token_budget": ((None,), "thinking_token_budget is not supported"),
    "echo": ((None, False), "echo is not supported for chat completions"),
    "best_of": ((None, 1), "best_of is not supported for chat completions"),
}


def check_unsupported(body: Any, honoured: tuple[str, ...] = ()) -> None:
    """A 400 for the first unsupported field the request sets to something other than "off"
    (``honoured``: fields this endpoint implements, e.g. echo for text completions)."""
    for name, (off, why) in UNSUPPORTED.items():
        if name in honoured:
            continue
        value = getattr(body, name, None)
        if not any(value is neutral or (type(value) is type(neutral) and value == neutral) for neutral in off):
            raise bad_request(f"{name}: {why}.", name)
