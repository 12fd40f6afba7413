"""The Responses API through every service, as a user sends it: the official openai
client against the session stack (local model, the OpenAI-wire stand-in, the Anthropic
stand-in), conversations continued on other edge and router replicas, stored responses
confined to their key and expiring, pools charged exactly what clients saw, and every
response object and stream event checked against OpenAI's published schemas."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from . import openai_schemas
from .conftest import LOCAL_MODEL, RunningStack, admin_headers
from .replicas import Replicas
from .test_audit_e2e import entries_of

REPLY = "Hello from the upstream stand-in."
WEATHER: Any = [
    {
        "type": "function",
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": False,
    }
]


def client_for(base_url: str, key: str = "no-key-needed") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def admin(hoosh: RunningStack) -> httpx.Client:
    return httpx.Client(base_url=hoosh.base_url, headers=admin_headers(hoosh), timeout=30)


def make_key(hoosh: RunningStack, pools: list[str] | None = None) -> str:
    with admin(hoosh) as client:
        body = {"name": f"resp-{uuid.uuid4().hex[:6]}", "pools": pools or ["default"], "models": ["*"]}
        made = client.post("/v1/admin/keys", json=body)
        assert made.status_code == 200, made.text
        return str(made.json()["key"])


def raw_events(base_url: str, body: dict[str, Any], key: str = "no-key-needed") -> list[dict[str, Any]]:
    """A streamed response's events as sent: each `event:` line names its data's type."""
    events: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{base_url}/v1/responses", json={**body, "stream": True}, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                events.append(event)
    return events


def text_event_types(deltas: int) -> list[str]:
    return [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


@pytest.fixture
def replicas(hoosh: RunningStack, tmp_path: Path) -> Iterator[Replicas]:
    assert hoosh.stack_config is not None
    started = Replicas(hoosh.stack_config, tmp_path / "replica-logs")
    try:
        yield started
    finally:
        started.stop_all()


def upstream_last_body(root_url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{root_url}/control/stats", timeout=10).json()["last_body"]
    return body


# --------------------------------------------------------------------------- create


def test_blocking_response_from_the_local_model_validates(hoosh: RunningStack) -> None:
    response = client_for(hoosh.base_url).responses.create(
        model=LOCAL_MODEL, input="Say hello in one word.", instructions="Answer briefly.", max_output_tokens=12
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage is not None and 0 < response.usage.output_tokens <= 12
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    raw = httpx.get(f"{hoosh.base_url}/v1/responses/{response.id}", timeout=10).json()
    openai_schemas.assert_valid(raw, "Response")
    assert raw["output"][0]["content"][0]["text"] == response.output_text
    items = httpx.get(f"{hoosh.base_url}/v1/responses/{response.id}/input_items", timeout=10).json()
    openai_schemas.assert_valid(items, "ResponseItemList")
    assert [item["type"] for item in items["data"]] == ["message"]


def test_streamed_response_events_in_order_and_valid(hoosh: RunningStack) -> None:
    events = raw_events(hoosh.base_url, {"model": LOCAL_MODEL, "input": "Count to three.", "max_output_tokens": 12})
    types = [event["type"] for event in events]
    deltas = types.count("response.output_text.delta")
    final_type = types[-1]
    assert final_type in ("response.completed", "response.incomplete")
    assert types[:-1] == text_event_types(deltas)[:-1] and deltas >= 1
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        openai_schemas.assert_valid(event, "ResponseStreamEvent")
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] > 0
    # The official client reads the same stream.
    stream = client_for(hoosh.base_url).responses.create(model="gpt-4o-mini", input="Hello there", stream=True)
    seen = list(stream)
    assert [event.type for event in seen] == text_event_types(7)  # the stand-in streams seven pieces
    assert seen[-1].response.output_text == REPLY  # type: ignore[union-attr]


def test_function_tool_round_trip_over_the_anthropic_format(hoosh: RunningStack) -> None:
    assert hoosh.stand_ins is not None
    client = client_for(hoosh.base_url)
    events = raw_events(hoosh.base_url, {"model": "claude-tool-1", "input": "Weather in Paris?", "tools": WEATHER})
    for event in events:
        openai_schemas.assert_valid(event, "ResponseStreamEvent")
    types = [event["type"] for event in events]
    assert "response.function_call_arguments.delta" in types
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    call = events[-1]["response"]["output"][-1]
    assert call["type"] == "function_call" and call["name"] == "weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    follow = client.responses.create(
        model="claude-3-haiku",
        previous_response_id=events[-1]["response"]["id"],
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny, 21 C"}],
        tools=WEATHER,
    )
    assert follow.status == "completed" and follow.output_text
    sent = upstream_last_body(hoosh.stand_ins.anthropic)["messages"]
    # Anthropic's own shapes: the call as tool_use, its output as tool_result.
    assert any(block.get("type") == "tool_use" for block in sent[-2]["content"])
    result = sent[-1]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == call["call_id"]


def test_text_format_json_schema_reaches_the_backend_as_response_format(hoosh: RunningStack) -> None:
    schema = {"type": "object", "properties": {"greeting": {"type": "string"}}, "required": ["greeting"]}
    response = client_for(hoosh.base_url).responses.create(
        model="gpt-4o-mini",
        input="Greet me as JSON.",
        text={"format": {"type": "json_schema", "name": "greeting", "schema": schema, "strict": True}},
    )
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    sent = upstream_last_body(hoosh.upstream_url.removesuffix("/v1"))
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "greeting", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "computer_use_preview", "display_width": 1, "display_height": 1, "environment": "linux"},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "image_generation"},
        {"type": "mcp", "server_label": "x", "server_url": "https://example.com"},
    ],
)
def test_hosted_tools_are_refused_with_400(hoosh: RunningStack, tool: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(hoosh.base_url).responses.create(model="gpt-4o-mini", input="hi", tools=[tool])  # type: ignore[list-item]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "tools[0].type"
    assert error["type"] == "invalid_request_error" and tool["type"] in error["message"]


# --------------------------------------------------------------------------- state across replicas


def test_three_turns_each_on_another_edge_and_router(hoosh: RunningStack, replicas: Replicas) -> None:
    edge2 = replicas.start("hoosh_edge")
    router2 = replicas.start("hoosh_router")
    edge3 = replicas.start("hoosh_edge", {"HOOSH_ROUTER_ADDR": router2.address})
    upstream_root = hoosh.upstream_url.removesuffix("/v1")
    first = client_for(hoosh.base_url).responses.create(model="gpt-4o-mini", input="Turn one")
    second = client_for(edge2.base_url).responses.create(
        model="gpt-4o-mini", input="Turn two", previous_response_id=first.id
    )
    third = client_for(edge3.base_url).responses.create(
        model="gpt-4o-mini", input="Turn three", previous_response_id=second.id, instructions="Be brief."
    )
    sent = upstream_last_body(upstream_root)["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("system", "Be brief."),
        ("user", "Turn one"),
        ("assistant", REPLY),
        ("user", "Turn two"),
        ("assistant", REPLY),
        ("user", "Turn three"),
    ]
    # Every replica reads every turn.
    for base_url in (hoosh.base_url, edge2.base_url, edge3.base_url):
        assert client_for(base_url).responses.retrieve(third.id).previous_response_id == second.id


def test_another_key_cannot_read_continue_or_delete(hoosh: RunningStack) -> None:
    owner, other = client_for(hoosh.base_url, make_key(hoosh)), client_for(hoosh.base_url, make_key(hoosh))
    response = owner.responses.create(model="gpt-4o-mini", input="mine")
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="gpt-4o-mini", input="more", previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):  # keyless (anonymous) is another owner too
        client_for(hoosh.base_url).responses.retrieve(response.id)
    assert owner.responses.retrieve(response.id).id == response.id
    owner.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        owner.responses.retrieve(response.id)


def test_a_stored_response_expires_after_its_ttl(hoosh: RunningStack, replicas: Replicas) -> None:
    short = replicas.start("hoosh_edge", {"HOOSH_RESPONSES_TTL_SECONDS": "1"})
    client = client_for(short.base_url)
    response = client.responses.create(model="gpt-4o-mini", input="fleeting")
    assert client.responses.retrieve(response.id).id == response.id
    time.sleep(2.2)
    for base_url in (short.base_url, hoosh.base_url):
        with pytest.raises(openai.NotFoundError):
            client_for(base_url).responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o-mini", input="again", previous_response_id=response.id)


def test_background_response_cancelled_and_failed_validate(hoosh: RunningStack) -> None:
    api = client_for(hoosh.base_url, make_key(hoosh))
    # gpt-stall: the stand-in streams its pieces, then hangs until the caller goes.
    queued = api.responses.create(model="gpt-stall", input="Take your time", background=True)
    raw = httpx.get(f"{hoosh.base_url}/v1/responses/{queued.id}", headers={"Authorization": f"Bearer {api.api_key}"})
    openai_schemas.assert_valid(raw.json(), "Response")
    assert raw.json()["status"] in ("queued", "in_progress") and raw.json()["background"] is True
    cancelled = api.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    after = api.responses.retrieve(queued.id).model_dump(mode="json", exclude_unset=True)
    openai_schemas.assert_valid(after, "Response")
    assert after["status"] == "cancelled"
    failing = api.responses.create(model="gpt-fail-400", input="hi", background=True)
    for _ in range(100):
        failed = api.responses.retrieve(failing.id)
        if failed.status == "failed":
            break
        time.sleep(0.05)
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "invalid_prompt"
    openai_schemas.assert_valid(failed.model_dump(mode="json", exclude_unset=True), "Response")
    # The cancelled run's reservation is released (its router call is cancelled), not
    # left for the lease to expire: every pool's reserved returns to 0.
    reserved: list[tuple[str, int]] = []
    for _ in range(300):
        pools = httpx.get(f"{hoosh.base_url}/v1/tokens/pools").json()
        reserved = [(pool["name"], pool["reserved"]) for pool in pools if pool["reserved"]]
        if not reserved:
            break
        time.sleep(0.1)
    assert reserved == []


# --------------------------------------------------------------------------- budgets


def test_pool_used_equals_what_clients_saw_over_chat_and_responses(hoosh: RunningStack) -> None:
    pool = f"resp-{uuid.uuid4().hex[:8]}"
    with admin(hoosh) as client:
        assert client.post("/v1/admin/pools", json={"name": pool, "capacity": 1_000_000}).status_code == 200
    api = client_for(hoosh.base_url, make_key(hoosh, [pool]))
    seen = 0
    reply = api.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}])
    assert reply.usage is not None
    seen += reply.usage.total_tokens
    chunks = list(
        api.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    seen += chunks[-1].usage.total_tokens
    first = api.responses.create(model="gpt-4o-mini", input="Hello", instructions="Be brief.")
    assert first.usage is not None
    seen += first.usage.total_tokens
    streamed = list(api.responses.create(model="gpt-4o-mini", input="More", previous_response_id=first.id, stream=True))
    final = streamed[-1].response  # type: ignore[union-attr]
    assert final.usage is not None
    seen += final.usage.total_tokens
    local = api.responses.create(model=LOCAL_MODEL, input="Hi", max_output_tokens=8)
    assert local.usage is not None
    seen += local.usage.total_tokens
    with admin(hoosh) as client:
        state = client.get(f"/v1/admin/pools/{pool}").json()
    assert state["used"] == seen and state["reserved"] == 0


def test_responses_calls_are_recorded_as_kind_response(hoosh: RunningStack) -> None:
    """Events and audit as for chat, with their own kind: a blocking, a streamed (over the
    Anthropic format) and a background response are each one ``response`` entry of the
    key, beside its chat entry."""
    with admin(hoosh) as client:
        made = client.post("/v1/admin/keys", json={"name": f"kind-{uuid.uuid4().hex[:6]}", "pools": ["default"]})
        assert made.status_code == 200, made.text
        key, key_id = made.json()["key"], made.json()["record"]["id"]
        api = client_for(hoosh.base_url, key)
        chat = api.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        blocking = api.responses.create(model="gpt-4o-mini", input="hi")
        streamed = list(api.responses.create(model="claude-3-haiku", input="hi", stream=True))
        background = api.responses.create(model="gpt-4o-mini", input="hi", background=True)
        for _ in range(100):
            if api.responses.retrieve(background.id).status == "completed":
                break
            time.sleep(0.05)
        responses = [blocking.id, streamed[-1].response.id, background.id]  # type: ignore[union-attr]
        found = entries_of(client, key_id=key_id, kind="response", expect=3)
        assert sorted(entry["event_id"] for entry in found) == sorted(r.removeprefix("resp_") for r in responses)
        assert {entry["payload"]["kind"] for entry in found} == {"response"}
        chats = entries_of(client, key_id=key_id, kind="chat")
        assert [entry["event_id"] for entry in chats] == [chat.headers["x-request-id"]]
