"""A provider is trusted to speak its API, not to be small, quick or well-behaved: every
backend call is bounded in memory and in time, and model ids cannot reshape a URL.

- a 10 MB single-line stream event is refused (502, ``upstream_error``) after at most
  ``max_event_bytes`` were held; the tokens already streamed are paid for, the
  connection is closed, the pump task ends;
- a stream that trickles a byte at a time and never ends is cut at the provider's
  ``stream_timeout_seconds`` (504, ``upstream_timeout``) and settled; a silent one at
  ``read_timeout_seconds``;
- a huge non-streamed answer (declared or not) and a huge error body are bounded reads;
- model ids with ``/``, ``..``, ``?`` or spaces never change the URL called, for every
  provider kind (the local worker's included).

Providers are the bench stand-ins (their real wire formats), with the hostile
behaviours added here by model name; the local worker is an in-process gRPC stand-in.
The settlement tests run the whole chat path against the real Redis and NATS."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
import pytest
import redis.asyncio as redis
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh.router.v1 import router_pb2
from hoosh_cli.stack import free_port
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.pools import BudgetStore
from hoosh_router.backends.base import Backend
from hoosh_router.backends.factory import build_backend
from hoosh_router.backends.http import embedding_response_limit, iter_lines, iter_sse
from hoosh_router.budget_client import RouterBudget
from hoosh_router.cache import ResponseCache
from hoosh_router.chat import ChatService
from hoosh_router.config import MAX_EVENT_BYTES, MAX_RESPONSE_BYTES, Catalogue, ProviderConfig
from hoosh_router.dispatch import Dispatcher, RetryPolicy
from hoosh_router.errors import InvalidRequest, RouterError, UpstreamError, UpstreamTimeout
from hoosh_router.estimate import prompt_token_bound
from hoosh_router.health import HealthBoard
from hoosh_router.ratelimit import RateLimiter
from hoosh_router.recording import Recorder
from hoosh_router.routing import ModelRouter

from bench.upstream import ChunkedWriter, OpenAIUpstream, StandIn
from bench.upstream_anthropic import AnthropicUpstream
from bench.upstream_gemini import GeminiUpstream

from .conftest import Bus
from .helpers import chat_request, params, user

TEN_MB = 10 * 1024 * 1024
TRICKLE_GAP = 0.1  # seconds between two bytes of a trickling stream
HANG_LIMIT = 20.0  # the longest a hostile stand-in keeps a connection on its own
FIRST_TEXT = "Hi"  # the one piece of text a hostile stream sends before misbehaving

# --------------------------------------------------------------------------- hostile stand-ins


def _first_events(dialect: str, model: str) -> bytes:
    """The start of a stream, in the dialect's wire format, up to one text piece (FIRST_TEXT)."""
    if dialect == "openai":
        chunk = {
            "id": "chatcmpl-hostile",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": FIRST_TEXT}, "finish_reason": None}],
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"
    if dialect == "anthropic":
        message = {
            "id": "msg_hostile",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 5, "output_tokens": 1},
        }
        events = [
            ("message_start", {"message": message}),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": FIRST_TEXT}}),
        ]
        return b"".join(
            f"event: {name}\n".encode() + b"data: " + orjson.dumps({"type": name, **payload}) + b"\n\n"
            for name, payload in events
        )
    chunk = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": FIRST_TEXT}]}, "index": 0}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1, "totalTokenCount": 6},
        "modelVersion": model,
    }
    return b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"


def _one_chunk(data: bytes) -> bytes:
    """``data`` as a whole HTTP/1.1 chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"


def _huge_line() -> bytes:
    """One 10 MB server-sent event on a single line (valid JSON, as a provider might send)."""
    return b'data: {"text": "' + b"x" * TEN_MB + b'"}\n\n'


class Hostile:
    """Mixed into a bench stand-in: records each request's target, counts open
    connections, and adds behaviours chosen by the model name:

      *huge-line*    streams FIRST_TEXT, then one 10 MB line
      *huge-first*   streams one 10 MB line first
      *trickle*      streams FIRST_TEXT, then one byte every TRICKLE_GAP, never ending a line
      *drip-early*   streams nothing whole: one byte every TRICKLE_GAP from the start
      *silent*       streams FIRST_TEXT, then sends nothing more
      *huge-body*    a 10 MB non-streamed answer (chunked: no declared length)
      *huge-length*  declares a 64 MiB answer, then sends it slowly
      *huge-error*   503 with a 10 MB body
      *set-cookie*   a small chat answer (OpenAI's shape) that sets a cookie
    """

    dialect = ""
    behaviours = (
        "huge-line",
        "huge-first",
        "trickle",
        "drip-early",
        "silent",
        "huge-body",
        "huge-length",
        "huge-error",
        "set-cookie",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.targets: list[str] = []
        self.cookies: list[str] = []  # each request's Cookie header ("" when none)
        self.connections = 0
        self._handlers: set[asyncio.Task[Any]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            await super()._handle(reader, writer)  # type: ignore[misc]
        finally:
            self.connections -= 1
            self._handlers.discard(task)

    async def close(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await super().close()  # type: ignore[misc]

    def model_of(self, path: str, body: bytes) -> str:
        try:
            return str(orjson.loads(body).get("model", ""))
        except (orjson.JSONDecodeError, AttributeError):
            return ""

    async def route(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        self.targets.append(f"{path}?{query}" if query else path)
        self.cookies.append(headers.get("cookie", ""))
        model = self.model_of(path, body)
        behaviour = next((name for name in self.behaviours if name in model), None)
        if behaviour is None or method != "POST":
            return await super().route(method, path, query, headers, body, writer)  # type: ignore[misc, no-any-return]
        self.count(model, {})  # type: ignore[attr-defined]
        try:
            await self._misbehave(behaviour, model, writer)
        except ConnectionError:
            pass  # the router hung up: what it should do
        return False

    async def _misbehave(self, behaviour: str, model: str, writer: asyncio.StreamWriter) -> None:
        deadline = time.monotonic() + HANG_LIMIT
        if behaviour == "set-cookie":
            answer = orjson.dumps(
                {
                    "id": "chatcmpl-cookie",
                    "object": "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                }
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + b"Set-Cookie: session=tenant-a; Path=/\r\nConnection: close\r\n"
                + f"Content-Length: {len(answer)}\r\n\r\n".encode()
                + answer
            )
            await writer.drain()
            return
        if behaviour == "huge-body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(_one_chunk(b'{"choices": [{"message": {"content": "' + b"x" * TEN_MB + b'"}}]}'))
            await writer.drain()
            return
        if behaviour == "huge-length":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {64 * 1024 * 1024}\r\n\r\n".encode()
            )
            while time.monotonic() < deadline and not writer.is_closing():
                writer.write(b" " * 1024)
                await writer.drain()
                await asyncio.sleep(TRICKLE_GAP)
            return
        if behaviour == "huge-error":
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            writer.write(_one_chunk(b"overloaded " + b"x" * TEN_MB))
            await writer.drain()
            return
        out = ChunkedWriter(writer)
        if behaviour != "drip-early" and behaviour != "huge-first":
            out.raw(_first_events(self.dialect, model))
            await writer.drain()
        if behaviour in ("huge-line", "huge-first"):
            out.raw(_huge_line())
            await writer.drain()
            await out.end()
            return
        if behaviour == "silent":
            await asyncio.sleep(HANG_LIMIT)  # cancelled by close() if still here
            return
        # trickle / drip-early: the start of a data line, a byte at a time, never ended
        line = b"data: " + b"z" * 1_000_000
        for byte in line:
            if time.monotonic() > deadline or writer.is_closing():
                return
            out.raw(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(TRICKLE_GAP)


class HostileOpenAI(Hostile, OpenAIUpstream):
    dialect = "openai"


class HostileAnthropic(Hostile, AnthropicUpstream):
    dialect = "anthropic"


class HostileGemini(Hostile, GeminiUpstream):
    dialect = "gemini"

    def model_of(self, path: str, body: bytes) -> str:
        return path.removeprefix("/v1beta/models/").partition(":")[0]


STAND_INS: dict[str, type[StandIn]] = {"openai": HostileOpenAI, "anthropic": HostileAnthropic, "gemini": HostileGemini}
DIALECTS = list(STAND_INS)


@pytest.fixture(params=DIALECTS)
async def hostile(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    up = STAND_INS[request.param]()
    await up.start()
    yield up
    await up.close()


def provider_settings(up: Any, **settings: Any) -> dict[str, Any]:
    """The catalogue entry of a provider served by the stand-in ``up``."""
    return {
        "name": up.dialect,
        "type": up.dialect,
        "base_url": up.base_url,
        "api_key": "k",
        "models": ["*"],
        **settings,
    }


def provider_for(up: Any, **settings: Any) -> ProviderConfig:
    return ProviderConfig.model_validate(provider_settings(up, **settings))


async def wait_for(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


def pumps() -> list[asyncio.Task[Any]]:
    """Stream pump tasks still running (streaming.UpstreamStream)."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__qualname__", "").endswith("UpstreamStream._pump")
    ]


# --------------------------------------------------------------------------- the line and event readers


class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


class _Response:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = _Content(chunks)


async def lines_of(chunks: list[bytes], limit: int = 1024) -> list[bytes]:
    return [line async for line in iter_lines(_Response(chunks), limit, "p")]  # type: ignore[arg-type]


async def test_lines_are_split_across_reads_and_ends() -> None:
    assert await lines_of([b"ab", b"c\nde", b"f\r\n\ng", b"h"]) == [b"abc", b"def\r", b"", b"gh"]
    assert await lines_of([b"\n\n", b"x\n"]) == [b"", b"", b"x"]
    assert await lines_of([]) == []


async def test_a_line_may_be_exactly_the_limit_and_not_one_byte_more() -> None:
    assert await lines_of([b"a" * 600, b"a" * 424 + b"\n"]) == [b"a" * 1024]
    with pytest.raises(UpstreamError, match="stream line larger than 1024 bytes"):
        await lines_of([b"a" * 600, b"a" * 425 + b"\n"])
    with pytest.raises(UpstreamError):  # refused before its end arrives
        await lines_of([b"a" * 600, b"a" * 600])
    with pytest.raises(UpstreamError):
        await lines_of([b"ok\n" + b"a" * 2000 + b"\n"])


async def test_an_event_of_many_lines_is_bounded_as_a_whole() -> None:
    lines = b"".join(b"data: " + b"a" * 300 + b"\n" for _ in range(3)) + b"\n"
    events = [event async for event in iter_sse(_Response([lines]), 1024, "p")]  # type: ignore[arg-type]
    assert events == [("", b"\n".join([b"a" * 300] * 3))]
    with pytest.raises(UpstreamError, match="stream event larger than 1024 bytes"):
        too_many = b"".join(b"data: " + b"a" * 300 + b"\n" for _ in range(4)) + b"\n"
        async for _ in iter_sse(_Response([too_many]), 1024, "p"):  # type: ignore[arg-type]
            pass


def test_an_embeddings_answer_may_grow_with_its_batch() -> None:
    config = ProviderConfig(name="p", type="openai")
    assert embedding_response_limit(config, 1, None) == MAX_RESPONSE_BYTES
    assert embedding_response_limit(config, 2048, None) == 2048 * 4096 * 40  # the edge's largest batch
    assert embedding_response_limit(config, 2048, 256) == MAX_RESPONSE_BYTES


def test_the_defaults_are_documented_values() -> None:
    config = ProviderConfig(name="p", type="openai")
    assert (config.max_event_bytes, config.max_response_bytes) == (MAX_EVENT_BYTES, MAX_RESPONSE_BYTES)
    assert (config.max_event_bytes, config.max_response_bytes) == (8 * 1024 * 1024, 32 * 1024 * 1024)
    assert (config.stream_timeout_seconds, config.read_timeout_seconds) == (600.0, None)


# --------------------------------------------------------------------------- backends, one call at a time


async def test_a_ten_megabyte_line_is_refused_and_the_connection_closed(hostile: Any) -> None:
    backend = build_backend(provider_for(hostile), "")
    try:
        received: list[str] = []
        started = time.monotonic()
        with pytest.raises(UpstreamError, match=f"larger than {MAX_EVENT_BYTES} bytes") as refused:
            async for piece in backend.stream(chat_request(model="m-huge-line"), params("m-huge-line")):
                if piece.content:
                    received.append(piece.content)
        assert received == [FIRST_TEXT]
        assert not refused.value.retryable and refused.value.fallback  # 502; the next candidate may answer
        await wait_for(lambda: hostile.connections == 0)  # closed, not pooled with 2 MB unread
        assert time.monotonic() - started < 10
    finally:
        await backend.close()


async def test_a_smaller_configured_event_limit_is_honoured(hostile: Any) -> None:
    backend = build_backend(provider_for(hostile, max_event_bytes=4096), "")
    try:
        with pytest.raises(UpstreamError, match="larger than 4096 bytes"):
            async for _ in backend.stream(chat_request(model="m-huge-first"), params("m-huge-first")):
                pass
        # An ordinary stream is untouched by the bound.
        pieces = [p async for p in backend.stream(chat_request(model="m-ok"), params("m-ok"))]
        assert "".join(p.content or "" for p in pieces) == "Hello from the upstream stand-in."
    finally:
        await backend.close()


async def test_a_trickling_stream_is_cut_at_its_overall_deadline(hostile: Any) -> None:
    # Each byte comes well within the read timeout: only the overall deadline can end it.
    backend = build_backend(provider_for(hostile, stream_timeout_seconds=1.0, read_timeout_seconds=5.0), "")
    try:
        received: list[str] = []
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="did not finish within 1s"):
            async for piece in backend.stream(chat_request(model="m-trickle"), params("m-trickle", timeout=30)):
                if piece.content:
                    received.append(piece.content)
        elapsed = time.monotonic() - started
        assert received == [FIRST_TEXT] and 0.9 <= elapsed < 5
        await wait_for(lambda: hostile.connections == 0)
    finally:
        await backend.close()


async def test_a_silent_stream_is_cut_at_its_read_timeout(hostile: Any) -> None:
    backend = build_backend(provider_for(hostile, read_timeout_seconds=0.5), "")
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match=r"sent nothing for 0\.5s"):
            async for _ in backend.stream(chat_request(model="m-silent"), params("m-silent", timeout=30)):
                pass
        assert time.monotonic() - started < 5
    finally:
        await backend.close()


async def test_a_providers_cookies_are_never_sent_back() -> None:
    """One session per provider serves every tenant: a cookie one call's answer set must
    not ride along on the next call (someone else's). By host name: aiohttp keeps no
    cookies of a bare IP address anyway."""
    up = HostileOpenAI()
    await up.start()
    settings = provider_settings(up)
    settings["base_url"] = settings["base_url"].replace("127.0.0.1", "localhost")
    backend = build_backend(ProviderConfig.model_validate(settings), "")
    try:
        first = await backend.chat(chat_request(model="m-set-cookie"), params("m-set-cookie"))
        assert first.message.text == "hi"
        await backend.chat(chat_request(model="m"), params("m"))
        assert up.cookies == ["", ""]
    finally:
        await backend.close()
        await up.close()


async def test_a_huge_answer_is_a_bounded_read(hostile: Any) -> None:
    backend = build_backend(provider_for(hostile, max_response_bytes=1024 * 1024), "")
    try:
        with pytest.raises(UpstreamError, match=f"response larger than {1024 * 1024} bytes"):
            await backend.chat(chat_request(model="m-huge-body"), params("m-huge-body"))
        await wait_for(lambda: hostile.connections == 0)
    finally:
        await backend.close()


async def test_a_declared_length_over_the_default_bound_is_refused_before_reading(hostile: Any) -> None:
    backend = build_backend(provider_for(hostile), "")
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamError, match=f"response larger than {MAX_RESPONSE_BYTES} bytes"):
            await backend.chat(chat_request(model="m-huge-length"), params("m-huge-length", timeout=30))
        assert time.monotonic() - started < 5
        await wait_for(lambda: hostile.connections == 0)
    finally:
        await backend.close()


async def test_a_huge_error_body_is_read_only_as_far_as_its_message(hostile: Any) -> None:
    backend = build_backend(provider_for(hostile), "")
    try:
        with pytest.raises(UpstreamError, match="status 503: overloaded x") as failed:
            await backend.chat(chat_request(model="m-huge-error"), params("m-huge-error"))
        assert failed.value.retryable and len(failed.value.message) < 1000
        await wait_for(lambda: hostile.connections == 0)
    finally:
        await backend.close()


# --------------------------------------------------------------------------- model ids and URLs

UNSAFE_IDS = ["a/../b", "../etc/passwd", "m?key=x", "m#frag", "has space", "m/", "a//b", "./m", "m%2F..", ""]


@pytest.mark.parametrize("model", UNSAFE_IDS)
async def test_an_unsafe_model_id_never_reaches_a_provider(hostile: Any, model: str) -> None:
    backend = build_backend(provider_for(hostile), "")
    try:
        with pytest.raises(InvalidRequest) as chat_refused:
            await backend.chat(chat_request(model=model), params(model))
        with pytest.raises(InvalidRequest):
            async for _ in backend.stream(chat_request(model=model), params(model)):
                pass
        if hostile.dialect != "anthropic":  # Anthropic has no embeddings
            with pytest.raises(InvalidRequest):
                await backend.embed(["hello"], None, params(model))
        assert chat_refused.value.param == "model"
        assert hostile.targets == []  # nothing was sent
    finally:
        await backend.close()


async def test_a_slash_or_colon_in_a_gemini_model_id_stays_inside_one_segment() -> None:
    up = HostileGemini()
    await up.start()
    backend = build_backend(provider_for(up), "")
    try:
        for model in ("org/gemini-x", "gemini-x:batchEmbedContents", "models/org/x", "tunedModels/mine"):
            with contextlib.suppress(RouterError):  # the stand-in need not know the model
                await backend.chat(chat_request(model=model), params(model))
            with contextlib.suppress(RouterError):
                async for _ in backend.stream(chat_request(model=model), params(model)):
                    pass
        assert up.targets == [
            "/v1beta/models/org%2Fgemini-x:generateContent",
            "/v1beta/models/org%2Fgemini-x:streamGenerateContent?alt=sse",
            "/v1beta/models/gemini-x%3AbatchEmbedContents:generateContent",
            "/v1beta/models/gemini-x%3AbatchEmbedContents:streamGenerateContent?alt=sse",
            "/v1beta/models/org%2Fx:generateContent",
            "/v1beta/models/org%2Fx:streamGenerateContent?alt=sse",
            "/v1beta/tunedModels/mine:generateContent",
            "/v1beta/tunedModels/mine:streamGenerateContent?alt=sse",
        ]
        # An ordinary id is sent as it is, and answered.
        completion = await backend.chat(chat_request(model="gemini-2.0-flash"), params("gemini-2.0-flash"))
        assert completion.message.text and up.targets[-1] == "/v1beta/models/gemini-2.0-flash:generateContent"
        await backend.embed(["hello"], None, params("text-embedding-004"))
        assert up.targets[-1] == "/v1beta/models/text-embedding-004:batchEmbedContents"
    finally:
        await backend.close()
        await up.close()


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_a_slash_model_id_goes_only_in_the_body_for_body_dialects(dialect: str) -> None:
    up: Any = STAND_INS[dialect]()
    await up.start()
    backend = build_backend(provider_for(up), "")
    try:
        model = "meta-llama/Llama-3.1-8B"
        await backend.chat(chat_request(model=model), params(model))
        assert up.targets == ["/v1/chat/completions" if dialect == "openai" else "/v1/messages"]
        assert up.stats.last_body["model"] == model
    finally:
        await backend.close()
        await up.close()


# --------------------------------------------------------------------------- the local worker


class StandInWorker(inference_pb2_grpc.InferenceServiceServicer):
    """The local-inference service's contract, with hostile streams by model name:
    ``trickle`` sends an empty message every TRICKLE_GAP forever, ``silent`` nothing
    after its first token."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        self.requests.append(request.model)
        yield inference_pb2.GenerateStreamResponse(text=FIRST_TEXT)
        deadline = time.monotonic() + HANG_LIMIT
        while time.monotonic() < deadline:
            await asyncio.sleep(TRICKLE_GAP)
            if request.model == "trickle":
                yield inference_pb2.GenerateStreamResponse()

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.GenerateResponse:
        self.requests.append(request.model)
        return inference_pb2.GenerateResponse(text=FIRST_TEXT, finish_reason="stop")

    async def CountTokens(
        self, request: inference_pb2.CountTokensRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.CountTokensResponse:
        self.requests.append(request.model)
        return inference_pb2.CountTokensResponse(prompt_tokens=3)


@pytest.fixture
async def worker() -> AsyncIterator[tuple[StandInWorker, str]]:
    server = grpc.aio.server()
    servicer = StandInWorker()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


def local_config(**settings: Any) -> ProviderConfig:
    return ProviderConfig.model_validate({"name": "local", "type": "local", "models": ["*"], **settings})


async def test_a_local_stream_is_cut_at_its_overall_deadline(worker: tuple[StandInWorker, str]) -> None:
    _, address = worker
    backend = build_backend(local_config(stream_timeout_seconds=1.0, read_timeout_seconds=5.0), address)
    try:
        received: list[str] = []
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            async for piece in backend.stream(chat_request(model="trickle"), params("trickle", timeout=30)):
                if piece.content:
                    received.append(piece.content)
        assert received == [FIRST_TEXT] and 0.9 <= time.monotonic() - started < 5
    finally:
        await backend.close()


async def test_a_silent_local_stream_is_cut_at_its_read_timeout(worker: tuple[StandInWorker, str]) -> None:
    _, address = worker
    backend = build_backend(local_config(read_timeout_seconds=0.5), address)
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match=r"sent nothing for 0\.5s"):
            async for _ in backend.stream(chat_request(model="silent"), params("silent", timeout=30)):
                pass
        assert time.monotonic() - started < 5
    finally:
        await backend.close()


@pytest.mark.parametrize("model", UNSAFE_IDS)
async def test_an_unsafe_model_id_never_reaches_the_local_worker(worker: tuple[StandInWorker, str], model: str) -> None:
    servicer, address = worker
    backend = build_backend(local_config(), address)
    try:
        with pytest.raises(InvalidRequest):
            await backend.chat(chat_request(model=model), params(model))
        with pytest.raises(InvalidRequest):
            async for _ in backend.stream(chat_request(model=model), params(model)):
                pass
        with pytest.raises(InvalidRequest):
            await backend.count_prompt_tokens(chat_request(model=model), model)
        assert servicer.requests == []
        assert (await backend.chat(chat_request(model="ok"), params("ok"))).message.text == FIRST_TEXT
    finally:
        await backend.close()


# --------------------------------------------------------------------------- settlement, end to end

POOL = "team"


@dataclass
class Rig:
    chat: ChatService
    store: BudgetStore
    recorder: Recorder
    bus: Bus
    up: Any


@pytest.fixture
async def rig(redis_client: redis.Redis, prefix: str, bus: Bus, hostile: Any) -> AsyncIterator[Rig]:
    """The router's chat path over one hostile provider: 1 MiB answers, 1 s streams."""
    catalogue = Catalogue.model_validate(
        {
            "providers": [
                provider_settings(
                    hostile, stream_timeout_seconds=1.0, read_timeout_seconds=5.0, max_response_bytes=1024 * 1024
                )
            ],
            "routing": {"retry": {"max_attempts": 1}},
            "health": {"failure_threshold": 100, "probe_interval_seconds": 0},
            "cache": {"enabled": False},
        }
    )
    entries: list[tuple[ProviderConfig, Backend]] = [
        (config, build_backend(config, f"127.0.0.1:{free_port()}")) for config in catalogue.providers
    ]
    store = BudgetStore(redis_client, f"{prefix}budget:", 60)
    await store.upsert_pool(POOL, 1_000_000)
    dispatcher = Dispatcher(
        ModelRouter(entries, catalogue.routes),
        HealthBoard(redis_client, prefix, entries, catalogue.health),
        RateLimiter(redis_client, prefix),
        RetryPolicy(catalogue.routing.retry),
        upstream_timeout=30,
        request_timeout=60,
    )
    recorder = Recorder(RouterBudget(store, 60), bus.publisher, KeyGate(KeyLimiter(redis_client, f"{prefix}budget:")))
    cache = ResponseCache(redis_client, prefix, catalogue.cache)
    yield Rig(ChatService(dispatcher, recorder, cache), store, recorder, bus, hostile)
    await recorder.drain(10)
    await store.close()
    for _, backend in entries:
        await backend.close()


def ask(model: str) -> router_pb2.ChatRequest:
    return router_pb2.ChatRequest(model=model, messages=[user("hi")], pool=POOL, include_usage=True)


async def settled(rig: Rig, request_id: str) -> tuple[int, int, tuple[str, str, int]]:
    """(used, reserved) of the pool once the request has ended, and its one event."""
    await rig.recorder.drain(10)
    pool = await rig.store.get_pool(POOL)
    events = [(name, event) for name, event in await rig.bus.events() if event.request_id == request_id]
    assert len(events) == 1
    name, event = events[0]
    return pool.used, pool.reserved, (name, event.error_code, event.charged_tokens)


async def stream_until_failure(rig: Rig, request: router_pb2.ChatRequest, request_id: str) -> tuple[str, Exception]:
    text = ""
    try:
        async for chunk in rig.chat.stream(request, request_id):
            if chunk.choices:
                text += chunk.choices[0].delta.content
    except Exception as error:
        return text, error
    raise AssertionError("the stream ended without an error")


async def test_a_ten_megabyte_line_after_a_token_is_a_502_and_the_token_is_paid(rig: Rig) -> None:
    request, request_id = ask("m-huge-line"), uuid.uuid4().hex
    text, error = await stream_until_failure(rig, request, request_id)
    assert text == FIRST_TEXT
    assert isinstance(error, UpstreamError) and error.status == grpc.StatusCode.INTERNAL  # 502 at the edge
    charge = prompt_token_bound(request) + len(FIRST_TEXT.encode())
    assert await settled(rig, request_id) == (charge, 0, ("inference.failed", "upstream_error", charge))
    await wait_for(lambda: rig.up.connections == 0)
    assert pumps() == []


async def test_a_ten_megabyte_first_line_is_a_502_and_pays_its_prompt(rig: Rig) -> None:
    request, request_id = ask("m-huge-first"), uuid.uuid4().hex
    text, error = await stream_until_failure(rig, request, request_id)
    assert text == "" and isinstance(error, UpstreamError)
    # Accepted (200) and refused before any token: the provider read the prompt and may bill it.
    charge = prompt_token_bound(request)
    assert await settled(rig, request_id) == (charge, 0, ("inference.failed", "upstream_error", charge))
    await wait_for(lambda: rig.up.connections == 0)
    assert pumps() == []


async def test_a_trickling_stream_is_cut_at_its_deadline_and_its_tokens_are_paid(rig: Rig) -> None:
    request, request_id = ask("m-trickle"), uuid.uuid4().hex
    started = time.monotonic()
    text, error = await stream_until_failure(rig, request, request_id)
    assert text == FIRST_TEXT and 0.9 <= time.monotonic() - started < 5
    assert isinstance(error, UpstreamTimeout) and error.status == grpc.StatusCode.DEADLINE_EXCEEDED  # 504
    charge = prompt_token_bound(request) + len(FIRST_TEXT.encode())
    assert await settled(rig, request_id) == (charge, 0, ("inference.failed", "upstream_timeout", charge))
    await wait_for(lambda: rig.up.connections == 0)
    assert pumps() == []


async def test_a_stream_trickling_before_its_first_token_is_cut_and_pays_its_prompt(rig: Rig) -> None:
    request, request_id = ask("m-drip-early"), uuid.uuid4().hex
    text, error = await stream_until_failure(rig, request, request_id)
    assert text == "" and isinstance(error, UpstreamTimeout)
    charge = prompt_token_bound(request)  # sent, never answered: the provider may bill the prompt
    assert await settled(rig, request_id) == (charge, 0, ("inference.failed", "upstream_timeout", charge))
    await wait_for(lambda: rig.up.connections == 0)


async def test_a_huge_blocking_answer_is_a_502_and_pays_its_prompt(rig: Rig) -> None:
    request, request_id = ask("m-huge-body"), uuid.uuid4().hex
    with pytest.raises(UpstreamError, match="larger than"):
        await rig.chat.chat(request, request_id)
    # The provider answered 200 (and generated the whole answer): at least the prompt is paid.
    charge = prompt_token_bound(request)
    assert await settled(rig, request_id) == (charge, 0, ("inference.failed", "upstream_error", charge))
    await wait_for(lambda: rig.up.connections == 0)
