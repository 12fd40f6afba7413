"""The request model accepts OpenAI's shapes and refuses what the spec refuses."""

from __future__ import annotations

from typing import Any

import pytest
from hoosh_edge.protocol import (
    AssistantMessage,
    AudioPart,
    ChatCompletionRequest,
    ImagePart,
    NamedToolChoice,
    RefusalPart,
    TextPart,
    ToolMessage,
)
from pydantic import ValidationError

USER = {"role": "user", "content": "hi"}


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [USER], **fields})


def test_minimal_request_has_defaults() -> None:
    req = request()
    assert req.pool is None  # the edge charges the key's default pool
    assert req.stream is False
    assert req.effective_max_tokens is None
    assert req.include_usage is False


def test_assistant_content_null_with_openai_tool_calls() -> None:
    req = request(
        messages=[
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ]
    )
    assistant = req.messages[1]
    assert isinstance(assistant, AssistantMessage)
    assert assistant.content is None
    assert assistant.tool_calls is not None and assistant.tool_calls[0].function.arguments == '{"a": 1}'
    tool = req.messages[2]
    assert isinstance(tool, ToolMessage) and tool.tool_call_id == "call_1"


def test_array_content_parts() -> None:
    req = request(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
            {
                "role": "user",
                "name": "ann",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                ],
            },
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        ]
    )
    parts = req.messages[1].content
    assert isinstance(parts, list)
    assert [type(part) for part in parts] == [TextPart, ImagePart, AudioPart]
    assert isinstance(req.messages[2].content, list) and isinstance(req.messages[2].content[0], RefusalPart)


@pytest.mark.parametrize("choice", ["none", "auto", "required"])
def test_tool_choice_strings(choice: str) -> None:
    assert request(tool_choice=choice).tool_choice == choice


def test_tool_choice_object_and_tools() -> None:
    req = request(
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "strict": True,
                },
            }
        ],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    assert isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name == "get_weather"
    assert req.tools is not None and req.tools[0].function.strict is True


@pytest.mark.parametrize(("stop", "expected"), [("\n", "\n"), (["a", "b"], ["a", "b"]), (None, None)])
def test_stop_string_or_list(stop: Any, expected: Any) -> None:
    assert request(stop=stop).stop == expected


def test_max_completion_tokens_wins() -> None:
    assert request(max_tokens=10, max_completion_tokens=20).effective_max_tokens == 20
    assert request(max_tokens=10).effective_max_tokens == 10


def test_unknown_fields_are_ignored() -> None:
    req = request(logit_bias={"1": 2}, store=True, metadata={"a": "b"})
    assert not hasattr(req, "logit_bias")


def test_include_usage_needs_stream() -> None:
    assert request(stream=True, stream_options={"include_usage": True}).include_usage is True
    with pytest.raises(ValidationError):
        request(stream_options={"include_usage": True})


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 2},
        {"temperature": 2.5},
        {"top_p": -0.1},
        {"presence_penalty": 3},
        {"frequency_penalty": -2.1},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"max_tokens": 0},
        {"model": ""},
        {"messages": []},
        {"messages": [{"role": "assistant"}]},
        {"messages": [{"role": "function", "name": "f", "content": "x"}]},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
        {"messages": [{"role": "user", "content": []}]},
        {"tools": [{"type": "custom", "custom": {"name": "x"}}]},
        {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        {"tool_choice": "sometimes"},
        {"response_format": {"type": "yaml"}},
        {"pool": ""},
    ],
)
def test_spec_violations_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        request(**fields)
