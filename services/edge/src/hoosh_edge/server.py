"""The HTTP server under the edge: uvicorn's httptools protocol with the bounds uvicorn
lacks, and the uvicorn options built from the settings.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not how
long a client may take to send a request: its keep-alive timer stops at the first byte
and no timer runs before the first request, so a client trickling a header line every
few seconds holds its connection (and a file descriptor) for ever, and httptools puts
no limit on the size of the headers. :class:`EdgeHttpToolsProtocol` adds, per
connection:

- a **header deadline**: the request line and headers must be complete within
  ``header_timeout`` seconds of the connection opening (first request) or of the
  request's first byte (later requests on a kept-alive connection); otherwise the
  connection is closed;
- a **body deadline**: the body must be complete within ``body_timeout`` seconds of
  the headers (the app then sees a disconnect: nothing was reserved, the chat path
  reads the whole body before anything else);
- a **header size** bound: more than ``max_header_bytes`` of request line and headers
  is answered 431 and closed;
- a **connection** bound per worker process: a connection beyond
  ``max_connections`` is answered 503 (Retry-After: 1) and closed at once.

The answers the protocol writes itself (400 for malformed HTTP, 431, 503) use OpenAI's
error envelope, like every answer of the app. A key's in-flight requests are bounded
separately, by its ``max_concurrency`` (``hoosh_metering.limits.KeyGate``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from .config import Settings
from .errors import APIError

log = logging.getLogger(__name__)

WARN_EVERY_SECONDS = 10.0  # refusals are logged at most this often per process


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-connection read bounds and the per-process connection bound."""

    header_timeout: float = 10.0
    body_timeout: float = 120.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout=settings.edge_header_timeout_seconds,
            body_timeout=settings.edge_body_timeout_seconds,
            max_header_bytes=settings.edge_max_header_bytes,
            max_connections=settings.edge_max_connections,
        )


def _raw_response(status: int, reason: bytes, error: APIError, extra: bytes = b"") -> bytes:
    body = error.json()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n%s"
        % (status, reason, len(body), extra, body)
    )


_MALFORMED = _raw_response(
    400, b"Bad Request", APIError(400, "The request is not valid HTTP/1.1.", "invalid_request_error")
)
_BUSY = _raw_response(
    503,
    b"Service Unavailable",
    APIError(503, "The gateway has too many open connections; retry shortly.", "api_error", code="server_busy"),
    b"retry-after: 1\r\n",
)


class _Throttled:
    """A warning logged at most once per interval (a flood must not flood the log)."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.last = 0.0
        self.suppressed = 0

    def warn(self, **extra: Any) -> None:
        now = time.monotonic()
        if now - self.last < WARN_EVERY_SECONDS:
            self.suppressed += 1
            return
        log.warning(self.message, extra={**extra, "suppressed": self.suppressed})
        self.last, self.suppressed = now, 0


_refused = _Throttled("connection refused: too many open connections")
_slow_headers = _Throttled("connection closed: request headers not received in time")
_slow_body = _Throttled("connection closed: request body not received in time")


class EdgeHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the read deadlines and bounds of :class:`ConnectionLimits`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_body = False
        self._header_bytes = 0
        self._pending_header_bytes = 0  # raw bytes received while the headers are incomplete
        self._refused = False
        self._headers_too_large = False

    # --------------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            _refused.warn(open_connections=len(self.connections))
            transport.write(_BUSY)
            transport.close()
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout)  # the first request, idle time included

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if not self._reading_body and (self.cycle is None or self.cycle.response_complete):
            # Headers still incomplete after this chunk: all of it was request line and
            # headers, which httptools holds until a header ends (on_header counts only
            # complete ones). An endless header value is cut here, not at the deadline.
            self._pending_header_bytes += len(data)
            if self._pending_header_bytes > self.limits.max_header_bytes:
                self._headers_too_large = True
                self.send_400_response("request headers too large")
                return
        # Bytes that start no request (blank lines before one) still must not keep an
        # idle connection open: uvicorn's keep-alive timer stopped at the first of them.
        if (
            self._deadline is None
            and not self.transport.is_closing()
            and (self.cycle is None or self.cycle.response_complete)
            and self.timeout_keep_alive_task is None
        ):
            self._arm(self.limits.header_timeout)

    # --------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._reading_body = False
        if self._deadline is None:  # a later request on a kept-alive connection
            self._arm(self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._pending_header_bytes = 0
        self._reading_body = True
        self._arm(self.limits.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_body = False
        self._pending_header_bytes = 0
        self._disarm()

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (or headers over the bound): the envelope, then close."""
        self._disarm()
        if self._headers_too_large:
            limit = self.limits.max_header_bytes
            error = APIError(
                431,
                f"The request line and headers are larger than the limit of {limit} bytes.",
                "invalid_request_error",
                code="request_headers_too_large",
            )
            self.transport.write(_raw_response(431, b"Request Header Fields Too Large", error))
        else:
            self.logger.debug("invalid HTTP request: %s", msg)
            self.transport.write(_MALFORMED)
        self.transport.close()

    # --------------------------------------------------------------- bounds

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            self._headers_too_large = True
            # httptools turns a failing callback into HttpParserCallbackError, which
            # uvicorn answers through send_400_response (above: 431 here).
            raise ValueError("request headers too large")

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        (_slow_body if self._reading_body else _slow_headers).warn(client=self.client and self.client[0])
        self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options that bound connections (``uvicorn.run`` / ``uvicorn.Config``):
    the protocol above (httptools) with the settings' limits, and the keep-alive timeout."""
    return {
        # A partial of a module-level class: picklable, so several workers can share it.
        "http": functools.partial(EdgeHttpToolsProtocol, limits=ConnectionLimits.from_settings(settings)),
        "timeout_keep_alive": settings.edge_keep_alive_timeout_seconds,
        "server_header": False,
    }
