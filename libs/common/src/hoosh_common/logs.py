"""Structured JSON logs carrying the request id and the trace context.

:func:`configure_logging` formats and writes off the caller's thread: a log call puts
the record on a queue (a few microseconds) and a listener thread turns it into JSON and
writes it to stderr, so a slow log consumer never stalls the event loop. What a line
needs from the caller (its request id, trace id and span id, its message and its
traceback) is taken on the caller's thread as the record is made; the listener thread
has no request context. What is queued is written at exit (``atexit``).
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from logging.handlers import QueueHandler, QueueListener
from queue import SimpleQueue
from typing import TextIO

import orjson
from opentelemetry import trace
from opentelemetry.trace import SpanContext

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("hoosh_request_id", default="")

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

# Set on a record by the queue handler: (request id, span context or None) as they were
# where the record was made. Underscored: never written as an extra field.
_IDS = "_hoosh_ids"

# Records waiting for the listener. Past this many (the log consumer is that far
# behind) new ones are dropped and counted, not kept without bound.
MAX_QUEUED = 10_000

# The writer thread: at most this many lines per write, and a pause of this long when it
# has emptied the queue (the latency a line may gain; the write calls it saves).
_BATCH = 256
_LINGER_S = 0.005

_exception_formatter = logging.Formatter()


def _current_ids() -> tuple[str, SpanContext | None]:
    span_context = trace.get_current_span().get_span_context()
    return request_id_var.get(), span_context if span_context.is_valid else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record. The ids come from the record when the queue handler
    stamped them, else from the current context (a formatter used directly, on the
    thread that logs)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ids = record.__dict__.get(_IDS)
        request_id, span_context = ids if ids is not None else _current_ids()
        if request_id:
            entry["request_id"] = request_id
        if span_context is not None:
            entry["trace_id"] = f"{span_context.trace_id:032x}"
            entry["span_id"] = f"{span_context.span_id:016x}"
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        exc_text = record.exc_text  # rendered by the queue handler (or cached by a formatter)
        if not exc_text and record.exc_info:
            exc_text = self.formatException(record.exc_info)
        if exc_text:
            entry["exc"] = exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return orjson.dumps(entry, default=str).decode()


# The queue between the two: records, and QueueListener's stop sentinel (None).
_Records = SimpleQueue[logging.LogRecord | None]


class _ContextQueueHandler(QueueHandler):
    """Hands records to the listener thread; runs on the thread that logs."""

    queue: _Records

    def __init__(self, queue: _Records, limit: int) -> None:
        super().__init__(queue)
        self.limit = limit
        self.dropped = 0  # approximate (+= from several threads): only ever reported

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Take now what only the caller has: the request id and the span (context
        variables of this thread), the message with its arguments rendered, and the
        traceback as text (the arguments and the frames' objects may change once the
        call returns). In place, no copy: handlers after this one see the same record,
        its message already rendered, its ``exc_info`` kept."""
        record.__dict__[_IDS] = _current_ids()
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _exception_formatter.formatException(record.exc_info)
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.queue.qsize() >= self.limit:
            self.dropped += 1
            return
        self.queue.put_nowait(record)


class _Listener(QueueListener):
    """The thread that formats and writes. It takes what is queued in batches and writes
    each batch with one call: every write releases the GIL and the thread must win it
    back, so a write per line would cost the event loop a hand-over per line."""

    queue: _Records

    def __init__(
        self,
        queue: _Records,
        handler: logging.StreamHandler[TextIO],
        source: _ContextQueueHandler,
    ) -> None:
        super().__init__(queue, handler)
        self._handler = handler
        self._source = source

    def start(self) -> None:
        self._thread = thread = threading.Thread(target=self._monitor, name="hoosh-log-writer", daemon=True)
        thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # stopping twice (atexit after a test) is a no-op
            super().stop()

    def _monitor(self) -> None:
        queue = self.queue
        stopping = False
        while not stopping:
            batch: list[logging.LogRecord] = []
            record = queue.get()
            while True:
                if record is None:  # QueueListener's sentinel (enqueue_sentinel)
                    stopping = True  # stop() waits: what came before it is written now
                    if queue.empty():
                        break
                else:
                    batch.append(record)
                if len(batch) >= _BATCH or queue.empty():
                    break
                record = queue.get()
            self._write(batch)
            if not stopping and queue.empty():
                time.sleep(_LINGER_S)  # let a few more lines arrive: fewer, larger writes

    def _write(self, records: list[logging.LogRecord]) -> None:
        handler = self._handler
        dropped = self._source.dropped
        if dropped:
            self._source.dropped -= dropped
            notice = logging.LogRecord(
                __name__, logging.WARNING, __file__, 0, "log lines dropped: the log consumer is behind", None, None
            )
            notice.__dict__.update({_IDS: ("", None), "dropped": dropped})
            records.insert(0, notice)
        lines = []
        for record in records:
            try:
                lines.append(handler.format(record))
            except Exception:
                handler.handleError(record)
        if not lines:
            return
        with handler.lock:  # type: ignore[union-attr]  # set by Handler.__init__
            try:
                handler.stream.write("\n".join(lines) + "\n")
                handler.flush()
            except Exception:
                handler.handleError(records[-1])


@dataclass
class _Active:
    queue_handler: _ContextQueueHandler
    listener: _Listener
    stream_handler: logging.StreamHandler[TextIO]
    pid: int


_lock = threading.Lock()
_active: _Active | None = None
_hooks_installed = False


def configure_logging(service: str, level: str | None = None, *, stream: TextIO | None = None) -> None:
    """Send every log record to stderr (or ``stream``) as one JSON object per line, at
    ``level`` (by default ``HOOSH_LOG_LEVEL``, else INFO), written by a thread of its
    own. Calling it again replaces the configuration: what the previous one queued is
    written first."""
    global _active, _hooks_installed
    level_name = (level or os.environ.get("HOOSH_LOG_LEVEL") or "INFO").upper()
    if not isinstance(logging.getLevelName(level_name), int):  # before anything is started or replaced
        raise ValueError(f"unknown log level {level_name!r}")
    stream_handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    stream_handler.setFormatter(JsonFormatter(service))
    queue: _Records = SimpleQueue()
    queue_handler = _ContextQueueHandler(queue, MAX_QUEUED)
    listener = _Listener(queue, stream_handler, queue_handler)
    listener.start()
    with _lock:
        previous, _active = _active, _Active(queue_handler, listener, stream_handler, os.getpid())
        root = logging.getLogger()
        root.handlers[:] = [queue_handler]
        root.setLevel(level_name)
        if not _hooks_installed:
            _hooks_installed = True
            atexit.register(shutdown_logging)
            os.register_at_fork(after_in_child=_restart_in_child)
    if previous is not None and previous.pid == os.getpid():
        previous.listener.stop()  # writes what it still held, then its thread ends
        previous.stream_handler.close()
    # Access logs on the hot path cost more than they tell; errors still surface.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def shutdown_logging() -> None:
    """Write out everything queued and stop the listener thread (at exit: registered
    with ``atexit`` by :func:`configure_logging`). Records logged afterwards (other exit
    handlers) are written directly, on the thread that logs."""
    global _active
    with _lock:
        active, _active = _active, None
        if active is None or active.pid != os.getpid():
            return
        root = logging.getLogger()
        root.handlers[:] = [active.stream_handler if h is active.queue_handler else h for h in root.handlers]
    active.listener.stop()
    active.stream_handler.flush()


def _restart_in_child() -> None:
    """After fork: the listener thread did not come along, and the queue may hold the
    parent's records (the parent writes those) or a lock taken mid-put. The child gets a
    queue and a listener of its own, so its records are written too."""
    global _active, _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    active = _active
    if active is None:
        return
    queue: _Records = SimpleQueue()
    active.queue_handler.queue = queue
    active.queue_handler.dropped = 0
    listener = _Listener(queue, active.stream_handler, active.queue_handler)
    listener.start()
    _active = _Active(active.queue_handler, listener, active.stream_handler, os.getpid())
