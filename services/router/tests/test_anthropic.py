"""Anthropic's Messages API: translation both ways (streaming and tool calls
included), and the backend against the stand-in that speaks the real wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh_router.backends.anthropic import (
    AnthropicBackend,
    AnthropicStreamTranslator,
    completion_from_anthropic,
    request_to_anthropic,
)
from hoosh_router.config import ProviderConfig
from hoosh_router.errors import InvalidRequest, RateLimited, UpstreamError

from bench.upstream import REPLY_WORDS, THOUGHT_WORDS
from bench.upstream_anthropic import AnthropicUpstream

from .helpers import assistant_call, chat_request, params, system, tool_result, user

# --------------------------------------------------------------------------- OpenAI -> Anthropic


def test_system_is_lifted_and_max_tokens_always_sent() -> None:
    request = chat_request(
        system("Be terse."),
        chat_pb2.ChatMessage(role="developer", text="Answer in English."),
        user("hello"),
    )
    body = request_to_anthropic(request, "claude-x", 300, stream=False)
    assert body["system"] == "Be terse.\n\nAnswer in English."
    assert body["max_tokens"] == 300
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert "stream" not in body and request_to_anthropic(request, "claude-x", 1, stream=True)["stream"] is True


def test_tool_calls_and_results_become_blocks_in_alternating_turns() -> None:
    request = chat_request(
        user("weather?"),
        assistant_call("call_1", "get_weather", '{"city": "Rome"}', text="Checking."),
        tool_result("call_1", "sunny"),
        assistant_call("call_2", "get_weather", ""),
        tool_result("call_2", '{"temp": 21}'),
        user("thanks"),
        tools=True,
    )
    request.tool_choice.mode = chat_pb2.TOOL_CHOICE_MODE_FUNCTION
    request.tool_choice.function_name = "get_weather"
    request.parallel_tool_calls = False
    body = request_to_anthropic(request, "claude-x", 100, stream=False)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    assert body["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]
    assert body["messages"][3]["content"][0]["input"] == {}  # empty arguments are an empty object
    # The tool result and the next user turn merge into one user turn, results first.
    assert body["messages"][4]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_2", "content": '{"temp": 21}'},
        {"type": "text", "text": "thanks"},
    ]
    tool = body["tools"][0]
    assert tool["name"] == "get_weather" and tool["description"] == "Weather for a city"
    assert tool["input_schema"]["required"] == ["city"]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (chat_pb2.TOOL_CHOICE_MODE_AUTO, {"type": "auto"}),
        (chat_pb2.TOOL_CHOICE_MODE_REQUIRED, {"type": "any"}),
        (chat_pb2.TOOL_CHOICE_MODE_NONE, {"type": "none"}),
        (chat_pb2.TOOL_CHOICE_MODE_UNSPECIFIED, None),
    ],
)
def test_tool_choice_modes(mode: int, expected: dict[str, str] | None) -> None:
    request = chat_request(user("hi"), tools=True)
    request.tool_choice.mode = mode
    assert request_to_anthropic(request, "m", 10, stream=False).get("tool_choice") == expected


def test_sampling_images_and_user() -> None:
    message = chat_pb2.ChatMessage(role="user")
    message.parts.parts.add(text="what is this?")
    message.parts.parts.add(image_url=chat_pb2.ImageUrl(url="data:image/png;base64,iVBORw0KGgo="))
    message.parts.parts.add(image_url=chat_pb2.ImageUrl(url="https://example.com/cat.jpg"))
    request = chat_request(message)
    request.sampling.temperature = 1.7
    request.sampling.top_p = 0.5
    request.sampling.stop.extend(["END", "STOP"])
    request.sampling.seed = 3  # Anthropic has no seed: dropped
    request.user = "alice"
    body = request_to_anthropic(request, "m", 10, stream=False)
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    assert body["temperature"] == 1.0 and body["top_p"] == 0.5
    assert body["stop_sequences"] == ["END", "STOP"] and "seed" not in body
    assert body["metadata"] == {"user_id": "alice"}


def test_audio_and_bad_tool_arguments_are_rejected() -> None:
    message = chat_pb2.ChatMessage(role="user")
    message.parts.parts.add(input_audio=chat_pb2.InputAudio(data="AAAA", format="wav"))
    with pytest.raises(InvalidRequest):
        request_to_anthropic(chat_request(message), "m", 10, stream=False)
    with pytest.raises(InvalidRequest):
        request_to_anthropic(chat_request(user("x"), assistant_call("c", "f", "[1, 2]")), "m", 10, stream=False)


# --------------------------------------------------------------------------- Anthropic -> OpenAI


def test_response_with_text_and_tool_use() -> None:
    data = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "x"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 20,
            "output_tokens": 7,
        },
    }
    completion = completion_from_anthropic("a", data, "fallback")
    assert completion.finish_reason == "tool_calls"
    assert completion.message.text == "Let me check."
    call = completion.message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == ("toolu_1", "function", "get_weather")
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    assert (completion.prompt_tokens, completion.completion_tokens) == (35, 7)
    assert completion.model == "claude-x"


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
    ],
)
def test_stop_reasons_map(stop_reason: str, finish: str) -> None:
    data = {"content": [{"type": "text", "text": "x"}], "stop_reason": stop_reason, "usage": {"output_tokens": 1}}
    assert completion_from_anthropic("a", data, "m").finish_reason == finish


def test_a_tool_only_answer_has_no_content() -> None:
    data = {
        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    assert completion_from_anthropic("a", data, "m").message.WhichOneof("content") is None


@pytest.mark.parametrize(
    "data",
    [
        {"content": [{"type": "text", "text": "x"}], "stop_reason": "banana", "usage": {"output_tokens": 1}},
        {"content": [{"type": "text"}], "stop_reason": "end_turn", "usage": {"output_tokens": 1}},
        {"content": [{"type": "text", "text": "x"}], "stop_reason": "end_turn"},
        {"type": "error", "error": {"type": "api_error", "message": "boom"}},
    ],
    ids=["unknown-stop", "text-missing", "usage-missing", "error-body"],
)
def test_broken_responses_are_upstream_errors(data: dict) -> None:
    with pytest.raises(UpstreamError):
        completion_from_anthropic("a", data, "m")


def test_stream_events_become_pieces() -> None:
    translator = AnthropicStreamTranslator("a")
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}},
        },
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ty": 1}'}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 15}},
        {"type": "some_future_event"},
        {"type": "message_stop"},
    ]
    pieces = [piece for event in events for piece in translator.feed(event)]
    assert translator.done
    assert [p.content for p in pieces if p.content] == ["Hi"]
    calls = [call for p in pieces for call in p.tool_calls]
    assert calls[0].index == 0 and calls[0].id == "toolu_9" and calls[0].function.name == "get_weather"
    assert "".join(call.function.arguments for call in calls) == '{"city": 1}'
    assert all(call.index == 0 for call in calls)  # the first tool call, whatever its block index
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["tool_calls"]
    assert (pieces[-1].prompt_tokens, pieces[-1].completion_tokens) == (25, 15)


def test_stream_error_event_and_malformed_delta() -> None:
    with pytest.raises(UpstreamError) as raised:
        AnthropicStreamTranslator("a").feed({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert raised.value.retryable
    with pytest.raises(UpstreamError) as raised:
        AnthropicStreamTranslator("a").feed({"type": "error", "error": {"type": "invalid_request_error"}})
    assert not raised.value.retryable
    with pytest.raises(UpstreamError, match="malformed"):
        AnthropicStreamTranslator("a").feed(
            {"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": "{"}}
        )
    with pytest.raises(UpstreamError, match="stop_reason"):
        AnthropicStreamTranslator("a").feed({"type": "message_delta", "delta": {"stop_reason": "banana"}})


# --------------------------------------------------------------------------- against the stand-in


@pytest.fixture
async def backend(anthropic_up: AnthropicUpstream) -> AsyncIterator[AnthropicBackend]:
    config = ProviderConfig(name="anthropic", type="anthropic", base_url=anthropic_up.base_url, api_key="sk-ant")
    made = AnthropicBackend(config)
    yield made
    await made.close()


async def test_chat_and_stream_against_the_stand_in(backend: AnthropicBackend, anthropic_up: AnthropicUpstream) -> None:
    request = chat_request(system("Be terse."), user("hello there"), tools=True)
    completion = await backend.chat(request, params("claude-tool"))
    assert completion.finish_reason == "tool_calls" and completion.message.tool_calls[0].function.name == "get_weather"
    assert anthropic_up.stats.last_body["system"] == "Be terse."
    pieces = [piece async for piece in backend.stream(request, params("claude-plain", max_tokens=3))]
    assert "".join(p.content or "" for p in pieces) == "Hello from the"
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["length"]
    assert pieces[-1].completion_tokens == 3
    models = await backend.list_models()
    assert models[0].id == "claude-3-5-haiku-20241022" and models[0].created > 0
    await backend.probe()


@pytest.mark.parametrize(
    ("model", "error", "retryable"),
    [
        ("claude-fail-503", UpstreamError, True),
        ("claude-fail-400", InvalidRequest, False),
        ("claude-fail-429", RateLimited, True),
        ("claude-bad-json", UpstreamError, False),
        ("claude-odd-finish", UpstreamError, False),
    ],
)
async def test_failures_map_to_errors(backend: AnthropicBackend, model: str, error: type, retryable: bool) -> None:
    with pytest.raises(error) as raised:
        await backend.chat(chat_request(user("hi")), params(model))
    assert raised.value.retryable is retryable
    if error is RateLimited:
        assert raised.value.retry_after == 1


async def test_a_cut_stream_raises_after_its_tokens(backend: AnthropicBackend) -> None:
    seen: list[str] = []
    with pytest.raises(UpstreamError):
        async for piece in backend.stream(chat_request(user("hi")), params("claude-cut-stream")):
            if piece.content:
                seen.append(piece.content)
    assert seen == ["Hello", " from"]


async def test_thinking_is_counted_as_hidden_tokens_never_as_content(backend: AnthropicBackend) -> None:
    pieces = [piece async for piece in backend.stream(chat_request(user("hi")), params("claude-think", 100))]
    assert "".join(p.content or "" for p in pieces) == "".join(REPLY_WORDS)
    assert sum(p.hidden_tokens for p in pieces) == len("".join(THOUGHT_WORDS).encode())
    assert pieces[-1].completion_tokens == len(THOUGHT_WORDS) + len(REPLY_WORDS)  # usage counts the thinking


def test_thinking_and_redacted_thinking_blocks_are_hidden_tokens() -> None:
    translator = AnthropicStreamTranslator("a")
    events = [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "héllo"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "Zm9v"}},
    ]
    pieces = [piece for event in events for piece in translator.feed(event)]
    assert [(p.content, p.hidden_tokens) for p in pieces] == [(None, 6), (None, 4)]


async def test_missing_key_is_a_credentials_error(anthropic_up: AnthropicUpstream) -> None:
    config = ProviderConfig(name="anthropic", type="anthropic", base_url=anthropic_up.base_url)
    backend = AnthropicBackend(config)
    try:
        with pytest.raises(UpstreamError, match="credentials"):
            await backend.chat(chat_request(user("hi")), params("claude-x"))
    finally:
        await backend.close()
