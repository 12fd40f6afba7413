"""Both sides of the JetStream event bus: stream declaration and a publisher that
awaits the ack.

The router publishes with ``EventPublisher``; audit declares the same stream with
``ensure_stream`` and consumes it. Every event carries ``Nats-Msg-Id`` (the event id,
i.e. the request id), so a retried publish inside the stream's duplicate window is
stored once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.js.api import PubAck, StorageType, StreamConfig, StreamInfo
from nats.js.client import JetStreamContext
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from hoosh_common import events
from hoosh_common.logs import request_id_var
from hoosh_common.telemetry import inject_headers

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
REQUEST_ID_HEADER = "hoosh-request-id"
DUPLICATE_WINDOW_S = 120.0

# Errors worth another try: the server or stream leader is briefly unreachable, or the
# ack did not arrive in time (the Nats-Msg-Id makes a second try safe either way).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
)


class EventPublishError(Exception):
    """An event could not be stored in JetStream (after retrying transient failures)."""

    def __init__(self, subject: str, event_id: str, attempts: int, cause: BaseException) -> None:
        super().__init__(f"publishing {subject} (event {event_id}) failed after {attempts} attempt(s): {cause!r}")
        self.subject = subject
        self.event_id = event_id
        self.attempts = attempts


async def ensure_stream(
    js: JetStreamContext,
    stream: str,
    subject_prefix: str,
    *,
    duplicate_window: float = DUPLICATE_WINDOW_S,
) -> StreamInfo:
    """Declare the event stream idempotently and return its info.

    The stream holds ``{subject_prefix}.>`` on file storage with the given duplicate
    window. An existing stream is updated when its subjects or duplicate window differ
    (storage cannot change after creation: a mismatch is logged, not fatal). Two
    replicas racing to create it both succeed.
    """
    subjects = [f"{subject_prefix}.>"]
    wanted = StreamConfig(
        name=stream,
        subjects=subjects,
        storage=StorageType.FILE,
        duplicate_window=duplicate_window,
    )
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        try:
            info = await js.add_stream(wanted)
            log.info("stream created", extra={"stream": stream, "subjects": subjects})
            return info
        except nats.js.errors.BadRequestError as exc:
            # Another replica may have created it between our lookup and our create;
            # anything else (overlapping subjects, bad config) is the real error.
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                raise exc from None

    current = info.config
    if current.storage != StorageType.FILE:
        log.warning(
            "stream exists with another storage type; it cannot be changed in place",
            extra={"stream": stream, "storage": str(current.storage)},
        )
    if sorted(current.subjects or []) == subjects and current.duplicate_window == duplicate_window:
        return info
    # Keep every other setting the operator chose; change only what we own.
    updated = current.evolve(subjects=subjects, duplicate_window=duplicate_window)
    info = await js.update_stream(updated)
    log.info(
        "stream updated",
        extra={"stream": stream, "subjects": subjects, "duplicate_window": duplicate_window},
    )
    return info


class EventPublisher:
    """Publishes protobuf events to JetStream and awaits the ack.

    Built once at start-up and shared; ``publish_background`` keeps the hot path from
    waiting for the ack, and ``drain`` (on shutdown) awaits every publish still in flight.
    """

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        subject_prefix: str,
        *,
        max_attempts: int = 5,
        ack_timeout: float = 2.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self._nc = nc
        self._js = js
        self.stream = stream
        self.subject_prefix = subject_prefix
        self._max_attempts = max_attempts
        self._ack_timeout = ack_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        # Strong references: the event loop only keeps weak ones to tasks.
        self._pending: set[asyncio.Task[PubAck | None]] = set()

    @property
    def pending(self) -> int:
        """Number of background publishes not finished yet."""
        return len(self._pending)

    def subject(self, name: str) -> str:
        """The full subject for an event name, e.g. ``hoosh.inference.completed``."""
        return events.subject(self.subject_prefix, name)

    def _headers(self, event_id: str, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers: dict[str, str] = dict(extra) if extra else {}
        inject_headers(headers)
        headers[REQUEST_ID_HEADER] = request_id_var.get() or event_id
        headers[MSG_ID_HEADER] = event_id
        return headers

    async def publish(
        self,
        name: str,
        message: Message,
        event_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> PubAck:
        """Publish ``message`` on ``{prefix}.{name}`` and return JetStream's ack.

        Transient failures are retried with jittered exponential backoff, at most
        ``max_attempts`` tries in all; ``ack.duplicate`` is true when the stream already
        held this event id. Raises ``EventPublishError`` when the event was not stored.
        """
        if not event_id:
            raise ValueError("event_id is required (it is the deduplication key)")
        return await self._publish(self.subject(name), message.SerializeToString(), event_id, headers)

    def publish_background(
        self,
        name: str,
        message: Message,
        event_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> asyncio.Task[PubAck | None]:
        """Schedule ``publish`` without waiting for it; failures are logged, not raised.

        The message is serialized now, and the task inherits the caller's context (trace
        and request id), so the caller may reuse the message right away.
        """
        if not event_id:
            raise ValueError("event_id is required (it is the deduplication key)")
        subject = self.subject(name)
        task = asyncio.get_running_loop().create_task(
            self._publish_logged(subject, message.SerializeToString(), event_id, headers)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def drain(self, max_wait: float | None = None) -> None:
        """Wait for every background publish (including ones started while waiting).

        With ``max_wait``, gives up after that many seconds and logs how many were left.
        """
        loop = asyncio.get_running_loop()
        deadline = None if max_wait is None else loop.time() + max_wait
        while self._pending:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                log.error("events still unpublished at shutdown", extra={"pending": len(self._pending)})
                return
            await asyncio.wait(set(self._pending), timeout=remaining)

    async def _publish_logged(
        self, subject: str, data: bytes, event_id: str, headers: Mapping[str, str] | None
    ) -> PubAck | None:
        try:
            return await self._publish(subject, data, event_id, headers)
        except Exception:
            log.exception("event lost: publish failed", extra={"subject": subject, "event_id": event_id})
            return None

    async def _publish(self, subject: str, data: bytes, event_id: str, headers: Mapping[str, str] | None) -> PubAck:
        hdrs = self._headers(event_id, headers)
        # The first try goes straight out: building a retry controller for every event
        # cost ~5% of the router's CPU under load, and almost every publish succeeds.
        try:
            return await self._send(subject, data, event_id, hdrs)
        except TRANSIENT_ERRORS as exc:
            if self._max_attempts <= 1:
                raise EventPublishError(subject, event_id, 1, exc) from exc
        except Exception as exc:
            raise EventPublishError(subject, event_id, 1, exc) from exc
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts - 1),
            wait=wait_random_exponential(multiplier=self._backoff_initial, max=self._backoff_max),
            retry=retry_if_exception_type(TRANSIENT_ERRORS),
        )
        attempts = 1
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    return await self._send(subject, data, event_id, hdrs)
        except RetryError as exc:
            cause = exc.last_attempt.exception() or exc
            raise EventPublishError(subject, event_id, attempts, cause) from cause
        except Exception as exc:
            raise EventPublishError(subject, event_id, attempts, exc) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _send(self, subject: str, data: bytes, event_id: str, headers: dict[str, str]) -> PubAck:
        # stream= makes the server refuse a message that would land in another stream
        # (a misconfigured prefix) instead of losing it.
        ack = await self._js.publish(
            subject, data, timeout=self._ack_timeout, stream=self.stream, headers=dict(headers)
        )
        if ack.duplicate:
            log.debug("duplicate event ignored by JetStream", extra={"event_id": event_id})
        return ack
