"""What every HTTP dialect shares: the pooled client, status and transport error
mapping (which failures are worth a retry), and a server-sent-events reader.

aiohttp rather than httpx: on the hot path it costs about a third of the CPU per
request (profiled under load; see the bench results)."""

from __future__ import annotations

import datetime
import email.utils
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
from hoosh.router.v1 import router_pb2

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
from .base import PROBE_TIMEOUT

# Statuses a provider uses for "try again": timeouts, conflicts, overload (Anthropic's 529) and 5xx.
RETRYABLE_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504, 529}


# What a broken exchange raises: connection and payload errors, and timeouts.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)
CONNECT_TIMEOUT = 10.0


def new_client(config: ProviderConfig, headers: dict[str, str]) -> aiohttp.ClientSession:
    """One pooled client per provider, built once, inside the running event loop."""
    return aiohttp.ClientSession(
        headers={"Content-Type": "application/json", **headers, **config.headers},
        connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=60, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=config.timeout_seconds or 300.0, sock_connect=CONNECT_TIMEOUT),
    )


def call_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """A blocking call: the whole exchange within ``seconds``."""
    return aiohttp.ClientTimeout(total=seconds, sock_connect=CONNECT_TIMEOUT)


def stream_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """A stream: no total (it may run long), but no gap between reads over ``seconds``."""
    return aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=seconds)


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


def malformed(provider: str, what: str = "response") -> UpstreamError:
    return UpstreamError(f"Provider '{provider}' sent a malformed {what}")


async def iter_sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, bytes]]:
    """(event, data) for each server-sent event; ``event`` is "" when unnamed.

    Multi-line data is joined with newlines, comments (": ...") are skipped, and an
    event is emitted at each blank line (and at the end of the body).
    """
    event = ""
    data: list[bytes] = []
    async for raw in response.content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, b"\n".join(data)
            event, data = "", []
            continue
        if line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode()
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
    running loop), GET/POST with error mapping, and streamed POSTs."""

    # A paid provider does not stop when hoosh hangs up: a stream the client left is
    # drained for the provider's own usage (see chat.py).
    bills_abandoned_streams = True

    def __init__(self, config: ProviderConfig, headers: dict[str, str]) -> None:
        self.name = config.name
        self.config = config
        self._base_url = config.base_url
        self._client = new_client(config, headers)

    async def close(self) -> None:
        await self._client.close()

    async def count_prompt_tokens(self, request: router_pb2.ChatRequest, upstream_model: str) -> int:
        """Remote providers: the UTF-8 byte bound (no token-counting round trip on the hot path)."""
        return prompt_token_bound(request)

    def context_length(self, model: str) -> int:
        return 0  # unknown for remote providers; they enforce their own

    async def _get(self, path: str, seconds: float, query: dict[str, str | int] | None = None) -> bytes:
        try:
            async with self._client.get(
                f"{self._base_url}{path}", params=query, timeout=call_timeout(seconds)
            ) as response:
                content = await response.read()
                status, retry_after = response.status, response.headers.get("retry-after")
        except TRANSPORT_ERRORS as error:
            raise transport_error(self.name, error) from error
        if status != 200:
            raise error_from_status(self.name, status, content, retry_after)
        return content

    async def _probe(self, path: str, query: dict[str, str | int] | None = None) -> None:
        """Sick means unreachable, 5xx, refused credentials or rate limited; other answers are alive."""
        try:
            await self._get(path, PROBE_TIMEOUT, query)
        except (InvalidRequest, ModelNotFound):
            return

    async def _post(self, path: str, body: bytes, request_id: str, seconds: float) -> bytes:
        """POST and read the whole answer within ``seconds``; a non-200 status raises the mapped error."""
        try:
            async with self._client.post(
                f"{self._base_url}{path}",
                data=body,
                headers={"X-Request-Id": request_id},
                timeout=call_timeout(seconds),
            ) as response:
                content = await response.read()
                status, retry_after = response.status, response.headers.get("retry-after")
        except TRANSPORT_ERRORS as error:
            raise transport_error(self.name, error) from error
        if status != 200:
            raise error_from_status(self.name, status, content, retry_after)
        return content

    @asynccontextmanager
    async def _stream(self, path: str, body: bytes, request_id: str, seconds: float) -> AsyncIterator[Any]:
        """A streamed POST whose status was 200 (else the mapped error), reads at most
        ``seconds`` apart. Transport errors while the caller reads it are mapped here too."""
        try:
            async with self._client.post(
                f"{self._base_url}{path}",
                data=body,
                headers={"X-Request-Id": request_id, "Accept": "text/event-stream"},
                timeout=stream_timeout(seconds),
            ) as response:
                if response.status != 200:
                    content = await response.read()
                    raise error_from_status(self.name, response.status, content, response.headers.get("retry-after"))
                yield response
        except TRANSPORT_ERRORS as error:
            raise transport_error(self.name, error) from error
