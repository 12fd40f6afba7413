"""gRPC transport for hoosh.audit.v1.AuditService: thin, the log does the work."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import orjson
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc

from hoosh_audit.chain import AuditLog, VerifyResult

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000


def to_proto(entry: dict[str, Any]) -> audit_pb2.AuditEntry:
    return audit_pb2.AuditEntry(
        seq=int(entry.get("seq", 0)),
        timestamp_ms=int(entry.get("ts_ms", 0)),
        event_id=str(entry.get("event_id", "")),
        subject=str(entry.get("subject", "")),
        stream_seq=int(entry.get("stream_seq", 0)),
        payload_json=orjson.dumps(entry.get("payload", {}), option=orjson.OPT_SORT_KEYS).decode(),
        prev_mac=str(entry.get("prev", "")),
        mac=str(entry.get("mac", "")),
    )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Answers queries from the log; every chain check really reads the whole file."""

    def __init__(self, audit_log: AuditLog, *, max_concurrent_verifies: int = 2) -> None:
        self._log = audit_log
        # A verify reads the whole file: bound how many run at once.
        self._verify_slots = asyncio.Semaphore(max_concurrent_verifies)

    async def _verify(self) -> VerifyResult:
        async with self._verify_slots:
            return await self._log.verify()

    async def ListEntries(
        self,
        request: audit_pb2.ListEntriesRequest,
        context: grpc.aio.ServicerContext[audit_pb2.ListEntriesRequest, audit_pb2.ListEntriesResponse],
    ) -> audit_pb2.ListEntriesResponse:
        """The most recent ``limit`` entries (0 = 100, at most 10000), oldest first,
        optionally only one event id's and only those whose event carries ``key_id``
        (a user key's own); plus the result of verifying the whole chain.

        ``total`` is the number of entries in the log, or with ``key_id`` the number
        that match the filters."""
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must be >= 0")
        limit = min(request.limit or DEFAULT_LIMIT, MAX_LIMIT)
        event_id = request.event_id or None
        if request.key_id:
            (entries, total), result = await asyncio.gather(
                self._log.matching(limit, key_id=request.key_id, event_id=event_id),
                self._verify(),
            )
        else:
            entries, result = await asyncio.gather(self._log.recent(limit, event_id), self._verify())
            total = self._log.last_seq
        return audit_pb2.ListEntriesResponse(
            entries=[to_proto(e) for e in entries],
            total=total,
            chain_valid=result.valid,
            verify_error=result.error,
        )

    async def Verify(
        self,
        request: audit_pb2.VerifyRequest,
        context: grpc.aio.ServicerContext[audit_pb2.VerifyRequest, audit_pb2.VerifyResponse],
    ) -> audit_pb2.VerifyResponse:
        """Walk the whole chain: every line, mac and link."""
        result = await self._verify()
        return audit_pb2.VerifyResponse(
            valid=result.valid,
            entries=result.count,
            first_bad_seq=result.first_bad_seq,
            error=result.error,
        )
