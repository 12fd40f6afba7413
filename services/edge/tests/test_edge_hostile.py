"""Hostile bodies and ids: deep JSON and bad model ids get a clear 400 in OpenAI's shape
before anything reaches the router (which is where a chat reserves budget).

Router, budget and audit are the real services in-process (conftest's ``stack``): the
router records every request it receives as an event (refusals included) and calls the
provider stand-in for every one it serves, so "nothing reached the router" is read off
the event stream and the stand-in's counters, and "nothing reached the budget" off the
pools.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hoosh_common.model_ids import model_id_problem
from hoosh_edge.json_depth import DEFAULT_MAX_JSON_DEPTH, exceeds_depth
from hoosh_edge.protocol import MODEL_ID_PATTERN
from hypothesis import given
from hypothesis import strategies as st

from .conftest import ADMIN_KEY, Edge, MakeEdge, Stack
from .test_edge_app import CHAT, USER, assert_envelope


@pytest.fixture
async def edge(make_edge: MakeEdge, stack: Stack) -> Edge:
    return await make_edge(**stack.addresses())


def nested_schema(levels: int) -> bytes:
    """A JSON schema (as text: orjson writes 254 levels at most) nesting ``levels`` objects deep."""
    half = (levels - 1) // 2
    return b'{"type": "object", "properties": {"p": ' * half + b'{"type": "string"}' + b"}}" * half


def chat_with_tool(parameters: bytes) -> bytes:
    return (
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], '
        b'"tools": [{"type": "function", "function": {"name": "deep", "parameters": ' + parameters + b"}}]}"
    )


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


async def nothing_reached_the_router(stack: Stack) -> bool:
    """No request event from the router, no provider call, nothing reserved or used."""
    pools = [await stack.pool(name) for name in ("default", "org", "team-a", "team-b")]
    return (
        await stack.router_events() == []
        and stack.upstream_requests() == 0
        and all(pool.used == pool.reserved == 0 for pool in pools)
    )


async def test_what_reaches_the_router_is_seen(edge: Edge, stack: Stack) -> None:
    """The measure above can fail: a well-formed id the router does not know reaches it
    (404 from the router itself, recorded as a failed request)."""
    body = {"model": "no-such-model", "messages": [USER]}
    error = assert_envelope(await edge.client.post(CHAT, json=body), 404, param="model")
    assert error["code"] == "model_not_found"
    [(name, event)] = await stack.router_events()
    assert (name, event.model, event.http_status) == ("inference.failed", "no-such-model", 404)
    assert not await nothing_reached_the_router(stack)


@pytest.mark.parametrize("levels", [500, 1000])
async def test_a_deeply_nested_tool_schema_is_400(edge: Edge, stack: Stack, levels: int) -> None:
    body = chat_with_tool(nested_schema(levels))
    assert len(body) < edge.settings.edge_max_body_bytes
    assert orjson.loads(body)  # valid JSON (orjson reads 1,024 levels), under the body limit
    response = await edge.client.post(CHAT, content=body, headers={"content-type": "application/json"})
    error = assert_envelope(response, 400)
    assert error["code"] == "json_too_deep"
    assert error["type"] == "invalid_request_error"
    assert str(DEFAULT_MAX_JSON_DEPTH) in error["message"]
    assert await nothing_reached_the_router(stack)  # so nothing was reserved


async def test_a_body_nested_ten_thousand_levels_is_400(edge: Edge, stack: Stack) -> None:
    inner = b"[" * 10_000 + b"]" * 10_000
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "user": ' + inner + b"}"
    response = await edge.client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert assert_envelope(response, 400)["code"] == "json_too_deep"
    assert await nothing_reached_the_router(stack)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
        ("/v1/tokens/check", {"pool": "default", "tokens": 1}),
        ("/v1/admin/pools", {"name": "deep", "capacity": 1}),
    ],
)
async def test_every_json_route_bounds_depth(
    make_edge: MakeEdge, stack: Stack, path: str, body: dict[str, Any]
) -> None:
    edge = await make_edge(**stack.addresses(), auth="keys", admin_key=ADMIN_KEY)
    deep = orjson.dumps(body)[:-1] + b', "extra": ' + nested_schema(300) + b"}"
    headers = {"content-type": "application/json", "authorization": f"Bearer {ADMIN_KEY}"}
    response = await edge.client.post(path, content=deep, headers=headers)
    assert assert_envelope(response, 400)["code"] == "json_too_deep"
    assert await nothing_reached_the_router(stack)
    assert "deep" not in [pool.name for pool in await stack.budget.store.list_pools()]


async def test_a_tool_schema_within_the_bound_is_served(edge: Edge, stack: Stack) -> None:
    parameters = nested_schema(DEFAULT_MAX_JSON_DEPTH - 6)  # body -> tools -> [0] -> function -> parameters
    body = chat_with_tool(parameters)
    assert depth_of(orjson.loads(body)) <= DEFAULT_MAX_JSON_DEPTH
    response = await edge.client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    # The schema reached the provider intact, through the router.
    sent = stack.upstream.stats.last_body["tools"][0]["function"]["parameters"]
    assert sent == orjson.loads(parameters)


async def test_the_depth_bound_is_a_setting(make_edge: MakeEdge, stack: Stack) -> None:
    edge = await make_edge(**stack.addresses(), edge_max_json_depth=8)
    body = chat_with_tool(nested_schema(9))
    response = await edge.client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert assert_envelope(response, 400)["code"] == "json_too_deep"


BAD_MODEL_IDS = ["a/../b", "..", "a b", "a?b", "/gpt-4o", "gpt-4o/", "a//b", "a/./b", "x" * 257, ""]


@pytest.mark.parametrize("model", BAD_MODEL_IDS)
async def test_bad_model_ids_are_400_before_routing(edge: Edge, stack: Stack, model: str) -> None:
    for path, body in (
        (CHAT, {"model": model, "messages": [USER]}),
        ("/v1/embeddings", {"model": model, "input": "x"}),
    ):
        error = assert_envelope(await edge.client.post(path, json=body), 400, param="model")
        assert error["code"] in ("invalid_value", "missing_required_parameter")
    assert await nothing_reached_the_router(stack)


@pytest.mark.parametrize("raw", ["a%2F..%2Fb", "..%2Fx", "a%20b", "a%3Fb", "a/", "a//b", "a%2F.%2Fb", "%2Fa"])
async def test_bad_ids_in_the_model_path_are_400_before_routing(edge: Edge, raw: str) -> None:
    # Listing models changes nothing at the router: that this 400 is the edge's, not a
    # lookup's, shows in the status (an id the router's list lacks is 404).
    error = assert_envelope(await edge.client.get(f"/v1/models/{raw}"), 400, param="model")
    assert error["code"] == "invalid_value"


async def test_a_good_model_path_with_a_slash_is_served(edge: Edge) -> None:
    response = await edge.client.get("/v1/models/local/llama-3")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "local/llama-3"
    assert_envelope(await edge.client.get("/v1/models/local/llama-4"), 404, param="model")  # well formed, unknown


@pytest.mark.parametrize("raw", ["a%20b", "a%3Fb", "a%2Cb", ".." + "x" * 70])
async def test_bad_pool_names_in_admin_paths_are_400(make_edge: MakeEdge, stack: Stack, raw: str) -> None:
    edge = await make_edge(**stack.addresses(), auth="keys", admin_key=ADMIN_KEY)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    # The edge's own 400 (the budget would answer a name it does not hold with 404).
    error = assert_envelope(await edge.client.get(f"/v1/admin/pools/{raw}", headers=admin), 400, param="name")
    assert error["code"] == "invalid_value"
    assert_envelope(await edge.client.get("/v1/admin/pools/no-such-pool", headers=admin), 404)


@given(st.from_regex(MODEL_ID_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 256))
def test_the_documented_model_id_pattern_accepts_only_valid_ids(model: str) -> None:
    assert model_id_problem(model) is None


@given(st.text(alphabet="ab./?: -", max_size=12))
def test_the_documented_model_id_pattern_is_the_rule(model: str) -> None:
    assert (re.fullmatch(MODEL_ID_PATTERN, model) is not None) == (model_id_problem(model) is None)


@given(
    st.recursive(
        st.none() | st.integers(-9, 9) | st.text(alphabet='ab{}[]"\\'),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(alphabet='a{["\\', max_size=3), inner),
        max_leaves=40,
    )
)
def test_exceeds_depth_measures_what_it_parses(value: Any) -> None:
    body = orjson.dumps(value)
    depth = depth_of(value)
    for limit in (1, 2, 3, 5, 8):
        assert exceeds_depth(body, limit) == (depth > limit)
