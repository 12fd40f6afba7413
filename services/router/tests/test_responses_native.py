"""The Responses API forwarded to a provider that speaks it (``responses_api: native``):
what the provider is sent, the usage and finish read from its object and events, and
how its failures are classified (retried, failed over, or the provider's accepted call)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hoosh_router.backends.base import StreamPiece, native_responses
from hoosh_router.backends.factory import build_backend
from hoosh_router.backends.openai_compat import OpenAICompatibleBackend
from hoosh_router.config import ProviderConfig
from hoosh_router.errors import UpstreamError
from pydantic import ValidationError

from bench.upstream import REPLY_WORDS, OpenAIUpstream

from .helpers import params

BODY: dict[str, Any] = {
    "input": "Hello there",
    "instructions": "Be brief.",
    "temperature": 0.5,
    "metadata": {"k": "v"},
    "previous_response_id": "resp_hoosh_1",  # hoosh's id: never the provider's business
    "store": True,
    "pool": "team",
}


def native(up: OpenAIUpstream, mode: str = "native") -> OpenAICompatibleBackend:
    config = ProviderConfig(name="oa", type="openai", base_url=up.base_url, responses_api=mode)  # type: ignore[arg-type]
    backend = build_backend(config, "")
    assert isinstance(backend, OpenAICompatibleBackend)
    return backend


async def test_native_is_off_by_default_and_only_for_the_openai_wire() -> None:
    assert ProviderConfig(name="oa", type="openai").responses_api == "translate"
    backend = build_backend(ProviderConfig(name="oa", type="openai"), "")
    assert native_responses(backend) is None
    await backend.close()
    with pytest.raises(ValidationError, match="OpenAI-compatible"):
        ProviderConfig(name="a", type="anthropic", responses_api="native")


async def test_blocking_body_and_usage(openai_up: OpenAIUpstream) -> None:
    backend = native(openai_up)
    assert native_responses(backend) is backend
    try:
        completion = await backend.respond(dict(BODY), params("native-up", max_tokens=100))
    finally:
        await backend.close()
    sent = openai_up.stats.last_body
    assert sent["model"] == "native-up" and sent["max_output_tokens"] == 100
    assert sent["store"] is False and sent["stream"] is False
    assert "previous_response_id" not in sent and "pool" not in sent
    assert {key: sent[key] for key in ("input", "instructions", "temperature", "metadata")} == {
        key: BODY[key] for key in ("input", "instructions", "temperature", "metadata")
    }
    data = orjson.loads(completion.native)
    assert data["object"] == "response" and data["status"] == "completed"
    assert completion.prompt_tokens == data["usage"]["input_tokens"]
    assert completion.completion_tokens == data["usage"]["output_tokens"] == len(REPLY_WORDS)
    assert completion.finish_reason == "stop"


async def test_a_truncated_answer_is_length_and_a_call_is_tool_calls(openai_up: OpenAIUpstream) -> None:
    backend = native(openai_up)
    try:
        short = await backend.respond({"input": "hi"}, params("native-up", max_tokens=2))
        tools = [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]
        call = await backend.respond({"input": "hi", "tools": tools}, params("native-tool", max_tokens=50))
    finally:
        await backend.close()
    assert short.finish_reason == "length" and short.completion_tokens == 2
    assert call.finish_reason == "tool_calls"
    assert orjson.loads(call.native)["output"][0]["name"] == "weather"


async def test_stream_pieces_carry_every_event(openai_up: OpenAIUpstream) -> None:
    backend = native(openai_up)
    pieces: list[StreamPiece] = []
    try:
        async for piece in backend.respond_stream(dict(BODY), params("native-up", max_tokens=100)):
            pieces.append(piece)
    finally:
        await backend.close()
    assert openai_up.stats.last_body["stream"] is True
    events = [orjson.loads(piece.native or b"") for piece in pieces]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert "".join(piece.content or "" for piece in pieces) == "".join(REPLY_WORDS)
    last = pieces[-1]
    assert last.finish_reason == "stop"
    assert (
        last.completion_tokens == len(REPLY_WORDS)
        and last.prompt_tokens == events[-1]["response"]["usage"]["input_tokens"]
    )


async def test_failures_are_classified_as_for_chat(openai_up: OpenAIUpstream) -> None:
    backend = native(openai_up)
    try:
        with pytest.raises(UpstreamError) as overloaded:
            await backend.respond({"input": "hi"}, params("native-fail-503"))
        assert overloaded.value.retryable and not overloaded.value.accepted
        with pytest.raises(UpstreamError) as cut:
            async for _ in backend.respond_stream({"input": "hi"}, params("native-cut-stream")):
                pass
        assert cut.value.accepted  # the provider had accepted the call: it may bill the prompt
    finally:
        await backend.close()


async def test_a_client_max_output_tokens_above_the_grant_is_clamped(openai_up: OpenAIUpstream) -> None:
    """The edge forwards the client's max_output_tokens; the provider gets the budget's
    grant (what was reserved), not a default the client's value would override."""
    backend = native(openai_up)
    body = {"input": "hi", "max_output_tokens": 100_000}
    try:
        await backend.respond(dict(body), params("native-up", max_tokens=40))
        assert openai_up.stats.last_body["max_output_tokens"] == 40
        async for _ in backend.respond_stream(dict(body), params("native-up", max_tokens=7)):
            pass
        assert openai_up.stats.last_body["max_output_tokens"] == 7
    finally:
        await backend.close()
