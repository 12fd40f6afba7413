"""The edge's metrics, access lines and server spans, against the real services in
process (tests/inprocess.py). Metrics are process-wide: each test reads deltas."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hoosh_common.logs import JsonFormatter
from hoosh_common.telemetry import capture_spans
from hoosh_edge.metrics import RouteLabels, http_method
from opentelemetry import trace
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Edge, MakeEdge, Stack
from .test_edge_tenancy import ADMIN, bearer, create_key, edge_on

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def edge(make_edge: MakeEdge, stack: Stack) -> Edge:
    return await edge_on(make_edge, stack)


def test_route_labels_are_templates_never_raw_paths() -> None:
    labels = RouteLabels(["/v1/chat/completions", "/v1/models/{model}", "/v1/admin/pools/{name}/reset"])
    assert labels("/v1/chat/completions") == "/v1/chat/completions"
    assert labels("/v1/models/gpt-4o") == "/v1/models/{model}"
    assert labels("/v1/models/openai/gpt-4o") == "/v1/models/{model}"  # a last parameter may hold slashes
    assert labels("/v1/admin/pools/team-a/reset") == "/v1/admin/pools/{name}/reset"
    assert labels("/v1/admin/pools/a/b/reset") == "_other"  # an inner one may not
    assert labels("/v1/models/") == "_other"
    assert labels("/wp-login.php") == "_other"


def test_http_methods_are_a_bounded_label() -> None:
    assert [http_method(m) for m in ("GET", "POST", "DELETE", "PROPFIND", "M-SEARCH", "get")] == [
        "GET",
        "POST",
        "DELETE",
        "_other",
        "_other",
        "_other",
    ]


async def test_requests_are_counted_by_route_method_and_status(edge: Edge) -> None:
    route = {"route": "/v1/chat/completions", "method": "POST"}
    before = (
        value("hoosh_http_requests_total", **route, status="200"),
        value("hoosh_http_request_duration_seconds_count", **route),
        value("hoosh_http_requests_total", route="_other", method="GET", status="404"),
        value("hoosh_http_requests_total", **route, status="401"),
        value("hoosh_auth_failures_total", reason="invalid_api_key"),
        value("hoosh_http_time_to_first_token_seconds_count", route="/v1/chat/completions"),
    )
    for _ in range(3):
        response = await edge.client.post("/v1/chat/completions", json=CHAT, headers=ADMIN)
        assert response.status_code == 200, response.text
    async with edge.client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=ADMIN
    ) as stream:
        assert stream.status_code == 200
        _ = [line async for line in stream.aiter_lines()]
    assert (await edge.client.get("/no/such/path/" + "x" * 40, headers=ADMIN)).status_code == 404
    assert (
        await edge.client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-hoosh-wrong"))
    ).status_code == 401
    after = (
        value("hoosh_http_requests_total", **route, status="200"),
        value("hoosh_http_request_duration_seconds_count", **route),
        value("hoosh_http_requests_total", route="_other", method="GET", status="404"),
        value("hoosh_http_requests_total", **route, status="401"),
        value("hoosh_auth_failures_total", reason="invalid_api_key"),
        value("hoosh_http_time_to_first_token_seconds_count", route="/v1/chat/completions"),
    )
    assert [b - a for a, b in zip(before, after, strict=True)] == [4, 5, 1, 1, 1, 1]
    assert value("hoosh_http_requests_in_flight") == 0
    assert b"/no/such/path" not in (await edge.client.get("/metrics", headers=ADMIN)).content


async def test_metrics_on_the_api_port_need_an_admin_key(edge: Edge) -> None:
    key, _ = await create_key(edge, pools=["team-a"])
    assert (await edge.client.get("/metrics", headers=bearer(key))).status_code == 403
    assert (await edge.client.get("/metrics")).status_code == 401
    response = await edge.client.get("/metrics", headers=ADMIN)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"hoosh_http_requests", "hoosh_http_request_duration_seconds"} <= names


async def test_one_access_line_per_request_with_its_ids_and_no_secret(edge: Edge) -> None:
    key, record = await create_key(edge, pools=["team-a"])
    # As a service logs: the JSON formatter on a stream, formatting as each line is written.
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(JsonFormatter("edge"))
    logger = logging.getLogger("hoosh_edge")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        response = await edge.client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={**bearer(key), "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert response.status_code == 200, response.text
    lines = [json.loads(raw) for raw in sink.getvalue().splitlines()]
    access = [line for line in lines if line["msg"] == "access"]
    assert len(access) == 1
    line = access[0]
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and len(line["span_id"]) == 16
    assert (line["route"], line["method"], line["status"], line["key_id"]) == (
        "/v1/chat/completions",
        "POST",
        200,
        record["id"],
    )
    assert key not in sink.getvalue()


async def test_exported_requests_get_a_server_span_in_the_callers_trace(make_edge: MakeEdge, stack: Stack) -> None:
    with capture_spans() as exporter:
        edge = await edge_on(make_edge, stack)  # the middleware stack is built while exporting
        response = await edge.client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={**ADMIN, "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        )
        assert response.status_code == 200
        await stack.router.settled()
        spans = exporter.get_finished_spans()
    server = [span for span in spans if span.kind == trace.SpanKind.SERVER and span.resource]
    edge_span = next(span for span in server if span.parent and span.parent.span_id == 0x00F067AA0BA902B7)
    assert f"{edge_span.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert edge_span.attributes["hoosh.request_id"] == response.headers["x-request-id"]
    # The router's server span (the gRPC call) is a descendant in the same trace.
    assert any(
        span.context.trace_id == edge_span.context.trace_id and "RouterService/Chat" in span.name for span in spans
    )
