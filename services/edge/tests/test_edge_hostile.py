"""Hostile bodies and ids: deep JSON and bad model ids get a clear 400 in OpenAI's shape
before anything reaches the router (which is where a chat reserves budget).

Router, budget and audit are the in-process fakes of backends.py, so "nothing reached
the router" is read off what they recorded.
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

from .backends import Backends
from .conftest import ADMIN_KEY, Edge, MakeEdge
from .test_edge_app import CHAT, USER, assert_envelope

ROUTER_CALLS = ("Chat", "ChatStream", "Embed", "ListModels")


@pytest.fixture
async def edge(make_edge: MakeEdge, backends: Backends) -> Edge:
    return await make_edge(router_addr=backends.address, budget_addr=backends.address, audit_addr=backends.address)


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


def nothing_reached_the_router(backends: Backends) -> bool:
    return all(backends.recorder.count(method) == 0 for method in ROUTER_CALLS)


@pytest.mark.parametrize("levels", [500, 1000])
async def test_a_deeply_nested_tool_schema_is_400(edge: Edge, backends: Backends, levels: int) -> None:
    body = chat_with_tool(nested_schema(levels))
    assert len(body) < edge.settings.edge_max_body_bytes
    assert orjson.loads(body)  # valid JSON (orjson reads 1,024 levels), under the body limit
    response = await edge.client.post(CHAT, content=body, headers={"content-type": "application/json"})
    error = assert_envelope(response, 400)
    assert error["code"] == "json_too_deep"
    assert error["type"] == "invalid_request_error"
    assert str(DEFAULT_MAX_JSON_DEPTH) in error["message"]
    assert nothing_reached_the_router(backends)  # so nothing was reserved


async def test_a_body_nested_ten_thousand_levels_is_400(edge: Edge, backends: Backends) -> None:
    inner = b"[" * 10_000 + b"]" * 10_000
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "user": ' + inner + b"}"
    response = await edge.client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert assert_envelope(response, 400)["code"] == "json_too_deep"
    assert nothing_reached_the_router(backends)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
        ("/v1/tokens/check", {"pool": "default", "tokens": 1}),
        ("/v1/admin/pools", {"name": "deep", "capacity": 1}),
    ],
)
async def test_every_json_route_bounds_depth(
    make_edge: MakeEdge, backends: Backends, path: str, body: dict[str, Any]
) -> None:
    edge = await make_edge(budget_addr=backends.address, auth="keys", admin_key=ADMIN_KEY)
    deep = orjson.dumps(body)[:-1] + b', "extra": ' + nested_schema(300) + b"}"
    headers = {"content-type": "application/json", "authorization": f"Bearer {ADMIN_KEY}"}
    response = await edge.client.post(path, content=deep, headers=headers)
    assert assert_envelope(response, 400)["code"] == "json_too_deep"


async def test_a_tool_schema_within_the_bound_is_served(edge: Edge, backends: Backends) -> None:
    parameters = nested_schema(DEFAULT_MAX_JSON_DEPTH - 6)  # body -> tools -> [0] -> function -> parameters
    body = chat_with_tool(parameters)
    assert depth_of(orjson.loads(body)) <= DEFAULT_MAX_JSON_DEPTH
    response = await edge.client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    sent = backends.recorder.last("Chat").tools[0].function.parameters_json
    assert orjson.loads(sent) == orjson.loads(parameters)


async def test_the_depth_bound_is_a_setting(make_edge: MakeEdge, backends: Backends) -> None:
    edge = await make_edge(router_addr=backends.address, edge_max_json_depth=8)
    body = chat_with_tool(nested_schema(9))
    response = await edge.client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert assert_envelope(response, 400)["code"] == "json_too_deep"


BAD_MODEL_IDS = ["a/../b", "..", "a b", "a?b", "/gpt-4o", "gpt-4o/", "a//b", "a/./b", "x" * 257, ""]


@pytest.mark.parametrize("model", BAD_MODEL_IDS)
async def test_bad_model_ids_are_400_before_routing(edge: Edge, backends: Backends, model: str) -> None:
    for path, body in (
        (CHAT, {"model": model, "messages": [USER]}),
        ("/v1/embeddings", {"model": model, "input": "x"}),
    ):
        error = assert_envelope(await edge.client.post(path, json=body), 400, param="model")
        assert error["code"] in ("invalid_value", "missing_required_parameter")
    assert nothing_reached_the_router(backends)


@pytest.mark.parametrize("raw", ["a%2F..%2Fb", "..%2Fx", "a%20b", "a%3Fb", "a/", "a//b", "a%2F.%2Fb", "%2Fa"])
async def test_bad_ids_in_the_model_path_are_400_before_routing(edge: Edge, backends: Backends, raw: str) -> None:
    error = assert_envelope(await edge.client.get(f"/v1/models/{raw}"), 400, param="model")
    assert error["code"] == "invalid_value"
    assert nothing_reached_the_router(backends)


async def test_a_good_model_path_with_a_slash_is_served(edge: Edge) -> None:
    response = await edge.client.get("/v1/models/local/llama-3")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "local/llama-3"


@pytest.mark.parametrize("raw", ["a%20b", "a%3Fb", "a%2Cb", ".." + "x" * 70])
async def test_bad_pool_names_in_admin_paths_are_400(make_edge: MakeEdge, backends: Backends, raw: str) -> None:
    edge = await make_edge(budget_addr=backends.address, auth="keys", admin_key=ADMIN_KEY)
    response = await edge.client.get(f"/v1/admin/pools/{raw}", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    error = assert_envelope(response, 400, param="name")
    assert error["code"] == "invalid_value"
    assert backends.recorder.count("GetPool") == 0


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
