"""Admin: ``POST /v1/admin/reload`` — every router and budget replica re-reads hoosh.yaml
(``HOOSH_CONFIG``): providers, routes, prices and pools change without a restart, and
without dropping a request or a stream in flight.

The edge asks every replica over NATS and gathers their answers
(``hoosh_common.reload``, which documents the rounds: check, then apply or abort). The
body is always the report; a status other than 200 carries OpenAI's error envelope
(``error``) beside it:

- **200** ``ok``: every replica that answered reloaded, or already ran this file
  (``unchanged``).
- **400** ``refused`` (``config_refused``): a replica refused the file (a YAML error, an
  unknown provider type, a route to an unknown provider, a pool whose parent does not
  exist, ...): the reason names it; nothing changed anywhere.
- **409** ``refused`` (``config_conflict``): the file is not at fault, but the replicas
  read different files (a ConfigMap change not on every pod yet) or it changed during the
  reload; nothing changed. Run it again.
- **502** ``partial`` (``reload_partial``): some replicas reloaded, others refused while
  applying, applied only part of the file (a replica's ``partial``: the budget's store
  failed after some pools were written) or did not answer in time
  (``HOOSH_EDGE_RELOAD_TIMEOUT_SECONDS``): the deployment runs mixed configurations until
  the reload is run again (a reload is idempotent: replicas already on the file answer
  ``unchanged``).
- **503** ``reload_unavailable``: NATS cannot be reached, or no replica answered within
  ``HOOSH_EDGE_RELOAD_GATHER_SECONDS``.

Every replica records its outcome (refusals included) as an audit event
(``kind=config.reload``). The edge's NATS connection opens on the first reload.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import nats
import nats.errors
from fastapi import APIRouter, Depends, FastAPI, Request
from hoosh_common.eventbus import nats_inbox_prefix
from hoosh_common.reload import NoReplicas, ReloadReport, coordinate_reload
from nats.aio.client import Client as NATS
from pydantic import BaseModel, Field
from starlette.responses import Response

from .config import Settings
from .errors import INVALID_REQUEST, ServiceUnavailableError
from .protocol import ErrorDetail, ErrorResponse
from .responses import OrjsonResponse
from .routing import edge, request_id
from .scopes import admin_only, principal_of

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 2  # (nats-py takes whole seconds)


class ReloadBus:
    """This process's NATS connection for reloads, opened on first use (the edge starts
    without NATS), and opened again by the next reload after it was lost."""

    def __init__(self) -> None:
        self._nc: NATS | None = None
        self._lock = asyncio.Lock()

    async def connect(self, settings: Settings) -> NATS:
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = await open_connection(settings.nats_url)
            return self._nc

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.close()
            except nats.errors.Error as error:
                log.warning("closing the reload NATS connection failed", extra={"error": repr(error)})
        self._nc = None


async def open_connection(url: str) -> NATS:
    """A bounded connect, all of it within ``CONNECT_TIMEOUT_SECONDS``: a refused port, a
    host that does not answer, a name that does not resolve or a wrong password raise
    (``nats.errors.Error``, ``OSError``, ``TimeoutError``: 503 ``reload_unavailable``)
    instead of retrying while the request waits. A connection once open does not
    reconnect: when NATS goes away it closes, and the next reload opens a new one.
    The inbox is the user's own (``_INBOX_edge``: the only one its NATS user may read)."""
    try:
        inbox_prefix = nats_inbox_prefix(url)
    except ValueError as error:
        raise nats.errors.Error(f"nats: HOOSH_NATS_URL: {error}") from error
    client = NATS()
    try:
        await asyncio.wait_for(
            client.connect(
                url,
                name="hoosh-edge",
                inbox_prefix=inbox_prefix,
                error_cb=_on_error,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                # A refusal by the server (a wrong password) is final at once.
                allow_reconnect=False,
                # nats-py tries a server it cannot reach again and again until the
                # attempts run out (-1 or 0: never): twice, no pause between.
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
            ),
            timeout=CONNECT_TIMEOUT_SECONDS,
        )
    except BaseException:
        # A half-made client (its socket, its reader and pinger) goes with the failure.
        try:
            await client.close()
        except Exception as error:  # closing what never opened: nothing else to do
            log.debug("closing a failed NATS connection", extra={"error": repr(error)})
        raise
    return client


async def _on_error(error: Exception) -> None:
    # One line per failed try or connection error (nats-py's default logs a traceback).
    log.warning("reload NATS connection: %s", error, extra={"error": repr(error)})


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    bus = ReloadBus()
    app.state.reload_bus = bus
    try:
        yield
    finally:
        await bus.close()


router = APIRouter(tags=["admin"], dependencies=[Depends(admin_only)], lifespan=_lifespan)


class ReloadServiceResult(BaseModel):
    service: str = Field(description="The service of the replica: router | budget")
    instance: str = Field(description="The replica: <host>:<pid> (in Kubernetes the host is the pod)")
    status: Literal["reloaded", "partial", "refused", "unchanged"] = Field(
        description="reloaded: new requests use the new file; partial: it applied part of the file and then "
        "failed (the reason says what was and was not applied; run the reload again); refused: it keeps its "
        "running configuration; unchanged: it already ran this file"
    )
    reason: str | None = Field(description="Why it refused, or what it did not apply")
    config_sha256: str | None = Field(description="SHA-256 of the file the replica read (null: it could not)")


class ReloadResponse(BaseModel):
    status: Literal["ok", "partial", "refused"] = Field(
        description="ok: every replica answered reloaded or unchanged; refused: nothing changed anywhere; "
        "partial: some replicas reloaded and others did not (run the reload again)"
    )
    reason: str | None = Field(description="Why the reload was refused or partial")
    services: list[ReloadServiceResult] = Field(description="Each replica's answer")
    reload_id: str = Field(description="This reload's id (the request id), in each replica's audit event")


class ReloadErrorResponse(ReloadResponse):
    """The report with OpenAI's error envelope beside it."""

    error: ErrorDetail


_REFUSED = {"model": ReloadErrorResponse}


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    responses={
        400: {**_REFUSED, "description": "A replica refused the file (the reason says why); nothing changed"},
        403: {"model": ErrorResponse, "description": "Not an admin key"},
        409: {**_REFUSED, "description": "The replicas read different files, or it changed meanwhile"},
        502: {**_REFUSED, "description": "Partial: some replicas reloaded, others did not"},
        503: {"model": ErrorResponse, "description": "NATS unreachable, or no replica answered"},
    },
)
async def reload_config(request: Request) -> Response:
    """Admin: every router and budget replica re-reads hoosh.yaml; refused whole when any
    replica finds it invalid, else applied by each without dropping work in flight."""
    state = edge(request)
    settings = state.settings
    bus: ReloadBus = request.app.state.reload_bus
    try:
        nc = await bus.connect(settings)
        report = await coordinate_reload(
            nc,
            settings.subject_prefix,
            reload_id=request_id(request),
            key_id=principal_of(request).id,
            gather_seconds=settings.edge_reload_gather_seconds,
            timeout_seconds=settings.edge_reload_timeout_seconds,
        )
    except NoReplicas as error:
        raise ServiceUnavailableError(str(error), code="reload_unavailable") from error
    except (nats.errors.Error, OSError, TimeoutError) as error:
        log.warning("reload: NATS unavailable", extra={"error": repr(error)})
        raise ServiceUnavailableError(
            "The reload could not be sent: NATS is unreachable from the edge.", code="reload_unavailable"
        ) from error
    return _response(report)


def _response(report: ReloadReport) -> Response:
    body: dict[str, Any] = report.to_json()
    if report.status == "ok":
        return OrjsonResponse(body)
    if report.status == "partial":
        status, kind, code = 502, "api_error", "reload_partial"
    elif report.conflict:
        status, kind, code = 409, INVALID_REQUEST, "config_conflict"
    else:
        status, kind, code = 400, INVALID_REQUEST, "config_refused"
    body["error"] = {"message": report.reason or report.status, "type": kind, "param": None, "code": code}
    log.warning("reload not applied everywhere", extra={"status": report.status, "reason": report.reason})
    return OrjsonResponse(body, status_code=status)
