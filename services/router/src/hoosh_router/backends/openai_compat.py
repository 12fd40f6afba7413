"""Any provider that speaks OpenAI's chat-completions API over HTTP."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
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


TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


def _transport_error(provider: str, error: BaseException) -> RouterError:
    if isinstance(error, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"Provider '{provider}' is unreachable: {type(error).__name__}")
    if isinstance(error, TimeoutError):
        return UpstreamTimeout(f"Provider '{provider}' timed out")
    return UpstreamError(f"Provider '{provider}' broke the connection: {type(error).__name__}")


class OpenAICompatibleBackend:
    """One pooled HTTP client per provider, built once (inside the running loop).

    aiohttp rather than httpx: on the hot path it costs about a third of the CPU
    per request (profiled under load; see BENCHMARKS.md)."""

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        self._base_url = config.base_url
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._client = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=60, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=config.timeout_seconds or 300.0, sock_connect=10.0),
            json_serialize=lambda value: orjson.dumps(value).decode(),
        )

    async def close(self) -> None:
        await self._client.close()

    def context_length(self, model: str) -> int:
        return 0  # unknown for remote providers; they enforce their own

    async def count_prompt_tokens(self, request: router_pb2.ChatRequest, upstream_model: str) -> int:
        return prompt_token_bound(request)

    async def list_models(self) -> list[BackendModel]:
        try:
            async with self._client.get(
                f"{self._base_url}/models", timeout=aiohttp.ClientTimeout(total=5.0)
            ) as response:
                response.raise_for_status()
                data = orjson.loads(await response.read()).get("data", [])
        except (*TRANSPORT_ERRORS, orjson.JSONDecodeError, AttributeError) as error:
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
            async with self._client.post(
                f"{self._base_url}/chat/completions",
                data=orjson.dumps(body),
                headers={"X-Request-Id": params.request_id},
                timeout=aiohttp.ClientTimeout(total=params.timeout, sock_connect=10.0),
            ) as response:
                content = await response.read()
                status, retry_after = response.status, response.headers.get("retry-after")
        except TRANSPORT_ERRORS as error:
            raise _transport_error(self.name, error) from error
        if status != 200:
            raise _error_from_response(self.name, status, content, retry_after)
        try:
            data = orjson.loads(content)
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
            async with self._client.post(
                f"{self._base_url}/chat/completions",
                data=orjson.dumps(body),
                headers={"X-Request-Id": params.request_id, "Accept": "text/event-stream"},
                timeout=aiohttp.ClientTimeout(total=params.timeout, sock_connect=10.0),
            ) as response:
                if response.status != 200:
                    content = await response.read()
                    raise _error_from_response(self.name, response.status, content, response.headers.get("retry-after"))
                done = False
                async for raw_line in response.content:
                    if not raw_line.startswith(b"data:"):
                        continue
                    payload = raw_line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    for piece in self._pieces(payload):
                        yield piece
                if not done:
                    raise UpstreamError(f"Provider '{self.name}' ended the stream before [DONE]")
        except TRANSPORT_ERRORS as error:
            raise _transport_error(self.name, error) from error

    def _pieces(self, payload: bytes) -> list[StreamPiece]:
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
