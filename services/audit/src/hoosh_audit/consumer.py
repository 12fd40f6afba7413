"""The JetStream side of audit: a durable pull consumer that appends every event to
the chain and acks only once the entries are fsynced.

Order and duplicates. The log file is the source of truth for what is recorded: at
start the durable consumer is (re)created to deliver from the stream sequence after
the last recorded one, so events a previous process wrote but never acked are not
delivered again, and events it fetched but never wrote come first, in stream order.
While running, a redelivered message (ack lost, or ack_wait expired during a slow
write) has a stream sequence <= the last recorded one and is acked without being
appended. A failed write is retried in place (the batch stays in hand and its ack
deadline is extended) so later events never overtake it.

What is recorded. The consumer reads every subject under the prefix (NATS 2.9 allows
one filter subject per consumer) and records the events it has a decoder for
(``inference.*``, ``budget.reset``, ``config.reload``) and, whatever their payload, the
admin actions under ``admin.>`` (key and pool changes, token reports: the decoded
JSON object, or the bytes in base64 until producers publish a message type for them).
An event on another subject is acked and skipped: it is another consumer's, not a
corrupt one. A known subject whose payload cannot be decoded is terminated.

Publishers. With publisher keys (``verifier``), an event on a recorded subject must
carry a valid ``hoosh-signature`` from one of them (see ``hoosh_common.eventbus``).
One that does not (missing, malformed, an unknown key id, a wrong MAC) is never
recorded as the event it claims to be: an entry on ``<prefix>.audit.rejected`` takes
its place in the chain (the reason, the claimed subject, message id and key id, and
the payload's SHA-256; not the payload), it is acked, counted in
``hoosh_audit_events_rejected_total{reason}`` and logged as a warning. Its event id
is ``rejected:<message id>``, so a forgery never stands in for the genuine event of
that id (the outbox copy check looks event ids up). Without a verifier
(development) every event is taken as it comes.

Durability. A batch is written and fsynced before any of its messages is acked; then
the checkpoint writer is told, and stores the new head outside the log (off the ack
path: Redis being slow delays the checkpoint, never the acks).

Observability. Every written event counts in ``hoosh_audit_events_written_total``
(see ``hoosh_audit.metrics``) and logs one ``audit entry written`` line with its
request id and the trace it belongs to (from the message's headers). While spans are
exported, the write is also a ``hoosh.audit.write`` span (kind CONSUMER) under the
producer's span: it covers the batch's append and fsync. The stream's last sequence
is read every few seconds (``stream_info_interval``) for the lag gauge.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from hoosh.events.v1 import events_pb2
from hoosh_common import events
from hoosh_common.eventbus import (
    DUPLICATE_WINDOW_S,
    MSG_ID_HEADER,
    OUTBOX_HEADER,
    REQUEST_ID_HEADER,
    EventVerifier,
    SignatureProblem,
    StreamPolicy,
    ensure_stream,
)
from hoosh_common.telemetry import context_from_headers, exporting
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy
from nats.js.client import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from hoosh_audit import metrics
from hoosh_audit.chain import NewEntry, canonical
from hoosh_audit.errors import AuditWriteError, UndecodableEvent
from hoosh_audit.log import AuditLog

log = logging.getLogger(__name__)
tracer = trace.get_tracer("hoosh.audit")
WRITE_SPAN = "hoosh.audit.write"
TRACEPARENT_HEADER = "traceparent"
# version-trace_id-parent_id-flags; later versions may append fields (W3C Trace Context).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(?:-|$)")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16

DECODERS: dict[str, type[Message]] = {
    events.SUBJECT_COMPLETED: events_pb2.InferenceCompleted,
    events.SUBJECT_FAILED: events_pb2.InferenceFailed,
    events.SUBJECT_BUDGET_RESET: events_pb2.BudgetReset,
    events.SUBJECT_CONFIG_RELOAD: events_pb2.ConfigReload,
}
# Recorded whatever the payload (see decode_any).
ADMIN_SUBJECTS = "admin."
# Where a message that is not signed by a known publisher is recorded instead.
REJECTED_SUBJECT = "audit.rejected"
# Bounds on what a rejection copies from the (untrusted) message.
_MAX_CLAIMED = 256

# Called once a batch is durable, before its acks: False skips the acks (a lost ack).
DurableHook = Callable[[list[Msg]], bool]


@dataclass(slots=True)
class ConsumerStats:
    appended: int = 0
    duplicates: int = 0  # redeliveries and outbox copies acked without appending
    terminated: int = 0  # undecodable payloads on a known subject
    skipped: int = 0  # subjects audit has no decoder for (acked, not recorded)
    rejected: int = 0  # not signed by a known publisher: recorded as audit.rejected
    write_failures: int = 0


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_any(data: bytes) -> dict[str, Any]:
    """A payload audit has no message type for, as a JSON object: the payload itself if
    it is one, ``{"data_json": value}`` for other JSON, else ``{"data_base64": ...}``."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
        payload = value if isinstance(value, dict) else {"data_json": value}
        canonical(payload)  # it must also be writable (no lone surrogates, not too deep)
        return payload
    except (UnicodeError, ValueError, RecursionError):
        return {"data_base64": base64.b64encode(data).decode("ascii")}


def records(subject: str, subject_prefix: str) -> bool:
    """Whether audit records events on this subject (so they must be signed)."""
    prefix = f"{subject_prefix}."
    if not subject.startswith(prefix):
        return False
    name = subject[len(prefix) :]
    return name in DECODERS or name.startswith(ADMIN_SUBJECTS)


def _clip(text: str) -> str:
    # Untrusted text into the log: bounded, and always encodable.
    return text[:_MAX_CLAIMED].encode("utf-8", "replace").decode("utf-8")


def rejection(
    subject: str, headers: dict[str, str] | None, data: bytes, problem: SignatureProblem, stream_seq: int
) -> tuple[str, dict[str, Any]]:
    """The event id and payload of the ``audit.rejected`` entry that stands for a message
    not signed by a known publisher: what it claimed, never its payload."""
    msg_id = _clip((headers or {}).get(MSG_ID_HEADER, ""))
    payload: dict[str, Any] = {
        "reason": problem.reason,
        "claimed_subject": _clip(subject),
        "msg_id": msg_id,
        "claimed_key_id": _clip(problem.key_id),
        "payload_sha256": hashlib.sha256(data).hexdigest(),
        "payload_bytes": len(data),
        "outcome": "rejected",
    }
    return f"rejected:{msg_id or f'nats:{stream_seq}'}", payload


def decode(
    subject: str, subject_prefix: str, data: bytes, headers: dict[str, str] | None, stream_seq: int = 0
) -> tuple[str, dict[str, Any]] | None:
    """The event id and the event as a JSON object; None for a subject audit does not
    record; ``UndecodableEvent`` for a known subject whose payload is not its event.

    The event id is the ``Nats-Msg-Id`` header, else the event's own id field (for an
    admin action without either: ``nats:<stream sequence>``)."""
    name = subject.removeprefix(f"{subject_prefix}.") if subject.startswith(f"{subject_prefix}.") else ""
    header_id = (headers or {}).get(MSG_ID_HEADER)
    if name.startswith(ADMIN_SUBJECTS):
        try:  # hoosh's own admin actions; anything else under admin.> as it came
            action = events_pb2.AdminAction.FromString(data)
        except DecodeError:
            action = None
        if action is not None and action.action and action.event_id:
            return header_id or action.event_id, MessageToDict(action, preserving_proto_field_name=True)
        payload = decode_any(data)
        fallback = payload.get("event_id") or payload.get("request_id")
        event_id = header_id or (fallback if isinstance(fallback, str) and fallback else f"nats:{stream_seq}")
        return event_id, payload
    cls = DECODERS.get(name)
    if cls is None:
        return None
    try:
        message = cls.FromString(data)
    except DecodeError as exc:
        raise UndecodableEvent(f"payload on {subject!r} is not a {cls.DESCRIPTOR.full_name}: {exc}") from exc
    payload = MessageToDict(message, preserving_proto_field_name=True)
    event_id = header_id or str(payload.get("request_id") or payload.get("event_id") or "")
    if not event_id:
        raise UndecodableEvent(f"event on {subject!r} has neither a {MSG_ID_HEADER} header nor an id")
    return event_id, payload


def trace_ids(traceparent: str | None) -> tuple[str, str] | None:
    """The trace id and parent span id of a W3C ``traceparent`` (None if it is not one).
    For the log line only: reading the header directly costs a fraction of a
    propagator's ``extract`` (no context object is needed to log two ids)."""
    match = _TRACEPARENT.match(traceparent) if traceparent else None
    if match is None or match[1] == "ff" or match[2] == _ZERO_TRACE or match[3] == _ZERO_SPAN:
        return None
    return match[2], match[3]


def _fail_spans(spans: list[Span] | None, reason: str) -> None:
    for span in spans or ():
        span.set_status(Status(StatusCode.ERROR, reason))
        span.end()


class AuditConsumer:
    """Moves events from the stream into an ``AuditLog``.

    ``run()`` loops until ``stop()``; ``stop()`` lets the batch in hand finish (written,
    then acked) and returns once the loop has ended.
    """

    def __init__(
        self,
        js: JetStreamContext,
        audit_log: AuditLog,
        *,
        stream: str,
        subject_prefix: str,
        durable: str,
        batch_size: int = 256,
        fetch_timeout: float = 1.0,
        max_ack_pending: int = 1024,
        ack_wait: float = 30.0,
        nak_delay: float = 2.0,
        retry_max_delay: float = 5.0,
        check_interval: float = 10.0,
        linger: float = 0.05,
        on_durable: Callable[[], None] | None = None,
        before_ack: DurableHook | None = None,
        stream_policy: StreamPolicy | None = None,
        duplicate_window: float = DUPLICATE_WINDOW_S,
        stream_info_interval: float = 5.0,
        verifier: EventVerifier | None = None,
    ) -> None:
        """``on_durable`` is called after every batch is fsynced (the checkpoint writer's
        ``notify``). ``before_ack`` sees each durable batch before it is acked and may
        skip the acks by returning False (fault injection: a lost ack). ``stream_policy``
        / ``duplicate_window``: the stream's bounds, as every service declares them.
        ``stream_info_interval``: how often the stream's last sequence is read (lag).
        ``verifier``: the publishers' keys; None takes every event as it comes (development)."""
        self._verifier = verifier
        self._rejected_subject = events.subject(subject_prefix, REJECTED_SUBJECT)
        self._stream_policy = stream_policy
        self._duplicate_window = duplicate_window
        self._js = js
        self._log = audit_log
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.durable = durable
        self._batch_size = batch_size
        self._fetch_timeout = fetch_timeout
        self._max_ack_pending = max_ack_pending
        self._ack_wait = ack_wait
        self._nak_delay = nak_delay
        self._retry_max_delay = retry_max_delay
        self._check_interval = check_interval
        # After a short batch, wait this long before the next fetch, so that each fetch,
        # fsync, checkpoint and round of acks covers many events instead of one or two:
        # at low load too, where a wake-up per event cost the request path ~0.1-0.3 ms
        # on a 2-core machine (audit, NATS and the request path share the cores). At low
        # load an event waits about this long (plus the batch's fetch and fsync) to be
        # written.
        self._linger = linger
        self._sub: JetStreamContext.PullSubscription | None = None
        self._watermark = 0  # highest stream sequence recorded from the current stream
        self._stopping = asyncio.Event()
        self._running = False
        self._done = asyncio.Event()
        self.stats = ConsumerStats()
        self._on_durable = on_durable
        self._before_ack = before_ack
        self._stream_info_interval = stream_info_interval
        self._kinds = metrics.KindCounters(subject_prefix)
        # The lag: the stream's sequences (from stream info) against the highest stream
        # sequence written or deliberately passed over (see hoosh_audit.metrics).
        self._position = 0
        self._stream_last_seq = 0
        self._stream_first_seq = 0

    @property
    def filter_subject(self) -> str:
        # inference.> and budget.>: NATS 2.9 has no filter_subjects, so take the whole
        # prefix and skip (ack) the subjects audit has no decoder for.
        return f"{self.subject_prefix}.>"

    async def start(self) -> None:
        """Declare the stream, then (re)create the durable consumer after the log's end."""
        info = await ensure_stream(
            self._js,
            self.stream,
            self.subject_prefix,
            duplicate_window=self._duplicate_window,
            policy=self._stream_policy,
        )
        work_queue = info.config.retention == RetentionPolicy.WORK_QUEUE
        recorded = self._log.last_stream_seq
        last_seq, first_seq = info.state.last_seq, info.state.first_seq
        if recorded > last_seq:
            log.warning(
                "the stream is behind the audit log: it was recreated; consuming it from the start",
                extra={"stream": self.stream, "recorded_stream_seq": recorded, "stream_last_seq": last_seq},
            )
            recorded = 0
        elif recorded and first_seq > recorded + 1:
            log.warning(
                "events expired from the stream before they were recorded",
                extra={"stream": self.stream, "from_seq": recorded + 1, "to_seq": first_seq - 1},
            )
        self._watermark = recorded
        self._position = recorded
        metrics.WRITTEN_STREAM_SEQ.set(self._log.last_stream_seq)
        metrics.LOG_SEQ.set(self._log.last_seq)
        self._stream_state(last_seq, first_seq)

        config = ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            max_ack_pending=self._max_ack_pending,
            filter_subject=self.filter_subject,
            max_deliver=-1,
        )
        if recorded and not work_queue:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = recorded + 1
        else:
            # A work queue holds only what audit has not acked (it refuses a start
            # sequence); the watermark skips what was written but not acked.
            config.deliver_policy = DeliverPolicy.ALL
        # A consumer's start position cannot be changed in place: replace it.
        try:
            await self._js.delete_consumer(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            pass
        await self._js.add_consumer(self.stream, config)
        if self._sub is not None:
            await self._unsubscribe()
        self._sub = await self._js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        log.info(
            "audit consumer started",
            extra={"stream": self.stream, "consumer": self.durable, "from_stream_seq": recorded + 1},
        )

    async def run(self) -> None:
        """Fetch, record and ack until ``stop()``. Transient NATS errors are retried."""
        self._running = True
        watch = asyncio.create_task(self._watch_stream(), name="audit-stream-info")
        try:
            if self._sub is None:
                await self._retrying(self.start)
            loop = asyncio.get_running_loop()
            last_check = loop.time()
            while not self._stopping.is_set():
                assert self._sub is not None
                try:
                    msgs = await self._sub.fetch(self._batch_size, timeout=self._fetch_timeout)
                except (nats.errors.TimeoutError, TimeoutError):
                    # Nothing new (nats-py's fetch raises either: a bare TimeoutError
                    # is no connection trouble). A deleted consumer or stream also looks like this,
                    # so now and then make sure ours still exists.
                    if loop.time() - last_check >= self._check_interval:
                        last_check = loop.time()
                        await self._check_consumer()
                    continue
                except (nats.errors.Error, OSError) as exc:
                    # Consumer or stream deleted, connection trouble: declare again.
                    log.warning("fetch failed; re-declaring the consumer", extra={"error": repr(exc)})
                    await self._sleep(self._retry_max_delay * random.uniform(0.5, 1.0))
                    await self._retrying(self.start)
                    continue
                await self._handle(msgs)
                if len(msgs) < self._batch_size and self._linger > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self._linger)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await self._unsubscribe()
            self._done.set()

    async def stop(self) -> None:
        """Stop fetching; return once the batch in hand is written and acked."""
        self._stopping.set()
        if self._running:
            await self._done.wait()
        else:
            await self._unsubscribe()

    async def _watch_stream(self) -> None:
        """Read the stream's sequences every ``stream_info_interval`` (for the lag), here
        in the event loop: the scrape thread only reads the gauges."""
        while not self._stopping.is_set():
            try:
                info = await self._js.stream_info(self.stream)
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                log.debug("stream info failed", extra={"stream": self.stream, "error": repr(exc)})
            else:
                self._stream_state(info.state.last_seq, info.state.first_seq)
            await self._sleep(self._stream_info_interval)

    def _stream_state(self, last_seq: int, first_seq: int) -> None:
        self._stream_last_seq, self._stream_first_seq = last_seq, first_seq
        metrics.STREAM_LAST_SEQ.set(last_seq)
        self._set_lag()

    def _set_lag(self) -> None:
        # Below first_seq nothing is left to deal with: acked on a workqueue stream,
        # expired on a limits one (lost, not lagging).
        done = max(self._position, self._stream_first_seq - 1)
        metrics.LAG_EVENTS.set(max(0, self._stream_last_seq - done))

    async def _check_consumer(self) -> None:
        try:
            await self._js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            log.warning("the consumer or the stream was deleted; declaring them again")
            await self._retrying(self.start)
        except (nats.errors.Error, OSError) as exc:
            log.warning("consumer check failed", extra={"error": repr(exc)})

    async def _handle(self, msgs: list[Msg]) -> None:
        accepted: list[Msg] = []
        entries: list[NewEntry] = []
        duplicates: list[Msg] = []
        batch_ids: set[str] = set()
        rejected: list[tuple[NewEntry, SignatureProblem]] = []
        verifier = self._verifier
        watermark = self._watermark
        position = self._position
        redelivered = 0
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            position = max(position, seq)
            if seq <= watermark:
                duplicates.append(msg)
                redelivered += 1
                continue
            if verifier is not None and records(msg.subject, self.subject_prefix):
                problem = verifier.check(msg.subject, msg.headers, msg.data)
                if problem is not None:
                    # Before decoding: a forgery is recorded as one whatever its payload.
                    event_id, payload = rejection(msg.subject, msg.headers, msg.data, problem, seq)
                    entry = NewEntry(event_id=event_id, subject=self._rejected_subject, stream_seq=seq, payload=payload)
                    entries.append(entry)
                    accepted.append(msg)
                    rejected.append((entry, problem))
                    watermark = seq
                    continue
            try:
                decoded = decode(msg.subject, self.subject_prefix, msg.data, msg.headers, seq)
            except UndecodableEvent as exc:
                log.error(
                    "terminating an event that cannot be recorded",
                    extra={"subject": msg.subject, "stream_seq": seq, "error": str(exc)},
                )
                await self._settle(msg.term())
                self.stats.terminated += 1
                metrics.UNDECODABLE.inc()
                continue
            if decoded is None:
                # Not an event audit records: another consumer's. Acked so it does not
                # come back; a redelivery after a restart is skipped the same way.
                log.debug("skipping an event audit does not record", extra={"subject": msg.subject})
                await self._settle(msg.ack())
                self.stats.skipped += 1
                metrics.IGNORED.inc()
                continue
            event_id, payload = decoded
            if (msg.headers or {}).get(OUTBOX_HEADER) and (
                event_id in batch_ids or await self._log.has_event(event_id)
            ):
                # Republished from a publisher's outbox after JetStream's duplicate
                # window: already recorded once, so acked and not recorded again.
                duplicates.append(msg)
                continue
            batch_ids.add(event_id)
            entries.append(NewEntry(event_id=event_id, subject=msg.subject, stream_seq=seq, payload=payload))
            accepted.append(msg)
            watermark = seq

        if entries:
            spans = self._start_spans(accepted) if exporting() else None
            try:
                written = await self._append(entries, accepted)
            except BaseException as exc:  # cancelled mid-write: the spans still end
                _fail_spans(spans, repr(exc))
                raise
            if written is None:
                _fail_spans(spans, "not written: stopping while the disk failed")
                return  # stopping while the disk kept failing: the batch was nak'd
            self._written(entries, written, accepted, spans)
            if rejected:
                self._rejected(rejected)
        self._watermark = watermark
        self._position = position
        self.stats.appended += len(entries)
        self.stats.duplicates += len(duplicates)
        if redelivered:
            metrics.REDELIVERIES_SKIPPED.inc(redelivered)
        if len(duplicates) > redelivered:
            metrics.DUPLICATES_SKIPPED.inc(len(duplicates) - redelivered)
        self._stream_last_seq = max(self._stream_last_seq, position)
        metrics.STREAM_LAST_SEQ.set(self._stream_last_seq)
        self._set_lag()
        if entries and self._on_durable is not None:
            self._on_durable()
        if self._before_ack is not None and not self._before_ack(accepted):
            return
        for msg in accepted:
            await self._settle(msg.ack())
        for msg in duplicates:
            await self._settle(msg.ack())

    def _rejected(self, rejected: list[tuple[NewEntry, SignatureProblem]]) -> None:
        """Count and log the rejections of a batch that is durable."""
        self.stats.rejected += len(rejected)
        for entry, problem in rejected:
            metrics.EVENTS_REJECTED.labels(problem.reason).inc()
            log.warning(
                "event rejected: not signed by a known publisher; recorded as audit.rejected",
                extra={
                    "reason": problem.reason,
                    "claimed_subject": entry.payload["claimed_subject"],
                    "msg_id": entry.payload["msg_id"],
                    "claimed_key_id": problem.key_id,
                    "stream_seq": entry.stream_seq,
                },
            )

    def _start_spans(self, msgs: list[Msg]) -> list[Span]:
        """One ``hoosh.audit.write`` span per message, each under the context its headers
        carry (the producer's span): started before the append, ended after the fsync."""
        spans: list[Span] = []
        for msg in msgs:
            headers = msg.headers or {}
            attributes: dict[str, str] = {
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": msg.subject,
            }
            if msg_id := headers.get(MSG_ID_HEADER):
                attributes["messaging.message.id"] = msg_id
            if request_id := headers.get(REQUEST_ID_HEADER):
                attributes["hoosh.request_id"] = request_id
            spans.append(
                tracer.start_span(
                    WRITE_SPAN, context=context_from_headers(headers), kind=SpanKind.CONSUMER, attributes=attributes
                )
            )
        return spans

    def _written(
        self,
        entries: list[NewEntry],
        written: list[dict[str, Any]],
        msgs: list[Msg],
        spans: list[Span] | None,
    ) -> None:
        """Count, log and end the spans of a batch that is durable."""
        kinds = self._kinds
        for item in entries:
            kinds(item.subject).inc()
        metrics.WRITTEN_STREAM_SEQ.set(entries[-1].stream_seq)
        metrics.LOG_SEQ.set(written[-1]["seq"])
        info = log.isEnabledFor(logging.INFO)
        if spans is None and not info:
            return
        for i, (msg, entry) in enumerate(zip(msgs, written, strict=True)):
            seq = entry["seq"]
            span = spans[i] if spans is not None else None
            if span is not None:
                span.set_attribute("hoosh.audit.seq", seq)
            if info:
                headers = msg.headers or {}
                extra: dict[str, Any] = {"subject": entry["subject"], "seq": seq, "stream_seq": entry["stream_seq"]}
                request_id = headers.get(REQUEST_ID_HEADER)
                if request_id:
                    extra["request_id"] = request_id
                if span is not None:
                    span_context = span.get_span_context()
                    extra["trace_id"] = format(span_context.trace_id, "032x")
                    extra["span_id"] = format(span_context.span_id, "016x")
                elif ids := trace_ids(headers.get(TRACEPARENT_HEADER)):
                    # Not exporting: the producer's ids, as its headers carried them.
                    extra["trace_id"], extra["span_id"] = ids
                log.info("audit entry written", extra=extra)
            if span is not None:
                span.end()

    async def _append(self, entries: list[NewEntry], msgs: list[Msg]) -> list[dict[str, Any]] | None:
        """Write the batch, retrying in place: the entries as written, or None if it was
        given up (nak'd) on stop."""
        delay = 0.1
        while True:
            try:
                return await self._log.append_batch(entries)
            except AuditWriteError as exc:
                self.stats.write_failures += 1
                metrics.WRITE_FAILURES.inc()
                log.error("audit write failed; retrying", extra={"error": str(exc), "entries": len(entries)})
            if self._stopping.is_set():
                for msg in msgs:
                    await self._settle(msg.nak(delay=self._nak_delay))
                return None
            # Keep the batch ours while the disk recovers, so nothing overtakes it.
            for msg in msgs:
                await self._settle(msg.in_progress())
            await self._sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._retry_max_delay)

    @staticmethod
    async def _settle(op: Awaitable[None]) -> None:
        """Ack/nak/term/progress; a lost one only means a redelivery, recognised later."""
        try:
            await op
        except nats.errors.Error as exc:
            log.warning("could not settle a message", extra={"error": repr(exc)})

    async def _retrying(self, op: Callable[[], Any]) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            try:
                await op()
                return
            except (nats.errors.Error, OSError) as exc:
                log.warning("NATS not ready; retrying", extra={"error": repr(exc)})
            await self._sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._retry_max_delay)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribe failed", extra={"error": repr(exc)})
