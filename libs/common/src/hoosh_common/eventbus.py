"""Both sides of the JetStream event bus: stream declaration and a publisher that
awaits the ack, with a local outbox for what NATS cannot take.

The router, stt and budget publish with ``EventPublisher``; audit declares the same
stream with ``ensure_stream`` and consumes it. Every event carries ``Nats-Msg-Id``
(the event id, i.e. the request id), so a retried publish inside the stream's
duplicate window is stored once. Every service connects to NATS with the inbox
prefix of its own user (``nats_inbox_prefix``), the only one its user may subscribe to.

Outbox (``hoosh_common.outbox``), when the publisher is given one:

- The normal path never touches the disk: publish, await the ack in the background.
- An event JetStream did not ack (after the quick retries: ``max_attempts`` tries,
  ``ack_timeout`` each) is written to the outbox (temp file, fsync, rename, directory
  fsync; see ``hoosh_common.outbox``) instead of being dropped. From then on, and
  whenever the NATS connection is down, new events go straight to the outbox rather
  than waiting out retries in memory, until the drainer's next publish succeeds.
  So an event lives only in memory while its first publish is in flight: at most
  ``max_attempts`` x ``ack_timeout`` plus backoff when NATS starts failing (choose
  them short with an outbox, e.g. 3 x 1 s), a few ms (one group write) after that. A
  process killed inside that window loses those events; nothing else does.
- A drainer task publishes the entries oldest first, in batches, each with its
  original ``Nats-Msg-Id`` and headers, and removes an entry only after its ack.
  ``start()`` opens the outbox and drains what an earlier process left in it.
- Order: outbox entries reach the stream in the order they were kept (a batch whose
  middle fails leaves later, already acked entries ahead of the retried ones). Once
  NATS takes events again, new events go to it directly while the outbox drains, so
  they may land before older kept ones: stream order is not publish order across an
  outage (each event carries its own timestamp). Keeping new events behind the
  backlog would keep a busy service on the disk path for as long as traffic lasts.
- Exactly once: an outbox entry is never published twice by a live drainer; a copy
  can reach JetStream twice only when the first try's ack was lost (a timeout, the
  entry's ``maybe_stored``) or a crash came between an ack and the entry's deletion.
  JetStream drops such a copy when it arrives within the stream's duplicate window
  (``DUPLICATE_WINDOW_S``, 120 s by default, counted from the first copy). Past it
  JetStream stores the copy, and only a consumer that skips event ids it has already
  recorded keeps it single (audit recognises redeliveries by stream sequence only,
  which does not catch a second copy). Every event published from the outbox carries
  the ``hoosh-outbox`` header, so a consumer need check only those. The drainer
  counts entries published past the window after a lost ack in
  ``stats.possible_duplicates`` and logs each. A copy is possible only for an entry
  whose ack was lost, and most outages (the connection down) lose no acks.
- Full: an event that does not fit is never dropped to make room. ``publish`` (the
  awaited form) raises ``EventsUnavailableError``, so its caller can refuse the work
  (503). ``publish_background`` cannot refuse a request already served: it keeps
  such an event in memory (``overflow``, bounded by ``max_overflow``) and moves it
  to the outbox when there is room; ``healthy`` is false from the outbox's
  high-water mark on (90 % of a bound), which services wire into readiness and
  admission so that the overflow is never needed in practice. Past ``max_overflow``
  an event is lost with an error log and ``stats.lost`` counts it: the only loss,
  and only when a service keeps admitting work while reporting unhealthy.
- Signatures: a publisher given an ``EventSigner`` adds ``hoosh-signature:
  v1:<key id>:<hex HMAC-SHA256(key, subject "\n" Nats-Msg-Id "\n" hex SHA-256(data))>``
  to every event where its headers are made, so an outbox entry keeps it and a
  drained event verifies as the original. The audit checks it with
  ``EventVerifier`` and records anything else as a rejection (``hoosh_audit``). One
  SHA-256 of the payload and one HMAC over a short input per event (~3 µs).
- ``health()`` reports the outbox's depth (entries, bytes, oldest age), the overflow
  and counters. ``close(grace)`` on shutdown moves publishes still retrying to the
  outbox, lets the drainer empty it while NATS takes events, and releases it; what
  is left stays on disk for the next process with the same directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.client import JetStreamContext
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from hoosh_common import events
from hoosh_common.logs import request_id_var
from hoosh_common.outbox import Outbox, OutboxEntry, OutboxError
from hoosh_common.telemetry import inject_headers, producer_span

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
REQUEST_ID_HEADER = "hoosh-request-id"
# On every event the drainer publishes from the outbox: the few events a consumer may
# see twice past the duplicate window all carry it, so a consumer can check their
# event ids against what it recorded without paying for that on every event.
OUTBOX_HEADER = "hoosh-outbox"
DUPLICATE_WINDOW_S = 120.0
DEFAULT_STREAM_MAX_BYTES = 1024 * 1024 * 1024
# The publisher's signature over the event (see EventSigner / EventVerifier).
SIGNATURE_HEADER = "hoosh-signature"
SIGNATURE_VERSION = "v1"
MIN_SIGNING_KEY_BYTES = 32
SIGNING_KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{64}")

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

# Refusals that no later try changes: the request itself is wrong for the stream
# (another stream owns the subject, a payload over the server's limit).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    nats.js.errors.BadRequestError,
    nats.errors.MaxPayloadError,
)

Retention = Literal["workqueue", "limits"]

# NATS's own inbox prefix (nats-py's default): a connection whose URL names no user.
DEFAULT_INBOX_PREFIX = "_INBOX"
_NATS_USER = re.compile(r"[A-Za-z0-9_-]{1,64}")


def nats_inbox_prefix(nats_url: str) -> str:
    """The inbox prefix for a connection to ``nats_url`` (pass it to ``nats.connect(...,
    inbox_prefix=...)``): ``_INBOX_<user>`` for the NATS user the URL names
    (``nats://router:<pw>@nats:4222`` -> ``_INBOX_router``).

    Every answer a connection receives arrives on its inbox: publish acks, JetStream API
    replies, the messages the audit pulls (each with its ``$JS.ACK`` reply subject),
    reload answers. deploy/nats/nats.conf lets each user subscribe to its own prefix only
    (``_INBOX_<user>.>``), so no service reads another's answers, nor, through
    ``allow_responses``, acks or pulls the audit's messages; a connection with nats-py's
    default ``_INBOX`` would not receive any of its answers there.

    ``_INBOX`` when the URL names no user with a password (a development NATS without
    users; a lone ``nats://<token>@host`` is a token, which never goes into a subject).
    Several servers (``nats://a:4222,nats://b:4222``): the first that names a user.
    ``ValueError`` for a user name that cannot be a subject token.
    """
    for server in nats_url.split(","):
        server = server.strip()
        if not server:
            continue
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if parts.username and parts.password is not None:
            if not _NATS_USER.fullmatch(parts.username):
                raise ValueError(
                    f"NATS user {parts.username!r}: an inbox prefix takes 1-64 of A-Z a-z 0-9 _ - "
                    "(each service's inbox is _INBOX_<user>)"
                )
            return f"{DEFAULT_INBOX_PREFIX}_{parts.username}"
    return DEFAULT_INBOX_PREFIX


def signing_key(hex_key: str, what: str = "HOOSH_EVENTS_SIGNING_KEY") -> bytes:
    """A signing key from its hex form; ``ValueError`` unless it is hex of at least
    ``MIN_SIGNING_KEY_BYTES`` bytes (a random key: ``secrets.token_hex(32)``)."""
    try:
        key = bytes.fromhex(hex_key.strip())
    except ValueError:
        hint = "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        raise ValueError(f"{what} must be hex (generate one: {hint})") from None
    if len(key) < MIN_SIGNING_KEY_BYTES:
        raise ValueError(f"{what} must be at least {MIN_SIGNING_KEY_BYTES} bytes ({2 * MIN_SIGNING_KEY_BYTES} hex)")
    return key


def placeholder_key(key: bytes) -> bool:
    """A key no random generator makes: fewer than 16 distinct bytes (``"01" * 32``, the
    examples' placeholders). Refused outside development."""
    return len(set(key)) < 16


def check_key_id(key_id: str, what: str = "HOOSH_EVENTS_SIGNING_KEY_ID") -> str:
    if not SIGNING_KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError(f"{what} {key_id!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    return key_id


def signed_bytes(subject: str, msg_id: str, data: bytes) -> bytes:
    """What a signature covers: the subject and the event id as they travel (a copy
    moved to another subject or id does not verify) and a digest of the payload."""
    text = f"{subject}\n{msg_id}\n{hashlib.sha256(data).hexdigest()}"
    try:
        return text.encode()
    except UnicodeEncodeError:  # a forged header never raises here, it just does not verify
        return text.encode("utf-8", "surrogatepass")


class EventSigner:
    """Signs the events of one publisher with one key (its id travels in the header)."""

    __slots__ = ("_key", "_prefix", "key_id")

    def __init__(self, key: bytes, key_id: str) -> None:
        if len(key) < MIN_SIGNING_KEY_BYTES:
            raise ValueError(f"a signing key must be at least {MIN_SIGNING_KEY_BYTES} bytes")
        self.key_id = check_key_id(key_id)
        self._key = key
        self._prefix = f"{SIGNATURE_VERSION}:{key_id}:"

    def __repr__(self) -> str:  # never the key
        return f"EventSigner(key_id={self.key_id!r})"

    def sign(self, subject: str, msg_id: str, data: bytes) -> str:
        """The ``hoosh-signature`` header's value (one-shot OpenSSL HMAC: ~3 µs)."""
        return self._prefix + hmac.digest(self._key, signed_bytes(subject, msg_id, data), "sha256").hex()


# Why a message is not taken as the event it claims to be (the audit's metric label).
REJECT_MISSING = "missing"  # no hoosh-signature header
REJECT_MALFORMED = "malformed"  # not v1:<key id>:<64 hex>
REJECT_UNKNOWN_KEY = "unknown_key"  # a key id the verifier has no key for
REJECT_MISMATCH = "mismatch"  # the MAC is wrong: forged, or subject/id/payload changed
REJECT_REASONS = (REJECT_MISSING, REJECT_MALFORMED, REJECT_UNKNOWN_KEY, REJECT_MISMATCH)


@dataclass(frozen=True, slots=True)
class SignatureProblem:
    reason: str
    key_id: str  # the claimed key id ("" when none could be read), at most 64 characters


class EventVerifier:
    """Checks ``hoosh-signature`` against the publishers' keys (key id -> key). Several
    ids may belong to one publisher: a rotated key verifies while it stays configured."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise ValueError("an event verifier needs at least one key")
        for kid, key in keys.items():
            check_key_id(kid, "publisher key id")
            if len(key) < MIN_SIGNING_KEY_BYTES:
                raise ValueError(f"publisher key {kid!r} is shorter than {MIN_SIGNING_KEY_BYTES} bytes")
        self._keys = dict(keys)

    def __repr__(self) -> str:
        return f"EventVerifier(key_ids={sorted(self._keys)})"

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def check(self, subject: str, headers: Mapping[str, str] | None, data: bytes) -> SignatureProblem | None:
        """None when a configured key signed exactly this subject, id and payload."""
        value = (headers or {}).get(SIGNATURE_HEADER)
        if not value:
            return SignatureProblem(REJECT_MISSING, "")
        parts = value.split(":")
        claimed = parts[1][:64] if len(parts) > 1 else ""
        if (
            len(parts) != 3
            or parts[0] != SIGNATURE_VERSION
            or not SIGNING_KEY_ID_PATTERN.fullmatch(parts[1])
            or not _SIGNATURE_HEX.fullmatch(parts[2])
        ):
            return SignatureProblem(REJECT_MALFORMED, claimed)
        key = self._keys.get(claimed)
        if key is None:
            return SignatureProblem(REJECT_UNKNOWN_KEY, claimed)
        expected = hmac.digest(key, signed_bytes(subject, (headers or {}).get(MSG_ID_HEADER, ""), data), "sha256")
        if not hmac.compare_digest(expected.hex(), parts[2]):
            return SignatureProblem(REJECT_MISMATCH, claimed)
        return None


class EventPublishError(Exception):
    """An event could not be stored in JetStream (after retrying transient failures)."""

    def __init__(
        self,
        subject: str,
        event_id: str,
        attempts: int,
        cause: BaseException,
        *,
        maybe_stored: bool = False,
    ) -> None:
        super().__init__(f"publishing {subject} (event {event_id}) failed after {attempts} attempt(s): {cause!r}")
        self.subject = subject
        self.event_id = event_id
        self.attempts = attempts
        self.cause = cause
        # A try timed out waiting for its ack: JetStream may hold the event after all.
        self.maybe_stored = maybe_stored

    @property
    def permanent(self) -> bool:
        """JetStream refused the event itself; trying again later would not help."""
        return isinstance(self.cause, PERMANENT_ERRORS)


class EventsUnavailableError(EventPublishError):
    """Neither JetStream nor the outbox took the event (the outbox is full or its disk
    failed): the caller should refuse new work (503) until ``healthy`` again."""


class Publisher(Protocol):
    """What a service's request path needs of :class:`EventPublisher` (tests may wrap it)."""

    def publish_background(self, name: str, message: Message, event_id: str) -> object: ...

    @property
    def healthy(self) -> bool:
        """False while events could not be kept (the outbox past its high-water mark)."""
        ...

    @property
    def keeping(self) -> bool:
        """NATS is away: events go to the local outbox."""
        ...

    async def wait_kept(self) -> None:
        """The last event sent to the outbox is on disk."""
        ...


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """Bounds of the event stream, chosen so that no bound ever removes an event the
    audit has not written yet.

    - ``discard`` is always ``new``: a full stream refuses the next publish (a 503
      the publisher retries and then keeps in its outbox) rather than deleting the
      oldest events, which may not be audited yet.
    - ``retention="workqueue"`` (the default): an event leaves the stream when the
      audit consumer acks it (after its fsync), so ``max_bytes``/``max_msgs`` bound
      only the backlog audit has not recorded, and ``max_age`` stays 0: no unaudited
      event ever expires. The stream then admits one consumer per subject (audit's)
      and that consumer must deliver from the start (``DeliverPolicy.ALL``, which
      in a work queue means "everything not yet acked"); audit keeps skipping
      redeliveries by its stream-sequence watermark.
    - ``retention="limits"``: events stay after the audit acks them (other consumers
      can replay them) until ``max_age``, which must be set. Size ``max_bytes`` to at
      least the peak event bytes per second times ``max_age``: otherwise the stream
      fills with already-audited events and refuses new ones until they age out
      (events then wait in the outboxes, and services report unhealthy when those
      fill). An audit outage longer than ``max_age`` loses the oldest unaudited events.
    - ``interest`` retention is not offered: a stream with interest retention deletes
      what is published while no consumer exists (before audit first starts) and what
      a deleted consumer had not acked (audit re-creates its consumer at start).

    The retention of an existing stream cannot be changed in place: ``ensure_stream``
    then logs an error and leaves the stream's bounds alone (move to a new stream
    name, or let audit drain the old stream and delete it).
    """

    retention: Retention = "workqueue"
    max_bytes: int = DEFAULT_STREAM_MAX_BYTES
    max_msgs: int = -1
    max_age: float = 0.0
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError("max_bytes must be >= 1: the stream must be bounded")
        if self.max_msgs == 0 or self.max_msgs < -1:
            raise ValueError("max_msgs must be -1 (no count bound) or >= 1")
        if self.max_age < 0:
            raise ValueError("max_age must be >= 0")
        if self.retention == "limits" and self.max_age <= 0:
            raise ValueError("retention 'limits' needs max_age > 0, or a full stream never frees room")
        if self.retention == "workqueue" and self.max_age > 0:
            raise ValueError("retention 'workqueue' takes no max_age: it would expire events audit has not written")
        if not 1 <= self.replicas <= 5:
            raise ValueError("replicas must be between 1 and 5")

    @property
    def retention_policy(self) -> RetentionPolicy:
        return RetentionPolicy.WORK_QUEUE if self.retention == "workqueue" else RetentionPolicy.LIMITS


def _bound(current: float | None, wanted: float, unbounded: float, fits: Callable[[float], bool]) -> float:
    """The bound to declare: ``wanted``, unless that lowers the stream's bound below what
    it holds now. NATS applies a lowered bound at once by deleting the oldest events,
    which may not be audited yet, so a declaration never does that; once audit has
    caught up (or the stream is small enough) the lower bound applies."""
    have = unbounded if current is None or current <= 0 else current
    want = unbounded if wanted <= 0 else wanted
    raising = want == unbounded or (have != unbounded and want >= have)
    return want if raising or fits(want) else have


def _bounds(info: StreamInfo, policy: StreamPolicy) -> tuple[int, int, float]:
    """(max_bytes, max_msgs, max_age) to declare: the policy's where they delete nothing."""
    current, state = info.config, info.state
    max_bytes = int(_bound(current.max_bytes, policy.max_bytes, -1, lambda bound: state.bytes <= bound))
    max_msgs = int(_bound(current.max_msgs, policy.max_msgs, -1, lambda bound: state.messages <= bound))
    # The age of the oldest event is not in the stream info: a shorter age only on an empty stream.
    max_age = _bound(current.max_age, policy.max_age, 0.0, lambda bound: state.messages == 0)
    return max_bytes, max_msgs, max_age


def _bounds_differ(info: StreamInfo, policy: StreamPolicy) -> bool:
    current = info.config
    max_bytes, max_msgs, max_age = _bounds(info, policy)
    return (
        (current.max_bytes or -1) != max_bytes
        or (current.max_msgs or -1) != max_msgs
        or float(current.max_age or 0.0) != max_age
        or current.discard != DiscardPolicy.NEW
        or (current.num_replicas or 1) != policy.replicas
    )


async def ensure_stream(
    js: JetStreamContext,
    stream: str,
    subject_prefix: str,
    *,
    duplicate_window: float = DUPLICATE_WINDOW_S,
    policy: StreamPolicy | None = None,
    may_update: bool = True,
) -> StreamInfo:
    """Declare the event stream idempotently and return its info.

    The stream holds ``{subject_prefix}.>`` on file storage with the given duplicate
    window. An existing stream is updated when its subjects or duplicate window differ
    (storage cannot change after creation: a mismatch is logged, not fatal). Two
    replicas racing to create it both succeed.

    ``policy`` (see ``StreamPolicy``) sets the retention, ``discard=new``, the size and
    age bounds and the replica count, on creation and, when they differ, on an
    existing stream of the same retention. ``None`` leaves them as they are (a new
    stream is then unbounded: every process that declares the stream must pass the
    same policy, or none).

    ``may_update=False`` (the publishers: router, stt, budget) only reads the stream
    (``STREAM.INFO``) and creates it when it is missing (``STREAM.CREATE``): an existing
    stream whose settings differ from the declaration is left as it is, with a warning
    naming each difference, for the audit's declaration (``may_update=True``) or an
    operator to reconcile. Their NATS users are not granted ``STREAM.UPDATE``, with
    which any publisher could shrink the stream (deleting unaudited events) or seal it.
    """
    subjects = [f"{subject_prefix}.>"]
    wanted = StreamConfig(
        name=stream,
        subjects=subjects,
        storage=StorageType.FILE,
        duplicate_window=duplicate_window,
    )
    if policy is not None:
        wanted.retention = policy.retention_policy
        wanted.discard = DiscardPolicy.NEW
        wanted.max_bytes = policy.max_bytes
        wanted.max_msgs = policy.max_msgs
        wanted.max_age = policy.max_age
        wanted.num_replicas = policy.replicas
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        try:
            info = await js.add_stream(wanted)
            log.info("stream created", extra={"stream": stream, "subjects": subjects, "policy": _describe(policy)})
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
    if not may_update:
        differences = _differences(current, wanted, bounded=policy is not None)
        if differences:
            log.warning(
                "stream settings differ from this service's declaration (%s); left as they are: this service "
                "does not update the stream (the audit's declaration or an operator reconciles it)",
                ", ".join(f"{name}: stream {have!r}, declared {want!r}" for name, (have, want) in differences.items()),
                extra={
                    "stream": stream,
                    "differences": {
                        name: {"stream": have, "declared": want} for name, (have, want) in differences.items()
                    },
                },
            )
        return info
    apply_bounds = policy is not None
    if policy is not None and current.retention != policy.retention_policy:
        log.error(
            "stream exists with another retention; it cannot be changed in place, so its bounds are left alone",
            extra={"stream": stream, "retention": str(current.retention), "wanted": policy.retention},
        )
        apply_bounds = False
    same_basics = sorted(current.subjects or []) == subjects and current.duplicate_window == duplicate_window
    if same_basics and not (apply_bounds and policy is not None and _bounds_differ(info, policy)):
        return info
    # Keep every other setting the operator chose; change only what we own.
    updated = current.evolve(subjects=subjects, duplicate_window=duplicate_window)
    if apply_bounds and policy is not None:
        max_bytes, max_msgs, max_age = _bounds(info, policy)
        if (max_bytes, max_msgs, max_age) != (policy.max_bytes, policy.max_msgs, policy.max_age):
            log.warning(
                "stream bounds are not lowered by a declaration (events audit has not written could be lost); "
                "lower them with the nats CLI once audit has caught up",
                extra={"stream": stream, "kept": [max_bytes, max_msgs, max_age], "wanted": _describe(policy)},
            )
        updated = updated.evolve(
            discard=DiscardPolicy.NEW,
            max_bytes=max_bytes,
            max_msgs=max_msgs,
            max_age=max_age,
            num_replicas=policy.replicas,
        )
    info = await js.update_stream(updated)
    log.info(
        "stream updated",
        extra={
            "stream": stream,
            "subjects": subjects,
            "duplicate_window": duplicate_window,
            "policy": _describe(policy) if apply_bounds else None,
        },
    )
    return info


def _owned(config: StreamConfig, bounded: bool) -> dict[str, object]:
    """The settings a declaration owns, normalised (unset = the server's default), as
    plain values for a log line."""
    owned: dict[str, object] = {
        "subjects": sorted(config.subjects or []),
        "duplicate_window": float(config.duplicate_window or 0.0),
    }
    if bounded:
        owned |= {
            # (the server's answer carries plain strings here: RetentionPolicy("workqueue"))
            "retention": RetentionPolicy(config.retention or RetentionPolicy.LIMITS).value,
            "discard": DiscardPolicy(config.discard or DiscardPolicy.OLD).value,
            "max_bytes": config.max_bytes or -1,
            "max_msgs": config.max_msgs or -1,
            "max_age": float(config.max_age or 0.0),
            "num_replicas": config.num_replicas or 1,
        }
    return owned


def _differences(current: StreamConfig, wanted: StreamConfig, bounded: bool) -> dict[str, tuple[object, object]]:
    """{setting: (the stream's, the declaration's)} for each owned setting that differs."""
    have, want = _owned(current, bounded), _owned(wanted, bounded)
    return {name: (have[name], want[name]) for name in want if have[name] != want[name]}


def _describe(policy: StreamPolicy | None) -> dict[str, object] | None:
    return None if policy is None else asdict(policy)


@dataclass(slots=True)
class PublisherStats:
    """Counters since start, for health and tests."""

    published: int = 0  # events JetStream acked on the first path (not from the outbox)
    kept: int = 0  # events written to the outbox
    drained: int = 0  # outbox entries JetStream acked
    rejected: int = 0  # outbox entries refused for good (moved to rejected/)
    overflowed: int = 0  # events held in memory because the outbox had no room
    lost: int = 0  # events dropped past max_overflow (each logged as an error)
    possible_duplicates: int = 0  # maybe-stored entries drained past the duplicate window


class _Blocked(Exception):
    """The drainer could not publish: NATS or the stream is still unavailable."""


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("could not open the outbox; events wait in memory", extra={"error": repr(task.exception())})


class EventPublisher:
    """Publishes protobuf events to JetStream and awaits the ack.

    Built once at start-up and shared; ``publish_background`` keeps the hot path from
    waiting for the ack, and ``drain`` (on shutdown) awaits every publish still in
    flight. With an ``outbox`` (see the module docstring), call ``start()`` once
    before publishing and ``close()`` on shutdown; ``healthy`` and ``health()`` are
    for readiness and health endpoints.
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
        outbox: Outbox | None = None,
        duplicate_window: float = DUPLICATE_WINDOW_S,
        drain_batch: int = 512,
        drain_backoff_max: float = 2.0,
        max_overflow: int = 10_000,
        signer: EventSigner | None = None,
        batch_delay: float = 0.005,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if drain_batch < 1:
            raise ValueError("drain_batch must be >= 1")
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
        self._outbox = outbox
        self._last_kept: asyncio.Future[None] | None = None
        self._duplicate_window = duplicate_window
        self._drain_batch = drain_batch
        self._drain_backoff_max = drain_backoff_max
        self._max_overflow = max_overflow
        self._overflow: deque[OutboxEntry] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._starter: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._hurry = asyncio.Event()  # set on close: the drainer skips its backoff
        self._drain_failed_at = 0.0  # time.monotonic() of the last failed drain attempt
        self._blocked_since: float | None = None
        # Event ids whose drain publish timed out (JetStream may hold them): like maybe_stored.
        self._drain_unsure: set[str] = set()
        self.stats = PublisherStats()
        self._signer = signer
        # Background publishes wait for the next tick, ``batch_delay`` after the first
        # of them: the answer that made an event leaves before its publish costs the
        # event loop anything, and the events of one tick go out in one socket write.
        self._batch_delay = batch_delay
        self._tick: asyncio.Future[None] | None = None

    @property
    def signer(self) -> EventSigner | None:
        """Signs every event (None: events go unsigned, development only)."""
        return self._signer

    @property
    def pending(self) -> int:
        """Number of background publishes not finished yet."""
        return len(self._pending)

    @property
    def outbox(self) -> Outbox | None:
        return self._outbox

    @property
    def keeping(self) -> bool:
        """NATS is away and events go straight to the outbox (see ``wait_kept``)."""
        return self._outbox is not None and (self._blocked_since is not None or not self._nc.is_connected)

    async def wait_kept(self) -> None:
        """Wait until the event the last ``publish_background`` sent to the outbox is on
        disk (fsynced; or its write failed and it waits in memory). A caller that answers
        its client only after this loses no event it answered for if the process dies
        during an outage. Costs nothing while NATS takes events."""
        written = self._last_kept
        if written is not None and not written.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(written)

    @property
    def healthy(self) -> bool:
        """False when new work should be refused: the outbox is past its high-water
        mark, its last write failed, or events wait in memory for room. Always true
        without an outbox (nothing to protect)."""
        outbox = self._outbox
        return outbox is None or (outbox.healthy and not self._overflow)

    def health(self) -> dict[str, object]:
        """Depth and counters for a health endpoint (JSON-ready)."""
        outbox = self._outbox
        return {
            "healthy": self.healthy,
            "nats_connected": self._nc.is_connected,
            "in_flight": len(self._pending),
            "outbox": None if outbox is None else outbox.depth().as_dict(),
            "overflow": len(self._overflow),
            "stats": asdict(self.stats),
        }

    def subject(self, name: str) -> str:
        """The full subject for an event name, e.g. ``hoosh.inference.completed``."""
        return events.subject(self.subject_prefix, name)

    def _headers(self, subject: str, data: bytes, event_id: str, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers: dict[str, str] = dict(extra) if extra else {}
        inject_headers(headers)
        headers[REQUEST_ID_HEADER] = request_id_var.get() or event_id
        headers[MSG_ID_HEADER] = event_id
        if self._signer is not None:
            # Here, once: retries and the outbox reuse these headers, so a drained
            # event carries the signature of its first try.
            headers[SIGNATURE_HEADER] = self._signer.sign(subject, event_id, data)
        return headers

    def _nats_away(self) -> bool:
        """NATS is known not to take events now (the connection is down, or the last
        publish or drain failed and none succeeded since): a new event goes straight
        to the outbox instead of waiting out the retries in memory."""
        return self._outbox is not None and (self._blocked_since is not None or not self._nc.is_connected)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the outbox (taking its lock) and start the drainer, which first
        publishes what an earlier process left. A no-op without an outbox."""
        if self._outbox is None or self._drainer is not None:
            return
        await self._outbox.open()
        self._closing.clear()
        self._hurry.clear()
        self._drainer = asyncio.get_running_loop().create_task(self._drain_forever(), name="outbox-drainer")
        if self._outbox.count or self._overflow:
            self._wake.set()

    async def close(self, grace: float = 5.0) -> None:
        """Shut down within about ``grace`` seconds: let publishes in flight finish,
        move the ones still retrying to the outbox, give the drainer what is left of
        the grace to empty the outbox while NATS takes events (what it cannot empty
        stays on disk for the next process), then stop it and release the outbox.
        Without an outbox it is ``drain(grace)``."""
        if self._outbox is None:
            await self.drain(grace)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=grace)
        leftover = set(self._pending)
        for task in leftover:
            task.cancel()  # each keeps its event in the outbox as it unwinds
        if leftover:
            await asyncio.wait(leftover)
        if self._drainer is not None:
            self._spill_overflow()
            await self._outbox.flush()
            started = time.monotonic()
            self._hurry.set()  # no backoff sleeps now: one more try at once
            self._wake.set()
            for _ in range(max(0, int((deadline - loop.time()) / 0.05))):
                if not (self._outbox.count or self._overflow) or not self._nc.is_connected:
                    break
                if self._drain_failed_at >= started:  # NATS still does not take them: keep them on disk
                    break
                await asyncio.sleep(0.05)
        self._closing.set()
        self._wake.set()
        drainer, self._drainer = self._drainer, None
        if drainer is not None:
            try:
                await asyncio.wait_for(drainer, timeout=max(min(grace, 2.0), 0.1))
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception:
                log.exception("outbox drainer failed")
        if self._outbox.is_open:
            self._spill_overflow()
            if self._overflow:
                self.stats.lost += len(self._overflow)
                log.error(
                    "events lost at shutdown: the outbox had no room for them",
                    extra={"count": len(self._overflow), "event_ids": [e.event_id for e in self._overflow][:20]},
                )
                self._overflow.clear()
            await self._outbox.close()

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self,
        name: str,
        message: Message,
        event_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> PubAck | None:
        """Publish ``message`` on ``{prefix}.{name}`` and return JetStream's ack.

        Transient failures are retried with jittered exponential backoff, at most
        ``max_attempts`` tries in all; ``ack.duplicate`` is true when the stream already
        held this event id. Raises ``EventPublishError`` when the event was not stored.

        With an outbox, an event JetStream did not take (and any event while NATS is
        known to be away) is stored there and ``None`` is returned: it is durable and
        will be published by the drainer. ``EventsUnavailableError`` then means neither
        took it (refuse new work); a permanent refusal (``error.permanent``) is
        raised as before.
        """
        if not event_id:
            raise ValueError("event_id is required (it is the deduplication key)")
        subject = self.subject(name)
        data = message.SerializeToString()
        with producer_span(subject, event_id):
            hdrs = self._headers(subject, data, event_id, headers)
            if self._nats_away():
                await self._store(subject, data, event_id, hdrs, maybe_stored=False, attempts=0)
                return None
            try:
                return await self._publish(subject, data, event_id, hdrs)
            except EventPublishError as exc:
                if self._outbox is None or exc.permanent:
                    raise
                self._note_blocked(exc)
                await self._store(subject, data, event_id, hdrs, maybe_stored=exc.maybe_stored, attempts=exc.attempts)
                return None

    def publish_background(
        self,
        name: str,
        message: Message,
        event_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> asyncio.Task[PubAck | None]:
        """Schedule ``publish`` without waiting for it; failures are logged, not raised.

        The message is serialized now, and the task inherits the caller's context (trace
        and request id), so the caller may reuse the message right away. The publish
        itself waits for the next tick (``batch_delay``, 5 ms, after the first publish
        waiting for it): the answer that made the event leaves first, and the events of
        one tick go out together. With an outbox, an event JetStream does not take is
        kept there (the task's result is then ``None``), and so is one still waiting
        for its tick at shutdown; without one it is logged as lost.
        """
        if not event_id:
            raise ValueError("event_id is required (it is the deduplication key)")
        subject = self.subject(name)
        data = message.SerializeToString()
        if self._outbox is not None and (self._blocked_since is not None or not self._nc.is_connected):
            # NATS is away: queue the write now, so that even a task that never runs
            # (cancelled at shutdown) cannot lose the event.
            hdrs = self._headers(subject, data, event_id, headers)
            written = self._keep_nowait(self._entry(subject, data, event_id, hdrs, maybe_stored=False))
            self._last_kept = written
            coro = self._kept(written)
        else:
            coro = self._publish_logged(subject, data, event_id, headers)
        task = asyncio.get_running_loop().create_task(coro)
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
            await asyncio.shield(self._next_tick())  # shared: a waiter's cancellation must not end it
        except asyncio.CancelledError:
            if self._outbox is not None:  # shutdown before the tick: kept, as a publish cut short is
                hdrs = self._headers(subject, data, event_id, headers)
                self._keep_nowait(self._entry(subject, data, event_id, hdrs, maybe_stored=False))
            else:
                log.error("event lost: cancelled before its publish", extra={"subject": subject, "event_id": event_id})
            raise
        with producer_span(subject, event_id):
            return await self._publish_or_keep(subject, data, event_id, headers)

    def _next_tick(self) -> asyncio.Future[None]:
        tick, loop = self._tick, asyncio.get_running_loop()
        if tick is None or tick.done() or tick.get_loop() is not loop:
            tick = self._tick = loop.create_future()
            loop.call_later(self._batch_delay, _resolve, tick)
        return tick

    async def _publish_or_keep(
        self, subject: str, data: bytes, event_id: str, headers: Mapping[str, str] | None
    ) -> PubAck | None:
        hdrs = self._headers(subject, data, event_id, headers)
        try:
            return await self._publish(subject, data, event_id, hdrs)
        except asyncio.CancelledError:
            if self._outbox is not None:
                # Shutdown cut the retries short: the write goes on after this task ends.
                self._keep_nowait(self._entry(subject, data, event_id, hdrs, maybe_stored=True))
            raise
        except Exception as exc:
            if self._outbox is None:
                log.exception("event lost: publish failed", extra={"subject": subject, "event_id": event_id})
                return None
            maybe_stored = isinstance(exc, EventPublishError) and exc.maybe_stored
            if not (isinstance(exc, EventPublishError) and exc.permanent):
                self._note_blocked(exc)
            return await self._kept(
                self._keep_nowait(self._entry(subject, data, event_id, hdrs, maybe_stored=maybe_stored))
            )

    async def _publish(self, subject: str, data: bytes, event_id: str, hdrs: dict[str, str]) -> PubAck:
        # The first try goes straight out: building a retry controller for every event
        # cost ~5% of the router's CPU under load, and almost every publish succeeds.
        timed_out = False
        try:
            return await self._send(subject, data, event_id, hdrs)
        except TRANSIENT_ERRORS as exc:
            timed_out = isinstance(exc, nats.errors.TimeoutError)
            if self._max_attempts <= 1:
                raise EventPublishError(subject, event_id, 1, exc, maybe_stored=timed_out) from exc
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
                    try:
                        return await self._send(subject, data, event_id, hdrs)
                    except nats.errors.TimeoutError:
                        timed_out = True
                        raise
        except RetryError as exc:
            cause = exc.last_attempt.exception() or exc
            raise EventPublishError(subject, event_id, attempts, cause, maybe_stored=timed_out) from cause
        except Exception as exc:
            raise EventPublishError(subject, event_id, attempts, exc, maybe_stored=timed_out) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _send(self, subject: str, data: bytes, event_id: str, headers: dict[str, str]) -> PubAck:
        # stream= makes the server refuse a message that would land in another stream
        # (a misconfigured prefix) instead of losing it.
        ack = await self._js.publish(
            subject, data, timeout=self._ack_timeout, stream=self.stream, headers=dict(headers)
        )
        if ack.duplicate:
            log.debug("duplicate event ignored by JetStream", extra={"event_id": event_id})
        self.stats.published += 1
        return ack

    # -- keeping ---------------------------------------------------------------------

    @staticmethod
    def _entry(subject: str, data: bytes, event_id: str, hdrs: dict[str, str], *, maybe_stored: bool) -> OutboxEntry:
        return OutboxEntry(
            subject=subject,
            event_id=event_id,
            data=data,
            headers=hdrs,
            first_attempt_ms=int(time.time() * 1000),
            maybe_stored=maybe_stored,
        )

    async def _store(
        self, subject: str, data: bytes, event_id: str, hdrs: dict[str, str], *, maybe_stored: bool, attempts: int
    ) -> None:
        """The awaited form: into the outbox or ``EventsUnavailableError``."""
        outbox = self._outbox
        assert outbox is not None
        try:
            if not outbox.is_open:
                await self.start()
            if self._overflow:  # events wait in memory already: this one cannot pass them
                raise OutboxError("events are waiting in memory for room in the outbox")
            await outbox.put(self._entry(subject, data, event_id, hdrs, maybe_stored=maybe_stored))
        except OutboxError as exc:
            raise EventsUnavailableError(subject, event_id, attempts, exc, maybe_stored=maybe_stored) from exc
        self.stats.kept += 1
        self._wake.set()

    def _keep_nowait(self, entry: OutboxEntry) -> asyncio.Future[None] | None:
        """The background form: queue the entry's write now (it goes on whatever
        happens to the caller) and return its future; an entry the outbox cannot take
        (full, not open yet, a failed write) waits in the bounded overflow instead,
        behind any already waiting there, and None is returned."""
        outbox = self._outbox
        assert outbox is not None
        try:
            if not outbox.is_open:
                self._start_soon()
                raise OutboxError("the outbox is not open yet")
            if self._overflow:
                raise OutboxError("events are waiting in memory already")
            written = outbox.put_nowait(entry)
        except OutboxError as exc:
            self._overflow_append(entry, repr(exc))
            self._wake.set()
            return None
        self.stats.kept += 1
        written.add_done_callback(functools.partial(self._after_write, entry=entry))
        self._wake.set()
        return written

    def _after_write(self, written: asyncio.Future[None], entry: OutboxEntry) -> None:
        if not written.cancelled() and written.exception() is not None:
            self.stats.kept -= 1
            self._overflow_append(entry, repr(written.exception()))
            self._wake.set()

    @staticmethod
    async def _kept(written: asyncio.Future[None] | None) -> PubAck | None:
        """A background publish's result once its event is kept (on disk or, failing
        that, in the overflow): None."""
        if written is not None:
            with contextlib.suppress(OutboxError):
                await asyncio.shield(written)
        return None

    def _start_soon(self) -> None:
        """``start()`` was not called: open the outbox and start the drainer now."""
        if self._starter is None or self._starter.done():
            self._starter = asyncio.get_running_loop().create_task(self.start(), name="outbox-start")
            self._starter.add_done_callback(_log_start_failure)

    def _overflow_append(self, entry: OutboxEntry, reason: str) -> None:
        if len(self._overflow) >= self._max_overflow:
            self.stats.lost += 1
            log.error(
                "event lost: the outbox and the in-memory overflow are full",
                extra={"event_id": entry.event_id, "subject": entry.subject, "reason": reason},
            )
            return
        if not self._overflow:
            log.error(
                "outbox has no room: events wait in memory until it has (refuse new work now)",
                extra={"event_id": entry.event_id, "reason": reason},
            )
        self._overflow.append(entry)
        self.stats.overflowed += 1

    def _spill_overflow(self) -> None:
        """Move events waiting in memory into the outbox, oldest first, while they fit."""
        outbox = self._outbox
        assert outbox is not None
        while self._overflow and outbox.is_open and not outbox.write_failed:
            entry = self._overflow[0]
            try:
                written = outbox.put_nowait(entry)
            except OutboxError:
                return
            self._overflow.popleft()
            self.stats.kept += 1
            written.add_done_callback(functools.partial(self._after_write, entry=entry))

    def _note_blocked(self, exc: BaseException) -> None:
        if self._blocked_since is None and self._outbox is not None:
            self._blocked_since = time.monotonic()
            log.warning("NATS did not take an event; keeping new events in the outbox", extra={"error": repr(exc)})

    # -- draining --------------------------------------------------------------------

    async def _drain_forever(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        delay = 0.05
        while not self._closing.is_set():
            if outbox.count == 0 and not self._overflow:
                self._wake.clear()  # nothing awaits between the check and the clear
                await self._wake.wait()
                continue
            if not self._nc.is_connected:
                await self._pause(delay)
                delay = min(delay * 2, self._drain_backoff_max)
                continue
            try:
                await self._drain_step()
                delay = 0.05
            except _Blocked as exc:
                self._drain_failed_at = time.monotonic()
                log.debug("outbox drain blocked", extra={"error": repr(exc.__cause__)})
                await self._pause(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._drain_backoff_max)
            except Exception:
                log.exception("outbox drain failed")
                await self._pause(self._drain_backoff_max)

    async def _pause(self, seconds: float) -> None:
        if self._hurry.is_set():
            await asyncio.sleep(0.05)
            return
        try:
            await asyncio.wait_for(self._hurry.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _drain_step(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        self._spill_overflow()
        segments = outbox.head(self._drain_batch)
        if not segments:
            if outbox.count:
                await outbox.flush()  # entries still being written
                if outbox.head(1) or not self._overflow:
                    return
            if self._overflow:
                await self._drain_memory()
            return
        contents = await outbox.read(segments)
        # Every entry of the batch goes out at once, in order (one connection keeps
        # the order); each segment then keeps only what was not acked.
        loop = asyncio.get_running_loop()
        sends = [[loop.create_task(self._send_entry(entry)) for entry in content.entries] for content in contents]
        await asyncio.gather(*(task for tasks in sends for task in tasks), return_exceptions=True)
        blocked: BaseException | None = None
        for content, tasks in zip(contents, sends, strict=True):
            remaining: list[OutboxEntry] = []
            rejected: list[OutboxEntry] = []
            for entry, task in zip(content.entries, tasks, strict=True):
                error = task.exception()
                if error is None:
                    self.stats.drained += 1
                    self._check_window(entry, unsure=entry.event_id in self._drain_unsure)
                    self._drain_unsure.discard(entry.event_id)
                elif isinstance(error, PERMANENT_ERRORS):
                    rejected.append(entry)
                    self._drain_unsure.discard(entry.event_id)
                else:
                    if isinstance(error, nats.errors.TimeoutError):
                        self._drain_unsure.add(entry.event_id)
                    remaining.append(entry)
                    blocked = blocked or error
            self.stats.rejected += len(rejected) + (1 if content.damaged is not None else 0)
            await outbox.settle(content, remaining, rejected)
        if blocked is not None:
            self._note_blocked(blocked)
            raise _Blocked() from blocked
        if self._blocked_since is not None:
            log.info(
                "NATS takes events again: new events go to it directly while the outbox drains",
                extra={"blocked_s": round(time.monotonic() - self._blocked_since, 3), "outbox": outbox.count},
            )
            self._blocked_since = None

    async def _drain_memory(self) -> None:
        """The outbox cannot be written: publish what waits in memory directly."""
        while self._overflow:
            entry = self._overflow[0]
            try:
                await self._send_entry(entry)
            except PERMANENT_ERRORS as exc:
                log.error(
                    "event refused for good and the outbox cannot keep it",
                    extra={"event_id": entry.event_id, "error": repr(exc)},
                )
                self.stats.lost += 1
            except Exception as exc:
                raise _Blocked() from exc
            else:
                self.stats.drained += 1
                self._check_window(entry)
            self._overflow.popleft()

    async def _send_entry(self, entry: OutboxEntry) -> PubAck:
        headers = dict(entry.headers)
        headers[OUTBOX_HEADER] = "1"
        return await self._js.publish(
            entry.subject, entry.data, timeout=self._ack_timeout, stream=self.stream, headers=headers
        )

    def _check_window(self, entry: OutboxEntry, *, unsure: bool = False) -> None:
        late = time.time() * 1000 - entry.first_attempt_ms > self._duplicate_window * 1000
        if (entry.maybe_stored or unsure) and late:
            self.stats.possible_duplicates += 1
            log.warning(
                "an event whose first ack was lost was published past the duplicate window; "
                "only a consumer that skips recorded event ids keeps it single",
                extra={"event_id": entry.event_id},
            )
