"""gRPC transport for hoosh.audit.v1.AuditService: thin, the log does the work."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import orjson
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc

from hoosh_audit import metrics
from hoosh_audit.errors import BadCursor
from hoosh_audit.index import Filters
from hoosh_audit.log import AuditLog
from hoosh_audit.query import decode_cursor, encode_cursor

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
MAX_FILTER_LENGTH = 256


def to_proto(entry: dict[str, Any], segment: str = "") -> audit_pb2.AuditEntry:
    return audit_pb2.AuditEntry(
        seq=int(entry.get("seq", 0)),
        timestamp_ms=int(entry.get("ts_ms", 0)),
        event_id=str(entry.get("event_id", "")),
        subject=str(entry.get("subject", "")),
        stream_seq=int(entry.get("stream_seq", 0)),
        payload_json=orjson.dumps(entry.get("payload", {}), option=orjson.OPT_SORT_KEYS).decode(),
        prev_mac=str(entry.get("prev", "")),
        mac=str(entry.get("mac", "")),
        signing_key_id=str(entry.get("kid", "")),
        segment=segment,
    )


def filters_of(request: audit_pb2.ListEntriesRequest) -> Filters:
    return Filters(
        since_ms=request.since_ms,
        until_ms=request.until_ms,
        event_id=request.event_id,
        request_id=request.request_id,
        key_id=request.key_id,
        pool=request.pool,
        model=request.model,
        provider=request.provider,
        kind=request.kind,
        outcome=request.outcome,
    )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Queries come from the index; the chain's state from what the log already knows."""

    def __init__(self, audit_log: AuditLog, *, max_concurrent_full_verifies: int = 1) -> None:
        self._log = audit_log
        # A full verification reads every segment: one at a time.
        self._full_slots = asyncio.Semaphore(max_concurrent_full_verifies)

    async def ListEntries(
        self,
        request: audit_pb2.ListEntriesRequest,
        context: grpc.aio.ServicerContext[audit_pb2.ListEntriesRequest, audit_pb2.ListEntriesResponse],
    ) -> audit_pb2.ListEntriesResponse:
        """One page of the entries matching every filter given, newest page first, each
        page oldest first; ``next_cursor`` asks for the older page. ``total`` counts the
        matches in the whole log (every entry without filters)."""
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must be >= 0")
        if request.since_ms < 0 or request.until_ms < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "since_ms and until_ms must be >= 0")
        filters = filters_of(request)
        if any(len(value) > MAX_FILTER_LENGTH for _, value in filters.equalities()):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a filter is longer than {MAX_FILTER_LENGTH}")
        limit = min(request.limit or DEFAULT_LIMIT, MAX_LIMIT)
        before = 0
        if request.cursor:
            try:
                before = decode_cursor(request.cursor, filters)
            except BadCursor as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        integrity, page = await asyncio.gather(
            self._log.integrity(), self._log.query(filters, before=before, limit=limit)
        )
        problems = [p for p in (integrity.problem, page.problem) if p is not None]
        problem = min(problems, key=lambda p: p.seq) if problems else None
        return audit_pb2.ListEntriesResponse(
            entries=[to_proto(e, s) for e, s in zip(page.entries, page.segments, strict=True)],
            total=page.total,
            chain_valid=problem is None,
            verify_error=problem.describe() if problem else "",
            next_cursor=encode_cursor(page.oldest_seq, filters) if page.more else "",
            head_seq=integrity.head_seq,
            checkpoint_seq=integrity.checkpoint_seq,
            first_bad_seq=problem.seq if problem else 0,
        )

    async def Verify(
        self,
        request: audit_pb2.VerifyRequest,
        context: grpc.aio.ServicerContext[audit_pb2.VerifyRequest, audit_pb2.VerifyResponse],
    ) -> audit_pb2.VerifyResponse:
        """The incremental state, or (``full``) every segment read and verified again."""
        if request.full:
            async with self._full_slots:
                report = await self._log.verify_full()
            problem, entries = report.problem, report.entries
            if problem is not None:
                metrics.VERIFY_FAILED_FULL.inc()
            checkpoint_seq = (await self._log.integrity()).checkpoint_seq
        else:
            integrity = await self._log.integrity()
            problem, entries, checkpoint_seq = integrity.problem, integrity.head_seq, integrity.checkpoint_seq
        return audit_pb2.VerifyResponse(
            valid=problem is None,
            entries=entries,
            first_bad_seq=problem.seq if problem else 0,
            error=problem.describe() if problem else "",
            segment=problem.segment if problem else "",
            missing_from=problem.missing_from if problem else 0,
            missing_to=problem.missing_to if problem else 0,
            checkpoint_seq=checkpoint_seq,
        )
