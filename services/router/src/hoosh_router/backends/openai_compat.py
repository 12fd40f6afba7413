"""Any provider that speaks OpenAI's chat-completions API over HTTP."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
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
from . import openai_wire
from .base import BackendModel, CallParams, Completion, StreamPiece

log = logging.getLogger(__name__)

KNOWN_FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}


def _error_from_response(provider: str, status: int, body: bytes, retry_after: str | None) -> RouterError:
    try:
        detail = orjson.loads(body).get("error", {}).get("message") or ""
    except (orjson.JSONDecodeError, AttributeError):
        detail = ""
    detail = str(detail)[:500]
    if status == 400 or status == 422:
        return InvalidRequest(f"Provider '{provider}' rejected the request: {detail or status}")
    if status == 404:
        return ModelNotFound(f"Provider '{provider}' does not know this model: {detail or status}", param="model")
    if status == 429:
        seconds = int(retry_after) if retry_after and retry_after.isdigit() else None
        return RateLimited(f"Provider '{provider}' is rate limiting: {detail or status}", retry_after=seconds)
    if status in (401, 403):
        return UpstreamError(f"Provider '{provider}' refused hoosh's credentials ({status})")
    return UpstreamError(f"Provider '{provider}' failed with status {status}: {detail}")


def _transport_error(provider: str, error: httpx.HTTPError) -> RouterError:
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamUnavailable(f"Provider '{provider}' is unreachable: {type(error).__name__}")
    if isinstance(error, httpx.TimeoutException):
        return UpstreamTimeout(f"Provider '{provider}' timed out")
    return UpstreamError(f"Provider '{provider}' broke the connection: {type(error).__name__}")


class OpenAICompatibleBackend:
    """One pooled HTTP client per provider, built once."""

    def __init__(self, config: ProviderConfig, client: httpx.AsyncClient | None = None) -> None:
        self.name = config.name
        self.config = config
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._client = client or httpx.AsyncClient(
            base_url=config.base_url,
            headers=headers,
            timeout=httpx.Timeout(config.timeout_seconds or 300.0, connect=10.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=256),
        )

    async def close(self) -> None:
        await self._client.aclose()

    def context_length(self, model: str) -> int:
        return 0  # unknown for remote providers; they enforce their own

    async def count_prompt_tokens(self, request: router_pb2.ChatRequest, upstream_model: str) -> int:
        return prompt_token_bound(request)

    async def list_models(self) -> list[BackendModel]:
        try:
            response = await self._client.get("/models", timeout=5.0)
            response.raise_for_status()
            data = orjson.loads(response.content).get("data", [])
        except (httpx.HTTPError, orjson.JSONDecodeError, AttributeError) as error:
            log.warning("listing models failed", extra={"provider": self.name, "error": str(error)})
            return []
        return [
            BackendModel(
                id=str(item["id"]),
                owned_by=str(item.get("owned_by") or self.name),
                created=int(item.get("created") or 0),
            )
            for item in data
            if isinstance(item, dict) and "id" in item
        ]

    async def chat(self, request: router_pb2.ChatRequest, params: CallParams) -> Completion:
        body = openai_wire.request_to_json(request, params.upstream_model, params.max_tokens, stream=False)
        try:
            response = await self._client.post(
                "/chat/completions",
                content=orjson.dumps(body),
                headers={"X-Request-Id": params.request_id},
                timeout=params.timeout,
            )
        except httpx.HTTPError as error:
            raise _transport_error(self.name, error) from error
        if response.status_code != 200:
            raise _error_from_response(
                self.name, response.status_code, response.content, response.headers.get("retry-after")
            )
        try:
            data = orjson.loads(response.content)
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            finish_reason = choice.get("finish_reason") or "stop"
            message = openai_wire.message_from_json(choice["message"])
            prompt_tokens = int(usage["prompt_tokens"])
            completion_tokens = int(usage["completion_tokens"])
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as error:
            raise UpstreamError(f"Provider '{self.name}' sent a malformed response") from error
        if finish_reason not in KNOWN_FINISH_REASONS:
            raise UpstreamError(f"Provider '{self.name}' sent an unknown finish_reason '{finish_reason}'")
        return Completion(
            message=message,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            model=str(data.get("model") or params.upstream_model),
            system_fingerprint=str(data.get("system_fingerprint") or ""),
        )

    async def stream(self, request: router_pb2.ChatRequest, params: CallParams) -> AsyncIterator[StreamPiece]:
        body = openai_wire.request_to_json(request, params.upstream_model, params.max_tokens, stream=True)
        try:
            async with self._client.stream(
                "POST",
                "/chat/completions",
                content=orjson.dumps(body),
                headers={"X-Request-Id": params.request_id, "Accept": "text/event-stream"},
                timeout=params.timeout,
            ) as response:
                if response.status_code != 200:
                    content = await response.aread()
                    raise _error_from_response(
                        self.name, response.status_code, content, response.headers.get("retry-after")
                    )
                done = False
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    for piece in self._pieces(payload):
                        yield piece
                if not done:
                    raise UpstreamError(f"Provider '{self.name}' ended the stream before [DONE]")
        except httpx.HTTPError as error:
            raise _transport_error(self.name, error) from error

    def _pieces(self, payload: str) -> list[StreamPiece]:
        try:
            chunk: dict[str, Any] = orjson.loads(payload)
        except orjson.JSONDecodeError as error:
            raise UpstreamError(f"Provider '{self.name}' sent a malformed stream chunk") from error
        if "error" in chunk:
            raise UpstreamError(f"Provider '{self.name}' failed mid-stream: {str(chunk['error'])[:300]}")
        pieces = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            piece = StreamPiece()
            if delta.get("content"):
                piece.content = str(delta["content"])
            if delta.get("tool_calls"):
                piece.tool_calls = openai_wire.tool_call_deltas_from_json(delta["tool_calls"])
            finish_reason = choice.get("finish_reason")
            if finish_reason:
                if finish_reason not in KNOWN_FINISH_REASONS:
                    raise UpstreamError(f"Provider '{self.name}' sent an unknown finish_reason '{finish_reason}'")
                piece.finish_reason = finish_reason
            pieces.append(piece)
        usage = chunk.get("usage")
        if usage:
            try:
                pieces.append(
                    StreamPiece(
                        prompt_tokens=int(usage["prompt_tokens"]), completion_tokens=int(usage["completion_tokens"])
                    )
                )
            except (KeyError, TypeError, ValueError) as error:
                raise UpstreamError(f"Provider '{self.name}' sent malformed usage") from error
        return pieces
