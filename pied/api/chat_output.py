"""A chat completion's output text as the message OpenAI clients expect: ``reasoning_content``
split off by ``--reasoning-parser``, then ``tool_calls`` parsed by ``--tool-call-parser`` (tool_choice
auto) or read from the output that structured output forced (tool_choice required or named)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pied.api.protocol import ChatResponseMessage, DeltaMessage
from pied.api.reasoning import ReasoningStream, split_reasoning
from pied.api.structured import ToolChoice
from pied.api.tool_parsers import ToolCallStream, forced_tool_calls, parse_tool_calls


@dataclass(frozen=True)
class ChatOutputFormat:
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    tool_choice: ToolChoice = "none"
    include_reasoning: bool = True
    parallel_tool_calls: bool = True

    @property
    def forced_tools(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, dict)

    @property
    def auto_tools(self) -> bool:
        return self.tool_choice == "auto" and self.tool_call_parser is not None

    def _calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return calls[:1] if not self.parallel_tool_calls else calls

    def message(self, text: str, finish_reason: str | None) -> tuple[ChatResponseMessage, str | None]:
        """The whole message, and the finish reason (``tool_calls`` when it called tools)."""
        reasoning: Any = None
        content: str | None = text
        if self.reasoning_parser is not None:
            reasoning, content = split_reasoning(self.reasoning_parser, text)
        calls: list[dict[str, Any]] = []
        if self.forced_tools:
            calls, content = forced_tool_calls(self.tool_choice, content or ""), None
        elif self.auto_tools:
            content, calls = parse_tool_calls(self.tool_call_parser, content or "")  # type: ignore[arg-type]
        calls = self._calls(calls)
        message = ChatResponseMessage(content=content, tool_calls=calls)
        if self.reasoning_parser is not None:
            message.reasoning_content = reasoning if self.include_reasoning else None
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return message, finish_reason

    def stream(self) -> ChatOutputStream:
        return ChatOutputStream(self)


@dataclass
class ChatOutputStream:
    """One choice's streamed deltas through the same parsers."""

    format: ChatOutputFormat
    reasoning: ReasoningStream | None = None
    tools: ToolCallStream | None = None
    forced_text: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.format.reasoning_parser is not None:
            self.reasoning = ReasoningStream(self.format.reasoning_parser)
        if self.format.auto_tools:
            self.tools = ToolCallStream(
                self.format.tool_call_parser,  # type: ignore[arg-type]
                max_calls=None if self.format.parallel_tool_calls else 1,
            )

    def feed(self, text: str, finish_reason: str | None) -> tuple[DeltaMessage, str | None]:
        """The delta for ``text`` (empty fields are None), and the finish reason to send."""
        final = finish_reason is not None
        reasoning, content = "", text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text, final)
            if not self.format.include_reasoning:
                reasoning = ""
        call_deltas: list[dict[str, Any]] = []
        if self.format.forced_tools:
            self.forced_text.append(content)
            content = ""
            if final:
                calls = self.format._calls(forced_tool_calls(self.format.tool_choice, "".join(self.forced_text)))
                call_deltas = [{"index": i, **call} for i, call in enumerate(calls)]
        elif self.tools is not None:
            # Auto tool calls stream as they are written: a call's name, then its arguments.
            content, call_deltas = self.tools.feed(content)
            if final:
                rest, last = self.tools.finish()
                content += rest
                call_deltas += last
        if final and finish_reason == "stop" and self._called(call_deltas):
            finish_reason = "tool_calls"
        delta = DeltaMessage(
            content=content or None,
            reasoning_content=reasoning or None,
            tool_calls=call_deltas or None,
        )
        return delta, finish_reason

    def _called(self, call_deltas: list[dict[str, Any]]) -> bool:
        return bool(call_deltas) or (self.tools is not None and bool(self.tools.sent))
