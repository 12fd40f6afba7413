"""The Responses API at the edge: the translation onto chat (pure functions), then
``/v1/responses`` against the real router, budget and audit in-process (conftest's
``stack``) with the OpenAI-wire stand-in upstream, stored responses in the real Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import orjson
import pytest
from hoosh_edge.errors import InvalidRequestError, NotFoundError
from hoosh_edge.protocol_responses import ResponseCreateRequest
from hoosh_edge.responses_native import native_body
from hoosh_edge.routes_responses import _checked_id
from hoosh_edge.serving_responses import items_to_messages, normalize_input, prepare, text_format

from .conftest import REPLY, MakeEdge, Stack

# --------------------------------------------------------------------------- translation


def request(**fields: Any) -> ResponseCreateRequest:
    return ResponseCreateRequest.model_validate({"model": "gpt-4o-mini", "input": "hi", **fields})


def test_string_input_is_one_user_message_and_instructions_a_system_message_first() -> None:
    prepared = prepare(request(instructions="Be brief.", max_output_tokens=9, temperature=0.5), "r1", [])
    messages = [message.model_dump(exclude_none=True) for message in prepared.chat.messages]
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert prepared.chat.max_tokens == 9 and prepared.chat.temperature == 0.5
    assert prepared.response_id == "resp_r1"
    assert prepared.input_items[0]["type"] == "message"
    assert prepared.input_items[0]["content"] == [{"type": "input_text", "text": "hi"}]


def test_items_become_chat_messages_with_tool_calls_and_outputs() -> None:
    items = normalize_input(
        [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "call_2", "name": "time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ]
    )
    assert [item["type"] for item in items] == ["message", "message", "function_call", "function_call"] + [
        "function_call_output"
    ] * 2
    assert all(item["id"] and item["status"] == "completed" for item in items)
    messages = items_to_messages(items, None)
    assert messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    ]


def test_function_tools_tool_choice_and_json_schema_map_onto_chat() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    prepared = prepare(
        request(
            tools=[{"type": "function", "name": "weather", "description": "Weather", "parameters": schema}],
            tool_choice={"type": "function", "name": "weather"},
            parallel_tool_calls=False,
            text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
        ),
        "r2",
        [],
    )
    chat = prepared.chat
    assert chat.tools is not None and chat.tools[0].function.name == "weather"
    assert chat.tools[0].function.parameters == schema
    assert chat.tool_choice is not None and not isinstance(chat.tool_choice, str)
    assert chat.tool_choice.function.name == "weather"
    assert chat.parallel_tool_calls is False
    assert chat.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    assert prepared.tools[0]["name"] == "weather" and prepared.tools[0]["strict"] is None
    assert text_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    assert text_format(None) == {"type": "text"}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "name": "ok"}, {"type": "mcp", "server_label": "x"}]}, "tools[1].type"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        (  # a function output's non-text part could not be counted (nor sent on)
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_text", "text": "ok"}, {"type": "input_image", "image_url": "x"}],
                    }
                ]
            },
            "input[0].output[1].type",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file"}]}]},
            "input[0].output[0].type",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": ["x"]}]}, "input[0].output[0]"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
        ({"text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema"),
    ],
)
def test_unsupported_items_and_hosted_tools_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        prepare(request(**fields), "r3", [])
    assert caught.value.param == param


# --------------------------------------------------------------------------- against the stack


async def edge_with_stack(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str, **overrides: Any
) -> httpx.AsyncClient:
    edge = await make_edge(**stack.addresses(), responses_key_prefix=f"{tenancy_prefix}responses:", **overrides)
    return edge.client


def sdk(client: httpx.AsyncClient, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://edge/v1", api_key=key, http_client=client, max_retries=0)


async def test_blocking_response_is_stored_and_continued(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    client = await edge_with_stack(make_edge, stack, tenancy_prefix)
    api = sdk(client)
    first = await api.responses.create(model="gpt-4o-mini", input="Hello there", instructions="Be kind.")
    assert first.id.startswith("resp_") and first.object == "response" and first.status == "completed"
    assert first.output_text == REPLY
    assert first.usage is not None and first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    second = await api.responses.create(model="gpt-4o-mini", input="And again?", previous_response_id=first.id)
    sent = stack.upstream.stats.last_body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]  # instructions are not carried over
    assert sent[1]["content"] == REPLY and sent[2]["content"] == "And again?"
    assert second.previous_response_id == first.id
    fetched = await api.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == REPLY
    items = await api.responses.input_items.list(second.id)
    assert [item.type for item in items.data] == ["message"]
    await api.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(first.id)
    # The continuation keeps the whole conversation: deleting the first turn breaks nothing.
    third = await api.responses.create(model="gpt-4o-mini", input="Third", previous_response_id=second.id)
    assert [m["role"] for m in stack.upstream.stats.last_body["messages"]] == ["user", "assistant"] * 2 + ["user"]
    assert third.status == "completed"


async def test_stream_events_in_order_and_the_stored_copy(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    client = await edge_with_stack(make_edge, stack, tenancy_prefix)
    api = sdk(client)
    events = [event async for event in await api.responses.create(model="gpt-4o-mini", input="Hi", stream=True)]
    types = [event.type for event in events]
    deltas = types.count("response.output_text.delta")
    assert deltas >= 2
    assert types == [
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
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1].response  # type: ignore[union-attr]
    assert completed.output_text == REPLY and completed.usage is not None
    stored = await api.responses.retrieve(completed.id)
    assert stored.output_text == REPLY and stored.status == "completed"


async def test_function_call_stream_and_round_trip(make_edge: MakeEdge, stack: Stack, tenancy_prefix: str) -> None:
    client = await edge_with_stack(make_edge, stack, tenancy_prefix)
    api = sdk(client)
    tools: Any = [{"type": "function", "name": "weather", "parameters": {"type": "object"}, "strict": False}]
    events = [e async for e in await api.responses.create(model="mock-tool", input="Paris?", tools=tools, stream=True)]
    types = [event.type for event in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in types
    assert types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    response = events[-1].response  # type: ignore[union-attr]
    call = response.output[-1]
    assert call.type == "function_call" and call.name == "weather" and call.arguments == '{"city": "Paris"}'
    follow = await api.responses.create(
        model="gpt-4o-mini",
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=tools,
    )
    sent = stack.upstream.stats.last_body["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == call.call_id
    assert sent[-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}
    assert follow.output_text == REPLY


async def test_other_keys_cannot_see_and_hosted_tools_are_refused(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    client = await edge_with_stack(make_edge, stack, tenancy_prefix, auth="keys", admin_key="a" * 40)
    admin = {"Authorization": "Bearer " + "a" * 40}
    keys = []
    for name in ("one", "two"):
        made = await client.post("/v1/admin/keys", headers=admin, json={"name": name, "pools": ["default"]})
        assert made.status_code == 200, made.text
        keys.append(made.json()["key"])
    mine, theirs = sdk(client, keys[0]), sdk(client, keys[1])
    response = await mine.responses.create(model="gpt-4o-mini", input="secret")
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError) as caught:
        await theirs.responses.create(model="gpt-4o-mini", input="more", previous_response_id=response.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.delete(response.id)
    assert (await mine.responses.retrieve(response.id)).id == response.id
    refused = await client.post(
        "/v1/responses",
        headers={"Authorization": f"Bearer {keys[0]}"},
        json={"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "web_search"}]},
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "tools[0].type" and error["type"] == "invalid_request_error"
    assert "web_search" in error["message"]


async def test_store_false_keeps_nothing_and_ttl_applies(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    import redis.asyncio as aioredis

    client = await edge_with_stack(make_edge, stack, tenancy_prefix, responses_ttl_seconds=77)
    reply = await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", "store": False})
    assert reply.status_code == 200 and reply.json()["store"] is False
    assert (await client.get(f"/v1/responses/{reply.json()['id']}")).status_code == 404
    kept = (await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"})).json()
    redis = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        ttl = await redis.ttl(f"{tenancy_prefix}responses:{kept['id']}")
        assert 70 <= ttl <= 77
        assert orjson.loads(await redis.get(f"{tenancy_prefix}responses:{kept['id']}"))["owner"] == "anonymous"
    finally:
        await redis.aclose()
    assert (await client.get("/v1/responses/not-an-id")).status_code == 404


# --------------------------------------------------------------------------- background, cancel, failed


async def settled(client: httpx.AsyncClient, response_id: str, *, until: tuple[str, ...]) -> dict[str, Any]:
    """GET the response until its status is one of ``until`` (bounded poll)."""
    body: dict[str, Any] = {}
    for _ in range(100):
        reply = await client.get(f"/v1/responses/{response_id}")
        assert reply.status_code == 200, reply.text
        body = reply.json()
        if body["status"] in until:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"{response_id} stayed {body.get('status')}")


async def test_background_response_runs_server_side_and_is_stored(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    edge = await make_edge(**stack.addresses(), responses_key_prefix=f"{tenancy_prefix}responses:")
    api = sdk(edge.client)
    queued = await api.responses.create(model="gpt-4o-mini", input="Hello there", background=True)
    assert queued.status in ("queued", "in_progress") and queued.background is True and not queued.output
    done = await settled(edge.client, queued.id, until=("completed",))
    assert done["background"] is True and done["output"][0]["content"][0]["text"] == REPLY
    assert done["usage"]["output_tokens"] > 0 and done["error"] is None
    assert edge.app.state.edge.responses.background.running == 0
    # A background response continues like any other; cancelling a finished one is a 400.
    follow = await api.responses.create(model="gpt-4o-mini", input="More", previous_response_id=queued.id)
    assert [m["role"] for m in stack.upstream.stats.last_body["messages"]] == ["user", "assistant", "user"]
    assert follow.status == "completed"
    with pytest.raises(openai.BadRequestError, match="status 'completed'"):
        await api.responses.cancel(queued.id)
    with pytest.raises(openai.BadRequestError, match="background"):
        await api.responses.cancel(follow.id)


async def test_cancel_on_another_edge_stops_the_running_one(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    settings = {"responses_key_prefix": f"{tenancy_prefix}responses:", "responses_background_poll_seconds": 0.05}
    runner = await make_edge(**stack.addresses(), **settings)
    other = await make_edge(**stack.addresses(), **settings)
    # mock-stall streams its pieces, then hangs until the caller goes (or the edge's 5 s timeout).
    started = await runner.client.post(
        "/v1/responses", json={"model": "mock-stall", "input": "Take your time", "background": True}
    )
    assert started.status_code == 200, started.text
    response_id = started.json()["id"]
    await settled(other.client, response_id, until=("in_progress",))
    assert runner.app.state.edge.responses.background.running == 1
    began = time.monotonic()
    cancelled = await sdk(other.client).responses.cancel(response_id)
    assert cancelled.status == "cancelled" and cancelled.background is True
    for _ in range(60):
        if runner.app.state.edge.responses.background.running == 0:
            break
        await asyncio.sleep(0.05)
    assert runner.app.state.edge.responses.background.running == 0
    assert time.monotonic() - began < 3  # stopped by the cancel, not by the call's timeout
    await asyncio.sleep(0.2)
    for client in (runner.client, other.client):
        stored = (await client.get(f"/v1/responses/{response_id}")).json()
        assert stored["status"] == "cancelled" and stored["output"] == []
    again = await other.client.post(f"/v1/responses/{response_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"  # idempotent


async def test_cancel_is_confined_to_the_owner_and_runs_stop_at_once_here(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    # A slow poll: the cancel reaches the running edge itself, which stops at once.
    edge = await make_edge(
        **stack.addresses(),
        responses_key_prefix=f"{tenancy_prefix}responses:",
        responses_background_poll_seconds=30,
        auth="keys",
        admin_key="a" * 40,
    )
    admin = {"Authorization": "Bearer " + "a" * 40}
    keys = []
    for name in ("one", "two"):
        made = await edge.client.post("/v1/admin/keys", headers=admin, json={"name": name, "pools": ["default"]})
        keys.append(made.json()["key"])
    mine, theirs = sdk(edge.client, keys[0]), sdk(edge.client, keys[1])
    queued = await mine.responses.create(model="mock-stall", input="Slowly", background=True)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.cancel(queued.id)
    with pytest.raises(openai.BadRequestError, match="still"):
        await mine.responses.create(model="gpt-4o-mini", input="next", previous_response_id=queued.id)
    assert (await mine.responses.cancel(queued.id)).status == "cancelled"
    for _ in range(40):
        if edge.app.state.edge.responses.background.running == 0:
            break
        await asyncio.sleep(0.05)
    assert edge.app.state.edge.responses.background.running == 0
    # A cancelled response cannot be continued (only a completed or incomplete one).
    with pytest.raises(openai.BadRequestError, match="status 'cancelled'") as refused:
        await mine.responses.create(model="gpt-4o-mini", input="next", previous_response_id=queued.id)
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_failed_responses_are_stored_with_their_error(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    client = await edge_with_stack(make_edge, stack, tenancy_prefix)
    # Background: the upstream refuses (503 before anything streams).
    queued = (
        await client.post("/v1/responses", json={"model": "mock-fail-503", "input": "hi", "background": True})
    ).json()
    failed = await settled(client, queued["id"], until=("failed",))
    assert failed["error"]["code"] == "server_error" and failed["error"]["message"]
    assert failed["background"] is True and failed["output"] == [] and failed["completed_at"] is None
    # Streamed: the stream breaks after it started; the client saw the id in response.created.
    events = [
        event async for event in await sdk(client).responses.create(model="mock-cut-stream", input="hi", stream=True)
    ]
    assert events[-1].type == "response.failed"
    response_id = events[0].response.id  # type: ignore[union-attr]
    stored = (await client.get(f"/v1/responses/{response_id}")).json()
    error = events[-1].response.error  # type: ignore[union-attr]
    assert stored["status"] == "failed" and stored["error"] == {"code": error.code, "message": error.message}


@pytest.mark.parametrize(
    "fields", [{"background": True, "stream": True}, {"background": True, "store": False}], ids=["stream", "no-store"]
)
async def test_background_needs_store_and_no_stream(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str, fields: dict[str, Any]
) -> None:
    client = await edge_with_stack(make_edge, stack, tenancy_prefix)
    refused = await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", **fields})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "background"


# --------------------------------------------------------------------------- native body, ids


def test_native_body_is_built_from_the_counted_items() -> None:
    history = [
        *normalize_input([{"role": "user", "content": "Earlier"}]),
        {"id": "rs_1", "type": "reasoning", "summary": [], "encrypted_content": "x" * 1000},
        {
            "id": "msg_up",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Answer", "annotations": [{"junk": "y" * 1000}]},
                {"type": "something_new", "data": "z" * 1000},
            ],
        },
    ]
    prepared = prepare(
        request(
            input=[
                {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "x" * 1000},
                {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "extra": 1},
                {
                    "type": "function_call_output",
                    "call_id": "c1",
                    "output": [{"type": "input_text", "text": "out", "junk": "j"}],
                },
                {"role": "user", "content": [{"type": "input_text", "text": "Now?", "junk": "j"}], "junk": "j"},
            ],
            tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}, "junk": "j" * 1000}],
            tool_choice={"type": "function", "name": "f", "junk": "j"},
            text={"format": {"type": "json_object", "junk": "j"}, "verbosity": "low", "junk": "j"},
            max_output_tokens=50,
        ),
        "rn1",
        history,
    )
    sent = orjson.loads(native_body(prepared))
    assert "junk" not in orjson.dumps(sent).decode() and "x" * 100 not in orjson.dumps(sent).decode()
    assert sent["input"] == [
        {
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_text", "text": "Earlier"}],
        },
        {
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Answer", "annotations": [], "logprobs": []}],
        },
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "status": "completed"},
        {"type": "function_call_output", "call_id": "c1", "output": "out", "status": "completed"},
        {"type": "message", "role": "user", "status": "completed", "content": [{"type": "input_text", "text": "Now?"}]},
    ]
    # Exactly what the translation counted (and the reservation was sized from).
    assert [m.role for m in prepared.chat.messages] == ["user", "assistant", "tool", "user"]  # the call joins the turn
    assert sent["tools"] == [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    assert sent["tool_choice"] == {"type": "function", "name": "f"}
    assert sent["text"] == {"format": {"type": "json_object"}, "verbosity": "low"}
    assert sent["max_output_tokens"] == 50  # the router replaces it with the grant (router tests)
    assert not {"pool", "previous_response_id", "store", "stream", "background", "model"} & sent.keys()
    # A lone string is one user message, sent as it is.
    assert orjson.loads(native_body(prepare(request(input="hi"), "rn2", [])))["input"] == "hi"


def test_checked_id_wants_the_whole_id() -> None:
    assert _checked_id("resp_abc") == "resp_abc"
    for bad in ("resp_abc\n", "resp_abc/x", "xresp_abc", "resp_"):
        with pytest.raises(NotFoundError):
            _checked_id(bad)
    with pytest.raises(InvalidRequestError):  # a function name is matched whole too
        prepare(request(tools=[{"type": "function", "name": "f\n"}]), "r4", [])


# --------------------------------------------------------------------------- storage bounds


async def stored_raw(tenancy_prefix: str, response_id: str) -> bytes | None:
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        raw: bytes | None = await redis.get(f"{tenancy_prefix}responses:{response_id}")
        return raw
    finally:
        await redis.aclose()


async def stored_count(tenancy_prefix: str) -> int:
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        return len([key async for key in redis.scan_iter(match=f"{tenancy_prefix}responses:*")])
    finally:
        await redis.aclose()


async def test_conversation_cap_refuses_before_storing_or_sending(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    client = await edge_with_stack(make_edge, stack, tenancy_prefix, responses_max_conversation_bytes=4096)
    first = await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "a" * 2500})
    assert first.status_code == 200, first.text
    keys, calls = await stored_count(tenancy_prefix), stack.upstream.stats.requests
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": "b" * 2000, "previous_response_id": first.json()["id"]}, "previous_response_id"),
        ({"input": "b" * 2000, "previous_response_id": first.json()["id"], "background": True}, "previous_response_id"),
        ({"input": "c" * 5000}, "input"),
        ({"input": [{"role": "user", "content": "c" * 5000}], "background": True}, "input"),
        ({"input": "c" * 5000, "stream": True}, "input"),
    ]
    for fields, param in cases:
        refused = await client.post("/v1/responses", json={"model": "gpt-4o-mini", **fields})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == param
        assert error["type"] == "invalid_request_error"
    assert await stored_count(tenancy_prefix) == keys and stack.upstream.stats.requests == calls
    # Under the cap it continues as ever.
    ok = await client.post(
        "/v1/responses", json={"model": "gpt-4o-mini", "input": "b" * 100, "previous_response_id": first.json()["id"]}
    )
    assert ok.status_code == 200, ok.text


async def test_failed_responses_are_small_and_not_continuable(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    client = await edge_with_stack(make_edge, stack, tenancy_prefix)
    big = "x" * 50_000
    first = (await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": big})).json()
    assert first["status"] == "completed"
    # A background continuation that fails before any provider call (no such model), and
    # one the provider refuses: stored with their error and own input, no conversation copy.
    for model in ("no-such-model", "mock-fail-503"):
        queued = await client.post(
            "/v1/responses",
            json={"model": model, "input": "small", "background": True, "previous_response_id": first["id"]},
        )
        assert queued.status_code == 200, queued.text
        failed = await settled(client, queued.json()["id"], until=("failed",))
        assert failed["error"]["message"]
        raw = await stored_raw(tenancy_prefix, failed["id"])
        assert raw is not None and len(raw) < 10_000  # the 50 kB conversation is not copied
        record = orjson.loads(raw)
        assert record["conversation"] == [] and len(record["input_items"]) == 1
        items = (await client.get(f"/v1/responses/{failed['id']}/input_items")).json()
        assert [item["content"][0]["text"] for item in items["data"]] == ["small"]
        # Not continuable: a chain of failures cannot grow.
        for background in (False, True):
            refused = await client.post(
                "/v1/responses",
                json={"model": "gpt-4o-mini", "input": "more", "previous_response_id": failed["id"]}
                | ({"background": True} if background else {}),
            )
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == "previous_response_id" and "status 'failed'" in error["message"]
    # A completed one still carries the conversation.
    record = orjson.loads(await stored_raw(tenancy_prefix, first["id"]) or b"{}")
    assert [item["type"] for item in record["conversation"]] == ["message", "message"]


# --------------------------------------------------------------------------- fields not served, bounds, leases


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"conversation": "conv_123"}, "conversation", "unsupported_parameter"),
        ({"conversation": {"id": "conv_123"}}, "conversation", "unsupported_parameter"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
        ({"include": ["message.output_text.logprobs"]}, "include[0]", "unsupported_value"),
        ({"include": ["reasoning.encrypted_content", "file_search_call.results"]}, "include[1]", "unsupported_value"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "invalid_value"),
        ({"reasoning": {"summary": "long"}}, "reasoning.summary", "invalid_value"),
        ({"reasoning": {"budget": 3}}, "reasoning.budget", "unknown_parameter"),
        ({"include": [{}]}, "include[0]", "unsupported_value"),
        ({"reasoning": {"effort": ["low"]}}, "reasoning.effort", "invalid_value"),
        ({"service_tier": "flex"}, "service_tier", "unsupported_value"),
        ({"top_logprobs": 3}, "top_logprobs", "unsupported_parameter"),
        ({"truncation": "auto"}, "truncation", "unsupported_value"),
    ],
)
async def test_fields_not_served_are_refused_not_ignored(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str, fields: dict[str, Any], param: str, code: str
) -> None:
    client = await edge_with_stack(make_edge, stack, tenancy_prefix)
    keys, calls = await stored_count(tenancy_prefix), stack.upstream.stats.requests
    refused = await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", **fields})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert await stored_count(tenancy_prefix) == keys and stack.upstream.stats.requests == calls


async def test_empty_forms_of_those_fields_are_served(make_edge: MakeEdge, stack: Stack, tenancy_prefix: str) -> None:
    # What the OpenAI Agents SDK sends by default (include: [] always), and explicit defaults.
    client = await edge_with_stack(make_edge, stack, tenancy_prefix)
    fields = {
        "include": [],
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "auto",
        "truncation": "disabled",
        "top_logprobs": 0,
        "conversation": None,
        "prompt": None,
    }
    served = await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", **fields})
    assert served.status_code == 200, served.text
    assert served.json()["status"] == "completed"
    for name in ("include", "reasoning", "service_tier", "conversation", "prompt", "top_logprobs"):
        assert name not in stack.upstream.stats.last_body


async def test_the_agents_sdk_gpt5_defaults_are_served(make_edge: MakeEdge, stack: Stack, tenancy_prefix: str) -> None:
    # An Agent with no model: the SDK's default GPT-5 settings (reasoning effort none or
    # low, verbosity low) and the include it adds for reasoning models.
    client = await edge_with_stack(make_edge, stack, tenancy_prefix)
    for effort in ("none", "low", "medium"):
        served = await client.post(
            "/v1/responses",
            json={
                "model": "gpt-5.4",
                "input": [{"role": "user", "content": "hi"}],
                "include": ["reasoning.encrypted_content"],
                "reasoning": {"effort": effort},
                "text": {"verbosity": "low"},
                "store": True,
            },
        )
        assert served.status_code == 200, served.text
        body = served.json()
        assert body["status"] == "completed" and body["reasoning"] == {"effort": effort, "summary": None}


async def test_background_runs_are_bounded_per_key_and_per_edge(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    edge = await make_edge(
        **stack.addresses(),
        responses_key_prefix=f"{tenancy_prefix}responses:",
        responses_max_background_per_key=1,
        responses_background_poll_seconds=0.05,
    )
    first = await edge.client.post("/v1/responses", json={"model": "mock-stall", "input": "slow", "background": True})
    assert first.status_code == 200, first.text
    keys = await stored_count(tenancy_prefix)
    second = await edge.client.post("/v1/responses", json={"model": "mock-stall", "input": "slow", "background": True})
    assert second.status_code == 429, second.text
    error = second.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "rate_limit_error",
        "too_many_background_responses",
        "background",
    )
    assert second.headers["retry-after"] == "1"
    assert await stored_count(tenancy_prefix) == keys  # nothing stored for the refused one
    # A blocking response is not a background run: still served.
    blocking = await edge.client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"})
    assert blocking.status_code == 200, blocking.text
    assert (await edge.client.post(f"/v1/responses/{first.json()['id']}/cancel")).json()["status"] == "cancelled"
    for _ in range(60):
        if edge.app.state.edge.responses.background.running == 0:
            break
        await asyncio.sleep(0.05)
    assert edge.app.state.edge.responses.background.running == 0
    again = await edge.client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", "background": True})
    assert again.status_code == 200, again.text
    await settled(edge.client, again.json()["id"], until=("completed",))


async def test_a_run_holds_a_lease_and_an_orphaned_one_reads_as_failed(
    make_edge: MakeEdge, stack: Stack, tenancy_prefix: str
) -> None:
    import redis.asyncio as aioredis
    from hoosh_edge.responses_background import ORPHAN_MESSAGE
    from hoosh_edge.responses_store import StoredResponse

    edge = await make_edge(
        **stack.addresses(),
        responses_key_prefix=f"{tenancy_prefix}responses:",
        responses_background_poll_seconds=0.05,
        responses_background_lease_seconds=2,
    )
    store = edge.app.state.edge.responses.store
    redis = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        running = (
            await edge.client.post("/v1/responses", json={"model": "mock-stall", "input": "slow", "background": True})
        ).json()
        lease = store.run_key(running["id"])
        assert await redis.exists(lease) and 0 < await redis.ttl(lease) <= 2
        await settled(edge.client, running["id"], until=("in_progress",))
        # A live run is not an orphan: reads leave it in progress.
        assert (await edge.client.get(f"/v1/responses/{running['id']}")).json()["status"] == "in_progress"
        await edge.client.post(f"/v1/responses/{running['id']}/cancel")
        assert not await redis.exists(lease)  # a cancel drops the lease
        for _ in range(60):
            if edge.app.state.edge.responses.background.running == 0:
                break
            await asyncio.sleep(0.05)

        # What an edge that died mid-run leaves once its lease lapsed: an in-progress
        # background response and no lease. Reading it (on any edge) settles it as failed.
        done = (await edge.client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"})).json()
        orphan = {**done, "id": "resp_" + "0" * 31 + "1", "status": "in_progress", "background": True}
        orphan.pop("usage")
        raw = await stored_raw(tenancy_prefix, done["id"])
        assert raw is not None
        await store.save(StoredResponse(orjson.loads(raw)["owner"], orphan, []))
        read = (await edge.client.get(f"/v1/responses/{orphan['id']}")).json()
        assert read["status"] == "failed"
        assert read["error"] == {"code": "server_error", "message": ORPHAN_MESSAGE}
        again = await edge.client.post(f"/v1/responses/{orphan['id']}/cancel")
        assert again.status_code == 400 and "failed" in again.json()["error"]["message"]
        refused = await edge.client.post(
            "/v1/responses", json={"model": "gpt-4o-mini", "input": "next", "previous_response_id": orphan["id"]}
        )
        assert refused.status_code == 400 and "failed" in refused.json()["error"]["message"]
        # After a delete, neither the response nor a lease is left.
        assert (await edge.client.delete(f"/v1/responses/{running['id']}")).status_code == 200
        assert await stored_raw(tenancy_prefix, running["id"]) is None and not await redis.exists(lease)
    finally:
        await redis.aclose()


@pytest.mark.parametrize(
    ("details", "status", "code"),
    [
        ("Sent message larger than max (40000000 vs. 33554432)", 413, "request_too_large"),
        ("Received message larger than max (40000000 vs. 33554432)", 502, "upstream_error"),
    ],
)
def test_grpc_message_size_bounds_are_not_rate_limits(details: str, status: int, code: str) -> None:
    import grpc
    from hoosh_edge.errors import to_api_error

    error = to_api_error(
        grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    )
    assert (error.status, error.code) == (status, code)
    assert "33554432" not in error.message
    # A quota the router refuses (hoosh-error-* metadata) is still a 429.
    quota = to_api_error(
        grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(("hoosh-error-code", "rate_limit_exceeded")),
            "too many requests",
        )
    )
    assert quota.status == 429


def test_reasoning_and_include_are_forwarded_to_native_providers() -> None:
    prepared = prepare(
        request(reasoning={"effort": "low", "summary": "auto"}, include=["reasoning.encrypted_content"]), "rn2", []
    )
    sent = orjson.loads(native_body(prepared))
    assert sent["reasoning"] == {"effort": "low", "summary": "auto"}
    assert sent["include"] == ["reasoning.encrypted_content"]
