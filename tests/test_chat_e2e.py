"""One chat request through every service, as a user sends it: the official
openai client against the edge, with the local model and an OpenAI-wire provider."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc

from .conftest import LOCAL_MODEL, RunningStack
from .scraping import scrape, value


def client_for(hoosh: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hoosh.base_url}/v1", api_key="no-key-needed", max_retries=0)


async def create_pool(hoosh: RunningStack, capacity: int) -> str:
    name = f"pool-{uuid.uuid4().hex[:8]}"
    async with hoosh.channel(hoosh.budget_addr) as channel:
        await budget_pb2_grpc.BudgetServiceStub(channel).UpsertPool(
            budget_pb2.UpsertPoolRequest(pool=name, capacity=capacity), metadata=hoosh.credentials()
        )
    return name


def pool_state(hoosh: RunningStack, name: str) -> dict[str, int]:
    pools = httpx.get(f"{hoosh.base_url}/v1/tokens/pools").json()
    return next(pool for pool in pools if pool["name"] == name)


def audit(hoosh: RunningStack, request_id: str | None = None, limit: int = 1000) -> dict:
    params: dict[str, str | int] = {"limit": limit}
    if request_id:
        params["request_id"] = request_id
    response = httpx.get(f"{hoosh.base_url}/v1/audit", params=params)
    assert response.status_code == 200
    return response.json()


def wait_for_audit(hoosh: RunningStack, request_ids: set[str], attempts: int = 100) -> dict:
    """Events reach the audit log asynchronously: poll (bounded) until all are there."""
    import time

    body: dict = {}
    for _ in range(attempts):
        body = audit(hoosh)
        seen = {entry["event_id"] for entry in body["entries"]}
        if request_ids <= seen:
            return body
        time.sleep(0.1)
    raise AssertionError(f"audit never recorded {request_ids - seen}")


def test_models_list_shows_local_and_provider_models(hoosh: RunningStack) -> None:
    ids = {model.id for model in client_for(hoosh).models.list()}
    assert LOCAL_MODEL in ids
    assert "gpt-4o-mini" in ids  # listed by the upstream, matched by the gpt-* route


def test_local_model_chat_returns_generated_text_and_usage(hoosh: RunningStack) -> None:
    reply = client_for(hoosh).chat.completions.create(
        model=LOCAL_MODEL, messages=[{"role": "user", "content": "Say hello in one word."}], max_tokens=12
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in {"stop", "length"}
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_local_model_stream_ends_with_usage_chunk(hoosh: RunningStack) -> None:
    stream = client_for(hoosh).chat.completions.create(
        model=LOCAL_MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_ends_with_done(hoosh: RunningStack) -> None:
    body = {"model": LOCAL_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{hoosh.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("x-request-id")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_provider_route_blocking_and_streaming(hoosh: RunningStack) -> None:
    client = client_for(hoosh)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello there"}])
    assert reply.choices[0].message.content == "Hello from the upstream stand-in."
    assert reply.usage is not None and reply.usage.total_tokens == reply.usage.prompt_tokens + 7
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Hello there"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the upstream stand-in."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_provider_tool_calls_round_trip_in_openai_shape(hoosh: RunningStack) -> None:
    client = client_for(hoosh)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
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
    reply = client.chat.completions.create(
        model="mock-tool",
        messages=messages,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    streamed = list(client.chat.completions.create(model="mock-tool", messages=messages, tools=tools, stream=True))
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in streamed
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert json.loads(arguments) == {"city": "Paris"}
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


async def test_pool_accounting_and_audit_chain_after_n_chats(hoosh: RunningStack) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    client = openai.AsyncOpenAI(base_url=f"{hoosh.base_url}/v1", api_key="x", max_retries=0)
    seen_total = 0
    request_ids: set[str] = set()
    for index in range(6):
        model = LOCAL_MODEL if index % 2 == 0 else "gpt-4o-mini"
        messages = [{"role": "user", "content": f"Tell me about the number {index}."}]
        if index % 3 == 2:
            raw = await client.chat.completions.with_raw_response.create(
                model=model,
                messages=messages,
                max_tokens=10,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"pool": pool},
            )
            chunks = [chunk async for chunk in raw.parse()]
            seen_total += chunks[-1].usage.total_tokens
        else:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=10, extra_body={"pool": pool}
            )
            seen_total += raw.parse().usage.total_tokens
        request_ids.add(raw.headers["x-request-id"])
    await client.close()

    state = pool_state(hoosh, pool)
    assert state["used"] == seen_total
    assert state["reserved"] == 0
    body = wait_for_audit(hoosh, request_ids)
    mine = [entry for entry in body["entries"] if entry["event_id"] in request_ids]
    assert len(mine) == len(request_ids) == 6
    assert all(entry["subject"].endswith("inference.completed") for entry in mine)
    # The trace context crossed HTTP -> gRPC -> NATS: every event carries the edge's trace id.
    assert all(len(entry["payload"]["trace_id"]) == 32 and int(entry["payload"]["trace_id"], 16) for entry in mine)
    assert sum(int(e["payload"]["usage"]["total_tokens"]) for e in mine) == seen_total
    assert body["chain_valid"] is True


def test_editing_one_byte_of_the_audit_file_breaks_verification(hoosh: RunningStack) -> None:
    raw = client_for(hoosh).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    # Events land asynchronously: wait for this one, or the audit service could append it
    # while the file is being tampered with and restored (and the restore would drop it).
    body = wait_for_audit(hoosh, {raw.http_response.headers["x-request-id"]})
    assert body["total"] >= 1 and body["chain_valid"] is True
    original = hoosh.audit_file.read_bytes()
    position = original.index(b'"model"') + 9  # a byte inside the first entry's payload
    tampered = original[:position] + bytes([original[position] ^ 0x01]) + original[position + 1 :]
    try:
        hoosh.audit_file.write_bytes(tampered)
        assert audit(hoosh)["chain_valid"] is False
    finally:
        hoosh.audit_file.write_bytes(original)
    assert audit(hoosh)["chain_valid"] is True


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"model": "x", "messages": [', 400, None),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "model"),
        (json.dumps({"model": LOCAL_MODEL, "messages": []}).encode(), 400, "messages"),
        (
            json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            404,
            "model",
        ),
        (
            json.dumps(
                {"model": LOCAL_MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}
            ).encode(),
            400,
            "temperature",
        ),
        (
            json.dumps(
                {"model": LOCAL_MODEL, "messages": [{"role": "user", "content": "hi"}], "pool": "nope"}
            ).encode(),
            400,
            "pool",
        ),
        (b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * 2_000_000 + b'"}]}', 413, None),
    ],
    ids=[
        "invalid-json",
        "missing-model",
        "empty-messages",
        "unknown-model",
        "temperature-3",
        "unknown-pool",
        "2mb-body",
    ],
)
def test_bad_input_gets_openai_error_and_leaves_nothing_behind(
    hoosh: RunningStack, body: bytes, status: int, param: str | None
) -> None:
    response = httpx.post(
        f"{hoosh.base_url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    assert response.headers.get("x-request-id")
    pools = httpx.get(f"{hoosh.base_url}/v1/tokens/pools").json()
    assert all(pool["reserved"] == 0 for pool in pools)
    # Every line of the audit file is a whole entry and the chain still verifies.
    for line in hoosh.audit_file.read_text().splitlines():
        json.loads(line)
    assert audit(hoosh)["chain_valid"] is True


async def test_exhausted_pool_gives_429_with_retry_after(hoosh: RunningStack) -> None:
    pool = await create_pool(hoosh, capacity=20)
    response = httpx.post(
        f"{hoosh.base_url}/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 50,
            "pool": pool,
        },
    )
    assert response.status_code == 429
    assert response.headers.get("retry-after", "").isdigit()
    assert response.json()["error"]["code"] == "budget_exhausted"
    assert pool_state(hoosh, pool)["reserved"] == 0


async def test_client_disconnect_mid_stream_pays_for_what_was_generated(hoosh: RunningStack) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    body = {
        "model": LOCAL_MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 400,
        "stream": True,
        "pool": pool,
    }
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", f"{hoosh.base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
    # The router sees the cancellation, commits the prompt and the tokens generated so far
    # (never 0) instead of the whole reservation, and records one failed event saying so.
    body_ = wait_for_audit(hoosh, {request_id})
    entry = next(e for e in body_["entries"] if e["event_id"] == request_id)
    assert entry["subject"].endswith("inference.failed")
    assert entry["payload"]["error_code"] == "client_disconnected"
    state = pool_state(hoosh, pool)
    assert state["reserved"] == 0
    assert 0 < state["used"] == int(entry["payload"]["charged_tokens"]) < 400


async def test_concurrent_local_requests_queue_and_all_succeed(hoosh: RunningStack) -> None:
    import asyncio

    client = openai.AsyncOpenAI(base_url=f"{hoosh.base_url}/v1", api_key="x", max_retries=0)
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=LOCAL_MODEL, messages=[{"role": "user", "content": f"Name a colour ({i})."}], max_tokens=8
            )
            for i in range(6)
        )
    )
    await client.close()
    assert all(reply.choices[0].message.content and reply.usage.completion_tokens <= 8 for reply in replies)


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("mock-bad-json", 502, "upstream_error"),
        ("mock-fail-400", 400, None),
        ("mock-odd-finish", 502, "upstream_error"),
    ],
)
async def test_broken_provider_output_gives_clean_error_and_failed_event(
    hoosh: RunningStack, model: str, status: int, code: str | None
) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    response = httpx.post(
        f"{hoosh.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "pool": pool},
        timeout=30,
    )
    assert response.status_code == status, response.text
    if code:
        assert response.json()["error"]["code"] == code
    request_id = response.headers["x-request-id"]
    entry = next(e for e in wait_for_audit(hoosh, {request_id})["entries"] if e["event_id"] == request_id)
    assert entry["subject"].endswith("inference.failed")
    # A 400 was refused before the provider did anything: nothing is charged. Output that
    # proved unusable after a 200 pays the prompt the provider read (and may bill).
    charged = int(entry["payload"].get("charged_tokens", 0))
    assert (charged > 0) == (status == 502)
    assert pool_state(hoosh, pool) | {"name": ""} == {
        "name": "",
        "capacity": 1_000_000,
        "used": charged,
        "reserved": 0,
        "available": 1_000_000 - charged,
    }


async def test_stream_cut_by_provider_ends_with_error_event_and_done(hoosh: RunningStack) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    body = {"model": "mock-cut-stream", "messages": [{"role": "user", "content": "hi"}], "stream": True, "pool": pool}
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", f"{hoosh.base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])
    assert error["error"]["type"] and error["error"]["message"]
    entry = next(e for e in wait_for_audit(hoosh, {request_id})["entries"] if e["event_id"] == request_id)
    assert entry["subject"].endswith("inference.failed")
    assert pool_state(hoosh, pool)["reserved"] == 0


def test_callers_trace_context_reaches_the_audit_record(hoosh: RunningStack) -> None:
    trace_id = uuid.uuid4().hex
    response = httpx.post(
        f"{hoosh.base_url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "trace me"}]},
        headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
    )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    entry = next(e for e in wait_for_audit(hoosh, {request_id})["entries"] if e["event_id"] == request_id)
    assert entry["payload"]["trace_id"] == trace_id


async def test_the_stacks_edge_reaches_its_router_over_the_local_link(hoosh: RunningStack) -> None:
    """`hoosh up`'s stack gives its router and edge the local link: the router's socket is
    owner-only, and a blocking chat is a tunneled call that opens no gRPC stream and
    makes no unary call."""
    config = hoosh.stack_config
    assert config is not None and config.router_link
    path = config.router_link_socket()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    port = config.ports.router_metrics
    service = {"grpc_service": "hoosh.router.v1.RouterService"}
    before = await scrape(port)
    client = openai.AsyncOpenAI(base_url=f"{hoosh.base_url}/v1", api_key="unused")
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert reply.choices[0].message.content
    after = await scrape(port)

    def grown(kind: str, method: str) -> float:
        labels = {**service, "grpc_type": kind, "grpc_method": method}
        return value(after, "grpc_server_started_total", **labels) - value(
            before, "grpc_server_started_total", **labels
        )

    assert grown("tunneled", "Chat") == 1
    assert grown("unary", "Chat") == 0
    assert grown("bidi_stream", "Tunnel") == 0
    # The kernel's own list: the router's end of a connection on its socket (state 03,
    # connected, listed under the socket's path) besides the listening one (01).
    states = [line.split()[5] for line in Path("/proc/net/unix").read_text().splitlines()[1:] if line.endswith(path)]
    assert "01" in states and "03" in states, states


def test_only_the_router_loads_aiohttp(hoosh: RunningStack) -> None:
    """The services that never call HTTP through aiohttp keep it out of memory (nats-py
    would load it for its WebSocket transport): ~10 MiB less each. Read from the kernel's
    map of each process's files: aiohttp's compiled parts are mapped where it is loaded."""

    def maps_aiohttp(name: str) -> bool:
        [service] = [s for s in hoosh.stack.services if s.name == name]
        assert service.process is not None
        return "/aiohttp/" in Path(f"/proc/{service.process.pid}/maps").read_text()

    assert maps_aiohttp("router")  # it calls the providers through aiohttp
    for name in ("edge", "budget", "audit"):
        assert not maps_aiohttp(name), name
