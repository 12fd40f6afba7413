"""The Responses API passed through to a provider that speaks it natively
(``responses_api: native``: the session stack's ``native`` provider, the OpenAI-wire
stand-in's /v1/responses), through every service: the provider gets the request's own
fields (the model mapped, hoosh's state kept to hoosh), the client gets the provider's
object and events with hoosh's ids, routing retries and falls back (into and out of the
native provider), a previous_response_id turn is rebuilt by hoosh, and the pool is
charged exactly the usage the provider reported."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from . import openai_schemas
from .conftest import RunningStack
from .test_responses_e2e import WEATHER, admin, client_for, make_key, raw_events, text_event_types

REPLY = "Hello from the upstream stand-in."
SCHEMA = {"type": "object", "properties": {"greeting": {"type": "string"}}, "required": ["greeting"]}


@pytest.fixture
def client(hoosh: RunningStack) -> Iterator[openai.OpenAI]:
    """The official client, keyless (the stack is open on loopback), closed afterwards."""
    with client_for(hoosh.base_url) as opened:
        yield opened


def stand_in(hoosh: RunningStack) -> str:
    return hoosh.upstream_url.removesuffix("/v1")


def stats(hoosh: RunningStack) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{stand_in(hoosh)}/control/stats", timeout=10).json()
    return data


def passed_through(response: dict[str, Any]) -> bool:
    """The stand-in's own output item ids: the answer came from its /v1/responses."""
    return all(re.fullmatch(r"(msg|fc)_upstream_\d+", str(item["id"])) for item in response["output"])


def test_blocking_request_reaches_the_provider_unchanged(hoosh: RunningStack) -> None:
    body: dict[str, Any] = {
        "model": "native-blocking",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Greet me as JSON."}]}],
        "instructions": "Be brief.",
        "temperature": 0.3,
        "top_p": 0.9,
        "max_output_tokens": 50,
        "metadata": {"ticket": "t-1"},
        "text": {"format": {"type": "json_schema", "name": "greeting", "schema": SCHEMA, "strict": True}},
        "parallel_tool_calls": False,
        "user": "u-1",
    }
    reply = httpx.post(f"{hoosh.base_url}/v1/responses", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    response = reply.json()
    sent = stats(hoosh)["last_body"]
    for name in ("instructions", "temperature", "top_p", "max_output_tokens", "metadata", "text", "user"):
        assert sent[name] == body[name], name
    # The items as hoosh checked and counted them (typed, without ids), not the raw ones.
    assert sent["input"] == [{"type": "message", "status": "completed", **body["input"][0]}]
    assert sent["parallel_tool_calls"] is False
    assert sent["model"] == "native-blocking" and sent["store"] is False and sent["stream"] is False
    assert "previous_response_id" not in sent and "pool" not in sent
    openai_schemas.assert_valid(response, "Response")
    assert passed_through(response) and response["output"][0]["content"][0]["text"] == REPLY
    assert response["id"].startswith("resp_") and "upstream" not in response["id"]
    assert response["store"] is True and response["metadata"] == {"ticket": "t-1"}
    usage = response["usage"]
    assert usage["output_tokens"] == 7 and usage["total_tokens"] == usage["input_tokens"] + 7
    assert usage["cost_usd_micros"] == int(reply.headers["X-Hoosh-Cost-Usd-Micros"]) > 0
    stored = httpx.get(f"{hoosh.base_url}/v1/responses/{response['id']}", timeout=10).json()
    assert stored == response


def test_streamed_events_come_from_the_provider(hoosh: RunningStack, client: openai.OpenAI) -> None:
    events = raw_events(hoosh.base_url, {"model": "native-stream", "input": "Hello there", "instructions": "Hi."})
    assert stats(hoosh)["last_body"]["stream"] is True
    assert [event["type"] for event in events] == text_event_types(7)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        openai_schemas.assert_valid(event, "ResponseStreamEvent")
    ids = {event["response"]["id"] for event in events if "response" in event}
    assert len(ids) == 1 and "upstream" not in ids.pop()
    added = next(event for event in events if event["type"] == "response.output_item.added")
    assert added["item"]["id"].startswith("msg_upstream_")  # the provider's own item
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == REPLY
    assert final["usage"]["output_tokens"] == 7 and final["usage"]["cost_usd_micros"] > 0
    stored = httpx.get(f"{hoosh.base_url}/v1/responses/{final['id']}", timeout=10).json()
    assert stored == final
    # The official client reads it as it reads OpenAI.
    streamed = list(client.responses.create(model="native-stream", input="Hi", stream=True))
    assert [event.type for event in streamed] == text_event_types(7)
    assert streamed[-1].response.output_text == REPLY  # type: ignore[union-attr]


def test_a_function_call_passes_through_and_its_output_continues(hoosh: RunningStack, client: openai.OpenAI) -> None:
    events = raw_events(hoosh.base_url, {"model": "native-tool", "input": "Weather in Paris?", "tools": WEATHER})
    for event in events:
        openai_schemas.assert_valid(event, "ResponseStreamEvent")
    assert stats(hoosh)["last_body"]["tools"] == WEATHER
    call = events[-1]["response"]["output"][0]
    assert call["type"] == "function_call" and call["name"] == "weather"
    follow = client.responses.create(
        model="native-followup",
        previous_response_id=events[-1]["response"]["id"],
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny, 21 C"}],
        tools=WEATHER,
    )
    assert follow.output_text == REPLY and follow.previous_response_id == events[-1]["response"]["id"]
    sent = stats(hoosh)["last_body"]["input"]
    assert [item["type"] for item in sent] == ["message", "function_call", "function_call_output"]
    assert sent[1]["call_id"] == sent[2]["call_id"] == call["call_id"]


def test_previous_response_id_is_rebuilt_by_hoosh(hoosh: RunningStack, client: openai.OpenAI) -> None:
    first = client.responses.create(model="native-turns", input="Turn one", instructions="Be brief.")
    second = client.responses.create(model="native-turns", input="Turn two", previous_response_id=first.id)
    sent = stats(hoosh)["last_body"]
    assert "previous_response_id" not in sent and sent["store"] is False and "instructions" not in sent
    assert all("id" not in item for item in sent["input"])  # hoosh's ids stay with hoosh
    assert [(item["role"], item["content"]) for item in sent["input"]] == [
        ("user", [{"type": "input_text", "text": "Turn one"}]),
        ("assistant", [{"type": "output_text", "text": REPLY, "annotations": [], "logprobs": []}]),
        ("user", [{"type": "input_text", "text": "Turn two"}]),
    ]
    assert second.previous_response_id == first.id and second.output_text == REPLY
    # A streamed third turn continues the second.
    events = raw_events(
        hoosh.base_url, {"model": "native-turns", "input": "Turn three", "previous_response_id": second.id}
    )
    assert events[-1]["response"]["previous_response_id"] == second.id
    assert [item["role"] for item in stats(hoosh)["last_body"]["input"]] == ["user", "assistant"] * 2 + ["user"]
    items = httpx.get(f"{hoosh.base_url}/v1/responses/{second.id}/input_items", timeout=10).json()
    openai_schemas.assert_valid(items, "ResponseItemList")
    assert [item["content"][0]["text"] for item in items["data"]] == ["Turn two"]


def test_retries_and_fallback_apply(hoosh: RunningStack, client: openai.OpenAI) -> None:
    # Retried on the native provider: its first two answers are 503s.
    flaky = f"native-fail-twice-{uuid.uuid4().hex[:6]}"
    retried = client.responses.create(model=flaky, input="hi")
    assert retried.output_text == REPLY and stats(hoosh)["by_model"][flaky] == 3
    # Fallen back onto it (the first target is down), the model mapped to the target's.
    fallen = client.responses.create(model="nativefall-a", input="hi")
    assert fallen.output_text == REPLY and stats(hoosh)["last_body"]["model"] == "native-mapped"
    assert passed_through(fallen.model_dump())
    # Fallen back from it (it keeps failing) onto a chat provider: served by translation.
    for stream in (False, True):
        if stream:
            events = raw_events(hoosh.base_url, {"model": "nativeback-a", "input": "hi"})
            for event in events:
                openai_schemas.assert_valid(event, "ResponseStreamEvent")
            response = events[-1]["response"]
        else:
            response = client.responses.create(model="nativeback-a", input="hi").model_dump()
        assert response["output"][0]["content"][0]["text"] == REPLY and not passed_through(response)
        sent = stats(hoosh)["last_body"]
        assert sent["model"] == "gpt-4o-mini" and sent["messages"][-1] == {"role": "user", "content": "hi"}


def test_pool_used_equals_the_usage_clients_saw(hoosh: RunningStack) -> None:
    pool = f"native-{uuid.uuid4().hex[:8]}"
    with admin(hoosh) as client:
        assert client.post("/v1/admin/pools", json={"name": pool, "capacity": 1_000_000}).status_code == 200
    key = make_key(hoosh, [pool])
    seen = 0
    with client_for(hoosh.base_url, key) as api:
        first = api.responses.create(model="native-pool", input="Hello", instructions="Be brief.")
        assert first.usage is not None
        seen += first.usage.total_tokens
        events = raw_events(
            hoosh.base_url, {"model": "native-pool", "input": "More", "previous_response_id": first.id}, key=key
        )
        seen += events[-1]["response"]["usage"]["total_tokens"]
        short = api.responses.create(model="native-pool", input="Hi", max_output_tokens=3)
        assert short.status == "incomplete" and short.usage is not None and short.usage.output_tokens == 3
        seen += short.usage.total_tokens
        fallen = api.responses.create(model="nativeback-pool", input="Hi")  # translated, after native failures
        assert fallen.usage is not None
        seen += fallen.usage.total_tokens
    with admin(hoosh) as client:
        state = client.get(f"/v1/admin/pools/{pool}").json()
    assert state["used"] == seen and state["reserved"] == 0


def test_a_provider_stream_cut_after_its_first_tokens_ends_failed(hoosh: RunningStack) -> None:
    events = raw_events(hoosh.base_url, {"model": "native-cut-stream", "input": "hi"})
    types = [event["type"] for event in events]
    assert types[:6] == text_event_types(2)[:6] and types[-2:] == ["error", "response.failed"]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        openai_schemas.assert_valid(event, "ResponseStreamEvent")
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["id"] == events[0]["response"]["id"]
