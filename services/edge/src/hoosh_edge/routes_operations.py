"""Operations: liveness and readiness (open), provider health and cache counters (admin),
the audit log (admin: every entry; a user key: its own)."""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

import grpc
import orjson
from fastapi import APIRouter, Query, Request
from grpc_health.v1 import health_pb2
from hoosh.audit.v1 import audit_pb2
from hoosh.router.v1 import router_pb2
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from .clients import HealthTarget
from .errors import PermissionDeniedError
from .metrics import exposition
from .protocol import AuditListResponse, CacheStats, HealthResponse, ProviderHealthList, ReadinessResponse
from .responses import OrjsonResponse
from .routing import BACKEND, edge, errors, grpc_metadata
from .scopes import audit_filter, principal_of, require_admin
from .serving_embeddings import cache_stats_to_dict, provider_health_to_dict

router = APIRouter()

try:
    VERSION = importlib.metadata.version("hoosh-edge")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare source tree
    VERSION = "0.0.0"

# Kubernetes' default probe timeout is 1 s: a readiness answer must come before it.
HEALTH_CHECK_TIMEOUT_SECONDS = 0.9


async def _health_of(target: HealthTarget) -> str:
    try:
        reply = await target.stub.Check(
            health_pb2.HealthCheckRequest(service=target.service), timeout=HEALTH_CHECK_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@router.get("/v1/health", response_model=HealthResponse, tags=["health"])
async def health() -> Response:
    """Liveness: the edge answers. Checks no backend (cheap; Kubernetes polls it). No key needed."""
    return OrjsonResponse({"status": "ok", "service": "edge", "version": VERSION})


@router.get(
    "/v1/health/ready",
    response_model=ReadinessResponse,
    responses={503: {"model": ReadinessResponse, "description": "The router does not serve"}},
    tags=["health"],
)
async def ready(request: Request) -> Response:
    """Readiness: grpc.health.v1 of router, budget, audit and stt (when configured). No key needed.

    200 ``ok`` when all serve; 200 ``degraded`` when the router serves but budget, audit
    or stt does not (chat still works); 503 ``unavailable`` when the router does not.
    """
    targets = edge(request).clients.health
    names = list(targets)
    statuses = await asyncio.gather(*(_health_of(targets[name]) for name in names))
    checks = dict(zip(names, statuses, strict=True))
    if checks.get("router") != "SERVING":
        return OrjsonResponse({"status": "unavailable", "checks": checks}, status_code=503)
    status = "ok" if all(value == "SERVING" for value in statuses) else "degraded"
    return OrjsonResponse({"status": status, "checks": checks})


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    """Admin: the edge's Prometheus metrics (the same as its metrics port serves)."""
    require_admin(principal_of(request))
    # Off the event loop: formatting every series (and, with several workers, reading
    # their files) takes a while on a big registry.
    return Response(await asyncio.to_thread(exposition), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/health/providers", response_model=ProviderHealthList, responses=errors(403, *BACKEND), tags=["health"])
async def provider_health(request: Request) -> Response:
    """Admin: every backend's circuit breaker as all router replicas share it: state,
    consecutive failures, last error, observed latency and rate limits."""
    require_admin(principal_of(request))
    state = edge(request)
    reply = await state.clients.router.GetProviderHealth(
        router_pb2.GetProviderHealthRequest(),
        metadata=grpc_metadata(request),
        timeout=state.settings.edge_rpc_timeout_seconds,
    )
    return OrjsonResponse({"object": "list", "data": [provider_health_to_dict(item) for item in reply.providers]})


@router.get("/v1/cache/stats", response_model=CacheStats, responses=errors(403, *BACKEND), tags=["cache"])
async def cache_stats(request: Request) -> Response:
    """Admin: response-cache counters (shared by all router replicas)."""
    require_admin(principal_of(request))
    state = edge(request)
    reply = await state.clients.router.GetCacheStats(
        router_pb2.GetCacheStatsRequest(),
        metadata=grpc_metadata(request),
        timeout=state.settings.edge_rpc_timeout_seconds,
    )
    return OrjsonResponse(cache_stats_to_dict(reply))


def _audit_entry(entry: audit_pb2.AuditEntry) -> dict[str, Any]:
    payload: Any = None
    if entry.payload_json:
        try:
            payload = orjson.loads(entry.payload_json)
        except orjson.JSONDecodeError:
            payload = entry.payload_json  # shown as recorded rather than dropped
    return {
        "seq": entry.seq,
        "timestamp_ms": entry.timestamp_ms,
        "event_id": entry.event_id,
        "subject": entry.subject,
        "stream_seq": entry.stream_seq,
        "payload": payload,
        "prev_mac": entry.prev_mac,
        "mac": entry.mac,
        "signing_key_id": entry.signing_key_id,
        "segment": entry.segment,
    }


@router.get("/v1/audit", response_model=AuditListResponse, responses=errors(400, *BACKEND), tags=["audit"])
async def list_audit(
    request: Request,
    limit: int = Query(100, ge=1, le=10_000, description="Page size: the newest N matching entries"),
    request_id: str | None = Query(None, max_length=128, description="Only the entries of this request id"),
    since_ms: int | None = Query(None, ge=0, description="Only entries appended at or after (Unix ms)"),
    until_ms: int | None = Query(None, ge=0, description="Only entries appended before (Unix ms)"),
    pool: str | None = Query(None, max_length=64, description="Only entries of this pool"),
    model: str | None = Query(None, max_length=256, description="Only entries of this model"),
    provider: str | None = Query(None, max_length=128, description="Only entries of this provider"),
    kind: str | None = Query(
        None,
        max_length=64,
        description="chat | embedding | transcription, or another event's subject (budget.reset, admin.key.created)",
    ),
    outcome: str | None = Query(None, max_length=32, description="completed | failed (inference events)"),
    key_id: str | None = Query(None, max_length=64, description="Admin: only the entries of this key"),
    cursor: str | None = Query(None, max_length=512, description="next_cursor of the previous page: older entries"),
) -> Response:
    """Audit entries, newest page first (each page oldest first), filtered and paged with
    a cursor, and whether the chain verifies as far as the audit service knows. A user
    key sees only the entries carrying its key id; admin sees all (or one key's)."""
    principal = principal_of(request)
    own = audit_filter(principal)
    if own and key_id and key_id != own:
        raise PermissionDeniedError("A user key sees only its own audit entries.", param="key_id")
    state = edge(request)
    reply = await state.clients.audit.ListEntries(
        audit_pb2.ListEntriesRequest(
            limit=limit,
            request_id=request_id or "",
            key_id=own or key_id or "",
            since_ms=since_ms or 0,
            until_ms=until_ms or 0,
            pool=pool or "",
            model=model or "",
            provider=provider or "",
            kind=kind or "",
            outcome=outcome or "",
            cursor=cursor or "",
        ),
        metadata=grpc_metadata(request),
        timeout=state.settings.edge_rpc_timeout_seconds,
    )
    body: dict[str, Any] = {
        "entries": [_audit_entry(entry) for entry in reply.entries],
        "total": reply.total,
        "chain_valid": reply.chain_valid,
        "head_seq": reply.head_seq,
        "checkpoint_seq": reply.checkpoint_seq,
    }
    if reply.next_cursor:
        body["next_cursor"] = reply.next_cursor
    if reply.verify_error:
        body["verify_error"] = reply.verify_error
        body["first_bad_seq"] = reply.first_bad_seq
    return OrjsonResponse(body)
