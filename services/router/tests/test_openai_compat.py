"""OpenAI-compatible providers: named types and their default base URLs, per-type
quirks, embeddings, and how HTTP failures are classified (retry / fall back / neither)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh_cli.stack import free_port
from hoosh_router.backends import openai_wire
from hoosh_router.backends.factory import build_backend
from hoosh_router.backends.http import error_from_status
from hoosh_router.backends.openai_compat import OpenAICompatibleBackend
from hoosh_router.config import OPENAI_COMPATIBLE_BASE_URLS, ProviderConfig
from hoosh_router.errors import (
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

from bench.upstream import REPLY_WORDS, THOUGHT_WORDS, OpenAIUpstream, fake_embedding

from .helpers import assistant_call, chat_request, params, system, tool_result, user


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("openai", "https://api.openai.com/v1"),
        ("deepseek", "https://api.deepseek.com/v1"),
        ("mistral", "https://api.mistral.ai/v1"),
        ("groq", "https://api.groq.com/openai/v1"),
        ("xai", "https://api.x.ai/v1"),
        ("openrouter", "https://openrouter.ai/api/v1"),
        ("ollama", "http://127.0.0.1:11434/v1"),
        ("llamacpp", "http://127.0.0.1:8080/v1"),
        ("lmstudio", "http://127.0.0.1:1234/v1"),
        ("localai", "http://127.0.0.1:8080/v1"),
        ("vllm", "http://127.0.0.1:8000/v1"),
        ("anthropic", "https://api.anthropic.com"),
        ("gemini", "https://generativelanguage.googleapis.com/v1beta"),
    ],
)
def test_a_named_type_needs_only_a_key(kind: str, url: str) -> None:
    config = ProviderConfig.model_validate({"name": kind, "type": kind, "api_key": "k"})
    assert config.base_url == url
    assert config.openai_compatible == (kind in OPENAI_COMPATIBLE_BASE_URLS)


def test_an_explicit_base_url_wins() -> None:
    config = ProviderConfig(name="o", type="ollama", base_url="http://gpu-box:11434/v1/")
    assert config.base_url == "http://gpu-box:11434/v1"


@pytest.mark.parametrize(
    ("status", "error", "retryable", "fallback"),
    [
        (400, InvalidRequest, False, False),
        (422, InvalidRequest, False, False),
        (401, UpstreamError, False, True),
        (403, UpstreamError, False, True),
        (404, ModelNotFound, False, True),
        (408, UpstreamError, True, True),
        (429, RateLimited, True, True),
        (500, UpstreamError, True, True),
        (502, UpstreamError, True, True),
        (503, UpstreamError, True, True),
        (529, UpstreamError, True, True),
        (418, UpstreamError, False, True),
    ],
)
def test_statuses_are_classified(status: int, error: type, retryable: bool, fallback: bool) -> None:
    mapped = error_from_status("p", status, b'{"error": {"message": "nope"}}', "3")
    assert type(mapped) is error
    assert (mapped.retryable, mapped.fallback) == (retryable, fallback)
    # A 404 (a model this provider does not know) falls back without counting against its breaker.
    assert mapped.backend_fault == (status != 404 and (retryable or fallback))
    if status == 429:
        assert mapped.retry_after == 3


@pytest.fixture
async def backend(openai_up: OpenAIUpstream) -> AsyncIterator[OpenAICompatibleBackend]:
    made = build_backend(ProviderConfig(name="up", type="openai", base_url=openai_up.base_url, api_key="k"), "")
    assert isinstance(made, OpenAICompatibleBackend)
    yield made
    await made.close()


async def test_mistral_quirks(openai_up: OpenAIUpstream) -> None:
    backend = OpenAICompatibleBackend(ProviderConfig(name="m", type="mistral", base_url=openai_up.base_url))
    try:
        request = chat_request(user("hi"))
        request.sampling.seed = 5
        pieces = [p async for p in backend.stream(request, params("mistral-small"))]
        body = openai_up.stats.last_body
        assert body["random_seed"] == 5 and "seed" not in body and "stream_options" not in body
        assert "".join(p.content or "" for p in pieces) == "Hello from the upstream stand-in."
    finally:
        await backend.close()


async def test_the_standard_body_asks_for_stream_usage(
    backend: OpenAICompatibleBackend, openai_up: OpenAIUpstream
) -> None:
    request = chat_request(user("hi"))
    request.sampling.seed = 5
    pieces = [p async for p in backend.stream(request, params("gpt-x"))]
    assert openai_up.stats.last_body["stream_options"] == {"include_usage": True}
    assert openai_up.stats.last_body["seed"] == 5
    assert pieces[-1].completion_tokens == 7


async def test_embeddings(backend: OpenAICompatibleBackend, openai_up: OpenAIUpstream) -> None:
    result = await backend.embed(["one two", "three"], 6, params("text-embedding-3-small"))
    assert result.vectors == [pytest.approx(fake_embedding("one two", 6)), pytest.approx(fake_embedding("three", 6))]
    assert result.prompt_tokens == 3
    assert openai_up.stats.last_body == {
        "model": "text-embedding-3-small",
        "input": ["one two", "three"],
        "encoding_format": "float",
        "dimensions": 6,
    }


async def test_a_stream_without_done_is_an_error(backend: OpenAICompatibleBackend) -> None:
    with pytest.raises(UpstreamError):
        async for _ in backend.stream(chat_request(user("hi")), params("mock-cut-stream")):
            pass


async def test_an_unreachable_provider_is_unavailable_and_retryable() -> None:
    config = ProviderConfig(name="gone", type="vllm", base_url=f"http://127.0.0.1:{free_port()}/v1")
    backend = OpenAICompatibleBackend(config)
    try:
        with pytest.raises(UpstreamUnavailable) as raised:
            await backend.chat(chat_request(user("hi")), params("m"))
        assert raised.value.retryable and raised.value.fallback
        with pytest.raises(UpstreamUnavailable):
            await backend.probe()
        assert await backend.list_models() == []
    finally:
        await backend.close()


async def test_a_slow_provider_times_out() -> None:
    slow = OpenAIUpstream(latency_ms=2000)
    await slow.start()
    backend = OpenAICompatibleBackend(ProviderConfig(name="slow", type="openai", base_url=slow.base_url))
    try:
        with pytest.raises(UpstreamTimeout) as raised:
            await backend.chat(chat_request(user("hi")), params("m", timeout=0.2))
        assert raised.value.retryable
    finally:
        await backend.close()
        await slow.close()


# --------------------------------------------------------------------------- the OpenAI wire, both ways


def test_request_to_json_carries_everything_set() -> None:
    request = chat_request(
        system("sys"),
        user("hi"),
        assistant_call("c1", "get_weather", '{"city":"Rome"}'),
        tool_result("c1", "ok"),
        tools=True,
    )
    request.sampling.temperature = 0
    request.sampling.stop.append("END")
    request.tool_choice.mode = chat_pb2.TOOL_CHOICE_MODE_REQUIRED
    request.parallel_tool_calls = False
    request.user = "u1"
    request.response_format_json = '{"type": "json_object"}'
    body = openai_wire.request_to_json(request, "gpt-x", 77, stream=True)
    assert body["model"] == "gpt-x" and body["max_tokens"] == 77 and body["temperature"] == 0
    assert body["messages"][2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}
        ],
    }
    assert body["messages"][3] == {"role": "tool", "content": "ok", "tool_call_id": "c1"}
    assert body["tools"][0]["function"]["parameters"]["required"] == ["city"]
    assert (body["tool_choice"], body["parallel_tool_calls"], body["user"]) == ("required", False, "u1")
    assert body["response_format"] == {"type": "json_object"} and body["stop"] == ["END"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "stream" not in openai_wire.request_to_json(request, "gpt-x", 1, stream=False)


def test_replies_and_stream_chunks_from_json(backend: OpenAICompatibleBackend) -> None:
    message = openai_wire.message_from_json(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        }
    )
    assert message.WhichOneof("content") is None and message.tool_calls[0].function.name == "f"
    pieces = backend._pieces(
        b'{"choices": [{"index": 0, "delta": {"content": "Hi", "tool_calls": [{"index": 1, "function": '
        b'{"arguments": "{\\"a"}}]}, "finish_reason": "tool_calls"}], '
        b'"usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
    )
    assert pieces[0].content == "Hi" and pieces[0].finish_reason == "tool_calls"
    assert pieces[0].tool_calls[0].index == 1 and pieces[0].tool_calls[0].function.arguments == '{"a'
    assert (pieces[1].prompt_tokens, pieces[1].completion_tokens) == (3, 2)
    with pytest.raises(UpstreamError, match="finish_reason"):
        backend._pieces(b'{"choices": [{"delta": {}, "finish_reason": "banana"}]}')
    with pytest.raises(UpstreamError, match="malformed"):
        backend._pieces(b"{nope")
    with pytest.raises(UpstreamError, match="mid-stream"):
        backend._pieces(b'{"error": {"message": "overloaded"}}')


async def test_reasoning_content_is_counted_as_hidden_tokens_never_as_content(
    backend: OpenAICompatibleBackend,
) -> None:
    pieces = [piece async for piece in backend.stream(chat_request(user("hi")), params("mock-think"))]
    assert "".join(p.content or "" for p in pieces) == "".join(REPLY_WORDS)
    assert sum(p.hidden_tokens for p in pieces) == len("".join(THOUGHT_WORDS).encode())
    assert pieces[-1].completion_tokens == len(THOUGHT_WORDS) + len(REPLY_WORDS)
    # OpenRouter and Ollama name it "reasoning".
    (piece,) = backend._pieces(b'{"choices": [{"index": 0, "delta": {"reasoning": "abc"}}]}')
    assert (piece.content, piece.hidden_tokens) == (None, 3)


def test_retry_after_is_read_in_both_forms() -> None:
    import email.utils
    import time

    from hoosh_router.backends.http import retry_after_seconds

    assert retry_after_seconds("7") == 7
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 58 <= (retry_after_seconds(in_a_minute) or 0) <= 61
