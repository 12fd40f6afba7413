"""What every HTTP dialect shares: the pooled client, status and transport error
mapping (which failures are worth a retry), bounded reads, and a server-sent-events
reader.

Everything read from a provider is bounded, in memory and in time (a provider is
trusted to speak its API, not to be small or quick): a non-streamed answer by
``max_response_bytes`` (more for embeddings, per input), one stream line or event by
``max_event_bytes``, an error body by ``ERROR_BODY_BYTES``; a blocking call by its
attempt's timeout, a stream by ``stream_timeout_seconds`` however its bytes trickle,
and both by ``read_timeout_seconds`` of silence. A bound that runs out is an
``UpstreamError`` (502) or ``UpstreamTimeout`` (504), so the usual settlement runs.

aiohttp rather than httpx: on the hot path it costs about a third of the CPU per
request (profiled under load; see the bench results)."""

from __future__ import annotations

import datetime
import email.utils
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from hoosh.router.v1 import router_pb2
from yarl import URL

from ..config import ProviderConfig
from ..errors import (
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    RouterError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..estimate import prompt_token_bound
from ..metrics import note_ratelimit
from .base import PROBE_TIMEOUT

# Statuses a provider uses for "try again": timeouts, conflicts, overload (Anthropic's 529) and 5xx.
RETRYABLE_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504, 529}


# What a broken exchange raises: connection and payload errors, and timeouts.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)
CONNECT_TIMEOUT = 10.0

# Of a non-200 answer only this much is read: every dialect's error envelope fits, and
# only its first few hundred characters are ever shown.
ERROR_BODY_BYTES = 64 * 1024
# Embeddings: an answer may hold this many bytes per value (a float written with 17
# significant digits, an exponent, a comma and pretty-printing's indentation), for this
# many dimensions per input when the request names none (text-embedding-3-large: 3072).
EMBEDDING_BYTES_PER_VALUE = 40
EMBEDDING_DIMENSIONS_BOUND = 4096


def new_client(config: ProviderConfig, headers: dict[str, str]) -> aiohttp.ClientSession:
    """One pooled client per provider, built once, inside the running event loop. It keeps
    no cookies: the session serves every tenant, so a cookie one answer set must not go
    out with anyone's next call."""
    return aiohttp.ClientSession(
        headers={"Content-Type": "application/json", **headers, **config.headers},
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=60, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=config.timeout_seconds or 300.0, sock_connect=CONNECT_TIMEOUT),
    )


def call_timeout(seconds: float, read: float | None = None) -> aiohttp.ClientTimeout:
    """A blocking call: the whole exchange within ``seconds``, and no silence between
    two reads over ``read`` (when shorter)."""
    sock_read = read if read is not None and read < seconds else None
    return aiohttp.ClientTimeout(total=seconds, sock_connect=CONNECT_TIMEOUT, sock_read=sock_read)


def stream_timeout(total: float, read: float) -> aiohttp.ClientTimeout:
    """A stream: the whole of it, from the request to its last byte, within ``total``
    (however slowly its bytes trickle in), and no silence between two reads over ``read``."""
    return aiohttp.ClientTimeout(total=total, sock_connect=CONNECT_TIMEOUT, sock_read=read)


def path_segment(value: str) -> str:
    """``value`` as one URL path segment: ``/``, ``?``, ``#``, ``:``, ``%`` and spaces
    percent-encoded, so it can neither add a segment, start a query nor name a method."""
    return quote(value, safe="")


def embedding_response_limit(config: ProviderConfig, inputs: int, dimensions: int | None) -> int:
    """The most bytes an embeddings answer may have: the provider's ``max_response_bytes``,
    or, for a large batch, what ``inputs`` vectors of ``dimensions`` floats can take as JSON."""
    per_input = (dimensions or EMBEDDING_DIMENSIONS_BOUND) * EMBEDDING_BYTES_PER_VALUE
    return max(config.max_response_bytes, inputs * per_input)


def retry_after_seconds(value: str | None) -> int | None:
    """A Retry-After header in either form (delta-seconds or an HTTP date), as seconds."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0, math.ceil((when - datetime.datetime.now(datetime.UTC)).total_seconds()))


def error_detail(body: bytes) -> str:
    """The human message of an error body in any of the dialects' envelopes."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(data, list) and data:  # Gemini's streaming endpoint wraps errors in a list
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("status") or error.get("type") or "")[:500]
    if isinstance(error, str):
        return error[:500]
    return ""


def error_from_status(provider: str, status: int, body: bytes, retry_after: str | None) -> RouterError:
    """Map a provider's non-2xx answer: 400/422 are the client's fault (never retried),
    401/403/404 are this provider's (the next candidate may do), 429/5xx are transient."""
    detail = error_detail(body)
    if status in (400, 413, 422):
        return InvalidRequest(f"Provider '{provider}' rejected the request: {detail or status}")
    if status == 404:
        return ModelNotFound(
            f"Provider '{provider}' does not know this model: {detail or status}", param="model", fallback=True
        )
    if status == 429:
        return RateLimited(
            f"Provider '{provider}' is rate limiting: {detail or status}", retry_after=retry_after_seconds(retry_after)
        )
    if status in (401, 403):
        return UpstreamError(f"Provider '{provider}' refused hoosh's credentials ({status})")
    if status in RETRYABLE_STATUSES:
        return UpstreamError(f"Provider '{provider}' failed with status {status}: {detail}", retryable=True)
    return UpstreamError(f"Provider '{provider}' failed with status {status}: {detail}")


def transport_error(provider: str, error: BaseException) -> RouterError:
    if isinstance(error, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailable(f"Provider '{provider}' is unreachable: {type(error).__name__}")
    if isinstance(error, TimeoutError):
        return UpstreamTimeout(f"Provider '{provider}' timed out")
    # The connection broke (disconnected, payload cut, ...): transient as far as we can tell.
    return UpstreamError(f"Provider '{provider}' broke the connection: {type(error).__name__}", retryable=True)


def accepted_failure(message: str, *, retryable: bool | None = None) -> UpstreamError:
    """A failure in what a provider sent after it accepted the call (a 200): an error
    event mid-stream, output hoosh cannot use. It read the prompt and may bill it."""
    error = UpstreamError(message, retryable=retryable)
    error.accepted = True
    return error


def malformed(provider: str, what: str = "response") -> UpstreamError:
    """Output hoosh cannot read; it came after the provider accepted the call."""
    return accepted_failure(f"Provider '{provider}' sent a malformed {what}")


def too_large(provider: str, what: str, limit: int) -> UpstreamError:
    """A provider's answer over hoosh's bound: not retried there (it would repeat); the
    next candidate may answer. Only a 200's body is measured, so the call was accepted."""
    error = UpstreamError(f"Provider '{provider}' sent a {what} larger than {limit} bytes; refused")
    error.accepted = True
    return error


async def read_body(response: aiohttp.ClientResponse, limit: int, provider: str) -> bytes:
    """The whole body, refused (``too_large``) once it passes ``limit`` bytes: a declared
    length over it is refused before anything is read; otherwise at most ``limit`` plus
    one network read is held. An unread rest closes the connection (never reused)."""
    length = response.content_length
    if length is not None and length > limit:
        raise too_large(provider, "response", limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large(provider, "response", limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_head(response: aiohttp.ClientResponse, limit: int = ERROR_BODY_BYTES) -> bytes:
    """At most the first ``limit`` bytes of the body (an error's envelope); the rest is
    left unread."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


async def iter_lines(response: aiohttp.ClientResponse, limit: int, provider: str) -> AsyncGenerator[bytes, None]:
    """Each line of the body, without its ``\\n`` (a ``\\r`` before it is kept), and the
    unterminated rest at the end. A line longer than ``limit`` bytes is refused
    (``too_large``) as soon as that many bytes of it have arrived, so whatever the
    provider sends, no more than about twice ``limit`` is ever held.

    A caller that may stop early closes it (``contextlib.aclosing``) rather than leave
    it to the garbage collector's finalizer (a task per stream)."""
    parts: list[bytes] = []  # the line being received, when it spans reads
    size = 0
    async for chunk in response.content.iter_any():
        lines = chunk.split(b"\n")
        rest = lines.pop()  # after the last newline: b"" when the read ended on one
        if lines:
            if parts:
                parts.append(lines[0])
                lines[0] = b"".join(parts)
                parts.clear()
            for line in lines:
                if len(line) > limit:
                    raise too_large(provider, "stream line", limit)
                yield line
            size = 0
        if rest:
            size += len(rest)
            if size > limit:
                raise too_large(provider, "stream line", limit)
            parts.append(rest)
    if parts:
        yield b"".join(parts)


async def iter_sse(
    response: aiohttp.ClientResponse, limit: int, provider: str
) -> AsyncGenerator[tuple[str, bytes], None]:
    """(event, data) for each server-sent event; ``event`` is "" when unnamed.

    Multi-line data is joined with newlines, comments (": ...") are skipped, and an
    event is emitted at each blank line (and at the end of the body). A line, or an
    event's data, over ``limit`` bytes is refused (``too_large``).
    """
    event = ""
    data: list[bytes] = []
    size = 0
    async with aclosing(iter_lines(response, limit, provider)) as lines:
        async for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if data:
                    yield event, b"\n".join(data)
                event, data, size = "", [], 0
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                size += len(value) + 1
                if size > limit:
                    raise too_large(provider, "stream event", limit)
                data.append(value)
            elif name == b"event":
                event = value.decode(errors="replace")
    if data:
        yield event, b"\n".join(data)


def loads_object(provider: str, payload: str | bytes, what: str = "stream event") -> dict[str, Any]:
    """Parse a JSON object or raise the provider's malformed-output error."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise malformed(provider, what) from error
    if not isinstance(data, dict):
        raise malformed(provider, what)
    return data


def arguments_object(arguments: str) -> dict[str, Any]:
    """Tool-call arguments (JSON text from an OpenAI client) as the object native APIs want."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError as error:
        raise InvalidRequest("tool_calls[].function.arguments must be a JSON object", param="messages") from error
    if not isinstance(value, dict):
        raise InvalidRequest("tool_calls[].function.arguments must be a JSON object", param="messages")
    return value


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a ``data:<type>;base64,<data>`` URL, else None."""
    if not url.startswith("data:"):
        return None
    head, _, data = url[5:].partition(",")
    media_type, _, encoding = head.partition(";")
    if encoding != "base64" or not data:
        return None
    return media_type or "application/octet-stream", data


class HTTPBackend:
    """The plumbing every HTTP dialect shares: one pooled session (built inside the
    running loop), GET/POST with error mapping, and streamed POSTs, each bounded in
    size and time by the provider's settings."""

    # A paid provider does not stop when hoosh hangs up: a stream the client left is
    # drained for the provider's own usage (see chat.py).
    bills_abandoned_streams = True

    def __init__(self, config: ProviderConfig, headers: dict[str, str]) -> None:
        self.name = config.name
        self.config = config
        # Encoded once; a request's URL is this plus a path whose variable parts went
        # through ``path_segment``, sent exactly as built (no re-quoting, no dot-segment folding).
        self._base_url = str(URL(config.base_url))
        self._client = new_client(config, headers)

    async def close(self) -> None:
        await self._client.close()

    async def count_prompt_tokens(self, request: router_pb2.ChatRequest, upstream_model: str) -> int:
        """Remote providers: the UTF-8 byte bound (no token-counting round trip on the hot path)."""
        return prompt_token_bound(request)

    def context_length(self, model: str) -> int:
        return 0  # unknown for remote providers; they enforce their own

    def _url(self, path: str) -> URL:
        return URL(self._base_url + path, encoded=True)

    def _read_timeout(self, seconds: float) -> float:
        """The longest silence allowed between two reads: the provider's
        ``read_timeout_seconds``, never more than ``seconds``."""
        read = self.config.read_timeout_seconds
        return min(read, seconds) if read is not None else seconds

    def _transport_error(self, error: BaseException, total: float, read: float) -> RouterError:
        """``transport_error``, saying which time bound ran out (the whole, or a silence)."""
        if isinstance(error, aiohttp.ConnectionTimeoutError) or not isinstance(error, TimeoutError):
            return transport_error(self.name, error)
        if isinstance(error, aiohttp.SocketTimeoutError):
            return UpstreamTimeout(f"Provider '{self.name}' sent nothing for {read:g}s")
        return UpstreamTimeout(f"Provider '{self.name}' did not finish within {total:g}s")

    async def _get(self, path: str, seconds: float, query: dict[str, str | int] | None = None) -> bytes:
        read = self._read_timeout(seconds)
        try:
            async with self._client.get(self._url(path), params=query, timeout=call_timeout(seconds, read)) as response:
                status, retry_after = response.status, response.headers.get("retry-after")
                note_ratelimit(self.name, response.headers)
                if status != 200:
                    content = await read_head(response)
                else:
                    content = await read_body(response, self.config.max_response_bytes, self.name)
        except TRANSPORT_ERRORS as error:
            raise self._transport_error(error, seconds, read) from error
        if status != 200:
            raise error_from_status(self.name, status, content, retry_after)
        return content

    async def _probe(self, path: str, query: dict[str, str | int] | None = None) -> None:
        """Sick means unreachable, 5xx, refused credentials or rate limited; other answers are alive."""
        try:
            await self._get(path, PROBE_TIMEOUT, query)
        except (InvalidRequest, ModelNotFound):
            return

    async def _post(
        self, path: str, body: bytes, request_id: str, seconds: float, *, limit: int | None = None
    ) -> bytes:
        """POST and read the whole answer within ``seconds`` (and at most ``limit`` bytes,
        by default the provider's ``max_response_bytes``); a non-200 status raises the
        mapped error."""
        read = self._read_timeout(seconds)
        status = 0
        try:
            async with self._client.post(
                self._url(path),
                data=body,
                headers={"X-Request-Id": request_id},
                timeout=call_timeout(seconds, read),
            ) as response:
                status, retry_after = response.status, response.headers.get("retry-after")
                note_ratelimit(self.name, response.headers)
                if status != 200:
                    content = await read_head(response)
                else:
                    content = await read_body(response, limit or self.config.max_response_bytes, self.name)
        except TRANSPORT_ERRORS as error:
            mapped = self._transport_error(error, seconds, read)
            mapped.accepted = status == 200  # cut while reading an answer the provider was giving
            raise mapped from error
        if status != 200:
            raise error_from_status(self.name, status, content, retry_after)
        return content

    @asynccontextmanager
    async def _stream(self, path: str, body: bytes, request_id: str, seconds: float) -> AsyncIterator[Any]:
        """A streamed POST whose status was 200 (else the mapped error). The whole stream
        must end within the provider's ``stream_timeout_seconds``, with no silence over
        ``read_timeout_seconds`` (by default ``seconds``, the attempt's timeout); either
        bound cuts it with UpstreamTimeout. Transport errors while the caller reads it
        are mapped here too."""
        total, read = self.config.stream_timeout_seconds, self._read_timeout(seconds)
        accepted = False
        try:
            async with self._client.post(
                self._url(path),
                data=body,
                headers={"X-Request-Id": request_id, "Accept": "text/event-stream"},
                timeout=stream_timeout(total, read),
            ) as response:
                note_ratelimit(self.name, response.headers)
                if response.status != 200:
                    content = await read_head(response)
                    raise error_from_status(self.name, response.status, content, response.headers.get("retry-after"))
                accepted = True
                yield response
        except TRANSPORT_ERRORS as error:
            mapped = self._transport_error(error, total, read)
            mapped.accepted = accepted  # cut mid-stream: the provider had accepted the call
            raise mapped from error
