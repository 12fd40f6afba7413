"""Response classes for the hot path: orjson bodies and the error envelope."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import orjson
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .errors import APIError


class OrjsonResponse(JSONResponse):
    """JSON rendered by orjson (several times faster than the stdlib on our payloads). A
    JSONResponse, so the OpenAPI document shows each route's ``response_model``."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(error: APIError) -> Response:
    """The OpenAI error envelope with the error's status and headers."""
    return Response(error.json(), status_code=error.status, headers=error.headers, media_type="application/json")


class ClosableByteStream(Protocol):
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class EventStreamResponse(Response):
    """Server-sent events from a byte stream that is closed whatever happens.

    Unlike Starlette's StreamingResponse this always calls ``stream.aclose()`` (which
    cancels the upstream call), also when sending fails because the client left.
    """

    media_type = "text/event-stream"

    def __init__(self, stream: ClosableByteStream, headers: Mapping[str, str] | None = None) -> None:
        self.stream = stream
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.stream.aclose()
