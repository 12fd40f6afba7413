"""Admin API for API keys: /v1/admin/keys (create, list, get, update, revoke).

A key is shown once, in the create response; Redis holds only its SHA-256. Every
change reaches every edge replica through the key store's change channel within
milliseconds (a revoked key is refused everywhere within a second).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Depends, Request
from hoosh.budget.v1 import budget_pb2
from hoosh_tenancy import ALL, DEFAULT_POOL, POOL_NAME, KeyRecord
from hoosh_tenancy.keys import MAX_MODELS, MAX_POOLS, MODEL_PATTERN
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response

from .admin_events import record_admin_action
from .errors import InvalidRequestError, MappedError, NotFoundError, to_api_error
from .protocol import JsonInt, PositiveInt32, not_null
from .responses import OrjsonResponse
from .routing import BACKEND, edge, errors, grpc_metadata, json_body, parse_body
from .scopes import admin_only

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"], dependencies=[Depends(admin_only)])

PoolRef = Annotated[str, Field(pattern=rf"^(\*|{POOL_NAME.pattern})$", description="A pool name, or '*'")]
ModelRef = Annotated[str, Field(pattern=rf"^{MODEL_PATTERN.pattern}$", description="A model id or glob pattern")]
PositiveSafeInt = Annotated[int, Field(strict=False, ge=1, le=2**53 - 1), JsonInt]
UnixSeconds = Annotated[int, Field(strict=False, ge=0, le=253_402_300_799), JsonInt]  # up to 9999-12-31


class KeyCreateRequest(BaseModel):
    """A new key. Unknown fields are refused (a typo must not create a wider key)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=128, description="A label for people")
    scope: Literal["admin", "user"] = Field(
        default="user", description="admin: manages keys and pools, sees everything; user: its own pools and models"
    )
    team: str = Field(default="", max_length=128, description="Owner label: the team")
    user: str = Field(default="", max_length=128, description="Owner label: the person or service")
    pools: list[PoolRef] = Field(
        default_factory=list,
        max_length=MAX_POOLS,
        description="Pools it may charge (each must exist); the first is its default; '*' = every pool. "
        "Default for a user key: ['default']",
    )
    models: list[ModelRef] = Field(
        default_factory=lambda: [ALL],
        min_length=1,
        max_length=MAX_MODELS,
        description="Models it may use: exact ids or glob patterns matched against the id as requested "
        "('provider/model' included); ['*'] = every model",
    )
    rpm: PositiveInt32 | None = Field(default=None, description="Requests per minute; null = no own limit")
    tpm: PositiveSafeInt | None = Field(default=None, description="Tokens per minute; null = no own limit")
    max_concurrency: PositiveInt32 | None = Field(
        default=None, description="Requests in flight at once; null = no own limit"
    )
    expires_at: UnixSeconds | None = Field(
        default=None, description="Unix seconds after which the key is refused; must be in the future"
    )


class KeyUpdateRequest(BaseModel):
    """Only the fields sent change; ``null`` clears a limit or the expiry."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra=not_null("name", "team", "user", "pools", "models")
    )

    name: str | None = Field(default=None, min_length=1, max_length=128, description="A label for people")
    team: str | None = Field(default=None, max_length=128, description="Owner label: the team")
    user: str | None = Field(default=None, max_length=128, description="Owner label: the person or service")
    pools: list[PoolRef] | None = Field(
        default=None, max_length=MAX_POOLS, description="Replaces its pools (each must exist); the first is default"
    )
    models: list[ModelRef] | None = Field(
        default=None, min_length=1, max_length=MAX_MODELS, description="Replaces its model ids and patterns"
    )
    rpm: PositiveInt32 | None = Field(default=None, description="Requests per minute; null = no own limit")
    tpm: PositiveSafeInt | None = Field(default=None, description="Tokens per minute; null = no own limit")
    max_concurrency: PositiveInt32 | None = Field(
        default=None, description="Requests in flight at once; null = no own limit"
    )
    expires_at: UnixSeconds | None = Field(default=None, description="Unix seconds; null = never expires")

    @model_validator(mode="after")
    def _labels_not_null(self) -> KeyUpdateRequest:
        for name in ("name", "team", "user", "pools", "models"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class KeyCreateResponse(BaseModel):
    key: str = Field(description="The API key: shown this once, never stored (Redis holds its SHA-256)")
    record: KeyRecord = Field(description="The stored record")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyRecord]


async def _check_pools_exist(request: Request, pools: list[str]) -> None:
    """404 ``pool_not_found`` naming the first pool the budget service does not know (as
    an unknown parent pool is, and an unknown pool on the token routes)."""
    state = edge(request)
    names = [pool for pool in pools if pool != ALL]

    async def exists(pool: str) -> bool:
        try:
            await state.clients.budget.GetPool(
                budget_pb2.GetPoolRequest(pool=pool),
                metadata=grpc_metadata(request),
                timeout=state.settings.edge_rpc_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise MappedError(to_api_error(exc, not_found_code="pool_not_found")) from exc
        return True

    found = await asyncio.gather(*(exists(pool) for pool in names))
    for pool, ok in zip(names, found, strict=True):
        if not ok:
            raise NotFoundError(
                f"The pool '{pool}' does not exist; create it first (POST /v1/admin/pools).",
                param=f"pools[{pools.index(pool)}]",
                code="pool_not_found",
            )


def _record(record: KeyRecord) -> dict[str, Any]:
    return record.model_dump(mode="json")


def _changes(changes: dict[str, Any]) -> dict[str, Any]:
    """An update's fields as JSON values (tuples as lists)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in changes.items()}


@router.post(
    "",
    response_model=KeyCreateResponse,
    responses=errors(400, 403, 404, *BACKEND),
    openapi_extra=json_body(KeyCreateRequest),
)
async def create_key(request: Request) -> Response:
    """Create a key. The response carries the key itself, once; store it now."""
    body = await parse_body(request, KeyCreateRequest)
    if body.expires_at is not None and body.expires_at <= time.time():
        raise InvalidRequestError("expires_at is in the past.", param="expires_at", code="invalid_value")
    await _check_pools_exist(request, body.pools or ([DEFAULT_POOL] if body.scope == "user" else []))
    record, key = await edge(request).tenancy.store.create(**body.model_dump())
    await record_admin_action(request, "key.created", record.id, _record(record))
    return OrjsonResponse({"key": key, "record": _record(record)})


@router.get("", response_model=KeyList, responses=errors(403))
async def list_keys(request: Request) -> Response:
    """Every key's record (revoked ones included), oldest first. Never the keys themselves."""
    records = await edge(request).tenancy.store.list()
    return OrjsonResponse({"object": "list", "data": [_record(record) for record in records]})


@router.get("/{key_id}", response_model=KeyRecord, responses=errors(403, 404))
async def get_key(request: Request, key_id: str) -> Response:
    """One key's record; 404 ``key_not_found``."""
    return OrjsonResponse(_record(await edge(request).tenancy.store.get(key_id)))


@router.patch(
    "/{key_id}",
    response_model=KeyRecord,
    responses=errors(400, 403, 404, *BACKEND),
    openapi_extra=json_body(KeyUpdateRequest),
)
async def update_key(request: Request, key_id: str) -> Response:
    """Change a key's name, owner labels, pools, models, limits or expiry."""
    body = await parse_body(request, KeyUpdateRequest)
    changes = body.model_dump(include=body.model_fields_set)
    if body.pools is not None:
        await _check_pools_exist(request, body.pools)
    tenancy = edge(request).tenancy
    if not changes:
        return OrjsonResponse(_record(await tenancy.store.get(key_id)))
    record = await tenancy.store.update(key_id, **changes)
    await tenancy.cache.refresh(await tenancy.store.hash_of(key_id))  # in force here at once
    await record_admin_action(request, "key.updated", key_id, {"changes": _changes(changes)})
    return OrjsonResponse(_record(record))


@router.delete("/{key_id}", response_model=KeyRecord, responses=errors(403, 404))
async def revoke_key(request: Request, key_id: str) -> Response:
    """Revoke a key: every edge refuses it within a second. The record stays (with
    ``revoked_at``) for listing and audit; revoking again changes nothing."""
    tenancy = edge(request).tenancy
    record = await tenancy.store.revoke(key_id)
    # In force on this replica at once; the others hear of it through the change channel.
    await tenancy.cache.refresh(await tenancy.store.hash_of(key_id))
    await record_admin_action(request, "key.revoked", key_id, {"revoked_at": record.revoked_at})
    return OrjsonResponse(_record(record))
