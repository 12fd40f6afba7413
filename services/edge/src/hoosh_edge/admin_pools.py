"""Admin API for token pools: /v1/admin/pools (create, list, get, update, reset, delete)
over the budget service's RPCs.

Errors: a taken name (ALREADY_EXISTS) and a pool with children (FAILED_PRECONDITION) are
409; an unknown pool or parent 404; the budget's Redis unreachable 503
``budget_unavailable``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Depends, Request
from hoosh.budget.v1 import budget_pb2
from hoosh_metering.errors import InvalidArgument
from hoosh_metering.periods import validate_period
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response

from .admin_events import record_admin_action
from .protocol import JsonInt, PoolName, not_null
from .responses import OrjsonResponse
from .routing import BACKEND, call_budget, edge, errors, grpc_metadata, json_body, parse_body
from .scopes import admin_only, principal_of

router = APIRouter(prefix="/v1/admin/pools", tags=["admin"], dependencies=[Depends(admin_only)])

Period = Literal["none", "minute", "hourly", "daily", "weekly", "monthly"]
MAX_AMOUNT = 2**53 - 1  # the budget's Lua counts in doubles: integers are exact up to here
MICROS_PER_USD = 1_000_000
Amount = Annotated[int, Field(strict=False, ge=0, le=MAX_AMOUNT), JsonInt]

# The admin routes' view of the budget's statuses (the token routes keep the defaults).
_OVERRIDES: dict[grpc.StatusCode, tuple[int, str | None]] = {
    grpc.StatusCode.ALREADY_EXISTS: (409, "pool_exists"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "pool_in_use"),
}


def _micros(dollars: float) -> int:
    return int((Decimal(str(dollars)) * MICROS_PER_USD).to_integral_value())


def _iana_zone(value: str) -> str:
    """400 naming the field, here, rather than the budget's own refusal (which cannot)."""
    try:
        validate_period("daily", value)
    except InvalidArgument as error:
        raise ValueError(f"'{value}' is not an IANA time zone (e.g. Europe/Berlin)") from error
    return value


Zone = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_iana_zone)]


class PoolCreateRequest(BaseModel):
    """A new pool; the parent (fixed for life) must exist. Give the money cap in dollars
    (``cap_usd``) or micro-dollars (``cap_usd_micros``), not both."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "not": {
                "required": ["cap_usd", "cap_usd_micros"],
                "properties": {"cap_usd": {"type": "number"}, "cap_usd_micros": {"type": "integer"}},
            }
        },
    )

    name: PoolName = Field(description="Pool name: [A-Za-z0-9._-], 1-64 characters")
    parent: PoolName | None = Field(default=None, description="The parent pool (key -> team -> org); null = a root")
    capacity: Amount = Field(description="Tokens per period (or in all, without a period)")
    period: Period = Field(default="none", description="When usage starts again at 0, calendar-aligned")
    timezone: Zone = Field(default="UTC", description="IANA zone of the period")
    cap_usd: float | None = Field(default=None, ge=0, le=9e9, description="Money cap per period, in dollars")
    cap_usd_micros: Amount | None = Field(default=None, description="Money cap, micro-dollars")

    @model_validator(mode="after")
    def _one_cap(self) -> PoolCreateRequest:
        if self.cap_usd is not None and self.cap_usd_micros is not None:
            raise ValueError("give cap_usd or cap_usd_micros, not both")
        return self

    def cap_micros(self) -> int | None:
        return _micros(self.cap_usd) if self.cap_usd is not None else self.cap_usd_micros


def _update_schema(schema: dict[str, Any]) -> None:
    not_null("capacity", "period", "timezone")(schema)
    schema["not"] = {"required": ["cap_usd", "cap_usd_micros"]}  # one of the two, even as null


class PoolUpdateRequest(BaseModel):
    """Only the fields sent change; ``cap_usd: null`` (or ``cap_usd_micros: null``)
    removes the money cap. The parent cannot change."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra=lambda schema: _update_schema(schema),
    )

    capacity: Amount | None = Field(default=None, description="New token capacity")
    period: Period | None = Field(default=None, description="New period")
    timezone: Zone | None = Field(default=None, description="New IANA zone")
    cap_usd: float | None = Field(default=None, ge=0, le=9e9, description="New money cap in dollars; null removes it")
    cap_usd_micros: Amount | None = Field(default=None, description="New money cap in micro-dollars; null removes it")

    @model_validator(mode="after")
    def _one_cap(self) -> PoolUpdateRequest:
        if {"cap_usd", "cap_usd_micros"} <= self.model_fields_set:
            raise ValueError("give cap_usd or cap_usd_micros, not both")
        for name in ("capacity", "period", "timezone"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class AdminPool(BaseModel):
    name: str
    parent: str | None = Field(description="null for a root")
    chain: list[str] = Field(description="This pool, then its ancestors up to the root")
    capacity: int
    used: int = Field(description="Tokens committed in the current period")
    reserved: int = Field(description="Tokens held by open reservations")
    available: int = Field(description="max(0, capacity - used - reserved) of this pool alone")
    period: Period
    timezone: str
    period_start_ms: int | None = Field(description="Start of the current period (Unix ms); null without a period")
    period_end_ms: int | None = Field(description="Its end (Unix ms); null without a period")
    cap_usd: float | None = Field(description="The money cap in dollars; null = none")
    cap_usd_micros: int | None = Field(description="The money cap in micro-dollars; null = none")
    used_usd_micros: int
    reserved_usd_micros: int


class AdminPoolList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdminPool]


class PoolDeleted(BaseModel):
    name: str
    deleted: Literal[True] = True


def admin_pool(pool: budget_pb2.Pool) -> dict[str, Any]:
    has_cap = pool.HasField("cap_usd_micros")
    return {
        "name": pool.name,
        "parent": pool.parent or None,
        "chain": list(pool.chain) or [pool.name],
        "capacity": pool.capacity,
        "used": pool.used,
        "reserved": pool.reserved,
        "available": pool.available,
        "period": pool.period or "none",
        "timezone": pool.timezone or "UTC",
        "period_start_ms": pool.period_start_ms or None,
        "period_end_ms": pool.period_end_ms or None,
        "cap_usd": pool.cap_usd_micros / MICROS_PER_USD if has_cap else None,
        "cap_usd_micros": pool.cap_usd_micros if has_cap else None,
        "used_usd_micros": pool.used_usd_micros,
        "reserved_usd_micros": pool.reserved_usd_micros,
    }


@router.post(
    "",
    response_model=AdminPool,
    responses=errors(400, 403, 404, 409, *BACKEND),
    openapi_extra=json_body(PoolCreateRequest),
)
async def create_pool(request: Request) -> Response:
    """Create a pool (409 ``pool_exists`` when the name is taken; 404 for an unknown parent)."""
    body = await parse_body(request, PoolCreateRequest)
    spec = budget_pb2.PoolSpec(
        name=body.name,
        parent=body.parent or "",
        capacity=body.capacity,
        period=body.period,
        timezone=body.timezone,
        cap_usd_micros=body.cap_micros(),
    )
    state = edge(request)
    reply = await call_budget(
        state.clients.budget.CreatePool(
            budget_pb2.CreatePoolRequest(spec=spec),
            metadata=grpc_metadata(request),
            timeout=state.settings.edge_rpc_timeout_seconds,
        ),
        overrides=_OVERRIDES,
    )
    created = admin_pool(reply.pool)
    await record_admin_action(request, "pool.created", body.name, created)
    return OrjsonResponse(created)


@router.get("", response_model=AdminPoolList, responses=errors(403, *BACKEND))
async def list_pools(request: Request) -> Response:
    """Every pool with its settings and counters."""
    state = edge(request)
    reply = await call_budget(
        state.clients.budget.ListPools(
            budget_pb2.ListPoolsRequest(),
            metadata=grpc_metadata(request),
            timeout=state.settings.edge_rpc_timeout_seconds,
        ),
        overrides=_OVERRIDES,
    )
    return OrjsonResponse({"object": "list", "data": [admin_pool(pool) for pool in reply.pools]})


@router.get("/{name}", response_model=AdminPool, responses=errors(400, 403, 404, *BACKEND))
async def get_pool(request: Request, name: PoolName) -> Response:
    """One pool; 404 ``pool_not_found``."""
    state = edge(request)
    reply = await call_budget(
        state.clients.budget.GetPool(
            budget_pb2.GetPoolRequest(pool=name),
            metadata=grpc_metadata(request),
            timeout=state.settings.edge_rpc_timeout_seconds,
        ),
        overrides=_OVERRIDES,
    )
    return OrjsonResponse(admin_pool(reply.pool))


@router.patch(
    "/{name}",
    response_model=AdminPool,
    responses=errors(400, 403, 404, *BACKEND),
    openapi_extra=json_body(PoolUpdateRequest),
)
async def update_pool(request: Request, name: PoolName) -> Response:
    """Resize a pool, change its period or time zone, set or remove its money cap."""
    body = await parse_body(request, PoolUpdateRequest)
    update = budget_pb2.UpdatePoolRequest(name=name)
    if body.capacity is not None:
        update.capacity = body.capacity
    if body.period is not None:
        update.period = body.period
    if body.timezone is not None:
        update.timezone = body.timezone
    if "cap_usd" in body.model_fields_set or "cap_usd_micros" in body.model_fields_set:
        cap = _micros(body.cap_usd) if body.cap_usd is not None else body.cap_usd_micros
        if cap is None:
            update.clear_cap_usd = True
        else:
            update.cap_usd_micros = cap
    state = edge(request)
    reply = await call_budget(
        state.clients.budget.UpdatePool(
            update, metadata=grpc_metadata(request), timeout=state.settings.edge_rpc_timeout_seconds
        ),
        overrides=_OVERRIDES,
    )
    updated = admin_pool(reply.pool)
    await record_admin_action(request, "pool.updated", name, {"set": body.model_dump(exclude_unset=True), **updated})
    return OrjsonResponse(updated)


@router.post("/{name}/reset", response_model=AdminPool, responses=errors(400, 403, 404, *BACKEND))
async def reset_pool(request: Request, name: PoolName) -> Response:
    """Usage back to 0 now (reserved tokens stay reserved); a ``budget.reset`` event
    carrying the admin key's id reaches the audit."""
    state = edge(request)
    reply = await call_budget(
        state.clients.budget.ResetPool(
            budget_pb2.ResetPoolRequest(name=name, key_id=principal_of(request).id),
            metadata=grpc_metadata(request),
            timeout=state.settings.edge_rpc_timeout_seconds,
        ),
        overrides=_OVERRIDES,
    )
    return OrjsonResponse(admin_pool(reply.pool))


@router.delete("/{name}", response_model=PoolDeleted, responses=errors(400, 403, 404, 409, *BACKEND))
async def delete_pool(request: Request, name: PoolName) -> Response:
    """Delete a pool (409 ``pool_in_use`` while it has children)."""
    state = edge(request)
    await call_budget(
        state.clients.budget.DeletePool(
            budget_pb2.DeletePoolRequest(name=name),
            metadata=grpc_metadata(request),
            timeout=state.settings.edge_rpc_timeout_seconds,
        ),
        overrides=_OVERRIDES,
    )
    await record_admin_action(request, "pool.deleted", name, {})
    return OrjsonResponse({"name": name, "deleted": True})
