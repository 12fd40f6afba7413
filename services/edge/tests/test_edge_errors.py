"""errors.to_api_error: gRPC statuses (real AioRpcError instances) and validation errors;
then the same mapping fed by the real router (conftest's ``stack``): the statuses and
trailing metadata it really sends for a provider that rate-limits, refuses, breaks,
is down or too slow, an unknown model or pool, an exhausted budget, and a stream cut
after its first tokens."""

from __future__ import annotations

from typing import Any

import grpc
import orjson
import pytest
from hoosh_edge.errors import EdgeError, RequestTooLargeError, to_api_error, validation_error
from hoosh_edge.protocol import ChatCompletionRequest
from hoosh_edge.responses import error_response
from hoosh_metering.pools import PoolSpec
from pydantic import ValidationError

from .conftest import LATE_TIMEOUT, MakeEdge, Stack
from .test_edge_app import CHAT, assert_envelope


def rpc_error(
    code: grpc.StatusCode, details: str = "details", trailing: tuple[tuple[str, str | bytes], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details)


@pytest.mark.parametrize(
    ("code", "status", "error_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, None),
        (grpc.StatusCode.FAILED_PRECONDITION, 400, None),
        (grpc.StatusCode.NOT_FOUND, 404, "model_not_found"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_exceeded"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_api_key"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_denied"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
        (grpc.StatusCode.INTERNAL, 502, "upstream_error"),
        (grpc.StatusCode.UNKNOWN, 502, "upstream_error"),
        (grpc.StatusCode.DATA_LOSS, 502, "upstream_error"),
        (grpc.StatusCode.CANCELLED, 499, "client_closed_request"),
    ],
)
def test_grpc_status_to_http(code: grpc.StatusCode, status: int, error_code: str | None) -> None:
    error = to_api_error(rpc_error(code))
    assert (error.status, error.code) == (status, error_code)
    assert error.type == ("api_error" if status in (502, 503, 504) else error.type)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_trailing_metadata_overrides_type_code_param_and_sets_retry_after() -> None:
    error = to_api_error(
        rpc_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Token budget exceeded: pool 'default' has 3 tokens available",
            (
                ("hoosh-error-type", "insufficient_quota"),
                ("hoosh-error-code", "budget_exhausted"),
                ("hoosh-error-param", "pool"),
                ("retry-after", "17"),
            ),
        )
    )
    assert error.status == 429
    assert error.headers == {"Retry-After": "17"}
    assert error.body() == {
        "error": {
            "message": "Token budget exceeded: pool 'default' has 3 tokens available",
            "type": "insufficient_quota",
            "param": "pool",
            "code": "budget_exhausted",
        }
    }


def test_retry_after_without_hoosh_metadata() -> None:
    error = to_api_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (("retry-after", "3"),)))
    assert (error.status, error.headers, error.message) == (429, {"Retry-After": "3"}, "slow down")


def test_error_response_carries_status_headers_and_envelope() -> None:
    error = to_api_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (("retry-after", "3"),)))
    response = error_response(error)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.headers["content-type"] == "application/json"
    assert orjson.loads(response.body) == error.body()


def test_error_as_sse_event() -> None:
    event = to_api_error(
        rpc_error(grpc.StatusCode.INTERNAL, "x", (("hoosh-error-code", "upstream_error"),))
    ).sse_event()
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:])["error"]["code"] == "upstream_error"


def test_transport_details_are_not_sent() -> None:
    details = "failed to connect to all addresses; last error: ipv4:10.0.0.7:50051: Connection refused"
    error = to_api_error(rpc_error(grpc.StatusCode.UNAVAILABLE, details))
    assert error.status == 503
    assert "10.0.0.7" not in error.json().decode()
    assert error.log_detail == details


def test_application_details_are_sent() -> None:
    error = to_api_error(
        rpc_error(
            grpc.StatusCode.UNAVAILABLE,
            "No healthy backend for model 'm'",
            (("hoosh-error-code", "upstream_unavailable"), ("hoosh-error-type", "api_error")),
        )
    )
    assert (error.status, error.message, error.code) == (
        503,
        "No healthy backend for model 'm'",
        "upstream_unavailable",
    )


def test_not_found_code_is_chosen_by_the_caller() -> None:
    assert to_api_error(rpc_error(grpc.StatusCode.NOT_FOUND), not_found_code="pool_not_found").code == "pool_not_found"


def test_edge_errors_and_unexpected_exceptions() -> None:
    too_large = to_api_error(RequestTooLargeError("big"))
    assert (too_large.status, too_large.code, too_large.type) == (413, "request_too_large", "invalid_request_error")
    custom = to_api_error(EdgeError("x", headers={"A": "b"}))
    assert (custom.status, custom.headers) == (500, {"A": "b"})
    unexpected = to_api_error(RuntimeError("secret stack detail"))
    assert (unexpected.status, unexpected.code) == (500, "internal_error")
    assert "secret" not in unexpected.json().decode()
    assert to_api_error(orjson.JSONDecodeError("bad", "{", 0)).status == 400


def validate(body: dict[str, Any]) -> tuple[str | None, str | None, str]:
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        error = validation_error(exc.errors(), body)
        assert error.status == 400 and error.type == "invalid_request_error"
        return error.param, error.code, error.message
    raise AssertionError("the body was accepted")


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": [USER]}, "model", "missing_required_parameter"),
        ({"model": "m"}, "messages", "missing_required_parameter"),
        ({"model": "m", "messages": []}, "messages", "invalid_value"),
        ({"model": "m", "messages": [USER], "temperature": 3}, "temperature", "invalid_value"),
        ({"model": "m", "messages": [USER], "temperature": "hot"}, "temperature", "invalid_type"),
        ({"model": "m", "messages": [USER], "n": 2}, "n", "invalid_value"),
        ({"model": "m", "messages": [USER, {"role": "user", "content": 5}]}, "messages[1].content", "invalid_type"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_type"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
        ({"model": "m", "messages": [{"role": "assistant"}]}, "messages[0].content", "missing_required_parameter"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", None),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
            "missing_required_parameter",
        ),
        (
            {"model": "m", "messages": [USER], "stream_options": {"include_usage": True}},
            "stream_options",
            "invalid_value",
        ),
        ({"model": "m", "messages": [USER], "stop": ["a"] * 5}, "stop", "invalid_value"),
        (
            {"model": "m", "messages": [USER], "tools": [{"type": "function", "function": {}}]},
            "tools[0].function.name",
            "missing_required_parameter",
        ),
    ],
)
def test_validation_errors_name_the_parameter(body: dict[str, Any], param: str, code: str | None) -> None:
    got_param, got_code, message = validate(body)
    assert got_param == param
    if code is not None:
        assert got_code == code
    assert param in message


# --------------------------------------------------------------------------- through the real router


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
@pytest.mark.parametrize(
    ("model", "pool", "status", "kind", "code", "param", "retry_after"),
    [
        ("mock-fail-429", None, 429, "rate_limit_error", "rate_limit_exceeded", None, "1"),
        ("mock-fail-400", None, 400, "invalid_request_error", "invalid_request", None, None),
        ("mock-bad-json", None, 502, "api_error", "upstream_error", None, None),
        ("down-1", None, 503, "api_error", "upstream_unavailable", None, None),
        ("late-1", None, 504, "api_error", "upstream_timeout", None, None),
        ("no-such-model", None, 404, "invalid_request_error", "model_not_found", "model", None),
        ("gpt-4o", "no-such-pool", 400, "invalid_request_error", "pool_not_found", "pool", None),
        ("gpt-4o", "tiny", 429, "insufficient_quota", "budget_exhausted", None, "60"),
    ],
    ids=["provider-429", "provider-400", "bad-json", "down", "timeout", "model", "pool", "budget"],
)
async def test_the_routers_errors_reach_the_client_in_openai_shape(
    make_edge: MakeEdge,
    stack: Stack,
    stream: bool,
    model: str,
    pool: str | None,
    status: int,
    kind: str,
    code: str,
    param: str | None,
    retry_after: str | None,
) -> None:
    await stack.budget.store.create_pool(PoolSpec("tiny", 3))  # less than any prompt
    edge = await make_edge(**stack.addresses())
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if pool is not None:
        body["pool"] = pool
    response = await edge.client.post(CHAT, json=body)
    # A stream waits for the router's first message, so an error before it is a status too.
    error = assert_envelope(response, status, param=param)
    assert (error["type"], error["code"]) == (kind, code)
    assert response.headers.get("retry-after") == retry_after
    if code == "upstream_timeout":
        assert f"{LATE_TIMEOUT:g}s" in error["message"]
    # The router recorded the failure once, and ended the reservation it made.
    [(name, event)] = await stack.router_events()
    assert (name, event.error_code, event.http_status) == ("inference.failed", code, status)
    for name in ("default", "tiny"):
        assert (await stack.pool(name)).reserved == 0


async def test_a_stream_cut_after_its_first_tokens_ends_with_an_error_event(make_edge: MakeEdge, stack: Stack) -> None:
    edge = await make_edge(**stack.addresses())
    body = {"model": "mock-cut-stream", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = await edge.client.post(CHAT, json=body)
    assert response.status_code == 200  # the first tokens went out before the provider broke off
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert (error["type"], error["code"]) == ("api_error", "upstream_error")
    content = "".join(
        choice["delta"].get("content") or "" for event in events[:-2] for choice in orjson.loads(event)["choices"]
    )
    assert content == "Hello from"
    # What was generated is paid for, never more than reserved, and nothing stays reserved.
    [(name, failed)] = await stack.router_events()
    assert name == "inference.failed" and failed.charged_tokens > 0
    pool = await stack.pool("default")
    assert (pool.used, pool.reserved) == (failed.charged_tokens, 0)
