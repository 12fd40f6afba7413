"""Builders shared by the router's unit tests."""

from __future__ import annotations

from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2
from hoosh_router.backends.base import CallParams

WEATHER_SCHEMA = (
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], '
    '"additionalProperties": false, "$schema": "http://json-schema.org/draft-07/schema#"}'
)


def params(model: str, max_tokens: int = 64, timeout: float = 10.0) -> CallParams:
    return CallParams(upstream_model=model, max_tokens=max_tokens, request_id="req-test", timeout=timeout)


def chat_request(*messages: chat_pb2.ChatMessage, model: str = "m", tools: bool = False) -> router_pb2.ChatRequest:
    request = router_pb2.ChatRequest(model=model, messages=list(messages) or [user("hi there")])
    if tools:
        request.tools.add(
            type="function",
            function=chat_pb2.FunctionDefinition(
                name="get_weather", description="Weather for a city", parameters_json=WEATHER_SCHEMA
            ),
        )
    return request


def user(text: str) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(role="user", text=text)


def system(text: str) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(role="system", text=text)


def assistant_call(call_id: str, name: str, arguments: str, text: str | None = None) -> chat_pb2.ChatMessage:
    message = chat_pb2.ChatMessage(role="assistant")
    if text is not None:
        message.text = text
    message.tool_calls.add(id=call_id, type="function", function=chat_pb2.FunctionCall(name=name, arguments=arguments))
    return message


def tool_result(call_id: str, text: str) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(role="tool", tool_call_id=call_id, text=text)
