"""Any provider that speaks OpenAI's chat-completions API over HTTP: OpenAI itself,
DeepSeek, Mistral, Groq, xAI, OpenRouter, Ollama (/v1), llama.cpp server, LM Studio,
LocalAI and vLLM. They differ only in base URL (config.OPENAI_COMPATIBLE_BASE_URLS)
and a few request quirks (``QUIRKS``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2

from ..config import ProviderConfig
from ..errors import RouterError
from . import openai_wire
from .base import BackendModel, CallParams, Completion, EmbeddingResult, StreamPiece, checked_model
from .http import (
    HTTPBackend,
    accepted_failure,
    embedding_response_limit,
    iter_lines,
    iter_sse,
    loads_object,
    malformed,
)

log = logging.getLogger(__name__)

KNOWN_FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}

# A Responses API body's fields the router decides (or hoosh keeps to itself): the
# provider never sees hoosh's response ids, stores nothing, and runs nothing in the background.
_RESPONSES_DROPPED = ("previous_response_id", "background", "pool", "stream_options")
_RESPONSES_TERMINAL = ("response.completed", "response.incomplete")


@dataclass(frozen=True, slots=True)
class Quirks:
    stream_options: bool = True  # accepts stream_options.include_usage
    seed_field: str = "seed"


QUIRKS: dict[str, Quirks] = {
    # Mistral's API rejects unknown fields and names the seed random_seed.
    "mistral": Quirks(stream_options=False, seed_field="random_seed"),
}


class OpenAICompatibleBackend(HTTPBackend):
    """One pooled HTTP client per provider, built once (inside the running loop)."""

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {})
        self._quirks = QUIRKS.get(config.type, Quirks())
        # The Responses API is forwarded to this provider's /responses (see ResponsesBackend).
        self.responses_native = config.responses_api == "native"

    async def probe(self) -> None:
        await self._probe("/models")

    async def list_models(self) -> list[BackendModel]:
        try:
            data = orjson.loads(await self._get("/models", 5.0)).get("data", [])
        except (RouterError, orjson.JSONDecodeError, AttributeError) as error:
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

    def _body(self, request: router_pb2.ChatRequest, params: CallParams, *, stream: bool) -> bytes:
        body = openai_wire.request_to_json(
            request,
            checked_model(params.upstream_model),
            params.max_tokens,
            stream=stream,
            stream_options=self._quirks.stream_options,
        )
        if self._quirks.seed_field != "seed" and "seed" in body:
            body[self._quirks.seed_field] = body.pop("seed")
        return orjson.dumps(body)

    async def chat(self, request: router_pb2.ChatRequest, params: CallParams) -> Completion:
        body = self._body(request, params, stream=False)
        content = await self._post("/chat/completions", body, params.request_id, params.timeout)
        try:
            data = orjson.loads(content)
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            finish_reason = choice.get("finish_reason") or "stop"
            message = openai_wire.message_from_json(choice["message"])
            prompt_tokens = int(usage["prompt_tokens"])
            completion_tokens = int(usage["completion_tokens"])
            cached_tokens = _cached_tokens(usage)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
            raise malformed(self.name) from error
        if finish_reason not in KNOWN_FINISH_REASONS:
            raise accepted_failure(f"Provider '{self.name}' sent an unknown finish_reason '{finish_reason}'")
        return Completion(
            message=message,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            model=str(data.get("model") or params.upstream_model),
            system_fingerprint=str(data.get("system_fingerprint") or ""),
            cached_tokens=cached_tokens,
        )

    async def stream(self, request: router_pb2.ChatRequest, params: CallParams) -> AsyncIterator[StreamPiece]:
        body = self._body(request, params, stream=True)
        async with (
            self._stream("/chat/completions", body, params.request_id, params.timeout) as response,
            aclosing(iter_lines(response, self.config.max_event_bytes, self.name)) as lines,
        ):
            done = False
            async for raw_line in lines:
                if not raw_line.startswith(b"data:"):
                    continue
                payload = raw_line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                for piece in self._pieces(payload):
                    yield piece
            if not done:
                raise accepted_failure(f"Provider '{self.name}' ended the stream before [DONE]")

    def _pieces(self, payload: bytes) -> list[StreamPiece]:
        chunk = loads_object(self.name, payload, "stream chunk")
        if "error" in chunk:
            raise accepted_failure(f"Provider '{self.name}' failed mid-stream: {str(chunk['error'])[:300]}")
        pieces = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            piece = StreamPiece()
            if delta.get("content"):
                piece.content = str(delta["content"])
            if delta.get("tool_calls"):
                piece.tool_calls = openai_wire.tool_call_deltas_from_json(delta["tool_calls"])
            # Reasoning streamed beside the answer (DeepSeek, vLLM and others:
            # reasoning_content; OpenRouter, Ollama: reasoning): billed as completion
            # tokens, never sent on to the client.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                piece.hidden_tokens = len(reasoning.encode())
            finish_reason = choice.get("finish_reason")
            if finish_reason:
                if finish_reason not in KNOWN_FINISH_REASONS:
                    raise accepted_failure(f"Provider '{self.name}' sent an unknown finish_reason '{finish_reason}'")
                piece.finish_reason = finish_reason
            pieces.append(piece)
        usage = chunk.get("usage")
        if usage:
            try:
                pieces.append(
                    StreamPiece(
                        prompt_tokens=int(usage["prompt_tokens"]),
                        completion_tokens=int(usage["completion_tokens"]),
                        cached_tokens=_cached_tokens(usage),
                    )
                )
            except (KeyError, TypeError, ValueError) as error:
                raise malformed(self.name, "usage") from error
        return pieces

    # -- the Responses API, natively -----------------------------------------------

    @staticmethod
    def _responses_body(body: dict[str, Any], params: CallParams, *, stream: bool) -> bytes:
        """The Responses API body for this attempt: the upstream model, the budget's
        grant as max_output_tokens, nothing stored upstream, hoosh's own fields left out."""
        out = {key: value for key, value in body.items() if key not in _RESPONSES_DROPPED}
        out["model"] = checked_model(params.upstream_model)
        out["max_output_tokens"] = params.max_tokens
        out["store"] = False
        out["stream"] = stream
        return orjson.dumps(out)

    async def respond(self, body: dict[str, Any], params: CallParams) -> Completion:
        content = await self._post(
            "/responses", self._responses_body(body, params, stream=False), params.request_id, params.timeout
        )
        data = loads_object(self.name, content, "response")
        finish_reason = self._response_finish(data)
        prompt_tokens, completion_tokens, cached_tokens = self._response_usage(data)
        return Completion(
            message=chat_pb2.ChatMessage(role="assistant"),
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            model=str(data.get("model") or params.upstream_model),
            cached_tokens=cached_tokens,
            native=content,
        )

    async def respond_stream(self, body: dict[str, Any], params: CallParams) -> AsyncIterator[StreamPiece]:
        payload = self._responses_body(body, params, stream=True)
        async with (
            self._stream("/responses", payload, params.request_id, params.timeout) as response,
            aclosing(iter_sse(response, self.config.max_event_bytes, self.name)) as events,
        ):
            ended = False
            async for _, data in events:
                piece = self._response_piece(data)
                yield piece
                if piece.finish_reason:
                    ended = True
                    break
            if not ended:
                raise accepted_failure(f"Provider '{self.name}' ended the stream before response.completed")

    def _response_piece(self, data: bytes) -> StreamPiece:
        """One Responses API event as a piece carrying it (``native``), with what hoosh
        counts: text and call deltas (the estimate, the first token), the usage and
        finish of the terminal event. An error event or response.failed raises."""
        event = loads_object(self.name, data)
        kind = event.get("type")
        piece = StreamPiece(native=data)
        try:
            if kind in ("response.output_text.delta", "response.refusal.delta"):
                piece.content = str(event.get("delta") or "")
            elif kind == "response.function_call_arguments.delta":
                piece.tool_calls = [
                    chat_pb2.ToolCallDelta(
                        index=int(event.get("output_index") or 0),
                        function=chat_pb2.FunctionCall(arguments=str(event.get("delta") or "")),
                    )
                ]
            elif kind == "response.output_item.added" and (event.get("item") or {}).get("type") == "function_call":
                item = event["item"]
                piece.tool_calls = [
                    chat_pb2.ToolCallDelta(
                        index=int(event.get("output_index") or 0),
                        id=str(item.get("call_id") or ""),
                        type="function",
                        function=chat_pb2.FunctionCall(
                            name=str(item.get("name") or ""), arguments=str(item.get("arguments") or "")
                        ),
                    )
                ]
            elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
                piece.hidden_tokens = len(str(event.get("delta") or "").encode())
            elif kind in _RESPONSES_TERMINAL:
                response = event.get("response")
                if not isinstance(response, dict):
                    raise malformed(self.name, kind)
                piece.finish_reason = self._response_finish(response)
                piece.prompt_tokens, piece.completion_tokens, piece.cached_tokens = self._response_usage(response)
            elif kind == "error":
                raise accepted_failure(f"Provider '{self.name}' failed mid-stream: {str(event.get('message'))[:300]}")
            elif kind == "response.failed":
                error = (event.get("response") or {}).get("error") or {}
                raise accepted_failure(f"Provider '{self.name}' failed mid-stream: {str(error)[:300]}")
        except (AttributeError, TypeError, ValueError) as error:
            raise malformed(self.name, f"{kind} event") from error
        return piece

    def _response_finish(self, response: dict[str, Any]) -> str:
        """The chat finish reason of a Responses API object (for events and the ledger)."""
        status = response.get("status")
        if status == "completed":
            output = response.get("output") or []
            calls = any(isinstance(item, dict) and item.get("type") == "function_call" for item in output)
            return "tool_calls" if calls else "stop"
        if status == "incomplete":
            reason = (response.get("incomplete_details") or {}).get("reason")
            return "content_filter" if reason == "content_filter" else "length"
        error = response.get("error")
        raise accepted_failure(f"Provider '{self.name}' answered a response with status {status!r}: {str(error)[:300]}")

    def _response_usage(self, response: dict[str, Any]) -> tuple[int, int, int]:
        """(input, output, cached input) tokens of a Responses API object's usage."""
        try:
            usage = response["usage"]
            details = usage.get("input_tokens_details") or {}
            cached = max(0, int(details.get("cached_tokens") or 0))
            return int(usage["input_tokens"]), int(usage["output_tokens"]), cached
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise malformed(self.name, "usage") from error

    async def embed(self, texts: list[str], dimensions: int | None, params: CallParams) -> EmbeddingResult:
        model = checked_model(params.upstream_model)
        body: dict[str, Any] = {"model": model, "input": texts, "encoding_format": "float"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        limit = embedding_response_limit(self.config, len(texts), dimensions)
        content = await self._post("/embeddings", orjson.dumps(body), params.request_id, params.timeout, limit=limit)
        try:
            data = orjson.loads(content)
            items = sorted(data["data"], key=lambda item: int(item.get("index", 0)))
            vectors = [[float(value) for value in item["embedding"]] for item in items]
            usage = data.get("usage") or {}
            prompt_tokens = int(usage["prompt_tokens"]) if "prompt_tokens" in usage else None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise malformed(self.name) from error
        if len(vectors) != len(texts):
            raise malformed(self.name, f"embedding list ({len(vectors)} vectors for {len(texts)} inputs)")
        return EmbeddingResult(
            vectors=vectors, prompt_tokens=prompt_tokens, model=str(data.get("model") or params.upstream_model)
        )


def _cached_tokens(usage: dict[str, Any]) -> int:
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens`` (a part of the prompt tokens)."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return 0
    return max(0, int(details.get("cached_tokens") or 0))
