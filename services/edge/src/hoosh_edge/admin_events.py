"""Admin actions as audit events: after an admin route changes something (a key, a
pool, usage reported without a reservation), the edge asks the budget service to
publish an ``AdminAction`` (through its publisher and outbox), which the audit
records like a request. Never the key itself, nor any secret."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import grpc
import orjson
from hoosh.events.v1 import events_pb2
from hoosh_common.telemetry import current_trace_id
from starlette.requests import Request

from .routing import edge, grpc_metadata, request_id
from .scopes import principal_of

log = logging.getLogger(__name__)

# The budget service accepts 16 KiB of details; a larger record (a key with hundreds of
# model patterns) is recorded with its long lists as counts and digests.
MAX_DETAILS_BYTES = 12 * 1024


def _compact(details: dict[str, Any]) -> dict[str, Any]:
    compact: dict[str, Any] = {}
    for name, value in details.items():
        text = orjson.dumps(value)
        if len(text) > 512:
            size = len(value) if isinstance(value, list | dict | str) else None
            compact[name] = {"sha256": hashlib.sha256(text).hexdigest(), "length": size}
        else:
            compact[name] = value
    return compact


async def record_admin_action(request: Request, action: str, target: str, details: dict[str, Any]) -> None:
    """Record ``action`` on ``target``; the change has happened, so a failure to record
    it is logged as an error (with the event id and what was changed), not answered."""
    state = edge(request)
    details_json = orjson.dumps(details).decode()
    if len(details_json) > MAX_DETAILS_BYTES:
        details_json = orjson.dumps(_compact(details)).decode()
    event = events_pb2.AdminAction(
        event_id=request_id(request),
        action=action,
        actor_key_id=principal_of(request).id,
        target=target,
        details_json=details_json,
        trace_id=current_trace_id(),
    )
    try:
        await state.clients.budget.RecordAdminAction(
            event, metadata=grpc_metadata(request), timeout=state.settings.edge_rpc_timeout_seconds
        )
    except grpc.aio.AioRpcError as exc:
        log.error(
            "admin action not recorded in the audit log",
            extra={"event_id": event.event_id, "action": action, "target": target, "error": exc.details()},
        )
