"""Live reload of hoosh.yaml (``HOOSH_CONFIG``) in every replica of every service that
reads it: the router (providers, routes, routing, health, cache, prices) and the budget
(pools). The edge, stt, audit and local-inference do not read the file.

One code path per replica, ``ConfigReloader``: read the file, parse and validate all of
it (``ConfigTarget.parse``, in a worker thread, off the event loop, once per file: the
result is kept by the file's SHA-256, so the apply round reuses the check round's), check
it against what only the running service knows (``ConfigTarget.check``: the budget's
store), and only then swap (``ConfigTarget.apply``); a file that is refused leaves the
running configuration untouched. Applies of one replica are serialised (checks are not:
a replica busy applying still answers another reload's check). SIGHUP (``install_sighup``)
and the edge's broadcast both call it, and every outcome — reloaded, partial, refused or
unchanged — is logged and published as a ``ConfigReload`` event
(``<prefix>.config.reload``, signed like the service's other events) that the audit
records. ``partial``: the target applied part of the file and then failed (the budget's
store went away after some pools were written); the reason says what was and was not
applied, and running the reload again completes it.

The broadcast (core NATS, not JetStream). ``POST /v1/admin/reload`` reaches one edge;
that edge asks every replica over NATS on ``reload_subject(prefix)``, a subject outside
the event stream's ``<prefix>.>`` (JetStream must not store it). Each replica of a
service that reads the file subscribes without a queue group, so every one receives
each request, and answers on the request's reply inbox; each request is handled in a
task of its own (nats-py runs a subscription's callbacks one at a time). ``coordinate_reload``
runs three rounds:

1. ``check``: every replica reads and validates the file and answers whether it is
   valid, changed, and its SHA-256. The edge cannot know how many replicas exist, so
   it gathers answers for a fixed window (``gather_seconds``, 1 s by default; replicas
   answer in milliseconds). The replicas that answered are the ones it expects below;
   an answer already on the edge's connection when the window closes counts even when
   the edge's event loop was too busy to read it in time.
2. If any replica refused the file, a replica answered without the file's SHA-256, or
   replicas read different files (a ConfigMap not yet propagated to every pod), nothing
   is applied anywhere: ``abort`` tells every replica why, each records the refused
   reload, and the edge answers ``refused``.
3. Else ``apply`` with the SHA-256 checked and the replicas that answered the check:
   a replica not named (its check answer missed the window) ignores it, and one that did
   not itself check this reload with that SHA-256 refuses it; each named replica reads the
   file again, refuses it if it is no longer that file, else swaps. The edge waits until
   every named replica has answered, at most ``timeout_seconds``. ``ok`` when every
   replica reloaded (or was already on this file), else ``partial``, with the reason;
   ``refused`` only when nothing changed anywhere.

A reload is idempotent: run it again after a partial one and the replicas already on the
file answer ``unchanged``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import nats.errors
import orjson
from google.protobuf.message import Message
from hoosh.events.v1 import events_pb2
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from pydantic import ValidationError

from hoosh_common.events import SUBJECT_CONFIG_RELOAD
from hoosh_common.logs import request_id_var
from hoosh_common.telemetry import context_from_headers, current_trace_id, inject_headers

log = logging.getLogger(__name__)

ReloadStatus = Literal["reloaded", "partial", "refused", "unchanged"]
RELOAD_STATUSES: tuple[ReloadStatus, ...] = ("reloaded", "partial", "refused", "unchanged")
Trigger = Literal["api", "signal"]
ReportStatus = Literal["ok", "partial", "refused"]

# The server's answer to a request nobody subscribes to (NATS 2.2+, headers on).
STATUS_HEADER = "Status"
NO_RESPONDERS = "503"
MAX_ID_CHARS = 128
MAX_REASON_CHARS = 2000
GATHER_SECONDS = 1.0
TIMEOUT_SECONDS = 15.0
PARSED_KEPT = 4  # parsed files kept by SHA-256 (a check and its apply; a few reloads at once)
CHECKS_KEPT = 64  # reload ids whose check this replica answered, for their apply
STOP_GRACE_SECONDS = 10.0
# How long a replica's start waits for the server to have its subscription.
START_FLUSH_SECONDS = 10.0
_HEX = frozenset("0123456789abcdef")


def reload_subject(subject_prefix: str) -> str:
    """The core NATS subject of reload requests for the services of ``subject_prefix``:
    ``hoosh-control.<prefix>.reload``. Outside ``<prefix>.>``, the event stream's subjects
    (a request there would be stored as an event and acked by JetStream instead of the
    replicas), and per prefix, so stacks sharing one NATS do not reload each other."""
    return f"hoosh-control.{subject_prefix}.reload"


def instance_id() -> str:
    """This replica: ``<host>:<pid>`` (in Kubernetes the host name is the pod's)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_sha256(value: Any) -> str | None:
    """``value`` if it is a SHA-256 as ``file_sha256`` writes it (64 lowercase hex), else None."""
    if isinstance(value, str) and len(value) == 64 and _HEX.issuperset(value):
        return value
    return None


def _clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ConfigRefused(Exception):
    """The file cannot become the running configuration; ``reason`` says why (one line,
    meant for the operator)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = _clip(" ".join(reason.split()))


class ConfigPartlyApplied(Exception):
    """``ConfigTarget.apply`` changed part of what it had to and then failed: ``reason``
    says what was applied and what was not, ``changes`` what was (for the audit)."""

    def __init__(self, reason: str, changes: Mapping[str, Any]) -> None:
        super().__init__(reason)
        self.reason = _clip(" ".join(reason.split()))
        self.changes = dict(changes)


def describe_validation_error(error: ValidationError, limit: int = 5) -> str:
    """pydantic's errors as one line: ``providers[1].type: Input should be ...; ...``."""
    parts = []
    for item in error.errors(include_url=False)[:limit]:
        where = ""
        for part in item.get("loc", ()):
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def describe_yaml_error(error: Exception) -> str:
    """A YAML parser error as one line with its place (PyYAML's ``problem_mark``)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    text = f"{context}, {problem}" if context else str(problem)
    if mark is not None:
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {text}"
    return f"YAML syntax error: {text}"


# -- one replica ---------------------------------------------------------------------------


T = TypeVar("T")


class ConfigTarget(Protocol[T]):
    """What a service reloads: its part of the file, validated whole, then swapped in."""

    service: str

    def parse(self, data: bytes) -> T:
        """The file's bytes parsed and validated as the service would at start;
        ``ConfigRefused`` with the reason otherwise. Pure work on ``data`` (no I/O, nothing
        of the running service read): it runs in a worker thread, and its result (or
        refusal) is reused for every round of the same file (same SHA-256)."""
        ...

    async def check(self, config: T) -> bool:
        """Whether applying ``config`` would change anything, after the checks that need
        the running service or its store (the budget: every parent exists); changes
        nothing. ``ConfigRefused`` with the reason when it could not be applied."""
        ...

    async def apply(self, config: T) -> dict[str, Any]:
        """Make ``config`` the running configuration for new work (in-flight work keeps
        what it started with); what changed, for the audit (names, never secrets).
        ``ConfigRefused`` if it cannot, having changed nothing; ``ConfigPartlyApplied``
        if it changed part of it."""
        ...


class EventSink(Protocol):
    """The awaited publish of ``hoosh_common.eventbus.EventPublisher``."""

    async def publish(self, name: str, message: Message, event_id: str) -> object: ...


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """One replica's answer to a reload (the response contract's ``services[]`` item)."""

    service: str
    instance: str
    status: ReloadStatus
    reason: str | None = None
    config_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "instance": self.instance,
            "status": self.status,
            "reason": self.reason,
            "config_sha256": self.config_sha256,
        }

    @classmethod
    def from_json(cls, value: Any) -> ReloadOutcome | None:
        """Parsed from a replica's reply; None for anything else."""
        if not isinstance(value, dict):
            return None
        service, instance, status = value.get("service"), value.get("instance"), value.get("status")
        reason, sha = value.get("reason"), value.get("config_sha256")
        if not (isinstance(service, str) and isinstance(instance, str) and service and instance):
            return None
        if status not in RELOAD_STATUSES:
            return None
        return cls(
            service[:MAX_ID_CHARS],
            instance[:MAX_ID_CHARS],
            status,
            _clip(reason) if isinstance(reason, str) else None,
            as_sha256(sha),
        )


@dataclass(frozen=True, slots=True)
class Checked:
    """One replica's answer to ``check``: would it take the file?"""

    service: str
    instance: str
    valid: bool
    changed: bool = False
    reason: str | None = None
    config_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "instance": self.instance,
            "valid": self.valid,
            "changed": self.changed,
            "reason": self.reason,
            "config_sha256": self.config_sha256,
        }

    @classmethod
    def from_json(cls, value: Any) -> Checked | None:
        if not isinstance(value, dict):
            return None
        service, instance, valid = value.get("service"), value.get("instance"), value.get("valid")
        reason, sha = value.get("reason"), value.get("config_sha256")
        if not (isinstance(service, str) and isinstance(instance, str) and service and instance):
            return None
        if not isinstance(valid, bool):
            return None
        return cls(
            service[:MAX_ID_CHARS],
            instance[:MAX_ID_CHARS],
            valid,
            bool(value.get("changed")),
            _clip(reason) if isinstance(reason, str) else None,
            as_sha256(sha),
        )


class ConfigReloader(Generic[T]):
    """Reloads one replica's configuration from ``path``: the one code path of SIGHUP and
    of the edge's broadcast. Applies are serialised; every outcome is logged and published."""

    def __init__(
        self,
        target: ConfigTarget[T],
        path: Path | None,
        *,
        running_sha256: str | None,
        events: EventSink | None = None,
        instance: str | None = None,
    ) -> None:
        self.target = target
        self.path = path
        self.running_sha256 = running_sha256
        self.instance = instance or instance_id()
        self._events = events
        self._lock = asyncio.Lock()
        # The file parsed, by SHA-256 (the task's result, or its ConfigRefused).
        self._parsed: dict[str, asyncio.Task[T]] = {}
        # Reload id -> the SHA-256 this replica's check of it found valid.
        self._checked: dict[str, str] = {}

    @property
    def service(self) -> str:
        return self.target.service

    async def _read(self) -> tuple[bytes, str]:
        if self.path is None:
            raise ConfigRefused("HOOSH_CONFIG is not set: this service has no configuration file to reload")
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except OSError as error:
            raise ConfigRefused(f"cannot read HOOSH_CONFIG {self.path}: {error.strerror or error}") from error
        return data, file_sha256(data)

    async def _parse(self, data: bytes, sha: str) -> T:
        """``target.parse(data)`` in a worker thread, once per SHA-256 (a check's parse
        serves the apply, and two reloads of one file share it)."""
        task = self._parsed.get(sha)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.target.parse, data), name="config-parse"
            )
            task.add_done_callback(_retrieve)
            self._parsed[sha] = task
            while len(self._parsed) > PARSED_KEPT:
                del self._parsed[next(iter(self._parsed))]
        return await asyncio.shield(task)

    def _remember(self, reload_id: str, sha: str) -> None:
        self._checked.pop(reload_id, None)
        self._checked[reload_id] = sha
        while len(self._checked) > CHECKS_KEPT:
            del self._checked[next(iter(self._checked))]

    async def check(self, reload_id: str | None = None) -> Checked:
        """Read and validate the file; change nothing. A valid file's SHA-256 is
        remembered for ``reload_id`` (its apply must name that file)."""
        try:
            data, sha = await self._read()
        except ConfigRefused as refused:
            return Checked(self.service, self.instance, False, reason=refused.reason)
        try:
            config = await self._parse(data, sha)
            changed = await self.target.check(config)
        except ConfigRefused as refused:
            return Checked(self.service, self.instance, False, reason=refused.reason, config_sha256=sha)
        except Exception as error:  # a check must answer, whatever went wrong
            log.exception("config check failed unexpectedly", extra={"service": self.service})
            reason = f"{type(error).__name__}: {error}"
            return Checked(self.service, self.instance, False, reason=_clip(reason), config_sha256=sha)
        if reload_id:
            self._remember(reload_id, sha)
        return Checked(self.service, self.instance, True, changed, None, sha)

    async def reload(
        self,
        *,
        trigger: Trigger,
        reload_id: str | None = None,
        key_id: str = "",
        expected_sha256: str | None = None,
        require_check: bool = False,
    ) -> ReloadOutcome:
        """Read, validate and (when it differs) apply the file. ``expected_sha256``: refuse
        unless the file is still the one checked. ``require_check`` (the edge's apply):
        refuse unless this replica's check of ``reload_id`` found that very file valid."""
        reload_id = reload_id or uuid.uuid4().hex
        changes: Mapping[str, Any] = {}
        async with self._lock:
            previous = self.running_sha256
            sha: str | None = None
            try:
                if require_check:
                    self._require_check(reload_id, expected_sha256)
                data, sha = await self._read()
                if expected_sha256 is not None and sha != expected_sha256:
                    raise ConfigRefused(
                        f"the file changed after it was checked (checked sha256 {expected_sha256[:12]}, "
                        f"now {sha[:12]}): run the reload again"
                    )
                config = await self._parse(data, sha)
                if not await self.target.check(config):
                    self.running_sha256 = sha
                    outcome = self._outcome("unchanged", None, sha)
                else:
                    changes = await self.target.apply(config)
                    self.running_sha256 = sha
                    outcome = self._outcome("reloaded", None, sha)
            except ConfigPartlyApplied as partial:  # the file is not the running one: the sha stays
                changes = partial.changes
                outcome = self._outcome("partial", partial.reason, sha)
            except ConfigRefused as refused:
                outcome = self._outcome("refused", refused.reason, sha)
            except Exception as error:  # the running configuration stays: apply swaps last
                log.exception("config reload failed unexpectedly", extra={"service": self.service})
                outcome = self._outcome("refused", _clip(f"{type(error).__name__}: {error}"), sha)
            await self._finish(outcome, trigger, reload_id, key_id, previous, changes)
        return outcome

    def _require_check(self, reload_id: str, expected_sha256: str | None) -> None:
        if as_sha256(expected_sha256) is None:
            raise ConfigRefused(
                "the apply request carries no checked SHA-256 (an edge of another version?): nothing was applied"
            )
        checked = self._checked.get(reload_id)
        if checked is None:
            raise ConfigRefused(
                "this replica did not take part in this reload's check: nothing was applied; run the reload again"
            )
        if checked != expected_sha256:
            raise ConfigRefused(
                f"this replica checked another file (sha256 {checked[:12]}, the apply names "
                f"{(expected_sha256 or '')[:12]}): nothing was applied; run the reload again"
            )

    async def refuse(self, *, reload_id: str, key_id: str = "", reason: str) -> ReloadOutcome:
        """The reload ``reload_id`` is refused (another replica refused the file, or the
        replicas read different files): record it here too. Keeps the running
        configuration; the reason is this replica's own when the file is bad here."""
        self._checked.pop(reload_id, None)
        checked = await self.check()
        own = None if checked.valid else checked.reason
        async with self._lock:
            outcome = self._outcome("refused", own or _clip(f"not applied: {reason}"), checked.config_sha256)
            await self._finish(outcome, "api", reload_id, key_id, self.running_sha256, {})
        return outcome

    def _outcome(self, status: ReloadStatus, reason: str | None, sha: str | None) -> ReloadOutcome:
        return ReloadOutcome(self.service, self.instance, status, reason, sha)

    async def _finish(
        self,
        outcome: ReloadOutcome,
        trigger: Trigger,
        reload_id: str,
        key_id: str,
        previous: str | None,
        changes: Mapping[str, Any],
    ) -> None:
        extra = {
            "service": outcome.service,
            "instance": outcome.instance,
            "outcome": outcome.status,
            "trigger": trigger,
            "reload_id": reload_id,
            "config_sha256": outcome.config_sha256,
            "previous_sha256": previous,
        }
        if outcome.status == "refused":
            log.warning("config reload refused", extra={**extra, "reason": outcome.reason})
        elif outcome.status == "partial":
            log.error(
                "config reload partly applied", extra={**extra, "reason": outcome.reason, "changes": dict(changes)}
            )
        else:
            log.info(f"config {outcome.status}", extra={**extra, "changes": dict(changes)})
        if self._events is None:
            return
        event_id = f"{reload_id}:{outcome.service}:{outcome.instance}"[:256]
        event = events_pb2.ConfigReload(
            event_id=event_id,
            timestamp_ms=int(time.time() * 1000),
            reload_id=reload_id,
            service=outcome.service,
            instance=outcome.instance,
            outcome=outcome.status,
            reason=outcome.reason or "",
            config_sha256=outcome.config_sha256 or "",
            previous_sha256=previous or "",
            trigger=trigger,
            key_id=key_id,
            changes_json=orjson.dumps(dict(changes)).decode(),
            trace_id=current_trace_id(),
        )
        try:
            # Awaited: NATS acked it, or the outbox holds it.
            await self._events.publish(SUBJECT_CONFIG_RELOAD, event, event_id)
        except Exception as error:  # the reload happened either way; say so loudly
            log.error(
                "config reload not recorded in the audit log",
                extra={**extra, "event_id": event_id, "error": repr(error)},
            )


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a parse's exception retrieved (its waiter may have gone: shield)."""
    if not task.cancelled():
        task.exception()


def install_sighup(reloader: ConfigReloader[Any]) -> Callable[[], None]:
    """SIGHUP reloads this process's configuration (``reload(trigger="signal")``, the
    outcome logged and recorded); returns the function that removes the handler."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[ReloadOutcome]] = set()

    def on_signal() -> None:
        task = loop.create_task(reloader.reload(trigger="signal"), name="config-reload")
        running.add(task)
        task.add_done_callback(running.discard)

    loop.add_signal_handler(signal.SIGHUP, on_signal)

    def remove() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return remove


class ReloadResponder:
    """Answers the edge's reload requests on NATS for one replica (see the module)."""

    def __init__(self, nc: NATS, subject_prefix: str, reloader: ConfigReloader[Any]) -> None:
        self._nc = nc
        self.subject = reload_subject(subject_prefix)
        self._reloader = reloader
        self._subscription: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._subscription = await self._nc.subscribe(self.subject, cb=self._on_request)
        # Registered at the server: a reload from now on reaches this replica. (Not
        # nats-py's flush timeout, which can leave the service's connection deaf.)
        if not await _round_trip(self._nc, START_FLUSH_SECONDS):
            raise nats.errors.FlushTimeoutError

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Unsubscribe, then let the requests in hand finish (an apply half done is worse
        than a slower stop) for at most ``grace`` seconds."""
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            try:
                await subscription.unsubscribe()
            except nats.errors.Error as error:
                log.warning("reload subscription not removed", extra={"error": repr(error)})
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        # nats-py awaits a subscription's callbacks one at a time: a replica busy applying
        # one reload would miss another edge's check window. Each request gets a task; the
        # reloader serialises the applies themselves.
        task = asyncio.get_running_loop().create_task(self._handle(msg), name="config-reload-request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            request = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            log.warning("undecodable reload request ignored", extra={"subject": msg.subject})
            return
        if not isinstance(request, dict):
            return
        # The edge's trace and request id: in this replica's log lines and audit event
        # (this task's own context).
        token = otel_context.attach(context_from_headers(msg.headers))
        request_id_var.set(_text(request.get("reload_id"), MAX_ID_CHARS))
        try:
            reply = await self.answer(request)
        finally:
            otel_context.detach(token)
        if reply is None:
            return
        try:
            await msg.respond(orjson.dumps(reply))
        except nats.errors.Error as error:
            log.warning("reload reply not sent", extra={"error": repr(error)})

    async def answer(self, request: Mapping[str, Any]) -> dict[str, Any] | None:
        """The reply to one request (None: not a request this replica answers)."""
        reloader = self._reloader
        op = request.get("op")
        reload_id = _text(request.get("reload_id"), MAX_ID_CHARS) or uuid.uuid4().hex
        key_id = _text(request.get("key_id"), MAX_ID_CHARS)
        try:
            if op == "check":
                return (await reloader.check(reload_id)).to_json()
            if op == "apply":
                named = _named(request.get("replicas"))
                me = _key(reloader.service[:MAX_ID_CHARS], reloader.instance[:MAX_ID_CHARS])  # as the edge read it
                if named is not None and me not in named:
                    # Its check answer missed the edge's window: the edge does not count on
                    # it, so it takes no part (the next reload brings it along).
                    log.warning(
                        "reload not applied here: this replica's check answer came too late",
                        extra={"reload_id": reload_id},
                    )
                    return None
                outcome = await reloader.reload(
                    trigger="api",
                    reload_id=reload_id,
                    key_id=key_id,
                    expected_sha256=as_sha256(request.get("expected_sha256")),
                    require_check=True,
                )
                return outcome.to_json()
            if op == "abort":
                reason = _text(request.get("reason"), MAX_REASON_CHARS) or "refused"
                return (await reloader.refuse(reload_id=reload_id, key_id=key_id, reason=reason)).to_json()
        except Exception as error:  # always answer: the edge is waiting for this replica
            log.exception("reload request failed", extra={"op": op})
            return ReloadOutcome(
                reloader.service, reloader.instance, "refused", _clip(f"{type(error).__name__}: {error}")
            ).to_json()
        return None


def _named(value: Any) -> set[tuple[str, str]] | None:
    """The replicas an apply names (None: it names none, as an edge of an earlier version)."""
    if value is None:
        return None
    named: set[tuple[str, str]] = set()
    if isinstance(value, list):
        for item in value:
            if (
                isinstance(item, dict)
                and isinstance(item.get("service"), str)
                and isinstance(item.get("instance"), str)
            ):
                named.add(_key(item["service"][:MAX_ID_CHARS], item["instance"][:MAX_ID_CHARS]))
    return named


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


# -- the edge ------------------------------------------------------------------------------


@dataclass(slots=True)
class ReloadReport:
    """What the edge answers (``POST /v1/admin/reload``)."""

    reload_id: str
    status: ReportStatus
    reason: str | None
    services: list[ReloadOutcome] = field(default_factory=list)
    # Refused for a reason that is not the file's: the replicas read different files,
    # or the file changed between the check and the apply (HTTP 409 rather than 400).
    conflict: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "services": [outcome.to_json() for outcome in self.services],
            "reload_id": self.reload_id,
        }


class NoReplicas(Exception):
    """No replica answered the check within the gather window."""


async def _gather(
    nc: NATS,
    subject: str,
    request: Mapping[str, Any],
    *,
    seconds: float,
    done: Callable[[list[Any]], bool] | None = None,
) -> list[Any]:
    """Publish ``request`` with a fresh reply inbox and collect the JSON replies for
    ``seconds``, or until ``done(replies)``."""
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    replies: list[Any] = []

    def take(msg: Msg) -> bool:
        """Keep one reply; False: the server says no replica will answer."""
        if msg.headers and msg.headers.get(STATUS_HEADER) == NO_RESPONDERS:
            return False  # nobody subscribes to the subject
        try:
            replies.append(orjson.loads(msg.data))
        except orjson.JSONDecodeError:
            log.warning("undecodable reload reply ignored")
        return True

    def finished() -> bool:
        return done is not None and done(replies)

    try:
        await nc.publish(subject, orjson.dumps(dict(request)), reply=inbox, headers=inject_headers({}))
        if not await _round_trip(nc, max(1.0, seconds)):
            raise nats.errors.FlushTimeoutError
        deadline = time.monotonic() + seconds
        while not finished():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msg = await subscription.next_msg(timeout=remaining)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            if not take(msg):
                return replies
        if not finished() and await _round_trip(nc, 1.0):
            # The window is over, but a reply may be on this connection unread: the event
            # loop can have been busy past the whole window (the process starved of CPU, a
            # long collection) while replies came. The server's PONG follows everything it
            # sent before it: what is queued by then reached this edge in time, or within a
            # round trip of the window's end, and counts.
            while subscription.pending_msgs > 0 and not finished():
                try:
                    msg = await subscription.next_msg(timeout=1)
                except (nats.errors.TimeoutError, TimeoutError):
                    break
                if not take(msg):
                    break
    finally:
        try:
            await subscription.unsubscribe()
        except nats.errors.Error:
            pass
    return replies


# Flushes in flight, kept until they end (see _round_trip).
_flushes: set[asyncio.Future[None]] = set()
# How long a flush left running may wait for its PONG (a connection that silent is dead:
# nats-py's pings close it).
FLUSH_GIVE_UP_SECONDS = 300


async def _round_trip(nc: NATS, seconds: float) -> bool:
    """True when the server has answered a PING within ``seconds``: everything it sent
    before is read by then. nats-py's own ``flush(timeout)`` must not time out: it cancels
    its PONG future, and the PONG still to come then ends the connection's read loop for
    good (nats-py 2.16, the connection left open and deaf). So the flush runs with a long
    bound in a task of its own, and only this wait for it is bounded."""
    flush = asyncio.ensure_future(nc.flush(timeout=FLUSH_GIVE_UP_SECONDS))
    _flushes.add(flush)
    flush.add_done_callback(_flush_done)
    done, _ = await asyncio.wait({flush}, timeout=seconds)
    return bool(done) and not flush.cancelled() and flush.exception() is None


def _flush_done(flush: asyncio.Future[None]) -> None:
    _flushes.discard(flush)
    if not flush.cancelled() and flush.exception() is not None:
        log.warning("reload connection's flush failed", extra={"error": repr(flush.exception())})


def _key(service: str, instance: str) -> tuple[str, str]:
    return service, instance


def _one_reason(items: Iterable[tuple[str, str | None]]) -> str:
    """Distinct reasons, each once, with the services that gave it."""
    by_reason: dict[str, list[str]] = {}
    for service, reason in items:
        names = by_reason.setdefault(reason or "refused", [])
        if service not in names:
            names.append(service)
    if len(by_reason) == 1:
        return next(iter(by_reason))
    return "; ".join(f"{', '.join(services)}: {reason}" for reason, services in by_reason.items())


async def coordinate_reload(
    nc: NATS,
    subject_prefix: str,
    *,
    reload_id: str,
    key_id: str = "",
    gather_seconds: float = GATHER_SECONDS,
    timeout_seconds: float = TIMEOUT_SECONDS,
) -> ReloadReport:
    """Reload every replica (check, then apply or abort; see the module). ``NoReplicas``
    when none answered the check."""
    subject = reload_subject(subject_prefix)
    base = {"reload_id": reload_id, "key_id": key_id}
    replies = await _gather(nc, subject, {**base, "op": "check"}, seconds=gather_seconds)
    checks = [checked for checked in map(Checked.from_json, replies) if checked is not None]
    if not checks:
        raise NoReplicas(
            f"no service replica answered the reload request within {gather_seconds:g} s "
            "(are the router and budget running and connected to NATS?)"
        )
    known = {_key(c.service, c.instance): c for c in checks}

    def answered_all(replies: list[Any]) -> bool:
        seen = {_key(str(r.get("service")), str(r.get("instance"))) for r in replies if isinstance(r, dict)}
        return set(known) <= seen

    refusals = [(c.service, c.reason) for c in checks if not c.valid]
    hashes = {c.config_sha256 for c in checks if c.valid}
    unhashed = [c for c in checks if c.valid and c.config_sha256 is None]
    if refusals or unhashed or len(hashes) > 1:
        conflict = not refusals
        if refusals:
            reason = _one_reason(refusals)
        elif unhashed:
            names = ", ".join(sorted(f"{c.service} {c.instance}" for c in unhashed))
            reason = (
                f"{names} answered the check without the file's SHA-256 (a replica of another version?): "
                "nothing was applied, as a replica applies only the file checked"
            )
        else:
            listed = ", ".join(sorted(f"{c.service} {c.instance}: {(c.config_sha256 or '')[:12]}" for c in checks))
            reason = (
                "the replicas read different files (a ConfigMap change not yet on every pod?): "
                f"{listed}; nothing was applied, run the reload again once they agree"
            )
        replies = await _gather(
            nc, subject, {**base, "op": "abort", "reason": reason}, seconds=timeout_seconds, done=answered_all
        )
        outcomes = _merge(
            replies,
            known,
            lambda c: ReloadOutcome(
                c.service, c.instance, "refused", c.reason or f"not applied: {reason}", c.config_sha256
            ),
        )
        return ReloadReport(reload_id, "refused", reason, outcomes, conflict=conflict)

    sha = next(iter(hashes))
    assert sha is not None  # every valid check carried one (unhashed above)
    # Only the replicas that answered the check in time take part: one whose answer came
    # late is not named, ignores the apply and keeps its configuration.
    named = [{"service": service, "instance": instance} for service, instance in known]
    apply = {**base, "op": "apply", "expected_sha256": sha, "replicas": named}
    replies = await _gather(nc, subject, apply, seconds=timeout_seconds, done=answered_all)
    outcomes = [o for o in map(ReloadOutcome.from_json, replies) if o is not None]
    answered = {_key(o.service, o.instance) for o in outcomes}
    missing = [c for key, c in known.items() if key not in answered]
    failed = [(o.service, o.reason) for o in outcomes if o.status in ("refused", "partial")]
    reloaded = any(o.status in ("reloaded", "partial") for o in outcomes)
    problems = []
    if failed:
        problems.append(_one_reason(failed))
    if missing:
        names = ", ".join(f"{c.service} {c.instance}" for c in missing)
        problems.append(
            f"no answer within {timeout_seconds:g} s from {names}: its configuration is unknown "
            "(run the reload again: replicas already on this file answer unchanged)"
        )
    outcomes.sort(key=lambda o: (o.service, o.instance))
    if not problems:
        return ReloadReport(reload_id, "ok", None, outcomes)
    if not reloaded and not missing:
        # Nothing changed anywhere (the file changed under the reload, or every replica refused).
        return ReloadReport(reload_id, "refused", "; ".join(problems), outcomes, conflict=True)
    return ReloadReport(reload_id, "partial", "; ".join(problems), outcomes)


def _merge(
    replies: list[Any], known: Mapping[tuple[str, str], Checked], fallback: Callable[[Checked], ReloadOutcome]
) -> list[ReloadOutcome]:
    """The replicas' answers, and for each known replica that did not answer, ``fallback``."""
    outcomes = {(o.service, o.instance): o for o in map(ReloadOutcome.from_json, replies) if o is not None}
    for key, checked in known.items():
        outcomes.setdefault(key, fallback(checked))
    return sorted(outcomes.values(), key=lambda o: (o.service, o.instance))
