"""Providers and routing through the whole stack, as a user sees them: the official
openai client against the edge, with stand-ins that speak OpenAI's, Anthropic's and
Gemini's real wire formats. Retries, fallback, the circuit breaker, rate limits
shared by two router processes, the response cache, embeddings, and broken
provider output."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh_cli.stack import free_port

from bench.upstream import fake_embedding

from .conftest import LOCAL_MODEL, RunningStack, StandIns, admin_headers
from .test_chat_e2e import client_for, create_pool, pool_state, wait_for_audit

REPLY = "Hello from the upstream stand-in."
DIALECT_MODELS = ["gpt-4o-mini", "claude-3-5-haiku-20241022", "gemini-2.0-flash"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


def stand_ins(hoosh: RunningStack) -> StandIns:
    assert hoosh.stand_ins is not None
    return hoosh.stand_ins


def control(root_url: str, **settings: object) -> dict:
    """The stand-in's counters (and, with settings, a change of behaviour)."""
    if settings:
        return httpx.post(f"{root_url}/control", json=settings).json()
    return httpx.get(f"{root_url}/control/stats").json()


def upstream_root(hoosh: RunningStack) -> str:
    return hoosh.upstream_url.removesuffix("/v1")


def event_of(hoosh: RunningStack, request_id: str) -> dict:
    body = wait_for_audit(hoosh, {request_id})
    return next(entry for entry in body["entries"] if entry["event_id"] == request_id)


def provider_health(hoosh: RunningStack) -> dict[str, dict]:
    response = httpx.get(f"{hoosh.base_url}/v1/health/providers", headers=admin_headers(hoosh))
    assert response.status_code == 200
    return {item["name"]: item for item in response.json()["data"]}


@pytest.fixture
def client(hoosh: RunningStack) -> Iterator[openai.OpenAI]:
    """The official client against the edge, closed after the test."""
    with client_for(hoosh) as opened:
        yield opened


async def router_chat(hoosh: RunningStack, address: str, model: str) -> router_pb2.ChatResponse:
    async with hoosh.channel(address) as channel:
        return await router_pb2_grpc.RouterServiceStub(channel).Chat(
            router_pb2.ChatRequest(model=model, messages=[chat_pb2.ChatMessage(role="user", text="hi")]),
            timeout=30,
            metadata=hoosh.credentials(),
        )


# --------------------------------------------------------------------------- dialects


@pytest.mark.parametrize("model", DIALECT_MODELS)
def test_each_dialect_answers_streams_and_counts_usage(hoosh: RunningStack, client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello please"}]
    reply = client.chat.completions.create(model=model, messages=messages)
    assert reply.choices[0].message.content == REPLY
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 7 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7

    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_anthropic_gets_system_lifted_and_max_tokens(hoosh: RunningStack, client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model="claude-3-5-haiku-20241022",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
        ],
        temperature=1.5,
        stop=["END"],
    )
    body = control(stand_ins(hoosh).anthropic)["last_body"]
    assert body["system"] == "You are terse."
    assert body["max_tokens"] == 1024  # Anthropic requires it: the provider's default
    assert [m["role"] for m in body["messages"]] == ["user"]  # consecutive user turns merged
    assert [block["text"] for block in body["messages"][0]["content"]] == ["first", "second"]
    assert body["temperature"] == 1.0 and body["stop_sequences"] == ["END"]


def test_gemini_gets_system_instruction_and_generation_config(hoosh: RunningStack, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gemini-2.0-flash",
        messages=[
            {"role": "developer", "content": "You are terse."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"},
        ],
        max_tokens=3,
        temperature=0.5,
        seed=7,
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    body = control(stand_ins(hoosh).gemini)["last_body"]
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert [content["role"] for content in body["contents"]] == ["user", "model", "user"]
    assert body["generationConfig"] == {"maxOutputTokens": 3, "temperature": 0.5, "seed": 7}


@pytest.mark.parametrize("model", ["claude-tool", "gemini-tool", "mock-tool"])
def test_tool_calls_both_ways_in_each_dialect(hoosh: RunningStack, client: openai.OpenAI, model: str) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris? And Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
    ]
    reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="auto")
    assert reply.choices[0].finish_reason == "tool_calls"
    call = reply.choices[0].message.tool_calls[0]
    assert call.id and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    streamed = list(
        client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="auto", stream=True)
    )
    deltas = [c.choices[0].delta.tool_calls[0] for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert streamed[-1].choices[0].finish_reason == "tool_calls"

    # The earlier tool call and its result reached the provider in its own shape.
    if model.startswith("claude"):
        body = control(stand_ins(hoosh).anthropic)["last_body"]
        assistant, result = body["messages"][1], body["messages"][2]
        assert assistant["content"] == [
            {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {"city": "Rome"}}
        ]
        assert result == {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_0", "content": "sunny"}],
        }
        assert body["tools"][0]["input_schema"]["properties"] == {"city": {"type": "string"}}
    elif model.startswith("gemini"):
        body = control(stand_ins(hoosh).gemini)["last_body"]
        assert body["contents"][1] == {
            "role": "model",
            "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}],
        }
        assert body["contents"][2] == {
            "role": "user",
            "parts": [{"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}}],
        }
        declaration = body["tools"][0]["functionDeclarations"][0]
        assert "additionalProperties" not in declaration["parameters"]
        assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}


def test_models_list_includes_every_dialect(hoosh: RunningStack, client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {"gpt-4o-mini", "claude-3-5-haiku-20241022", "gemini-2.0-flash", LOCAL_MODEL} <= ids


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize(("model", "expected_tokens"), [("text-embedding-3-small", 3), ("text-embedding-004", 30)])
async def test_embeddings_through_openai_and_gemini(
    hoosh: RunningStack, client: openai.OpenAI, model: str, expected_tokens: int
) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    texts = ["hello world", "bye"]
    raw = client.embeddings.with_raw_response.create(model=model, input=texts, extra_body={"pool": pool})
    reply = raw.parse()  # the client asks for base64 and decodes it
    assert [item.index for item in reply.data] == [0, 1]
    for item, text in zip(reply.data, texts, strict=True):
        assert item.embedding == pytest.approx(fake_embedding(text), abs=1e-6)
    # Gemini reports no usage: hoosh charges its upper bound (bytes + framing).
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == expected_tokens
    state = pool_state(hoosh, pool)
    assert state["used"] == expected_tokens and state["reserved"] == 0
    entry = event_of(hoosh, raw.headers["x-request-id"])
    assert entry["subject"].endswith("inference.completed") and entry["payload"]["kind"] == "embedding"

    response = httpx.post(
        f"{hoosh.base_url}/v1/embeddings", json={"model": model, "input": "hello world", "dimensions": 4}
    )
    assert response.status_code == 200, response.text
    vector = response.json()["data"][0]["embedding"]
    assert vector == pytest.approx(fake_embedding("hello world", 4), abs=1e-6)


@pytest.mark.parametrize(
    ("model", "status"), [(LOCAL_MODEL, 400), ("claude-3-5-haiku-20241022", 400), ("no-such-embedder", 404)]
)
def test_embeddings_of_a_model_without_them(hoosh: RunningStack, model: str, status: int) -> None:
    response = httpx.post(f"{hoosh.base_url}/v1/embeddings", json={"model": model, "input": "hi"})
    assert response.status_code == status, response.text
    if status == 400:
        assert "does not support embeddings" in response.json()["error"]["message"]
    assert all(pool["reserved"] == 0 for pool in httpx.get(f"{hoosh.base_url}/v1/tokens/pools").json())


# --------------------------------------------------------------------------- retries and fallback


async def test_two_503s_then_an_answer_is_retried(hoosh: RunningStack, client: openai.OpenAI) -> None:
    model = f"mock-fail-twice-{uuid.uuid4().hex[:8]}"
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == REPLY
    assert control(upstream_root(hoosh))["by_model"][model] == 3
    entry = event_of(hoosh, raw.headers["x-request-id"])
    assert entry["subject"].endswith("inference.completed") and entry["payload"]["attempts"] == 3


async def test_a_400_from_the_backend_is_not_retried(hoosh: RunningStack) -> None:
    model = f"mock-fail-400-{uuid.uuid4().hex[:8]}"
    response = httpx.post(
        f"{hoosh.base_url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 400
    assert control(upstream_root(hoosh))["by_model"][model] == 1
    entry = event_of(hoosh, response.headers["x-request-id"])
    assert entry["subject"].endswith("inference.failed") and entry["payload"]["attempts"] == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_down_backend_falls_back_within_the_request(
    hoosh: RunningStack, client: openai.OpenAI, stream: bool
) -> None:
    model = f"fallback-{uuid.uuid4().hex[:8]}"
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
        text = raw.parse().choices[0].message.content
    assert text == REPLY
    entry = event_of(hoosh, raw.headers["x-request-id"])
    assert entry["payload"]["provider"] == "upstream"
    assert entry["payload"]["attempts"] == 4  # three tries at the down backend, then the fallback
    assert control(upstream_root(hoosh))["by_model"][model] == 1


async def test_breaker_opens_skips_the_backend_and_recovers(hoosh: RunningStack, client: openai.OpenAI) -> None:
    flaky = stand_ins(hoosh).flaky
    messages = [{"role": "user", "content": "hi"}]
    control(flaky, fail_status=503, reset=True)
    try:
        # Every request still gets its answer (fallback); the failures open flaky's breaker.
        reply = client.chat.completions.create(model=f"breaker-{uuid.uuid4().hex[:6]}", messages=messages)
        assert reply.choices[0].message.content == REPLY
        health = provider_health(hoosh)["flaky"]
        assert health["state"] == "open" and health["consecutive_failures"] >= 3
        assert "503" in health["last_error"] and health["open_until"] > time.time() * 1000

        # While open, flaky is not called at all.
        calls_before = control(flaky)["requests"]
        for _ in range(5):
            reply = client.chat.completions.create(model=f"breaker-{uuid.uuid4().hex[:6]}", messages=messages)
            assert reply.choices[0].message.content == REPLY
        assert control(flaky)["requests"] == calls_before
    finally:
        control(flaky, fail_status=0)

    # Recovered: once the cooldown ends a trial (a request or the prober) closes the breaker,
    # and requests go to flaky again.
    for _ in range(200):
        if provider_health(hoosh)["flaky"]["state"] == "closed":
            break
        await asyncio.sleep(0.05)
    health = provider_health(hoosh)["flaky"]
    assert health["state"] == "closed" and health["consecutive_failures"] == 0
    model = f"breaker-{uuid.uuid4().hex[:6]}"
    client.chat.completions.create(model=model, messages=messages)
    assert control(flaky)["by_model"].get(model) == 1


# --------------------------------------------------------------------------- rate limits


async def test_a_rate_limited_provider_is_skipped_for_the_next(hoosh: RunningStack) -> None:
    model = f"ratefall-{uuid.uuid4().hex[:8]}"
    first = await router_chat(hoosh, hoosh.router_addr, model)
    second = await router_chat(hoosh, hoosh.router_addr, model)
    assert first.provider == "rl-one" and second.provider == "upstream"
    assert second.choices[0].message.text == REPLY


def test_429_with_retry_after_when_no_candidate_is_left(hoosh: RunningStack) -> None:
    body = {"model": f"solo-{uuid.uuid4().hex[:8]}", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{hoosh.base_url}/v1/chat/completions", json=body).status_code == 200
    response = httpx.post(f"{hoosh.base_url}/v1/chat/completions", json=body)
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"].isdigit() and int(response.headers["retry-after"]) >= 1
    assert all(pool["reserved"] == 0 for pool in httpx.get(f"{hoosh.base_url}/v1/tokens/pools").json())


def test_a_provider_429_without_retry_after_still_gives_the_client_one(hoosh: RunningStack) -> None:
    body = {"model": "mock-bare-429", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(f"{hoosh.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 429
    assert response.headers["retry-after"].isdigit() and int(response.headers["retry-after"]) >= 1
    assert all(pool["reserved"] == 0 for pool in httpx.get(f"{hoosh.base_url}/v1/tokens/pools").json())


async def _wait_grpc_healthy(hoosh: RunningStack, address: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        assert process.poll() is None, "the second router exited"
        async with hoosh.channel(address) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="hoosh.router.v1.RouterService"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
        await asyncio.sleep(0.1)
    raise AssertionError("the second router never served")


async def test_two_router_processes_hold_one_60_rpm_limit(hoosh: RunningStack, tmp_path: Path) -> None:
    assert hoosh.stack_config is not None
    second = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        **hoosh.stack_config.environment("router"),
        "HOOSH_ROUTER_LISTEN": second,
        "HOOSH_ROUTER_METRICS_LISTEN": "127.0.0.1:0",  # the first router holds the stack's port
        "HOOSH_EVENTS_OUTBOX_DIR": str(tmp_path / "outbox"),  # each process owns its outbox
        "HOOSH_ROUTER_LINK_SOCKET": "",  # the stack's link is the first router's
    }
    with open(tmp_path / "router-2.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "hoosh_router"], env=env, stdout=log, stderr=log)
    try:
        await _wait_grpc_healthy(hoosh, second, process)
        model = f"limited-{uuid.uuid4().hex[:8]}"
        addresses = [hoosh.router_addr, second]
        answered = {address: 0 for address in addresses}
        limited = 0
        channels = [hoosh.channel(address) for address in addresses]
        try:
            stubs = [router_pb2_grpc.RouterServiceStub(channel) for channel in channels]
            for index in range(100):
                request = router_pb2.ChatRequest(model=model, messages=[chat_pb2.ChatMessage(role="user", text="hi")])
                try:
                    await stubs[index % 2].Chat(request, timeout=30, metadata=hoosh.credentials())
                    answered[addresses[index % 2]] += 1
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert dict(error.trailing_metadata() or ())["retry-after"].isdigit()
                    limited += 1
        finally:
            for channel in channels:
                await channel.close()
        total = sum(answered.values())
        # 60 together (the sliding window may free a request or two while the test runs), not 120.
        assert 60 <= total <= 63, answered
        assert all(count >= 25 for count in answered.values()), answered  # both replicas served
        assert limited == 100 - total
    finally:
        process.terminate()
        process.wait(15)


# --------------------------------------------------------------------------- response cache


def _cache_stats(hoosh: RunningStack) -> dict:
    response = httpx.get(f"{hoosh.base_url}/v1/cache/stats", headers=admin_headers(hoosh))
    assert response.status_code == 200
    return response.json()


async def test_the_same_deterministic_request_twice_is_a_cache_hit(hoosh: RunningStack) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    model = f"mock-cache-{uuid.uuid4().hex[:8]}"
    body = {"model": model, "messages": [{"role": "user", "content": "hello cache"}], "temperature": 0, "pool": pool}
    stores_before = _cache_stats(hoosh)["stores"]
    first = httpx.post(f"{hoosh.base_url}/v1/chat/completions", json=body)
    assert first.status_code == 200 and first.headers["x-hoosh-cache"] == "miss"
    for _ in range(100):  # the store happens just after the answer
        if _cache_stats(hoosh)["stores"] > stores_before:
            break
        await asyncio.sleep(0.02)
    hits_before = _cache_stats(hoosh)["hits"]

    second = httpx.post(f"{hoosh.base_url}/v1/chat/completions", json=body)
    assert second.status_code == 200 and second.headers["x-hoosh-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    # The original usage, for reference; a hit costs nothing upstream, and says so.
    assert second.json()["usage"] == first.json()["usage"] | {"cost_usd_micros": 0}
    assert first.json()["usage"]["cost_usd_micros"] > 0 and second.headers["x-hoosh-cost-usd-micros"] == "0"
    assert second.json()["id"] != first.json()["id"]
    assert control(upstream_root(hoosh))["by_model"][model] == 1  # no upstream call

    # A hit makes no upstream call but still pays its pool the original usage's tokens
    # (cache.charge_hits, the default): a cache is no way around a budget.
    state = pool_state(hoosh, pool)
    assert state["used"] == 2 * first.json()["usage"]["total_tokens"] and state["reserved"] == 0
    entry = event_of(hoosh, second.headers["x-request-id"])
    assert entry["subject"].endswith("inference.completed")
    assert entry["payload"]["cached"] is True
    tokens = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {name: int(entry["payload"]["usage"][name]) for name in tokens} == {
        name: first.json()["usage"][name] for name in tokens
    }
    assert int(entry["payload"].get("cost_usd_micros", 0)) == 0  # no provider was paid

    # Another pool never sees this pool's cached answer.
    other = await create_pool(hoosh, capacity=1_000_000)
    elsewhere = httpx.post(f"{hoosh.base_url}/v1/chat/completions", json={**body, "pool": other})
    assert elsewhere.status_code == 200 and elsewhere.headers["x-hoosh-cache"] == "miss"
    assert control(upstream_root(hoosh))["by_model"][model] == 2

    # The same request streamed is served from the cache too.
    with httpx.stream("POST", f"{hoosh.base_url}/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.headers["x-hoosh-cache"] == "hit"
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == REPLY
    assert control(upstream_root(hoosh))["by_model"][model] == 2
    assert _cache_stats(hoosh)["hits"] >= hits_before + 2


def test_a_sampled_request_is_not_cached(hoosh: RunningStack) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}
    response = httpx.post(f"{hoosh.base_url}/v1/chat/completions", json=body)
    assert response.status_code == 200 and "x-hoosh-cache" not in response.headers


# --------------------------------------------------------------------------- broken provider output


@pytest.mark.parametrize(
    "model", ["claude-bad-json", "gemini-bad-json", "claude-odd-finish", "gemini-odd-finish", "mock-odd-finish"]
)
async def test_bad_provider_output_is_a_502_and_a_failed_event(hoosh: RunningStack, model: str) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    response = httpx.post(
        f"{hoosh.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "pool": pool},
    )
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_error" and error["message"]
    entry = event_of(hoosh, response.headers["x-request-id"])
    assert entry["subject"].endswith("inference.failed")
    # The provider answered 200 before its output proved unusable: it read the prompt and
    # may bill it, so the request pays its prompt (and no more), recorded on the event.
    state = pool_state(hoosh, pool)
    assert state["reserved"] == 0
    assert 0 < state["used"] == int(entry["payload"]["charged_tokens"]) < 100


@pytest.mark.parametrize("model", ["claude-cut-stream", "gemini-cut-stream", "claude-odd-finish"])
async def test_a_broken_stream_ends_with_an_error_event(hoosh: RunningStack, model: str) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "pool": pool}
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", f"{hoosh.base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"]["content"]  # tokens had reached the client
    error = json.loads(events[-2])["error"]
    assert error["type"] and error["message"]
    assert event_of(hoosh, request_id)["subject"].endswith("inference.failed")
    assert pool_state(hoosh, pool)["reserved"] == 0


def test_provider_health_lists_every_backend(hoosh: RunningStack) -> None:
    health = provider_health(hoosh)
    assert {"local", "upstream", "anthropic", "gemini", "flaky", "down", "rl-shared"} <= set(health)
    assert health["anthropic"]["type"] == "anthropic" and health["anthropic"]["state"] == "closed"
    assert health["rl-shared"]["rpm_limit"] == 60 and health["upstream"]["rpm_limit"] is None
    assert health["down"]["consecutive_failures"] >= 1 and health["down"]["last_error"]
