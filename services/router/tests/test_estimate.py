"""The prompt bound a reservation holds when the backend cannot count tokens: it counts
every text the request sends upstream, in every dialect."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from hoosh.chat.v1 import chat_pb2
from hoosh_router.backends import openai_wire
from hoosh_router.backends.anthropic import request_to_anthropic
from hoosh_router.backends.gemini import request_to_gemini
from hoosh_router.estimate import IMAGE_PART_TOKENS, audio_token_bound, prompt_token_bound

from .helpers import assistant_call, chat_request, system, tool_result, user

SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "description": "A summary of the conversation, " * 40},
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
    },
    "required": ["summary", "sentiment"],
}


def text_bytes(value: Any) -> int:
    """The UTF-8 bytes of every string value in a JSON body (keys and punctuation aside)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(text_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(text_bytes(item) for item in value.values())
    return 0


def everything() -> Any:
    request = chat_request(
        system("Answer as JSON."),
        user("Summarise our chat, please; ünïcödé counts by its bytes."),
        assistant_call("call_0123456789", "get_weather", '{"city": "Paris", "units": "metric"}'),
        tool_result("call_0123456789", "sunny, 21 degrees"),
        model="m",
        tools=True,
    )
    request.messages[1].name = "alice"
    request.tool_choice.mode = chat_pb2.TOOL_CHOICE_MODE_FUNCTION
    request.tool_choice.function_name = "get_weather"
    request.response_format_json = orjson.dumps(
        {"type": "json_schema", "json_schema": {"name": "summary", "schema": SCHEMA, "strict": True}}
    ).decode()
    request.sampling.stop.extend(["END OF ANSWER", "STOP"])
    request.user = "user-7f3a"
    return request


def test_the_bound_covers_every_text_each_dialect_sends() -> None:
    request = everything()
    bound = prompt_token_bound(request)
    bodies = {
        "openai": openai_wire.request_to_json(request, "m", 100, stream=True),
        "anthropic": request_to_anthropic(request, "m", 100, stream=True),
        "gemini": request_to_gemini(request, 100),
    }
    for dialect, body in bodies.items():
        sent = text_bytes({key: value for key, value in body.items() if key != "model"})
        assert bound >= sent, dialect


def test_the_response_format_and_the_tool_schemas_count() -> None:
    request = everything()
    without = chat_request(*request.messages, model="m", tools=True)
    without.tool_choice.CopyFrom(request.tool_choice)
    without.sampling.CopyFrom(request.sampling)
    without.user = request.user
    assert prompt_token_bound(request) - prompt_token_bound(without) == len(request.response_format_json.encode())
    no_tools = chat_request(*request.messages, model="m")
    assert prompt_token_bound(without) - prompt_token_bound(no_tools) > len(without.tools[0].function.parameters_json)


def test_audio_counts_by_its_longest_duration() -> None:
    minute_of_mp3 = base64.b64encode(b"\0" * 60 * 16_000).decode()  # a minute at 128 kbit/s
    message = chat_pb2.ChatMessage(role="user")
    message.parts.parts.add(input_audio=chat_pb2.InputAudio(data=minute_of_mp3, format="mp3"))
    bound = prompt_token_bound(chat_request(message))
    assert audio_token_bound(minute_of_mp3, "mp3") > IMAGE_PART_TOKENS
    assert bound >= audio_token_bound(minute_of_mp3, "mp3") >= 60 * 32  # at least a minute at 32 tokens a second
