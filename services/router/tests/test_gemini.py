"""Google's Gemini API: translation both ways (streaming, function calls and
embeddings included), and the backend against the stand-in that speaks the real
wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh_router.backends.gemini import (
    GeminiBackend,
    GeminiStreamTranslator,
    completion_from_gemini,
    request_to_gemini,
)
from hoosh_router.config import ProviderConfig
from hoosh_router.errors import InvalidRequest, ModelNotFound, UpstreamError

from bench.upstream import REPLY_WORDS, THOUGHT_WORDS, fake_embedding
from bench.upstream_gemini import GeminiUpstream

from .helpers import assistant_call, chat_request, params, system, tool_result, user

# --------------------------------------------------------------------------- OpenAI -> Gemini


def test_roles_system_instruction_and_generation_config() -> None:
    request = chat_request(
        system("Be terse."), user("hi"), chat_pb2.ChatMessage(role="assistant", text="hey"), user("?")
    )
    request.sampling.temperature = 0.25
    request.sampling.top_p = 0.5
    request.sampling.seed = 9
    request.sampling.presence_penalty = 0.5
    request.sampling.frequency_penalty = -0.5
    request.sampling.stop.append("END")
    body = request_to_gemini(request, 200)
    assert body["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "hi"}]},
        {"role": "model", "parts": [{"text": "hey"}]},
        {"role": "user", "parts": [{"text": "?"}]},
    ]
    assert body["generationConfig"] == {
        "maxOutputTokens": 200,
        "temperature": 0.25,
        "topP": 0.5,
        "seed": 9,
        "presencePenalty": 0.5,
        "frequencyPenalty": -0.5,
        "stopSequences": ["END"],
    }


def test_function_calls_and_responses() -> None:
    request = chat_request(
        user("weather?"),
        assistant_call("call_a", "get_weather", '{"city": "Rome"}'),
        tool_result("call_a", '{"temp": 21}'),
        tool_result("call_a", "plain words"),
        tools=True,
    )
    request.tool_choice.mode = chat_pb2.TOOL_CHOICE_MODE_FUNCTION
    request.tool_choice.function_name = "get_weather"
    body = request_to_gemini(request, 10)
    assert body["contents"][1] == {
        "role": "model",
        "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}],
    }
    # Consecutive tool results form one turn; a JSON object stays one, anything else is wrapped.
    assert body["contents"][2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
            {"functionResponse": {"name": "get_weather", "response": {"result": "plain words"}}},
        ],
    }
    declaration = body["tools"][0]["functionDeclarations"][0]
    assert declaration["name"] == "get_weather" and declaration["description"] == "Weather for a city"
    # JSON-Schema keywords Gemini refuses are dropped; the rest is kept.
    assert declaration["parameters"] == {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


def test_a_tool_result_for_an_unknown_call_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="unknown tool_call_id"):
        request_to_gemini(chat_request(user("x"), tool_result("nope", "1")), 10)


def test_images_audio_and_json_mode() -> None:
    message = chat_pb2.ChatMessage(role="user")
    message.parts.parts.add(text="describe")
    message.parts.parts.add(image_url=chat_pb2.ImageUrl(url="data:image/jpeg;base64,/9j/4AAQ"))
    message.parts.parts.add(input_audio=chat_pb2.InputAudio(data="UklGRg==", format="wav"))
    request = chat_request(message)
    request.response_format_json = '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}'
    body = request_to_gemini(request, 10)
    assert body["contents"][0]["parts"] == [
        {"text": "describe"},
        {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
    ]
    assert body["generationConfig"]["responseMimeType"] == "application/json"
    assert body["generationConfig"]["responseJsonSchema"] == {"type": "object"}


# --------------------------------------------------------------------------- Gemini -> OpenAI


def _response(parts: list[dict], finish: str = "STOP", usage: bool = True) -> dict:
    data: dict = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish}]}
    if usage:
        data["usageMetadata"] = {"promptTokenCount": 11, "candidatesTokenCount": 4, "thoughtsTokenCount": 2}
    return data


def test_text_function_call_and_usage() -> None:
    completion = completion_from_gemini(
        "g",
        _response(
            [
                {"text": "thinking...", "thought": True},
                {"text": "Sure."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            ]
        ),
        "gemini-x",
    )
    assert completion.message.text == "Sure."
    call = completion.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    assert completion.finish_reason == "tool_calls"  # STOP with a function call
    assert (completion.prompt_tokens, completion.completion_tokens) == (11, 6)  # thoughts are output


@pytest.mark.parametrize(
    ("reason", "finish"),
    [("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter")],
)
def test_finish_reasons_map(reason: str, finish: str) -> None:
    assert completion_from_gemini("g", _response([{"text": "x"}], reason), "m").finish_reason == finish


def test_a_blocked_prompt_is_content_filter() -> None:
    data = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}}
    completion = completion_from_gemini("g", data, "m")
    assert completion.finish_reason == "content_filter" and completion.message.text == ""


@pytest.mark.parametrize(
    "data",
    [_response([{"text": "x"}], "BANANA"), _response([{"text": "x"}], usage=False), {"candidates": []}, {"x": 1}],
    ids=["unknown-finish", "no-usage", "no-candidates", "garbage"],
)
def test_broken_responses_are_upstream_errors(data: dict) -> None:
    with pytest.raises(UpstreamError):
        completion_from_gemini("g", data, "m")


def test_stream_chunks_become_pieces() -> None:
    translator = GeminiStreamTranslator("g")
    chunks = [
        {"candidates": [{"content": {"parts": [{"text": "Hel"}]}}], "usageMetadata": {"promptTokenCount": 5}},
        {"candidates": [{"content": {"parts": [{"text": "lo"}]}}]},
        {
            "candidates": [
                {
                    "content": {"parts": [{"functionCall": {"name": "f", "args": {"a": 1}, "id": "fc_1"}}]},
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3},
        },
    ]
    pieces = [piece for chunk in chunks for piece in translator.feed(chunk)]
    assert translator.done
    assert "".join(p.content or "" for p in pieces) == "Hello"
    call = next(c for p in pieces for c in p.tool_calls)
    assert (call.index, call.id, call.function.name, call.function.arguments) == (0, "fc_1", "f", '{"a":1}')
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["tool_calls"]
    assert (pieces[-1].prompt_tokens, pieces[-1].completion_tokens) == (5, 3)


def test_thinking_without_thought_parts_is_counted_from_the_usage() -> None:
    """Without includeThoughts there are no thought parts: the chunks' cumulative
    thoughtsTokenCount still surfaces as hidden tokens (what a cut stream pays for)."""
    translator = GeminiStreamTranslator("g")
    chunks = [
        {"candidates": [{"content": {"parts": [{"text": "Hi"}]}}], "usageMetadata": {"thoughtsTokenCount": 120}},
        {"candidates": [{"content": {"parts": [{"text": "!", "thought": True}]}}]},
        {"candidates": [{"content": {"parts": [{"text": " there"}]}}], "usageMetadata": {"thoughtsTokenCount": 150}},
    ]
    pieces = [piece for chunk in chunks for piece in translator.feed(chunk)]
    assert "".join(p.content or "" for p in pieces) == "Hi there"
    assert sum(p.hidden_tokens for p in pieces) == 150


def test_stream_error_chunk() -> None:
    with pytest.raises(UpstreamError) as raised:
        GeminiStreamTranslator("g").feed({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})
    assert raised.value.retryable


# --------------------------------------------------------------------------- against the stand-in


@pytest.fixture
async def backend(gemini_up: GeminiUpstream) -> AsyncIterator[GeminiBackend]:
    made = GeminiBackend(ProviderConfig(name="gemini", type="gemini", base_url=gemini_up.base_url, api_key="g-key"))
    yield made
    await made.close()


async def test_chat_stream_and_tools_against_the_stand_in(backend: GeminiBackend, gemini_up: GeminiUpstream) -> None:
    request = chat_request(system("Be terse."), user("hello there"))
    completion = await backend.chat(request, params("gemini-2.0-flash"))
    assert completion.message.text == "Hello from the upstream stand-in." and completion.finish_reason == "stop"
    assert gemini_up.stats.last_body["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
    pieces = [piece async for piece in backend.stream(request, params("models/gemini-2.0-flash"))]
    assert "".join(p.content or "" for p in pieces) == "Hello from the upstream stand-in."
    assert pieces[-1].completion_tokens == 7
    tool_pieces = [p async for p in backend.stream(chat_request(user("x"), tools=True), params("gemini-tool"))]
    assert [c.function.name for p in tool_pieces for c in p.tool_calls] == ["get_weather"]
    assert [p.finish_reason for p in tool_pieces if p.finish_reason] == ["tool_calls"]
    assert {model.id for model in await backend.list_models()} == {"gemini-2.0-flash", "text-embedding-004"}
    await backend.probe()


async def test_thought_parts_are_counted_as_hidden_tokens_never_as_content(backend: GeminiBackend) -> None:
    pieces = [piece async for piece in backend.stream(chat_request(user("hi")), params("gemini-think"))]
    assert "".join(p.content or "" for p in pieces) == "".join(REPLY_WORDS)
    assert sum(p.hidden_tokens for p in pieces) == len("".join(THOUGHT_WORDS).encode())
    assert pieces[-1].completion_tokens == len(THOUGHT_WORDS) + len(REPLY_WORDS)  # thoughtsTokenCount included


async def test_embeddings_against_the_stand_in(backend: GeminiBackend) -> None:
    result = await backend.embed(["a b", "c"], 4, params("text-embedding-004"))
    assert result.vectors == [pytest.approx(fake_embedding("a b", 4)), pytest.approx(fake_embedding("c", 4))]
    assert result.prompt_tokens is None  # Gemini reports none; the router charges its bound


async def test_a_stream_cut_before_its_finish_reason_is_an_error(backend: GeminiBackend) -> None:
    seen: list[str] = []
    with pytest.raises(UpstreamError):
        async for piece in backend.stream(chat_request(user("hi")), params("gemini-cut-stream")):
            seen.append(piece.content or "")
    assert seen == ["Hello", " from"]


@pytest.mark.parametrize(
    ("model", "error"),
    [("gemini-fail-503", UpstreamError), ("gemini-fail-400", InvalidRequest), ("gemini-odd-finish", UpstreamError)],
)
async def test_failures_map_to_errors(backend: GeminiBackend, model: str, error: type) -> None:
    with pytest.raises(error):
        await backend.chat(chat_request(user("hi")), params(model))


async def test_unknown_route_is_model_not_found(backend: GeminiBackend) -> None:
    with pytest.raises(ModelNotFound) as raised:
        await backend._post("/models/x:nothing", b"{}", "r", 5)
    assert raised.value.fallback  # another provider may know it
