"""Tenancy inside the router: key limits at admission, one reservation on the pool
chain with max_tokens clamped to what it affords, lease renewal, settlement of cut and
abandoned streams (exact for the local model), commits retried through a Redis blip,
503 when Redis is away, the cache partitioned by pool, events carrying the key id and
the pool chain.

Everything real: the metering library against Redis (the shared one, or a Redis of
the test's own that it stops and continues), events on NATS, the local model as the
real local-inference process, paid providers as the bench stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh.router.v1 import router_pb2
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_cli.stack import free_port
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.pools import BudgetStore, PoolSpec, PoolView
from hoosh_metering.redis import connect_redis
from hoosh_router.backends.base import Backend
from hoosh_router.backends.factory import build_backend
from hoosh_router.budget_client import RouterBudget
from hoosh_router.cache import ResponseCache
from hoosh_router.chat import ChatService
from hoosh_router.config import Catalogue, ProviderConfig
from hoosh_router.dispatch import Dispatcher, RetryPolicy
from hoosh_router.embeddings import EmbeddingService
from hoosh_router.errors import (
    BudgetExhausted,
    BudgetUnavailable,
    ClientCancelled,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    UpstreamTimeout,
)
from hoosh_router.estimate import prompt_token_bound
from hoosh_router.health import HealthBoard
from hoosh_router.ratelimit import RateLimiter
from hoosh_router.recording import Recorder
from hoosh_router.routing import ModelRouter

from bench.upstream import REPLY_WORDS, THOUGHT_WORDS, ChunkedWriter, OpenAIUpstream
from bench.upstream_anthropic import AnthropicUpstream
from bench.upstream_gemini import GeminiUpstream

from .conftest import Bus
from .helpers import user

LOCAL_MODEL = "smollm2-135m-instruct"
PRICED = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}  # 1 and 2 micro-dollars per token


# --------------------------------------------------------------------------- stand-ins and processes


class DripUpstream(OpenAIUpstream):
    """The OpenAI stand-in, plus models named ``drip-*``: a stream that sends one word
    every ``DRIP_SECONDS`` (a long stream, for lease renewal)."""

    DRIP_SECONDS = 0.4
    WORDS = 10

    async def route(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        import orjson

        request = orjson.loads(body) if body else {}
        model = str(request.get("model", "")) if isinstance(request, dict) else ""
        if not model.startswith("drip-") or not request.get("stream"):
            return await super().route(method, path, query, headers, body, writer)
        self.count(model, request)
        out = ChunkedWriter(writer)
        base = {"id": "chatcmpl-drip", "object": "chat.completion.chunk", "created": 0, "model": model}
        for _ in range(self.WORDS):
            delta = {"index": 0, "delta": {"content": " word"}, "finish_reason": None}
            out.raw(b"data: " + orjson.dumps({**base, "choices": [delta]}) + b"\n\n")
            await writer.drain()
            await asyncio.sleep(self.DRIP_SECONDS)
        done = {"index": 0, "delta": {}, "finish_reason": "stop"}
        out.raw(b"data: " + orjson.dumps({**base, "choices": [done]}) + b"\n\n")
        usage = {"prompt_tokens": 9, "completion_tokens": self.WORDS, "total_tokens": 9 + self.WORDS}
        out.raw(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        out.raw(b"data: [DONE]\n\n")
        await out.end()
        return True


@pytest.fixture
async def drip_up() -> AsyncIterator[DripUpstream]:
    up = DripUpstream()
    await up.start()
    yield up
    await up.close()


@pytest.fixture
async def slow_up() -> AsyncIterator[OpenAIUpstream]:
    """Answers after a second: long enough to cancel a blocking call mid-way."""
    up = OpenAIUpstream(latency_ms=1000)
    await up.start()
    yield up
    await up.close()


@dataclass
class OwnRedis:
    """A Redis of the test's own: stop (SIGSTOP: a frozen, slow Redis), cont, kill."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() == b"PONG":
                break
            time.sleep(0.025)
        yield OwnRedis(port, process)
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def local_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real local-inference service (llama.cpp, the bundled SmolLM2) as a process."""
    port = free_port()
    env = {**os.environ, "HOOSH_INFERENCE_LISTEN": f"127.0.0.1:{port}", "HOOSH_INFERENCE_THREADS": "2"}
    log_path = tmp_path_factory.mktemp("inference") / "inference.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "hoosh_inference"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the local worker never answered"
                    time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        process.wait(30)


# --------------------------------------------------------------------------- the router, assembled


@dataclass
class Rig:
    chat: ChatService
    embeddings: EmbeddingService
    store: BudgetStore
    budget: RouterBudget
    recorder: Recorder
    limiter: KeyLimiter
    bus: Bus
    cache: ResponseCache
    health: HealthBoard
    entries: list[tuple[ProviderConfig, Backend]]

    async def pool(self, name: str) -> PoolView:
        return await self.store.get_pool(name)

    async def settled(self) -> None:
        """Background work done: retried settlements, key finishes, cache stores."""
        await self.recorder.drain(30)
        await self.cache.drain()


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(
    redis_client: redis.Redis, prefix: str, bus: Bus, openai_up: OpenAIUpstream
) -> AsyncIterator[RigFactory]:
    built: list[tuple[Rig, Any]] = []

    async def make(
        providers: list[dict[str, Any]] | None = None,
        *,
        budget_redis: Any = None,
        lease_seconds: float = 60,
        inference_addr: str = "",
        cache: dict[str, Any] | None = None,
        health: dict[str, Any] | None = None,
        limiter_redis: Any = None,
        drain_seconds: float = 30.0,
    ) -> Rig:
        catalogue = Catalogue.model_validate(
            {
                "providers": providers
                or [{"name": "primary", "type": "openai", "base_url": openai_up.base_url, "models": ["mock-*"]}],
                "routing": {"retry": {"max_attempts": 1}},
                "health": health or {"failure_threshold": 100, "probe_interval_seconds": 0},
                "cache": cache or {},
            }
        )
        entries = [
            (config, build_backend(config, inference_addr or f"127.0.0.1:{free_port()}"))
            for config in catalogue.providers
        ]
        for _, backend in entries:
            await backend.list_models()  # the local model's context window
        store = BudgetStore(budget_redis or redis_client, f"{prefix}budget:", lease_seconds)
        budget = RouterBudget(store, lease_seconds, retry_base_seconds=0.05, retry_max_seconds=0.2)
        limiter = KeyLimiter(limiter_redis or redis_client, f"{prefix}budget:")
        recorder = Recorder(budget, bus.publisher, KeyGate(limiter))
        board = HealthBoard(redis_client, prefix, entries, catalogue.health)
        response_cache = ResponseCache(redis_client, prefix, catalogue.cache)
        dispatcher = Dispatcher(
            ModelRouter(entries, catalogue.routes),
            board,
            RateLimiter(redis_client, prefix),
            RetryPolicy(catalogue.routing.retry),
            upstream_timeout=120,
            request_timeout=120,
        )
        rig = Rig(
            ChatService(dispatcher, recorder, response_cache, drain_seconds=drain_seconds),
            EmbeddingService(dispatcher, recorder),
            store,
            budget,
            recorder,
            limiter,
            bus,
            response_cache,
            board,
            entries,
        )
        built.append((rig, store))
        return rig

    yield make
    for rig, store in built:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(rig.settled(), 10)
        await store.close()
        for _, backend in rig.entries:
            await backend.close()


def rid() -> str:
    return uuid.uuid4().hex


def caller(key_id: str = "key_a", **limits: int) -> tenancy_pb2.Caller:
    return tenancy_pb2.Caller(key_id=key_id, key_name="test", team="t", **limits)


def ask(
    model: str,
    pool: str,
    *,
    text: str = "hi",
    max_tokens: int | None = None,
    temperature: float | None = None,
    who: tenancy_pb2.Caller | None = None,
) -> router_pb2.ChatRequest:
    request = router_pb2.ChatRequest(model=model, messages=[user(text)], pool=pool, include_usage=True)
    if max_tokens is not None:
        request.sampling.max_tokens = max_tokens
    if temperature is not None:
        request.sampling.temperature = temperature
    if who is not None:
        request.caller.CopyFrom(who)
    return request


async def new_pool(store: BudgetStore, capacity: int, **spec: Any) -> str:
    name = f"p{uuid.uuid4().hex[:10]}"
    await store.create_pool(PoolSpec(name=name, capacity=capacity, **spec))
    return name


async def wait_for(predicate: Callable[[], bool], limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- streams pay for what they used


async def test_a_local_stream_abandoned_mid_way_pays_exactly_what_was_generated(
    make_rig: RigFactory, local_worker: str
) -> None:
    rig = await make_rig(
        [{"name": "local", "type": "local", "models": [LOCAL_MODEL]}],
        inference_addr=local_worker,
        cache={"enabled": False},  # the same request twice: both must reach the model
    )
    pool = await new_pool(rig.store, 1_000_000)
    request = ask(LOCAL_MODEL, pool, text="Write a very long story about a dragon.", max_tokens=40, who=caller())
    request.sampling.temperature = 0.0
    async with grpc.aio.insecure_channel(local_worker) as channel:
        counted = await inference_pb2_grpc.InferenceServiceStub(channel).CountTokens(
            inference_pb2.CountTokensRequest(model=LOCAL_MODEL, messages=request.messages)
        )
    prompt = counted.prompt_tokens

    # The whole answer first: one message per generated token, the prompt as counted.
    whole = [chunk async for chunk in rig.chat.stream(request, rid())]
    pieces = sum(1 for chunk in whole if chunk.choices and chunk.choices[0].delta.content)
    usage = whole[-1].usage
    assert usage.prompt_tokens == prompt and usage.completion_tokens == pieces > 10

    before = (await rig.pool(pool)).used
    stream = rig.chat.stream(request, request_id := rid())
    taken = [await anext(stream) for _ in range(5)]
    assert all(chunk.choices[0].delta.content for chunk in taken)
    await stream.aclose()  # the client went away
    await rig.settled()
    state = await rig.pool(pool)
    assert (state.used - before, state.reserved) == (prompt + 5, 0)
    name, event = (await rig.bus.events())[-1]
    assert name == "inference.failed" and event.request_id == request_id
    assert (event.error_code, event.charged_tokens) == ("client_disconnected", prompt + 5)
    assert (event.usage.prompt_tokens, event.usage.completion_tokens) == (prompt, 5)
    assert event.key_id == "key_a" and list(event.pool_chain) == [pool]


async def test_a_blocking_call_cancelled_mid_way_pays_the_prompt(make_rig: RigFactory, slow_up: OpenAIUpstream) -> None:
    rig = await make_rig([{"name": "slow", "type": "openai", "base_url": slow_up.base_url, "models": ["mock-*"]}])
    pool = await new_pool(rig.store, 1_000_000)
    request = ask("mock-x", pool, who=caller())
    task = asyncio.create_task(rig.chat.chat(request, rid()))
    await wait_for(lambda: slow_up.stats.requests > 0)  # sent upstream
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await rig.settled()
    state = await rig.pool(pool)
    assert (state.used, state.reserved) == (prompt_token_bound(request), 0)
    (name, event), *_ = await rig.bus.events()
    assert (name, event.error_code, event.charged_tokens) == (
        "inference.failed",
        ClientCancelled.error_code,
        prompt_token_bound(request),
    )


async def test_a_timed_out_call_pays_the_prompt_and_an_answered_error_pays_nothing(
    make_rig: RigFactory, slow_up: OpenAIUpstream, openai_up: OpenAIUpstream
) -> None:
    rig = await make_rig(
        [
            {
                "name": "slow",
                "type": "openai",
                "base_url": slow_up.base_url,
                "models": ["mock-*"],
                "timeout_seconds": 0.2,
            },
            {"name": "fast", "type": "openai", "base_url": openai_up.base_url, "models": ["fail-*"]},
        ]
    )
    pool = await new_pool(rig.store, 1_000_000)
    timed_out = ask("mock-x", pool)
    with pytest.raises(UpstreamTimeout):
        await rig.chat.chat(timed_out, rid())
    with pytest.raises(InvalidRequest):
        await rig.chat.chat(ask("fail-400", pool), rid())  # answered with an error: nothing billed
    await rig.settled()
    state = await rig.pool(pool)
    assert (state.used, state.reserved) == (prompt_token_bound(timed_out), 0)
    events = await rig.bus.events()
    assert [event.charged_tokens for _, event in events] == [prompt_token_bound(timed_out), 0]


# --------------------------------------------------------------------------- streams the client leaves

# Each paid dialect's stand-in, and a model name prefix its provider entry serves.
DIALECTS = {
    "anthropic": ("claude", "anthropic"),
    "gemini": ("gemini", "gemini"),
    "openai": ("gpt", "openai"),
}


@pytest.fixture
def stand_ins(openai_up: OpenAIUpstream, anthropic_up: AnthropicUpstream, gemini_up: GeminiUpstream) -> dict[str, Any]:
    return {"openai": openai_up, "anthropic": anthropic_up, "gemini": gemini_up}


def paid_provider(dialect: str, stand_in: Any) -> dict[str, Any]:
    prefix, kind = DIALECTS[dialect]
    return {"name": dialect, "type": kind, "base_url": stand_in.base_url, "api_key": "k", "models": [f"{prefix}-*"]}


def events_of(events: list[tuple[str, Any]], request_id: str) -> list[tuple[str, Any]]:
    return [(name, event) for name, event in events if event.request_id == request_id]


@pytest.mark.parametrize("dialect", list(DIALECTS))
async def test_a_reasoning_stream_the_client_leaves_is_charged_the_providers_own_usage(
    make_rig: RigFactory, stand_ins: dict[str, Any], dialect: str
) -> None:
    """The client reads the first words and hangs up; the provider goes on (and bills its
    hidden reasoning, which usage reports only at the end): the router reads on in the
    background and commits the provider's usage, while the client's stream ends at once."""
    rig = await make_rig([paid_provider(dialect, stand_ins[dialect])], cache={"enabled": False})
    prefix = DIALECTS[dialect][0]
    pool = await new_pool(rig.store, 1_000_000)
    whole = [chunk async for chunk in rig.chat.stream(ask(f"{prefix}-think", pool, max_tokens=200), rid())]
    usage = whole[-1].usage
    assert usage.completion_tokens == len(THOUGHT_WORDS) + len(REPLY_WORDS)  # the reasoning is billed
    # ...but never shown.
    assert "".join(c.choices[0].delta.content for c in whole if c.choices) == "".join(REPLY_WORDS)
    await rig.settled()
    before = (await rig.pool(pool)).used

    request_id = rid()
    stream = rig.chat.stream(ask(f"{prefix}-think-slow-stream", pool, max_tokens=200, who=caller()), request_id)
    first = await anext(stream)
    assert first.choices[0].delta.content == "Hello"
    started = time.monotonic()
    await stream.aclose()  # the client hangs up
    assert time.monotonic() - started < 0.2  # its stream ended at once...
    assert (await rig.pool(pool)).reserved > 0  # ...while the provider still streams (and the lease is held)
    await rig.settled()
    state = await rig.pool(pool)
    assert (state.used - before, state.reserved) == (usage.total_tokens, 0)
    ((name, event),) = events_of(await rig.bus.events(), request_id)  # one event
    assert (name, event.error_code, event.charged_tokens) == (
        "inference.failed",
        "client_disconnected",
        usage.total_tokens,
    )
    assert (event.usage.prompt_tokens, event.usage.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert event.key_id == "key_a" and list(event.pool_chain) == [pool]


@pytest.mark.parametrize("dialect", list(DIALECTS))
async def test_a_client_that_leaves_while_the_model_still_thinks_pays_for_the_thinking(
    make_rig: RigFactory, stand_ins: dict[str, Any], dialect: str
) -> None:
    """Cancelled before the first visible token (the model is reasoning): the upstream
    call is read on all the same, and the provider's usage is charged, not the prompt alone."""
    stand_in = stand_ins[dialect]
    rig = await make_rig([paid_provider(dialect, stand_in)], cache={"enabled": False})
    prefix = DIALECTS[dialect][0]
    pool = await new_pool(rig.store, 1_000_000)
    whole = [chunk async for chunk in rig.chat.stream(ask(f"{prefix}-think", pool, max_tokens=200), rid())]
    usage = whole[-1].usage
    await rig.settled()
    before = (await rig.pool(pool)).used

    received: list[router_pb2.ChatStreamResponse] = []

    async def client() -> None:
        async for chunk in rig.chat.stream(ask(f"{prefix}-think-slow-stream", pool, max_tokens=200), request_id):
            received.append(chunk)

    request_id = rid()
    task = asyncio.create_task(client())
    await wait_for(lambda: stand_in.stats.requests == 2)
    await asyncio.sleep(0.15)  # a few thoughts in, no visible token yet
    task.cancel()  # the gRPC server cancels the handler when its caller goes away
    with pytest.raises(asyncio.CancelledError):
        await task
    assert received == []
    await rig.settled()
    state = await rig.pool(pool)
    assert (state.used - before, state.reserved) == (usage.total_tokens, 0)
    ((name, event),) = events_of(await rig.bus.events(), request_id)
    assert (name, event.error_code, event.charged_tokens) == (
        "inference.failed",
        "client_disconnected",
        usage.total_tokens,
    )


@pytest.mark.parametrize("dialect", list(DIALECTS))
async def test_a_left_stream_whose_usage_never_comes_pays_the_estimate_with_its_reasoning(
    make_rig: RigFactory, stand_ins: dict[str, Any], dialect: str
) -> None:
    """The provider streams its reasoning and answer, then neither ends nor reports usage:
    the drain gives up after its bound, and the charge is the prompt bound plus every
    byte generated, the hidden reasoning included."""
    rig = await make_rig([paid_provider(dialect, stand_ins[dialect])], drain_seconds=1.0)
    prefix = DIALECTS[dialect][0]
    pool = await new_pool(rig.store, 1_000_000)
    request = ask(f"{prefix}-think-stall", pool, max_tokens=1000)
    stream = rig.chat.stream(request, request_id := rid())
    assert (await anext(stream)).choices[0].delta.content == "Hello"
    await stream.aclose()
    started = time.monotonic()
    await rig.settled()
    assert 0.5 < time.monotonic() - started < 5  # bounded by drain_seconds
    charged = prompt_token_bound(request) + len("".join(THOUGHT_WORDS).encode()) + len("".join(REPLY_WORDS).encode())
    state = await rig.pool(pool)
    assert (state.used, state.reserved) == (charged, 0)
    ((name, event),) = events_of(await rig.bus.events(), request_id)
    assert (name, event.error_code, event.charged_tokens) == ("inference.failed", "client_disconnected", charged)


async def test_a_left_stream_is_not_read_past_the_requests_deadline(
    make_rig: RigFactory, anthropic_up: AnthropicUpstream
) -> None:
    """The drain never outlives the request's own deadline: with none left, the estimate
    is charged at once."""
    rig = await make_rig([paid_provider("anthropic", anthropic_up)])
    pool = await new_pool(rig.store, 1_000_000)
    request = ask("claude-think-stall", pool, max_tokens=1000)
    stream = rig.chat.stream(request, request_id := rid(), time_remaining=0.3)
    assert (await anext(stream)).choices[0].delta.content == "Hello"
    await asyncio.sleep(0.3)  # the deadline passes
    await stream.aclose()
    started = time.monotonic()
    await rig.settled()
    assert time.monotonic() - started < 0.5
    state = await rig.pool(pool)
    # What had been received: the prompt bound, the reasoning (read ahead of the first
    # word) and at least that first word.
    assert state.reserved == 0
    assert state.used >= prompt_token_bound(request) + len("".join(THOUGHT_WORDS).encode()) + len(b"Hello")
    ((name, event),) = events_of(await rig.bus.events(), request_id)
    assert (name, event.charged_tokens) == ("inference.failed", state.used)


# --------------------------------------------------------------------------- blocking calls renew their lease


async def test_a_long_blocking_call_renews_its_lease(make_rig: RigFactory) -> None:
    """A call that outlasts its lease keeps its reservation: no expiry settles it, and its
    real commit lands (not the whole reservation by the expiry policy)."""
    slow = OpenAIUpstream(latency_ms=2000)
    await slow.start()
    try:
        lease = 0.6
        rig = await make_rig(
            [{"name": "slow", "type": "openai", "base_url": slow.base_url, "models": ["mock-*"]}], lease_seconds=lease
        )
        pool = await new_pool(rig.store, 1_000_000)
        task = asyncio.create_task(rig.chat.chat(ask("mock-x", pool, max_tokens=50), rid()))
        reaped = 0
        while not task.done():
            reaped += await rig.store.reap_expired()  # an unrenewed lease would be settled here
            await asyncio.sleep(0.05)
        reply = await task
        assert reaped == 0
        await rig.settled()
        state = await rig.pool(pool)
        assert (state.used, state.reserved) == (reply.usage.total_tokens, 0)
        assert [name for name, _ in await rig.bus.events()] == ["inference.completed"]
    finally:
        await slow.close()


async def test_a_short_call_starts_no_renewal(make_rig: RigFactory) -> None:
    rig = await make_rig()
    pool = await new_pool(rig.store, 1_000_000)
    hold = rig.budget.placeholder(rid(), pool, "", "chat")
    renewal = rig.budget.keep_alive(hold)
    await asyncio.sleep(0.05)
    renewal.cancel()
    assert not renewal.renewing  # a timer only: no task, no Redis call


# --------------------------------------------------------------------------- clamping


async def test_max_tokens_is_clamped_to_what_the_chain_affords(make_rig: RigFactory, openai_up: OpenAIUpstream) -> None:
    rig = await make_rig()
    request = ask("mock-x", "", max_tokens=50, temperature=0)
    bound = prompt_token_bound(request)
    org = await new_pool(rig.store, bound + 3)  # the tightest pool is the ancestor
    team = await new_pool(rig.store, 1_000_000, parent=org)
    request.pool = team
    reply = await rig.chat.chat(request, rid())
    assert openai_up.stats.last_body["max_tokens"] == 3  # the granted completion went upstream
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    await rig.settled()
    for name in (team, org):
        state = await rig.pool(name)
        assert (state.used, state.reserved) == (reply.usage.total_tokens, 0)
    assert (await rig.cache.stats()).stores == 0  # a clamped answer is never cached

    # A request asking for less than the chain affords is not clamped up.
    roomy = await new_pool(rig.store, 1_000_000)
    await rig.chat.chat(ask("mock-x", roomy, max_tokens=2), rid())
    assert openai_up.stats.last_body["max_tokens"] == 2

    # Room for the prompt but not one completion token: refused.
    tight = await new_pool(rig.store, bound)
    with pytest.raises(BudgetExhausted) as refused:
        await rig.chat.chat(ask("mock-x", tight, max_tokens=50), rid())
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1


async def test_a_money_cap_clamps_too_and_usage_is_priced(make_rig: RigFactory, openai_up: OpenAIUpstream) -> None:
    rig = await make_rig(
        [{"name": "priced", "type": "openai", "base_url": openai_up.base_url, "models": ["mock-*"], "pricing": PRICED}]
    )
    request = ask("mock-x", "", max_tokens=50)
    bound = prompt_token_bound(request)
    request.pool = await new_pool(rig.store, 1_000_000, cap_usd_micros=bound * 1 + 4 * 2)  # the prompt + 4 tokens
    reply = await rig.chat.chat(request, rid())
    assert openai_up.stats.last_body["max_tokens"] == 4
    await rig.settled()
    cost = reply.usage.prompt_tokens * 1 + reply.usage.completion_tokens * 2
    state = await rig.pool(request.pool)
    assert (state.used_usd_micros, state.reserved_usd_micros) == (cost, 0)
    (_, event), *_ = await rig.bus.events()
    assert event.cost_usd == pytest.approx(cost / 1_000_000)


# --------------------------------------------------------------------------- leases


async def test_a_long_stream_renews_its_lease(make_rig: RigFactory, drip_up: DripUpstream) -> None:
    lease = 1.0
    rig = await make_rig(
        [{"name": "drip", "type": "openai", "base_url": drip_up.base_url, "models": ["drip-*"]}], lease_seconds=lease
    )
    pool = await new_pool(rig.store, 1_000_000)
    started = time.monotonic()
    reaped = 0
    chunks = []
    async for chunk in rig.chat.stream(ask("drip-1", pool), rid()):
        chunks.append(chunk)
        reaped += await rig.store.reap_expired()  # an unrenewed lease would be settled here
    assert time.monotonic() - started > 3 * lease
    assert reaped == 0
    await rig.settled()
    state = await rig.pool(pool)
    assert (state.used, state.reserved) == (9 + DripUpstream.WORDS, 0)  # the real usage, not the whole reservation
    (name, event), *_ = await rig.bus.events()
    assert (name, event.settlement) == ("inference.completed", "")


# --------------------------------------------------------------------------- Redis away


async def test_a_commit_is_retried_through_a_redis_blip(
    make_rig: RigFactory, own_redis: OwnRedis, slow_up: OpenAIUpstream
) -> None:
    client = connect_redis(own_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        rig = await make_rig(
            [{"name": "slow", "type": "openai", "base_url": slow_up.base_url, "models": ["mock-*"]}],
            budget_redis=client,
        )
        pool = await new_pool(rig.store, 1_000_000)
        task = asyncio.create_task(rig.chat.chat(ask("mock-x", pool), rid()))
        await wait_for(lambda: slow_up.stats.requests > 0)  # reserved, now upstream
        own_redis.stop()
        # Answered once the commit was written (the stopped Redis took the bytes), not
        # after its socket timeout; the commit then times out and waits for a retry.
        reply = await task
        await wait_for(lambda: rig.budget.pending == 1)
        await asyncio.sleep(1.0)
        own_redis.cont()
        await wait_for(lambda: rig.budget.pending == 0)
        state = await rig.pool(pool)
        assert (state.used, state.reserved) == (reply.usage.total_tokens, 0)
        assert [name for name, _ in await rig.bus.events()] == ["inference.completed"]
    finally:
        own_redis.cont()
        await client.aclose()


async def test_a_commit_that_never_lands_is_left_to_the_expiry_policy(
    make_rig: RigFactory, own_redis: OwnRedis, slow_up: OpenAIUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    client = connect_redis(own_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        rig = await make_rig(
            [{"name": "slow", "type": "openai", "base_url": slow_up.base_url, "models": ["mock-*"]}],
            budget_redis=client,
            lease_seconds=1.5,
        )
        pool = await new_pool(rig.store, 1_000_000)
        task = asyncio.create_task(rig.chat.chat(ask("mock-x", pool, max_tokens=20), rid()))
        await wait_for(lambda: slow_up.stats.requests > 0)
        own_redis.stop()
        await task  # answered once the commit was written; its reply is what never comes
        with caplog.at_level(logging.ERROR, logger="hoosh_router.budget_client"):
            await wait_for(lambda: rig.budget.pending > 0)  # the commit failed: retried in the background
            await wait_for(lambda: rig.budget.pending == 0)  # retried until the lease ended, then given up
        assert any("expiry policy" in record.getMessage() for record in caplog.records)
        await asyncio.sleep(0.5)  # well past the lease on Redis' clock too
        own_redis.cont()
        await rig.store.reap_expired()
        state = await rig.pool(pool)
        # The default policy ("commit"): the whole reservation is charged, nothing stays reserved.
        assert (state.used, state.reserved) == (prompt_token_bound(ask("mock-x", pool)) + 20, 0)
    finally:
        own_redis.cont()
        await client.aclose()


@pytest.mark.parametrize("outage", ["frozen", "gone"])
async def test_redis_away_means_503_never_a_free_answer(
    make_rig: RigFactory, own_redis: OwnRedis, openai_up: OpenAIUpstream, outage: str
) -> None:
    client = connect_redis(own_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        # A short lease bounds the background releases of reservations that may have landed.
        rig = await make_rig(budget_redis=client, lease_seconds=3)
        pool = await new_pool(rig.store, 1_000_000)
        if outage == "frozen":
            own_redis.stop()
        else:
            own_redis.kill()
        for stream in (False, True):
            with pytest.raises(BudgetUnavailable) as refused:
                if stream:
                    _ = [chunk async for chunk in rig.chat.stream(ask("mock-x", pool), rid())]
                else:
                    await rig.chat.chat(ask("mock-x", pool), rid())
            assert refused.value.status == grpc.StatusCode.UNAVAILABLE
            assert refused.value.error_code == "budget_unavailable"
        assert openai_up.stats.requests == 0
        events = await rig.bus.events()
        assert [event.error_code for _, event in events] == ["budget_unavailable"] * 2
        if outage == "frozen":
            own_redis.cont()  # back: service resumes, and the reservations that reached it are given back
            reply = await rig.chat.chat(ask("mock-x", pool), rid())
            await rig.settled()
            state = await rig.pool(pool)
            assert (state.used, state.reserved) == (reply.usage.total_tokens, 0)
    finally:
        own_redis.cont()
        await client.aclose()


# --------------------------------------------------------------------------- key limits


async def test_a_keys_rpm_limit(make_rig: RigFactory, openai_up: OpenAIUpstream) -> None:
    rig = await make_rig()
    pool = await new_pool(rig.store, 1_000_000)
    limited = caller("key_rpm", rpm=2)
    for _ in range(2):
        await rig.chat.chat(ask("mock-x", pool, who=limited), rid())
    with pytest.raises(RateLimited) as refused:
        await rig.chat.chat(ask("mock-x", pool, who=limited), rid())
    assert refused.value.error_code == "rate_limit_exceeded" and refused.value.retry_after >= 1
    assert openai_up.stats.requests == 2  # the refused one never went upstream
    await rig.chat.chat(ask("mock-x", pool, who=caller("key_other", rpm=2)), rid())  # another key is not limited
    await rig.settled()
    assert (await rig.pool(pool)).reserved == 0
    events = await rig.bus.events()
    assert [(name, event.key_id) for name, event in events][2] == ("inference.failed", "key_rpm")


async def test_a_keys_tpm_limit_is_settled_with_the_real_usage(make_rig: RigFactory, redis_client: redis.Redis) -> None:
    rig = await make_rig()
    pool = await new_pool(rig.store, 1_000_000)
    limited = caller("key_tpm", tpm=100)
    first = await rig.chat.chat(ask("mock-x", pool, who=limited, max_tokens=500), rid())  # an empty window admits
    await rig.settled()
    base = rig.limiter.key_base("key_tpm")
    windows = [key async for key in redis_client.scan_iter(match=f"{base}w:*")]
    assert [int(await redis_client.hget(key, "t")) for key in windows] == [first.usage.total_tokens]
    with pytest.raises(RateLimited):  # the estimate (prompt + 500) does not fit what is left
        await rig.chat.chat(ask("mock-x", pool, who=limited, max_tokens=500), rid())
    await rig.chat.chat(ask("mock-x", pool, who=limited, max_tokens=5), rid())  # a small one does


async def test_a_keys_concurrency_limit(make_rig: RigFactory, slow_up: OpenAIUpstream) -> None:
    rig = await make_rig([{"name": "slow", "type": "openai", "base_url": slow_up.base_url, "models": ["mock-*"]}])
    pool = await new_pool(rig.store, 1_000_000)
    limited = caller("key_conc", max_concurrency=1)
    running = asyncio.create_task(rig.chat.chat(ask("mock-x", pool, who=limited), rid()))
    await wait_for(lambda: slow_up.stats.requests > 0)
    with pytest.raises(RateLimited, match="concurrency"):
        await rig.chat.chat(ask("mock-x", pool, who=limited), rid())
    await running
    await rig.settled()  # finish() freed the slot
    await rig.chat.chat(ask("mock-x", pool, who=limited), rid())


class HeldReplies:
    """A TCP proxy in front of the real Redis that can hold its replies back while the
    commands still reach it (a script that ran whose reply was lost), and then hold the
    commands too (nothing gets through until ``release``)."""

    def __init__(self, port: int = 6379) -> None:
        self._target = port
        self._replies = asyncio.Event()
        self._replies.set()
        self._commands = asyncio.Event()
        self._commands.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        self._replies.clear()

    def hold_commands(self) -> None:
        self._commands.clear()

    def release(self) -> None:
        self._commands.set()
        self._replies.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, gate: asyncio.Event) -> None:
            try:
                while data := await source.read(65536):
                    await gate.wait()
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer, self._commands), pipe(up_reader, writer, self._replies))

    async def close(self) -> None:
        self.release()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.mark.parametrize("lost", ["timeout", "cancel"])
async def test_a_lost_admit_reply_still_frees_the_keys_slot(
    make_rig: RigFactory, redis_client: redis.Redis, openai_up: OpenAIUpstream, lost: str
) -> None:
    """The ADMIT script ran (the slot is taken) but its reply never came back — Redis too
    slow, or the client cancelled meanwhile: the request's ending still frees the slot,
    once Redis answers again, not after the limiter's in-flight TTL (900 s)."""
    proxy = HeldReplies()
    await proxy.start()
    # "cancel" must cancel while the reply is still awaited: a timeout far longer than the
    # polling below (on a loaded machine that polling alone can take more than 0.3 s).
    timeout = 0.3 if lost == "timeout" else 10.0
    client = connect_redis(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        rig = await make_rig(limiter_redis=client)
        pool = await new_pool(rig.store, 1_000_000)
        who = caller(f"key_lost_{lost}", max_concurrency=1)
        base = rig.limiter.key_base(who.key_id)
        inflight = f"{base}inflight"

        async def admitted() -> int:
            windows = [key async for key in redis_client.scan_iter(match=f"{base}w:*")]
            return sum([int(await redis_client.hget(key, "r") or 0) for key in windows])

        await rig.chat.chat(ask("mock-x", pool, who=who), rid())  # a connection, the script loaded
        await rig.settled()
        assert await admitted() == 1 and await redis_client.zcard(inflight) == 0
        proxy.hold()
        task = asyncio.create_task(rig.chat.chat(ask("mock-x", pool, who=who), rid()))
        for _ in range(200):
            if await admitted() == 2:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the admit script never ran")
        # The script ran; from now on nothing reaches Redis either: the finish written
        # when the request ends (on the same connection or a new one) cannot get through.
        proxy.hold_commands()
        if lost == "timeout":
            with pytest.raises(BudgetUnavailable):
                await task
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await admitted() == 2  # the script did run...
        assert await redis_client.zcard(inflight) == 1  # ...and took the slot
        await asyncio.sleep(0.5)  # the first finish cannot get through either
        proxy.release()
        deadline = time.monotonic() + 10
        while await redis_client.zcard(inflight):
            assert time.monotonic() < deadline, "the slot was never freed"
            await asyncio.sleep(0.05)
        await rig.chat.chat(ask("mock-x", pool, who=who), rid())  # the key is usable again
        assert openai_up.stats.requests == 2  # the lost admission never went upstream
        await rig.settled()
        assert (await rig.pool(pool)).reserved == 0
    finally:
        await proxy.close()
        await client.aclose()


async def test_a_rate_limited_request_sends_no_finish(make_rig: RigFactory) -> None:
    rig = await make_rig()
    pool = await new_pool(rig.store, 1_000_000)
    limited = caller("key_rpm1", rpm=1, max_concurrency=5)
    await rig.chat.chat(ask("mock-x", pool, who=limited), rid())
    await rig.settled()
    finishing: list[str] = []
    real_finish = rig.recorder.gate.finish_later

    def finish(key_id: str, request_id: str, *args: Any, **kwargs: Any) -> Any:
        finishing.append(request_id)
        return real_finish(key_id, request_id, *args, **kwargs)

    rig.recorder.gate.finish_later = finish  # type: ignore[method-assign]
    with pytest.raises(RateLimited):
        await rig.chat.chat(ask("mock-x", pool, who=limited), rid())
    assert finishing == []  # refused: nothing was counted, nothing to free


async def test_a_key_without_limits_costs_no_limiter_call(make_rig: RigFactory, redis_client: redis.Redis) -> None:
    rig = await make_rig()
    pool = await new_pool(rig.store, 1_000_000)
    await rig.chat.chat(ask("mock-x", pool, who=caller("key_free")), rid())
    await rig.settled()
    assert [key async for key in redis_client.scan_iter(match=f"{rig.limiter.key_base('key_free')}*")] == []


# --------------------------------------------------------------------------- isolation


async def test_the_cache_is_partitioned_by_pool(make_rig: RigFactory, openai_up: OpenAIUpstream) -> None:
    rig = await make_rig()
    team_a, team_b = await new_pool(rig.store, 1_000_000), await new_pool(rig.store, 1_000_000)
    first = await rig.chat.chat(ask("mock-same", team_a, temperature=0, who=caller("key_a")), rid())
    await rig.cache.drain()
    other = await rig.chat.chat(ask("mock-same", team_b, temperature=0, who=caller("key_b")), rid())
    assert (first.cache, other.cache) == ("miss", "miss")  # B never sees A's answer
    await rig.cache.drain()
    again = await rig.chat.chat(ask("mock-same", team_a, temperature=0, who=caller("key_c")), rid())
    assert again.cache == "hit"  # the pool, not the key, is the partition
    assert openai_up.stats.by_model["mock-same"] == 2
    await rig.settled()
    assert (await rig.pool(team_a)).used == 2 * first.usage.total_tokens  # the hit paid its tokens
    assert (await rig.pool(team_b)).used == other.usage.total_tokens


async def test_a_hit_can_be_free_by_configuration(make_rig: RigFactory) -> None:
    rig = await make_rig(cache={"charge_hits": False})
    pool = await new_pool(rig.store, 1_000_000)
    first = await rig.chat.chat(ask("mock-same", pool, temperature=0), rid())
    await rig.cache.drain()
    assert (await rig.chat.chat(ask("mock-same", pool, temperature=0), rid())).cache == "hit"
    await rig.settled()
    assert (await rig.pool(pool)).used == first.usage.total_tokens


async def test_events_carry_the_key_id_and_the_pool_chain(make_rig: RigFactory) -> None:
    rig = await make_rig()
    org = await new_pool(rig.store, 1_000_000)
    team = await new_pool(rig.store, 1_000_000, parent=org)
    who = caller("key_chain")
    await rig.chat.chat(ask("mock-x", team, who=who), rid())
    with pytest.raises(InvalidRequest):
        await rig.chat.chat(ask("mock-fail-400", team, who=who), rid())
    _ = [chunk async for chunk in rig.chat.stream(ask("mock-x", team, who=who), rid())]
    embed = router_pb2.EmbedRequest(model="text-embedding-3-small", input=["x"], pool=team, caller=who)
    with pytest.raises(ModelNotFound):  # no embedding models here: refused before any reservation
        await rig.embeddings.embed(embed, rid())
    events = await rig.bus.events()
    assert [(name, event.key_id, list(event.pool_chain), event.user) for name, event in events] == [
        ("inference.completed", "key_chain", [team, org], ""),
        ("inference.failed", "key_chain", [team, org], ""),
        ("inference.completed", "key_chain", [team, org], ""),
        ("inference.failed", "key_chain", [], ""),
    ]


async def test_embeddings_reserve_and_commit_on_the_chain(make_rig: RigFactory, openai_up: OpenAIUpstream) -> None:
    rig = await make_rig(
        [
            {
                "name": "primary",
                "type": "openai",
                "base_url": openai_up.base_url,
                "embedding_models": ["text-embedding-*"],
                "pricing": PRICED,
            }
        ]
    )
    org = await new_pool(rig.store, 1_000_000)
    team = await new_pool(rig.store, 1_000_000, parent=org)
    request = router_pb2.EmbedRequest(
        model="text-embedding-3-small", input=["one two", "three"], pool=team, caller=caller("key_e", tpm=1000)
    )
    reply = await rig.embeddings.embed(request, rid())
    await rig.settled()
    for name in (team, org):
        state = await rig.pool(name)
        assert (state.used, state.reserved, state.used_usd_micros) == (3, 0, 3)
    (name, event), *_ = await rig.bus.events()
    assert (name, event.kind, event.key_id, list(event.pool_chain)) == (
        "inference.completed",
        "embedding",
        "key_e",
        [team, org],
    )
    assert reply.usage.total_tokens == 3


async def test_reservations_are_owned_by_the_key(make_rig: RigFactory, slow_up: OpenAIUpstream) -> None:
    """The chat's reservation names its key and kind: only they may end it."""
    rig = await make_rig([{"name": "slow", "type": "openai", "base_url": slow_up.base_url, "models": ["mock-*"]}])
    pool = await new_pool(rig.store, 1_000_000)
    request_id = rid()
    task = asyncio.create_task(rig.chat.chat(ask("mock-x", pool, who=caller("key_owner")), request_id))
    await wait_for(lambda: slow_up.stats.requests > 0)
    from hoosh_metering.errors import NotOwner

    with pytest.raises(NotOwner):
        await rig.store.commit(request_id, 0, pool=pool, owner="key_thief")
    with pytest.raises(NotOwner):
        await rig.store.commit(request_id, 0, pool=pool, owner="key_owner", kind="manual")
    reply = await task
    await rig.settled()
    assert (await rig.pool(pool)).used == reply.usage.total_tokens
