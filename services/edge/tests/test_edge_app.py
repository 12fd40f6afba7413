"""The HTTP surface without any backend: validation, limits, auth, ids, envelopes, 503s.

The gRPC channels point at a closed port, so every backend call really fails (no mock);
the last test asks the real services (conftest's ``stack`` and ``stt``) instead.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from hoosh_edge.protocol import ErrorResponse

from .conftest import ADMIN_KEY, MakeEdge, Stack

CHAT = "/v1/chat/completions"
USER = {"role": "user", "content": "hi"}
HEX_ID = re.compile(r"[0-9a-f]{32}")


def assert_envelope(response: httpx.Response, status: int, *, param: str | None = None) -> dict[str, Any]:
    """The response is the OpenAI error envelope with ``status`` and a request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    ErrorResponse.model_validate(body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert "Traceback" not in response.text
    return dict(body["error"])


async def test_invalid_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT, content=b'{"model": "m", "messages": [', headers={"content-type": "application/json"}
    )
    error = assert_envelope(response, 400)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


async def test_empty_body_is_400(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.post(CHAT), 400)


async def test_missing_model_names_the_param(client: httpx.AsyncClient) -> None:
    error = assert_envelope(await client.post(CHAT, json={"messages": [USER]}), 400, param="model")
    assert error["code"] == "missing_required_parameter"


async def test_empty_messages(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.post(CHAT, json={"model": "m", "messages": []}), 400, param="messages")


async def test_temperature_out_of_range(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"model": "m", "messages": [USER], "temperature": 3})
    assert_envelope(response, 400, param="temperature")


async def test_n_above_one_is_refused(client: httpx.AsyncClient) -> None:
    error = assert_envelope(await client.post(CHAT, json={"model": "m", "messages": [USER], "n": 2}), 400, param="n")
    assert "n=1" in error["message"]


async def test_nested_param_is_named(client: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": [USER, {"role": "assistant", "content": None}]}
    assert_envelope(await client.post(CHAT, json=body), 400, param="messages[1].content")


async def test_body_over_limit_by_content_length_is_413(client: httpx.AsyncClient) -> None:
    big = b'{"model": "m", "messages": [], "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = await client.post(CHAT, content=big, headers={"content-type": "application/json"})
    error = assert_envelope(response, 413)
    assert error["code"] == "request_too_large"


async def test_chunked_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "m", "pad": "'
        for _ in range(32):
            yield b"x" * 65536
        yield b'"}'

    request = client.build_request("POST", CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in request.headers  # really streamed without a length
    response = await client.send(request)
    assert_envelope(response, 413)


async def test_small_limit_applies(make_edge: Callable[..., Any]) -> None:
    client = (await make_edge(edge_max_body_bytes=64)).client
    response = await client.post(CHAT, json={"model": "m", "messages": [USER] * 5})
    assert_envelope(response, 413)


async def test_unknown_path_is_404_envelope(client: httpx.AsyncClient) -> None:
    error = assert_envelope(await client.get("/v1/nope"), 404)
    assert "/v1/nope" in error["message"]


async def test_wrong_method_is_405_envelope(client: httpx.AsyncClient) -> None:
    error = assert_envelope(await client.get(CHAT), 405)
    assert error["code"] == "method_not_allowed"


async def test_query_validation_is_400_not_422(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.get("/v1/audit", params={"limit": 0}), 400, param="limit")
    assert_envelope(await client.get("/v1/audit", params={"limit": "many"}), 400, param="limit")


async def test_tokens_body_validation(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.post("/v1/tokens/check", json={"pool": "p"}), 400, param="tokens")
    assert_envelope(await client.post("/v1/tokens/reserve", json={"pool": "p", "tokens": -1}), 400, param="tokens")
    assert_envelope(await client.post("/v1/tokens/report", json={"pool": "p", "reserved": 1}), 400, param="actual")


# --------------------------------------------------------------------------- request ids


async def test_request_id_is_generated(client: httpx.AsyncClient) -> None:
    first = await client.get("/v1/health")
    second = await client.get("/v1/health")
    assert HEX_ID.fullmatch(first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize("given", ["client-42.a_b", "has space", "x" * 129, "semi;colon", ""])
async def test_client_request_id_never_becomes_ours(client: httpx.AsyncClient, given: str) -> None:
    # Our id doubles as the reservation and event id: a reused client id must not merge two requests.
    first = await client.get("/v1/health", headers={"x-request-id": given})
    second = await client.get("/v1/health", headers={"x-request-id": given})
    assert HEX_ID.fullmatch(first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


# --------------------------------------------------------------------------- auth


async def test_auth_refuses_missing_and_wrong_keys(make_edge: Callable[..., Any]) -> None:
    client = (await make_edge(auth="keys", admin_key=ADMIN_KEY)).client
    wrong = [{}, {"authorization": "Bearer sk-three"}, {"authorization": f"Basic {ADMIN_KEY}"}]
    wrong.append({"authorization": "Bearer sk-hoosh-" + "A" * 43})  # shaped like a key, unknown
    for headers in wrong:
        response = await client.post(CHAT, json={"model": "m", "messages": [USER]}, headers=headers)
        error = assert_envelope(response, 401)
        assert error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error"
        assert response.headers["www-authenticate"] == "Bearer"
        assert ADMIN_KEY not in response.text
    # The unknown path is refused before routing: nothing is revealed without a key.
    assert_envelope(await client.get("/v1/nope"), 401)


async def test_auth_accepts_the_bootstrap_admin_key(make_edge: Callable[..., Any]) -> None:
    client = (await make_edge(auth="keys", admin_key=ADMIN_KEY)).client
    # Past auth, the empty body fails validation: 400, not 401.
    response = await client.post(CHAT, json={}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert_envelope(response, 400, param="messages")


async def test_health_and_docs_need_no_key(make_edge: Callable[..., Any]) -> None:
    client = (await make_edge(auth="keys", admin_key=ADMIN_KEY)).client
    response = await client.get("/v1/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert (await client.get("/v1/health/ready")).status_code == 503  # exempt, and the router is down
    assert (await client.get("/openapi.json")).status_code == 200
    assert (await client.get("/docs")).status_code == 200


async def test_open_auth_serves_without_a_key(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.post(CHAT, json={}), 400, param="messages")


# --------------------------------------------------------------------------- backends down (closed port)


async def test_chat_with_router_down_is_503(client: httpx.AsyncClient, closed_addr: str) -> None:
    error = assert_envelope(await client.post(CHAT, json={"model": "m", "messages": [USER]}), 503)
    assert error["code"] == "service_unavailable"
    assert closed_addr.split(":")[1] not in error["message"]  # no internal address leaks


async def test_streaming_chat_with_router_down_is_503_not_a_stream(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"model": "m", "messages": [USER], "stream": True})
    assert_envelope(response, 503)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/some/model", None),
        ("GET", "/v1/tokens/pools", None),
        ("POST", "/v1/tokens/check", {"pool": "default", "tokens": 1}),
        ("POST", "/v1/tokens/reserve", {"pool": "default", "tokens": 1}),
        ("POST", "/v1/tokens/report", {"pool": "default", "actual": 1, "reservation_id": "r"}),
        ("GET", "/v1/audit", None),
    ],
)
async def test_other_routes_with_backends_down_are_503(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    assert_envelope(await client.request(method, path, json=body), 503)


async def test_readiness_reports_each_backend(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/health/ready")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"router": "UNREACHABLE", "budget": "UNREACHABLE", "audit": "UNREACHABLE", "stt": "UNREACHABLE"},
    }


# --------------------------------------------------------------------------- the rest


async def test_unexpected_exception_is_500_without_traceback(make_edge: Callable[..., Any]) -> None:
    edge = await make_edge()

    async def boom() -> None:
        raise RuntimeError("internal secret")

    edge.app.add_api_route("/v1/boom", boom)
    error = assert_envelope(await edge.client.get("/v1/boom"), 500)
    assert error["code"] == "internal_error"
    assert "secret" not in error["message"]


async def test_openapi_documents_the_api(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/tokens/reserve", "/v1/audit"} <= set(schema["paths"])
    request_schema = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert list(request_schema["properties"])[:2] == ["messages", "model"]
    assert "token pool" in request_schema["properties"]["pool"]["description"]
    assert (await client.get("/docs")).status_code == 200
    # Every reference resolves inside the document.
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', orjson.dumps(schema).decode()))
    assert refs <= set(schema["components"]["schemas"])


# --------------------------------------------------------------------------- a real server


async def test_real_server_limits_ids_and_503(served: str) -> None:
    async with httpx.AsyncClient(base_url=served) as client:
        big = orjson.dumps({"model": "m", "messages": [USER], "pad": "x" * (2 * 1024 * 1024)})
        assert_envelope(await client.post(CHAT, content=big, headers={"content-type": "application/json"}), 413)
        assert_envelope(await client.post(CHAT, content=b"{nope"), 400)
        assert_envelope(await client.get("/nope"), 404)
        assert_envelope(await client.post(CHAT, json={"model": "m", "messages": [USER]}), 503)
        health = await client.get("/v1/health")
        assert health.status_code == 200 and health.headers["x-request-id"]


async def test_readiness_asks_each_real_service(make_edge: MakeEdge, stack: Stack, stt: Any) -> None:
    """The health names the edge asks for are the ones the services register."""
    response = await (await make_edge(**stack.addresses())).client.get("/v1/health/ready")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ok",
        "checks": {"router": "SERVING", "budget": "SERVING", "audit": "SERVING", "stt": "SERVING"},
    }
