"""Anthropic's Messages API (POST /v1/messages), translated both ways.

OpenAI -> Anthropic: system/developer messages are lifted into ``system``;
``max_tokens`` is always sent (Anthropic requires it); assistant ``tool_calls``
become ``tool_use`` blocks and ``tool`` messages become ``tool_result`` blocks in a
user turn; consecutive turns of one role are merged (Anthropic wants them
alternating). Anthropic -> OpenAI: text and ``tool_use`` blocks, stop reasons and
usage (cache reads and writes count as prompt tokens); the SSE stream
(``message_start``, ``content_block_start``/``_delta``/``_stop``, ``message_delta``,
``message_stop``, ``ping``, ``error``) becomes stream pieces.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime
from typing import Any

import orjson
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2

from ..config import ProviderConfig
from ..errors import InvalidRequest, RouterError
from .base import BackendModel, CallParams, Completion, EmbeddingResult, StreamPiece, checked_model
from .http import HTTPBackend, accepted_failure, arguments_object, iter_sse, loads_object, malformed, parse_data_url

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Mid-stream error types that mean "try again" (before any token reached the client).
_RETRYABLE_STREAM_ERRORS = {"overloaded_error", "api_error", "rate_limit_error"}


def finish_reason(provider: str, stop_reason: str | None) -> str:
    if stop_reason is None:
        return "stop"
    try:
        return STOP_REASONS[stop_reason]
    except KeyError:
        raise accepted_failure(f"Provider '{provider}' sent an unknown stop_reason '{stop_reason}'") from None


# --------------------------------------------------------------------------- request


def _text_of(message: chat_pb2.ChatMessage) -> str:
    which = message.WhichOneof("content")
    if which == "text":
        return message.text
    if which == "parts":
        return "".join(part.text for part in message.parts.parts if part.WhichOneof("part") == "text")
    return ""


def _image_block(url: str) -> dict[str, Any]:
    data_url = parse_data_url(url)
    if data_url is not None:
        media_type, data = data_url
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content_blocks(message: chat_pb2.ChatMessage) -> list[dict[str, Any]]:
    which = message.WhichOneof("content")
    if which == "text":
        return [{"type": "text", "text": message.text}] if message.text else []
    blocks: list[dict[str, Any]] = []
    if which == "parts":
        for part in message.parts.parts:
            kind = part.WhichOneof("part")
            if kind == "text" and part.text:
                blocks.append({"type": "text", "text": part.text})
            elif kind == "refusal" and part.refusal:
                blocks.append({"type": "text", "text": part.refusal})
            elif kind == "image_url":
                blocks.append(_image_block(part.image_url.url))
            elif kind == "input_audio":
                raise InvalidRequest("Anthropic models do not accept audio input", param="messages")
    return blocks


def _tools(request: router_pb2.ChatRequest) -> list[dict[str, Any]]:
    tools = []
    for tool in request.tools:
        function = tool.function
        schema = orjson.loads(function.parameters_json) if function.parameters_json else {"type": "object"}
        entry: dict[str, Any] = {"name": function.name, "input_schema": schema}
        if function.description:
            entry["description"] = function.description
        tools.append(entry)
    return tools


def _tool_choice(request: router_pb2.ChatRequest) -> dict[str, Any] | None:
    mode = request.tool_choice.mode
    choice: dict[str, Any] | None = None
    if mode == chat_pb2.TOOL_CHOICE_MODE_NONE:
        choice = {"type": "none"}
    elif mode == chat_pb2.TOOL_CHOICE_MODE_AUTO:
        choice = {"type": "auto"}
    elif mode == chat_pb2.TOOL_CHOICE_MODE_REQUIRED:
        choice = {"type": "any"}
    elif mode == chat_pb2.TOOL_CHOICE_MODE_FUNCTION:
        choice = {"type": "tool", "name": request.tool_choice.function_name}
    if request.HasField("parallel_tool_calls") and not request.parallel_tool_calls and request.tools:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    return choice


def request_to_anthropic(
    request: router_pb2.ChatRequest, upstream_model: str, max_tokens: int, *, stream: bool
) -> dict[str, Any]:
    """The body to POST to {base_url}/v1/messages."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in request.messages:
        role = message.role
        if role in ("system", "developer"):
            text = _text_of(message)
            if text:
                system.append(text)
            continue
        if role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
            text = _text_of(message)
            if text:
                result["content"] = text
            target_role, blocks = "user", [result]
        elif role == "assistant":
            blocks = _content_blocks(message)
            for call in message.tool_calls:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.function.name,
                        "input": arguments_object(call.function.arguments),
                    }
                )
            target_role = "assistant"
        else:
            target_role, blocks = "user", _content_blocks(message)
        if not blocks:
            continue
        if messages and messages[-1]["role"] == target_role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": target_role, "content": blocks})
    body: dict[str, Any] = {"model": upstream_model, "max_tokens": max_tokens, "messages": messages}
    if system:
        body["system"] = "\n\n".join(system)
    sampling = request.sampling
    if sampling.HasField("temperature"):
        body["temperature"] = min(sampling.temperature, 1.0)  # Anthropic's range is 0..1
    if sampling.HasField("top_p"):
        body["top_p"] = sampling.top_p
    if sampling.stop:
        body["stop_sequences"] = list(sampling.stop)
    if request.tools:
        body["tools"] = _tools(request)
    choice = _tool_choice(request)
    if choice is not None and request.tools:
        body["tool_choice"] = choice
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if stream:
        body["stream"] = True
    return body


# --------------------------------------------------------------------------- response


def _cached_tokens(usage: dict[str, Any]) -> int:
    """Prompt tokens read from Anthropic's prompt cache (a part of ``_prompt_tokens``)."""
    return max(0, int(usage.get("cache_read_input_tokens") or 0))


def _prompt_tokens(usage: dict[str, Any]) -> int:
    return (
        int(usage.get("input_tokens") or 0)
        + int(usage.get("cache_creation_input_tokens") or 0)
        + int(usage.get("cache_read_input_tokens") or 0)
    )


def completion_from_anthropic(provider: str, data: dict[str, Any], fallback_model: str) -> Completion:
    """A Messages API response as a Completion (text joined, tool_use -> tool_calls)."""
    try:
        if data.get("type") == "error":
            raise accepted_failure(f"Provider '{provider}' failed: {str(data.get('error'))[:300]}")
        texts: list[str] = []
        message = chat_pb2.ChatMessage(role="assistant")
        for block in data["content"]:
            kind = block.get("type")
            if kind == "text":
                texts.append(str(block["text"]))
            elif kind == "tool_use":
                message.tool_calls.add(
                    id=str(block["id"]),
                    type="function",
                    function=chat_pb2.FunctionCall(
                        name=str(block["name"]), arguments=orjson.dumps(block.get("input") or {}).decode()
                    ),
                )
            # thinking / redacted_thinking / server tool blocks have no OpenAI counterpart
        if texts or not message.tool_calls:
            message.text = "".join(texts)
        usage = data["usage"]
        prompt_tokens = _prompt_tokens(usage)
        completion_tokens = int(usage["output_tokens"])
        cached_tokens = _cached_tokens(usage)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise malformed(provider) from error
    return Completion(
        message=message,
        finish_reason=finish_reason(provider, data.get("stop_reason")),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        model=str(data.get("model") or fallback_model),
        cached_tokens=cached_tokens,
    )


def _hidden_bytes(block: dict[str, Any]) -> int:
    """The bytes of reasoning a block opens with: a ``thinking`` block's text, or a
    ``redacted_thinking`` block's (encrypted) data, which stands for thinking the model did."""
    kind = block.get("type")
    if kind == "thinking":
        return len(str(block.get("thinking") or "").encode())
    if kind == "redacted_thinking":
        return len(str(block.get("data") or "").encode())
    return 0


class AnthropicStreamTranslator:
    """Anthropic SSE events -> stream pieces. ``done`` once ``message_stop`` arrived."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self._tool_ordinal: dict[int, int] = {}  # content block index -> OpenAI tool_calls index
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._completion_tokens = 0

    def feed(self, event: dict[str, Any]) -> list[StreamPiece]:
        try:
            return self._feed(event)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise malformed(self.provider, "stream event") from error

    def _feed(self, event: dict[str, Any]) -> list[StreamPiece]:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event["delta"]
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                return [StreamPiece(content=str(delta["text"]))] if delta["text"] else []
            if delta_type == "input_json_delta":
                ordinal = self._tool_ordinal[int(event["index"])]
                partial = str(delta.get("partial_json") or "")
                if not partial:
                    return []
                call = chat_pb2.ToolCallDelta(index=ordinal, function=chat_pb2.FunctionCall(arguments=partial))
                return [StreamPiece(tool_calls=[call])]
            if delta_type == "thinking_delta":
                # Extended thinking: generated and billed, never shown. Counted (by its
                # bytes) toward what a stream cut before message_stop is charged.
                thinking = str(delta.get("thinking") or "")
                return [StreamPiece(hidden_tokens=len(thinking.encode()))] if thinking else []
            return []  # signature_delta, citations_delta
        if kind == "content_block_start":
            block = event["content_block"]
            if block.get("type") == "tool_use":
                ordinal = len(self._tool_ordinal)
                self._tool_ordinal[int(event["index"])] = ordinal
                call = chat_pb2.ToolCallDelta(
                    index=ordinal,
                    id=str(block["id"]),
                    type="function",
                    function=chat_pb2.FunctionCall(name=str(block["name"]), arguments=""),
                )
                return [StreamPiece(tool_calls=[call])]
            if block.get("type") == "text" and block.get("text"):
                return [StreamPiece(content=str(block["text"]))]
            hidden = _hidden_bytes(block)
            return [StreamPiece(hidden_tokens=hidden)] if hidden else []
        if kind == "message_start":
            usage = event["message"].get("usage") or {}
            self._prompt_tokens = _prompt_tokens(usage)
            self._cached_tokens = _cached_tokens(usage)
            self._completion_tokens = int(usage.get("output_tokens") or 0)
            return []
        if kind == "message_delta":
            usage = event.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self._completion_tokens = int(usage["output_tokens"])  # cumulative
            if usage.get("input_tokens") is not None:
                self._prompt_tokens = _prompt_tokens(usage)
                self._cached_tokens = _cached_tokens(usage)
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            if stop_reason:
                return [StreamPiece(finish_reason=finish_reason(self.provider, stop_reason))]
            return []
        if kind == "message_stop":
            self.done = True
            return [
                StreamPiece(
                    prompt_tokens=self._prompt_tokens,
                    completion_tokens=self._completion_tokens,
                    cached_tokens=self._cached_tokens,
                )
            ]
        if kind == "error":
            error = event.get("error") or {}
            error_type = str(error.get("type") or "")
            raise accepted_failure(
                f"Provider '{self.provider}' failed mid-stream: {error_type}: {str(error.get('message'))[:300]}",
                retryable=error_type in _RETRYABLE_STREAM_ERRORS,
            )
        return []  # ping, content_block_stop, and event types added later


# --------------------------------------------------------------------------- backend


class AnthropicBackend(HTTPBackend):
    def __init__(self, config: ProviderConfig) -> None:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if config.api_key:
            headers["x-api-key"] = config.api_key
        super().__init__(config, headers)

    async def probe(self) -> None:
        await self._probe("/v1/models", {"limit": 1})

    async def list_models(self) -> list[BackendModel]:
        try:
            data = orjson.loads(await self._get("/v1/models", 5.0, {"limit": 1000})).get("data", [])
        except (RouterError, orjson.JSONDecodeError, AttributeError) as error:
            log.warning("listing models failed", extra={"provider": self.name, "error": str(error)})
            return []
        models = []
        for item in data:
            if not isinstance(item, dict) or "id" not in item:
                continue
            created = 0
            try:
                created = int(datetime.fromisoformat(str(item.get("created_at"))).timestamp())
            except ValueError:
                pass
            models.append(BackendModel(id=str(item["id"]), owned_by="anthropic", created=created))
        return models

    def _body(self, request: router_pb2.ChatRequest, params: CallParams, *, stream: bool) -> bytes:
        model = checked_model(params.upstream_model)
        return orjson.dumps(request_to_anthropic(request, model, params.max_tokens, stream=stream))

    async def chat(self, request: router_pb2.ChatRequest, params: CallParams) -> Completion:
        body = self._body(request, params, stream=False)
        content = await self._post("/v1/messages", body, params.request_id, params.timeout)
        return completion_from_anthropic(self.name, loads_object(self.name, content, "response"), params.upstream_model)

    async def stream(self, request: router_pb2.ChatRequest, params: CallParams) -> AsyncIterator[StreamPiece]:
        body = self._body(request, params, stream=True)
        translator = AnthropicStreamTranslator(self.name)
        async with (
            self._stream("/v1/messages", body, params.request_id, params.timeout) as response,
            aclosing(iter_sse(response, self.config.max_event_bytes, self.name)) as events,
        ):
            async for _event, data in events:
                for piece in translator.feed(loads_object(self.name, data)):
                    yield piece
                if translator.done:
                    break
        if not translator.done:
            raise accepted_failure(f"Provider '{self.name}' ended the stream before message_stop")

    async def embed(self, texts: list[str], dimensions: int | None, params: CallParams) -> EmbeddingResult:
        raise InvalidRequest(f"The model '{params.upstream_model}' does not support embeddings", param="model")
