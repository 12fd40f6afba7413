"""GET /v1/admin/status (admin): what /v1/health/ready does not say, on one page —
Redis, NATS, the audit log's head and lag, each publisher's outbox, and the local
inference worker's health. ``hoosh status`` shows it beside the readiness checks.

Every part is probed at once with a short timeout, and a part that cannot be reached
is reported as such (never a 5xx): the page is for the moment things are wrong.

- Redis: a PING on the edge's own connection to the budget's Redis (``HOOSH_REDIS_URL``).
- NATS: a TCP connection to ``HOOSH_NATS_URL`` reads the ``INFO`` line every NATS server
  sends before any authentication, and closes (no credentials needed, none sent).
- Audit: the audit service's own view of its log (``ListEntries``: head, last
  checkpoint, whether the chain verifies) and its lag from its Prometheus metrics
  (``hoosh_audit_lag_events``: events in the stream not yet dealt with).
- Outboxes: each publisher's (router, stt, budget) ``hoosh_events_outbox_*`` gauges.
- Local inference: each worker as the router last polled it (the router's
  GetProviderHealth ``workers``: answering or not, overloaded or out of memory, and why).
  The edge never calls a worker itself (the network policy lets only the router reach
  one); the readiness probe asks only the services the edge calls.

Where the metrics are read: ``HOOSH_STATUS_METRICS_URLS`` (``service=url,...``), else
each ``HOOSH_<SERVICE>_METRICS_LISTEN`` as ``hoosh up`` sets it (0.0.0.0 read as this
machine). A part whose address the edge is not given is ``not_configured``.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Literal
from urllib.parse import urlsplit

import grpc
import httpx
import orjson
from fastapi import APIRouter, Depends, Request
from hoosh.audit.v1 import audit_pb2
from hoosh.router.v1 import router_pb2
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.responses import Response

from .responses import OrjsonResponse
from .routing import edge, errors, grpc_metadata
from .scopes import admin_only

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(admin_only)])

PROBE_TIMEOUT_SECONDS = 1.0
PUBLISHERS = ("router", "stt", "budget")
METRIC_SOURCES = ("router", "stt", "budget", "audit")
MAX_INFO_BYTES = 64 * 1024
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)")

Probe = Literal["ok", "unreachable", "not_configured"]


class StatusSettings(BaseSettings):
    """Where the status page looks (read per request: an admin page, not a hot path)."""

    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")

    nats_url: str = Field(default="", description="NATS, probed for its INFO line only")
    status_metrics_urls: str = Field(default="", description="service=url,... of the Prometheus endpoints")
    router_metrics_listen: str = ""
    stt_metrics_listen: str = ""
    budget_metrics_listen: str = ""
    audit_metrics_listen: str = ""

    def metrics_urls(self) -> dict[str, str]:
        """Each service's /metrics URL: the explicit list first, else its listen address."""
        urls: dict[str, str] = {}
        for service in METRIC_SOURCES:
            listen = str(getattr(self, f"{service}_metrics_listen")).strip()
            if listen:
                host, _, port = listen.rpartition(":")
                host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
                urls[service] = f"http://{host}:{port}/metrics"
        for item in self.status_metrics_urls.split(","):
            service, _, url = item.partition("=")
            if service.strip() and url.strip():
                urls[service.strip()] = url.strip()
        return urls


class RedisStatus(BaseModel):
    status: Literal["ok", "unreachable"] = Field(description="Whether the budget's Redis answered a PING")
    latency_ms: float | None = Field(description="The PING's round trip; null when it failed")
    error: str | None = Field(description="Why it failed; null when ok")


class NatsStatus(BaseModel):
    status: Probe = Field(description="Whether a NATS server answered with its INFO line")
    address: str | None = Field(description="host:port probed (never credentials)")
    server_name: str | None = None
    version: str | None = Field(default=None, description="The server's version")
    jetstream: bool | None = Field(default=None, description="Whether the server runs JetStream")
    latency_ms: float | None = None
    error: str | None = None


class AuditStatus(BaseModel):
    status: Literal["ok", "unreachable", "invalid"] = Field(
        description="ok: the audit service answered and its chain verifies; invalid: it does not verify"
    )
    head_seq: int | None = Field(default=None, description="The log's last entry")
    checkpoint_seq: int | None = Field(default=None, description="The last checkpoint stored outside the log")
    chain_valid: bool | None = None
    verify_error: str | None = None
    lag_events: int | None = Field(
        default=None, description="Events in the stream audit has not dealt with yet (null: metrics not read)"
    )
    stream_last_seq: int | None = Field(default=None, description="The stream's last sequence, as audit last read it")
    error: str | None = None


class OutboxStatus(BaseModel):
    service: str = Field(description="The publishing service")
    status: Literal["ok", "backlog", "unhealthy", "unreachable", "not_configured"] = Field(
        description="ok: empty; backlog: events wait for NATS; unhealthy: nearly full, new work refused; "
        "unreachable: its metrics could not be read; not_configured: no metrics address or no outbox"
    )
    entries: int | None = Field(default=None, description="Events waiting for NATS")
    bytes: int | None = None
    oldest_age_seconds: float | None = None
    max_entries: int | None = None
    in_flight: int | None = Field(default=None, description="Events being published (not acked yet)")
    error: str | None = None


class ServiceHealth(BaseModel):
    service: str
    status: str = Field(
        description="SERVING, OVERLOADED, OUT_OF_MEMORY, UNREACHABLE, UNKNOWN, or not_configured "
        "(inference: the worst of its workers)"
    )
    detail: str | None = Field(default=None, description="Why, when the status says less than it should")


WorkerHealth = Literal["SERVING", "OVERLOADED", "OUT_OF_MEMORY", "UNREACHABLE", "UNKNOWN"]
# The inference service's status is its worst worker's, in this order.
_WORST_FIRST: tuple[WorkerHealth, ...] = ("UNREACHABLE", "OUT_OF_MEMORY", "OVERLOADED", "UNKNOWN", "SERVING")


class WorkerStatus(BaseModel):
    address: str = Field(description="The worker's gRPC address, as the router dials it")
    providers: list[str] = Field(description="The local providers it serves")
    status: WorkerHealth = Field(
        description="SERVING: takes work; OVERLOADED / OUT_OF_MEMORY: it says it refuses work; UNREACHABLE: "
        "the router's last poll got no answer; UNKNOWN: not polled yet, or its last word is stale"
    )
    reason: str | None = Field(default=None, description="In the worker's words while it refuses; the poll's error")
    queue_depth: int | None = None
    overload_queue: int | None = None
    active_requests: int | None = None
    retry_after_seconds: int | None = Field(default=None, description="While it refuses: when it expects to serve")
    polled_at_ms: int | None = Field(default=None, description="The router's last poll (Unix ms); null: not yet")


class AdminStatus(BaseModel):
    status: Literal["ok", "degraded"] = Field(description="ok when no problem is listed")
    problems: list[str] = Field(description="What is wrong, one sentence each")
    redis: RedisStatus
    nats: NatsStatus
    audit: AuditStatus
    outbox: list[OutboxStatus]
    services: list[ServiceHealth] = Field(description="Services the readiness probe does not ask (local inference)")
    workers: list[WorkerStatus] = Field(
        default=[], description="Each local inference worker, as the router last polled it"
    )
    checked_at_ms: int = Field(description="When the page was made (Unix ms)")


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


async def _redis(request: Request) -> RedisStatus:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(edge(request).tenancy.limits_redis.ping(), PROBE_TIMEOUT_SECONDS)
    except Exception as exc:  # any failure is the answer: unreachable, and why
        return RedisStatus(status="unreachable", latency_ms=None, error=_reason(exc))
    return RedisStatus(status="ok", latency_ms=_elapsed_ms(started), error=None)


def _nats_address(url: str) -> tuple[str, int] | None:
    first = url.split(",")[0].strip()
    if not first:
        return None
    parts = urlsplit(first if "://" in first else f"nats://{first}")
    return parts.hostname or "127.0.0.1", parts.port or 4222


async def _nats(settings: StatusSettings) -> NatsStatus:
    address = _nats_address(settings.nats_url)
    if address is None:
        return NatsStatus(status="not_configured", address=None, error="HOOSH_NATS_URL is not set for the edge")
    host, port = address
    shown = f"{host}:{port}"
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_INFO_BYTES)
            line = await reader.readline()
        if not line.startswith(b"INFO "):
            raise ValueError("the server did not start with an INFO line: not NATS?")
        info = orjson.loads(line[5:])
    except (OSError, TimeoutError, ValueError) as exc:
        return NatsStatus(status="unreachable", address=shown, error=_reason(exc))
    finally:
        if writer is not None:
            writer.close()
    return NatsStatus(
        status="ok",
        address=shown,
        server_name=str(info.get("server_name") or "") or None,
        version=str(info.get("version") or "") or None,
        jetstream=bool(info.get("jetstream", False)),
        latency_ms=_elapsed_ms(started),
    )


def parse_samples(text: str, names: frozenset[str]) -> dict[str, float]:
    """The first sample of each wanted metric in a Prometheus text exposition."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        match = _SAMPLE.match(line)
        if match and match["name"] in names and match["name"] not in found:
            try:
                found[match["name"]] = float(match["value"])
            except ValueError:
                continue
    return found


_WANTED = frozenset(
    {
        "hoosh_events_outbox_entries",
        "hoosh_events_outbox_bytes",
        "hoosh_events_outbox_oldest_age_seconds",
        "hoosh_events_outbox_max_entries",
        "hoosh_events_healthy",
        "hoosh_events_in_flight",
        "hoosh_audit_lag_events",
        "hoosh_audit_stream_last_seq",
    }
)


async def _scrape(client: httpx.AsyncClient, url: str) -> dict[str, float] | str:
    """The wanted samples, or why they could not be read."""
    try:
        response = await client.get(url)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        return _reason(exc)
    return parse_samples(response.text, _WANTED)


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _outbox(service: str, scraped: dict[str, float] | str | None) -> OutboxStatus:
    if scraped is None:
        return OutboxStatus(service=service, status="not_configured", error="no metrics address for this service")
    if isinstance(scraped, str):
        return OutboxStatus(service=service, status="unreachable", error=scraped)
    entries = _int(scraped.get("hoosh_events_outbox_entries"))
    in_flight = _int(scraped.get("hoosh_events_in_flight"))
    if entries is None:
        return OutboxStatus(
            service=service, status="not_configured", in_flight=in_flight, error="no outbox (HOOSH_EVENTS_OUTBOX_DIR)"
        )
    status: Literal["ok", "backlog", "unhealthy"] = "ok"
    if scraped.get("hoosh_events_healthy", 1.0) < 1:
        status = "unhealthy"
    elif entries > 0:
        status = "backlog"
    return OutboxStatus(
        service=service,
        status=status,
        entries=entries,
        bytes=_int(scraped.get("hoosh_events_outbox_bytes")),
        oldest_age_seconds=scraped.get("hoosh_events_outbox_oldest_age_seconds"),
        max_entries=_int(scraped.get("hoosh_events_outbox_max_entries")),
        in_flight=in_flight,
    )


async def _audit_log(request: Request) -> audit_pb2.ListEntriesResponse | str:
    """The audit service's view of its log, or why it did not answer."""
    try:
        reply: audit_pb2.ListEntriesResponse = await edge(request).clients.audit.ListEntries(
            audit_pb2.ListEntriesRequest(limit=1), metadata=grpc_metadata(request), timeout=PROBE_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return reply


def _audit(log: audit_pb2.ListEntriesResponse | str, scraped: dict[str, float] | str | None) -> AuditStatus:
    lag = last = None
    if isinstance(scraped, dict):
        lag = _int(scraped.get("hoosh_audit_lag_events"))
        last = _int(scraped.get("hoosh_audit_stream_last_seq"))
    if isinstance(log, str):
        return AuditStatus(status="unreachable", lag_events=lag, stream_last_seq=last, error=log)
    return AuditStatus(
        status="ok" if log.chain_valid else "invalid",
        head_seq=log.head_seq,
        checkpoint_seq=log.checkpoint_seq,
        chain_valid=log.chain_valid,
        verify_error=log.verify_error or None,
        lag_events=lag,
        stream_last_seq=last,
    )


def worker_status(state: router_pb2.WorkerState) -> WorkerStatus:
    """One worker as the router last polled it."""
    base = WorkerStatus(
        address=state.address,
        providers=list(state.providers),
        status="UNKNOWN",
        polled_at_ms=state.polled_at_ms or None,
    )
    if state.error:
        return base.model_copy(update={"status": "UNREACHABLE", "reason": state.error})
    if not state.HasField("status"):
        reason = "the router has not polled it yet" if not state.polled_at_ms else "its last answer is stale"
        return base.model_copy(update={"reason": reason})
    said = state.status
    refusing = said.out_of_memory or said.overloaded
    health: WorkerHealth = "OUT_OF_MEMORY" if said.out_of_memory else "OVERLOADED" if said.overloaded else "SERVING"
    return base.model_copy(
        update={
            "status": health,
            "reason": said.reason or None,
            "queue_depth": said.queue_depth,
            "overload_queue": said.overload_queue,
            "active_requests": said.active_requests,
            "retry_after_seconds": (state.retry_after_seconds or 1) if refusing else None,
        }
    )


async def _inference(request: Request) -> tuple[ServiceHealth, list[WorkerStatus]]:
    """The local inference workers, as the router polls them (the edge calls none)."""
    try:
        reply: router_pb2.GetProviderHealthResponse = await edge(request).clients.router.GetProviderHealth(
            router_pb2.GetProviderHealthRequest(), metadata=grpc_metadata(request), timeout=PROBE_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        detail = f"the router did not answer: {exc.code().name}"
        return ServiceHealth(service="inference", status="UNKNOWN", detail=detail), []
    found = [worker_status(state) for state in reply.workers]
    if not found:
        return ServiceHealth(service="inference", status="not_configured"), []
    worst = min(found, key=lambda worker: _WORST_FIRST.index(worker.status)).status
    return ServiceHealth(service="inference", status=worst), found


def _problems(page: AdminStatus, metrics_urls: dict[str, str]) -> list[str]:
    problems: list[str] = []
    if page.redis.status != "ok":
        problems.append(f"Redis does not answer: {page.redis.error}")
    if page.nats.status == "unreachable":
        problems.append(f"NATS at {page.nats.address} does not answer: {page.nats.error}")
    if page.audit.status == "unreachable":
        problems.append(f"the audit service does not answer: {page.audit.error}")
    elif page.audit.status == "invalid":
        problems.append(f"the audit chain does not verify: {page.audit.verify_error or 'see GET /v1/audit'}")
    if "audit" in metrics_urls and page.audit.lag_events is None:
        problems.append("the audit's metrics could not be read (its lag is unknown)")
    for box in page.outbox:
        if box.status == "unreachable":
            problems.append(f"{box.service}'s metrics could not be read (its outbox is unknown): {box.error}")
        elif box.status == "backlog":
            problems.append(f"{box.entries} events wait in {box.service}'s outbox for NATS")
        elif box.status == "unhealthy":
            problems.append(f"{box.service}'s outbox is nearly full ({box.entries} events): it refuses new work")
    for service in page.services:
        if service.service == "inference" and page.workers:
            continue  # each worker says more, below
        if service.status not in ("SERVING", "not_configured"):
            problems.append(
                f"{service.service} is {service.status}" + (f": {service.detail}" if service.detail else "")
            )
    for worker in page.workers:
        where = f"the local inference worker at {worker.address}"
        if worker.status == "UNREACHABLE":
            problems.append(f"{where} does not answer the router: {worker.reason}")
        elif worker.status in ("OVERLOADED", "OUT_OF_MEMORY"):
            problems.append(f"{where} refuses work: {worker.reason or worker.status.lower()}")
        elif worker.status == "UNKNOWN":
            problems.append(f"{where} is in an unknown state: {worker.reason}")
    return problems


@router.get("/status", response_model=AdminStatus, responses=errors(403))
async def admin_status(request: Request) -> Response:
    """Admin: Redis, NATS, the audit log (head, checkpoint, chain, lag), each publisher's
    outbox and the local inference workers (as the router polls them), probed at once (about a second at most).
    Always 200: a part that cannot be reached says so, and ``problems`` lists it."""
    settings = StatusSettings()
    urls = settings.metrics_urls()
    names = [service for service in METRIC_SOURCES if service in urls]
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_SECONDS) as client:
        (redis, nats, log, (inference, workers)), scraped_list = await asyncio.gather(
            asyncio.gather(_redis(request), _nats(settings), _audit_log(request), _inference(request)),
            asyncio.gather(*(_scrape(client, urls[service]) for service in names)),
        )
    scraped: dict[str, dict[str, float] | str] = dict(zip(names, scraped_list, strict=True))
    page = AdminStatus(
        status="ok",
        problems=[],
        redis=redis,
        nats=nats,
        audit=_audit(log, scraped.get("audit")),
        outbox=[_outbox(service, scraped.get(service)) for service in PUBLISHERS],
        services=[inference],
        workers=workers,
        checked_at_ms=int(time.time() * 1000),
    )
    page.problems = _problems(page, urls)
    page.status = "degraded" if page.problems else "ok"
    return OrjsonResponse(page.model_dump())
