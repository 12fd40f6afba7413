"""Chat and embeddings end to end inside the router: the metering library against the
real Redis, events on the real NATS, providers as the bench stand-ins. The spine's
guarantees under failover, the cache and cancellation: one reservation ended once
(streams cut after tokens pay for them), one event per request, no restart after a
token left."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2
from hoosh_cli.stack import free_port
from hoosh_common import events
from hoosh_common.eventbus import EventPublisher
from hoosh_common.outbox import Outbox, OutboxEntry
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.pools import BudgetStore, PoolView
from hoosh_router.backends.base import Backend
from hoosh_router.backends.factory import build_backend
from hoosh_router.budget_client import Hold, RouterBudget
from hoosh_router.cache import ResponseCache
from hoosh_router.chat import ChatService
from hoosh_router.config import Catalogue, ProviderConfig
from hoosh_router.dispatch import Dispatcher, RetryPolicy
from hoosh_router.embeddings import EmbeddingService
from hoosh_router.errors import EventsUnavailable, InvalidRequest, UpstreamError
from hoosh_router.estimate import prompt_token_bound
from hoosh_router.health import HealthBoard
from hoosh_router.ratelimit import RateLimiter
from hoosh_router.recording import Recorder
from hoosh_router.routing import ModelRouter

from bench.upstream import OpenAIUpstream
from bench.upstream_anthropic import AnthropicUpstream

from .conftest import Bus
from .helpers import chat_request, user

POOL = "team"
REPLY = "Hello from the upstream stand-in."


@dataclass
class Router:
    chat: ChatService
    embeddings: EmbeddingService
    store: BudgetStore
    bus: Bus
    limiter: RateLimiter
    cache: ResponseCache
    entries: list[tuple[ProviderConfig, Backend]]
    recorder: Recorder

    async def pool(self) -> PoolView:
        return await self.store.get_pool(POOL)


@pytest.fixture
async def router(
    redis_client: redis.Redis, prefix: str, bus: Bus, openai_up: OpenAIUpstream, anthropic_up: AnthropicUpstream
) -> AsyncIterator[Router]:
    catalogue = Catalogue.model_validate(
        {
            "providers": [
                {
                    "name": "primary",
                    "type": "openai",
                    "base_url": openai_up.base_url,
                    "models": ["mock-*"],
                    "embedding_models": ["text-embedding-*"],
                    "tpm": 100_000,
                },
                {"name": "secondary", "type": "anthropic", "base_url": anthropic_up.base_url, "api_key": "k"},
                {"name": "worker", "type": "local", "models": []},  # its worker is not running
            ],
            "routes": [
                {
                    "match": "flaky-first",
                    "targets": [
                        {"provider": "primary", "model": "mock-fail-503", "priority": 1},
                        {"provider": "secondary", "model": "claude-ok", "priority": 2},
                    ],
                },
                {
                    "match": "cut-first",
                    "targets": [
                        {"provider": "primary", "model": "mock-cut-stream", "priority": 1},
                        {"provider": "secondary", "model": "claude-ok", "priority": 2},
                    ],
                },
                {
                    "match": "local-first",
                    "targets": [
                        {"provider": "worker", "model": "smollm2-135m-instruct", "priority": 1},
                        {"provider": "primary", "model": "mock-ok", "priority": 2},
                    ],
                },
            ],
            "routing": {"retry": {"max_attempts": 3, "backoff_base_ms": 1, "backoff_max_ms": 5}},
            "health": {"failure_threshold": 100, "probe_interval_seconds": 0},
        }
    )
    dead_worker = f"127.0.0.1:{free_port()}"
    entries = [(provider, build_backend(provider, dead_worker)) for provider in catalogue.providers]
    store = BudgetStore(redis_client, f"{prefix}budget:", 60)
    await store.upsert_pool(POOL, 1_000_000)
    health = HealthBoard(redis_client, prefix, entries, catalogue.health)
    limiter = RateLimiter(redis_client, prefix)
    cache = ResponseCache(redis_client, prefix, catalogue.cache)
    dispatcher = Dispatcher(
        ModelRouter(entries, catalogue.routes),
        health,
        limiter,
        RetryPolicy(catalogue.routing.retry),
        upstream_timeout=10,
        request_timeout=30,
    )
    recorder = Recorder(RouterBudget(store, 60), bus.publisher, KeyGate(KeyLimiter(redis_client, f"{prefix}budget:")))
    yield Router(
        ChatService(dispatcher, recorder, cache),
        EmbeddingService(dispatcher, recorder),
        store,
        bus,
        limiter,
        cache,
        entries,
        recorder,
    )
    await recorder.drain(10)
    await cache.drain()
    await limiter.drain()
    for _, backend in entries:
        await backend.close()


def request_for(model: str, text: str = "hi", temperature: float | None = None) -> router_pb2.ChatRequest:
    request = chat_request(user(text), model=model)
    request.pool = POOL
    request.include_usage = True
    if temperature is not None:
        request.sampling.temperature = temperature
    return request


def rid() -> str:
    return uuid.uuid4().hex


async def test_a_stream_fails_over_before_its_first_token(router: Router, openai_up: OpenAIUpstream) -> None:
    request_id = rid()
    chunks = [chunk async for chunk in router.chat.stream(request_for("flaky-first"), request_id)]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].provider == "secondary"
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == REPLY
    usage = chunks[-1].usage
    assert openai_up.stats.by_model["mock-fail-503"] == 3  # retried, then failed over
    pool = await router.pool()
    assert pool.used == usage.total_tokens and pool.reserved == 0
    events = await router.bus.events()
    assert [(name, event.provider, event.attempts) for name, event in events] == [
        ("inference.completed", "secondary", 4)
    ]


async def test_a_stream_cut_after_tokens_is_not_restarted_and_pays_for_them(
    router: Router, anthropic_up: AnthropicUpstream
) -> None:
    received: list[str] = []
    request = request_for("cut-first")
    with pytest.raises(UpstreamError):
        async for chunk in router.chat.stream(request, rid()):
            received.extend(c.delta.content for c in chunk.choices)
    assert received == ["Hello", " from"]
    assert anthropic_up.stats.requests == 0  # no silent restart on the fallback
    # No usage came: the prompt bound plus the streamed pieces' byte bound.
    charged = prompt_token_bound(request) + len(b"Hello from")
    pool = await router.pool()
    assert (pool.used, pool.reserved) == (charged, 0)
    events = await router.bus.events()
    assert [(name, event.error_code, event.charged_tokens) for name, event in events] == [
        ("inference.failed", "upstream_error", charged)
    ]


async def test_a_client_leaving_mid_stream_pays_the_providers_usage(router: Router) -> None:
    request = request_for("mock-x")
    stream = router.chat.stream(request, rid())
    first = await anext(stream)
    assert first.choices[0].delta.content == "Hello"
    await stream.aclose()  # what the gRPC server does when the caller cancels
    # The provider goes on generating (and billing): the rest of its stream is read in
    # the background for its own usage ("hi": 1 word + 4; the 7-piece reply).
    await router.recorder.drain(10)
    charged = (1 + 4) + 7
    pool = await router.pool()
    assert (pool.used, pool.reserved) == (charged, 0)
    events = await router.bus.events()
    assert [(name, event.error_code, event.charged_tokens) for name, event in events] == [
        ("inference.failed", "client_disconnected", charged)
    ]
    assert (events[0][1].usage.prompt_tokens, events[0][1].usage.completion_tokens) == (5, 7)


async def test_a_cache_hit_charges_the_original_tokens_and_replays_as_a_stream(
    router: Router, openai_up: OpenAIUpstream
) -> None:
    first = await router.chat.chat(request_for("mock-cached", temperature=0), rid())
    assert first.cache == "miss"
    await router.cache.drain()
    second = await router.chat.chat(request_for("mock-cached", temperature=0), rid())
    assert second.cache == "hit" and second.id != first.id
    assert second.choices == first.choices and second.usage == first.usage and second.provider == "primary"
    streamed = [chunk async for chunk in router.chat.stream(request_for("mock-cached", temperature=0), rid())]
    assert streamed[0].cache == "hit"
    assert "".join(c.choices[0].delta.content for c in streamed if c.choices) == REPLY
    assert streamed[-1].usage == first.usage
    assert openai_up.stats.by_model["mock-cached"] == 1
    pool = await router.pool()
    # cache.charge_hits (the default): every hit pays the original usage's tokens, at USD 0.
    assert pool.used == 3 * first.usage.total_tokens and pool.reserved == 0
    events = await router.bus.events()
    assert [(event.cached, event.attempts, event.usage == first.usage) for _, event in events] == [
        (False, 1, True),
        (True, 0, True),
        (True, 0, True),
    ]
    assert events[1][1].cost_usd == 0


async def test_a_streamed_tool_call_is_cached_whole(router: Router) -> None:
    request = request_for("mock-tool", temperature=0)
    request.tools.add(type="function", function=chat_pb2.FunctionDefinition(name="get_weather"))
    chunks = [chunk async for chunk in router.chat.stream(request, rid())]
    assert chunks[0].cache == "miss"
    await router.cache.drain()
    hit = await router.chat.chat(request, rid())
    assert hit.cache == "hit" and hit.choices[0].finish_reason == "tool_calls"
    call = hit.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_upstream_1",
        "get_weather",
        '{"city": "Paris"}',
    )


async def test_tpm_is_settled_with_the_real_usage(router: Router, redis_client: redis.Redis, prefix: str) -> None:
    reply = await router.chat.chat(request_for("mock-x"), rid())
    await router.limiter.drain()
    counters = await redis_client.hgetall(f"{prefix}rl:primary")
    tokens = [int(value) for field, value in counters.items() if field.startswith(b"t:")]
    assert tokens == [reply.usage.total_tokens]


async def test_embeddings_commit_prompt_tokens_and_publish(router: Router) -> None:
    request = router_pb2.EmbedRequest(model="text-embedding-3-small", input=["one two", "three"], pool=POOL)
    reply = await router.embeddings.embed(request, rid())
    assert [item.index for item in reply.data] == [0, 1] and len(reply.data[0].values) == 8
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == 3 and reply.provider == "primary"
    pool = await router.pool()
    assert (pool.used, pool.reserved) == (3, 0)
    with pytest.raises(InvalidRequest, match="does not support embeddings"):
        await router.embeddings.embed(router_pb2.EmbedRequest(model="mock-chat", input=["x"], pool=POOL), rid())
    assert (await router.pool()).reserved == 0
    events = await router.bus.events()
    assert [(name, event.kind) for name, event in events] == [
        ("inference.completed", "embedding"),
        ("inference.failed", "embedding"),
    ]


# -- exactly once under cancellation (found in review; latency is injected around the real
#    Redis calls, nothing is stubbed) -----------------------------------------------------------


class CountingPublisher:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    def publish_background(self, name: str, message: Any, event_id: str) -> object:
        self.calls.append((name, event_id))
        return self.inner.publish_background(name, message, event_id)

    @property
    def healthy(self) -> bool:
        return bool(self.inner.healthy)

    @property
    def keeping(self) -> bool:
        return bool(self.inner.keeping)

    async def wait_kept(self) -> None:
        await self.inner.wait_kept()


async def test_cancel_after_reserve_while_the_cache_lookup_is_pending_releases(router: Router) -> None:
    cache = router.cache
    real_get = cache.get

    async def slow_get(key: str) -> Any:
        value = await real_get(key)
        await asyncio.sleep(0.3)
        return value

    cache.get = slow_get  # type: ignore[method-assign]
    task = asyncio.create_task(router.chat.chat(request_for("mock-x", temperature=0), rid()))
    await asyncio.sleep(0.1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert (await router.pool()).reserved == 0


async def test_cancel_during_commit_still_commits_and_records_once(router: Router) -> None:
    budget = router.chat._recorder.budget
    real_commit = budget.commit
    entered = asyncio.Event()

    async def slow_commit(hold: Hold, used: int, **options: Any) -> None:
        entered.set()
        await asyncio.sleep(0.3)
        await real_commit(hold, used, **options)

    budget.commit = slow_commit  # type: ignore[method-assign]
    publisher = CountingPublisher(router.chat._recorder._publisher)
    router.chat._recorder._publisher = publisher  # type: ignore[assignment]
    task = asyncio.create_task(router.chat.chat(request_for("mock-x"), rid()))
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)  # the shielded commit finishes on its own
    pool = await router.pool()
    assert [name for name, _ in publisher.calls] == [events.SUBJECT_COMPLETED]
    assert pool.reserved == 0 and pool.used > 0


async def test_the_answer_does_not_leave_before_the_commit_is_written(router: Router) -> None:
    # The commit held back before it reaches Redis: no answer until it is written.
    budget = router.chat._recorder.budget
    real_commit = budget.commit
    go = asyncio.Event()

    async def commit_later(hold: Hold, used: int, **options: Any) -> None:
        await go.wait()
        await real_commit(hold, used, **options)

    budget.commit = commit_later  # type: ignore[method-assign]
    task = asyncio.create_task(router.chat.chat(request_for("mock-x"), rid()))
    await asyncio.sleep(0.5)
    assert not task.done()  # upstream answered long ago; the commit is not written
    go.set()
    reply = await asyncio.wait_for(task, 10)
    pool = await router.pool()
    assert (pool.used, pool.reserved) == (reply.usage.total_tokens, 0)


async def test_the_answer_waits_for_the_commit_to_be_written_not_for_redis_to_answer_it(router: Router) -> None:
    # The commit's reply held back (as from a Redis slow to answer): the answer goes
    # anyway once the commit is written, and Redis ran the commit before anything sent
    # after the answer (here: reading the pool on another connection).
    budget = router.chat._recorder.budget
    real_commit = budget.commit
    reply_back = asyncio.Event()

    async def commit_with_a_slow_reply(hold: Hold, used: int, **options: Any) -> None:
        await real_commit(hold, used, **options)
        await reply_back.wait()

    budget.commit = commit_with_a_slow_reply  # type: ignore[method-assign]
    publisher = CountingPublisher(router.chat._recorder._publisher)
    router.chat._recorder._publisher = publisher  # type: ignore[assignment]
    reply = await asyncio.wait_for(router.chat.chat(request_for("mock-x"), rid()), 10)
    pool = await router.pool()
    assert (pool.used, pool.reserved) == (reply.usage.total_tokens, 0)
    assert [name for name, _ in publisher.calls] == [events.SUBJECT_COMPLETED]  # recorded with the answer
    reply_back.set()
    await asyncio.sleep(0.1)
    assert [name for name, _ in publisher.calls] == [events.SUBJECT_COMPLETED]  # and only then


async def test_a_cached_stream_closed_at_its_usage_chunk_records_one_event(router: Router) -> None:
    await router.chat.chat(request_for("mock-cached", temperature=0), rid())
    await router.cache.drain()
    publisher = CountingPublisher(router.chat._recorder._publisher)
    router.chat._recorder._publisher = publisher  # type: ignore[assignment]
    request = request_for("mock-cached", temperature=0)
    request.include_usage = True
    stream = router.chat.stream(request, rid())
    async for chunk in stream:
        if chunk.HasField("usage") and not chunk.choices:
            break  # the usage chunk went out; the caller leaves before asking for more
    await stream.aclose()
    assert [name for name, _ in publisher.calls] == [events.SUBJECT_COMPLETED]


async def test_a_candidate_that_cannot_count_tokens_falls_over_to_the_next(router: Router) -> None:
    reply = await router.chat.chat(request_for("local-first"), rid())
    assert reply.provider == "primary" and reply.usage.total_tokens > 0
    pool = await router.pool()
    assert pool.reserved == 0 and pool.used == reply.usage.total_tokens


async def test_while_events_cannot_be_kept_no_request_is_admitted(router: Router, tmp_path: Any) -> None:
    """An outbox past its high-water mark: every chat and embedding is refused with 503
    events_unavailable before anything is reserved; once it drains, service resumes."""
    outbox = Outbox(tmp_path / "outbox", max_entries=4, high_water=0.5)
    bus = router.bus
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.subject_prefix, outbox=outbox)
    await outbox.open()
    for index in range(2):  # two of four: at the high-water mark
        await outbox.put(
            OutboxEntry(
                subject=f"{bus.subject_prefix}.test",
                event_id=f"kept-{index}",
                data=b"{}",
                headers={"Nats-Msg-Id": f"kept-{index}"},
                first_attempt_ms=1_700_000_000_000,
            )
        )
    assert not publisher.healthy
    real = router.recorder._publisher
    router.recorder._publisher = publisher  # type: ignore[assignment]
    before = await router.pool()
    with pytest.raises(EventsUnavailable) as refused:
        await router.chat.chat(request_for("mock-x"), rid())
    assert refused.value.status == grpc.StatusCode.UNAVAILABLE and refused.value.retry_after == 5
    with pytest.raises(EventsUnavailable):
        await router.embeddings.embed(
            router_pb2.EmbedRequest(model="text-embedding-3-small", input=["x"], pool=POOL), rid()
        )
    after = await router.pool()
    assert (after.used, after.reserved) == (before.used, before.reserved)
    router.recorder._publisher = real
    await outbox.close()
