"""The token endpoints (/v1/tokens/*): pools, check, reserve, report, within the key's pools.

Reservations made here are ``kind="manual"`` and owned by the key that made them: a
report that commits one must come from that key (admin: any manual one; open mode's
anonymous user: only its own, owner ``anonymous``), and a chat's own reservation (kind
``chat``) can never be committed through here.

A reservation is a call under the key's own limits: one request against its RPM, the
tokens it reserved against its TPM (429 ``rate_limit_exceeded`` with Retry-After), a
concurrency slot while the call runs; and a user key with a TPM cannot reserve more
than its TPM at once.
"""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Request
from hoosh.budget.v1 import budget_pb2
from hoosh_metering.errors import BudgetUnavailable
from starlette.responses import Response

from .admin_events import record_admin_action
from .errors import ConflictError, InvalidRequestError, MappedError, PermissionDeniedError, to_api_error
from .key_limits import limits_of
from .protocol import (
    PoolInfo,
    TokenCheckRequest,
    TokenCheckResponse,
    TokenReportRequest,
    TokenReportResponse,
    TokenReserveRequest,
    TokenReserveResponse,
)
from .responses import OrjsonResponse
from .routing import BACKEND, call_budget, edge, errors, grpc_metadata, json_body, parse_body, request_id
from .scopes import authorize_pool, ending_owner, pool_filter, principal_of, reservation_owner

router = APIRouter(tags=["tokens"])

MANUAL = "manual"  # the kind of reservations made through /v1/tokens/reserve

# Budget answers that say for certain nothing was reserved (TPM is given those tokens back).
_NOT_RESERVED = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


def pool_info(pool: budget_pb2.Pool) -> dict[str, Any]:
    return {
        "name": pool.name,
        "capacity": pool.capacity,
        "used": pool.used,
        "reserved": pool.reserved,
        "available": pool.available,
    }


@router.get("/v1/tokens/pools", response_model=list[PoolInfo], responses=errors(*BACKEND))
async def list_pools(request: Request) -> Response:
    """The token pools the key may use (admin: every pool) with their counters."""
    state = edge(request)
    reply = await call_budget(
        state.clients.budget.ListPools(
            budget_pb2.ListPoolsRequest(names=pool_filter(principal_of(request))),
            metadata=grpc_metadata(request),
            timeout=state.settings.edge_rpc_timeout_seconds,
        )
    )
    return OrjsonResponse([pool_info(pool) for pool in reply.pools])


@router.post(
    "/v1/tokens/check",
    response_model=TokenCheckResponse,
    responses=errors(400, 403, 404, *BACKEND),
    openapi_extra=json_body(TokenCheckRequest),
)
async def check_tokens(request: Request) -> Response:
    """Whether a pool (and every ancestor) can cover ``tokens`` now (reserves nothing)."""
    body = await parse_body(request, TokenCheckRequest)
    pool = authorize_pool(principal_of(request), body.pool)
    state = edge(request)
    reply = await call_budget(
        state.clients.budget.Check(
            budget_pb2.CheckRequest(pool=pool, tokens=body.tokens),
            metadata=grpc_metadata(request),
            timeout=state.settings.edge_rpc_timeout_seconds,
        )
    )
    # available: the least along the pool's chain (an ancestor may hold less than the pool).
    return OrjsonResponse({"allowed": reply.allowed, "available": reply.available})


@router.post(
    "/v1/tokens/reserve",
    response_model=TokenReserveResponse,
    responses=errors(400, 403, 404, 429, *BACKEND),
    openapi_extra=json_body(TokenReserveRequest),
)
async def reserve_tokens(request: Request) -> Response:
    """Reserve tokens in a pool (and its ancestors); 200 with ``reserved: false`` when they do not fit.

    The reservation id is the request id; it is leased, so it is settled if never
    reported. Only the key that made it can commit it (``/v1/tokens/report``).

    The key's limits apply: the call counts one request (RPM) and the tokens it
    reserves (TPM), 429 with Retry-After past either or past its concurrency; a user
    key with a TPM may reserve at most its TPM at once (400).
    """
    body = await parse_body(request, TokenReserveRequest)
    principal = principal_of(request)
    pool = authorize_pool(principal, body.pool)
    if principal.tpm and not principal.is_admin and body.tokens > principal.tpm:
        raise InvalidRequestError(
            f"This API key may use {principal.tpm} tokens per minute, so one reservation can hold at most "
            f"{principal.tpm} tokens ({body.tokens} requested): reserve less, in several reservations, "
            "or ask an admin for a higher tpm.",
            param="tokens",
            code="invalid_value",
        )
    state = edge(request)
    timeout = state.settings.edge_rpc_timeout_seconds
    rid = request_id(request)
    limits = limits_of(principal)
    gate = state.tenancy.limits
    try:
        await gate.admit(principal.id, rid, limits, body.tokens)  # RateLimited: 429; BudgetUnavailable: 503
    except BudgetUnavailable:
        # The script may have run and taken a slot: finish it all the same (repeated).
        gate.finish_later(principal.id, rid, limits, estimated=body.tokens, actual=0, unconfirmed=True)
        raise
    charged = body.tokens  # what TPM keeps: unless the budget surely reserved nothing
    try:
        reply = await state.clients.budget.Reserve(
            budget_pb2.ReserveRequest(
                pool=pool, tokens=body.tokens, reservation_id=rid, owner=reservation_owner(principal), kind=MANUAL
            ),
            metadata=grpc_metadata(request),
            timeout=timeout,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in _NOT_RESERVED:
            charged = 0
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise MappedError(to_api_error(exc, not_found_code="pool_not_found")) from exc
        current = await call_budget(
            state.clients.budget.GetPool(
                budget_pb2.GetPoolRequest(pool=pool), metadata=grpc_metadata(request), timeout=timeout
            )
        )
        return OrjsonResponse({"reserved": False, "available": current.pool.available, "reservation_id": None})
    finally:
        # The reservation outlives this call; the call's concurrency slot does not.
        await gate.finish(principal.id, rid, limits, estimated=body.tokens, actual=charged)
    return OrjsonResponse({"reserved": True, "available": reply.pool.available, "reservation_id": reply.reservation_id})


@router.post(
    "/v1/tokens/report",
    response_model=TokenReportResponse,
    responses=errors(400, 403, 404, 409, *BACKEND),
    openapi_extra=json_body(TokenReportRequest),
)
async def report_tokens(request: Request) -> Response:
    """Record usage. With ``reservation_id``: commit that reservation (made by this key
    through /v1/tokens/reserve, in ``pool``) with ``actual``, exactly once (409 if it
    already ended; 403 if another key or a chat made it). Without: add ``actual`` as
    untracked usage (admin only).

    A leased reservation can only be ended by its id: subtracting a bare ``reserved``
    count (the seed's report) would free it twice once its lease also expires."""
    body = await parse_body(request, TokenReportRequest)
    principal = principal_of(request)
    pool = authorize_pool(principal, body.pool)
    state = edge(request)
    timeout = state.settings.edge_rpc_timeout_seconds
    if body.reservation_id is not None:
        reply = await call_budget(
            state.clients.budget.Commit(
                budget_pb2.CommitRequest(
                    reservation_id=body.reservation_id,
                    used_tokens=body.actual,
                    pool=pool,
                    owner=ending_owner(principal),  # admin: any manual reservation; never empty otherwise
                    kind=MANUAL,  # a chat's reservation never ends here
                ),
                metadata=grpc_metadata(request),
                timeout=timeout,
            )
        )
        if reply.already_ended:
            raise ConflictError(
                f"Reservation '{body.reservation_id}' has already ended (committed, released or expired) "
                "or does not exist",
                param="reservation_id",
            )
        return OrjsonResponse({"used": reply.pool.used, "available": reply.pool.available})
    if body.reserved:
        raise InvalidRequestError(
            "reservation_id is required to end a reservation; without it only untracked usage can be reported "
            "(reserved must be 0)",
            param="reservation_id",
        )
    if not principal.is_admin:
        raise PermissionDeniedError(
            "Only an admin key can report usage without a reservation_id.",
            param="reservation_id",
            code="insufficient_scope",
        )
    reply = await call_budget(
        state.clients.budget.Report(
            budget_pb2.ReportRequest(pool=pool, reserved=0, actual=body.actual, report_id=request_id(request)),
            metadata=grpc_metadata(request),
            timeout=timeout,
        )
    )
    await record_admin_action(request, "tokens.reported", pool, {"actual": body.actual})
    return OrjsonResponse({"used": reply.pool.used, "available": reply.pool.available})
