"""Google's Gemini API (``models/{model}:generateContent`` and
``:streamGenerateContent?alt=sse``), translated both ways.

OpenAI -> Gemini: system/developer messages become ``systemInstruction``; roles map
user -> ``user`` and assistant -> ``model``; assistant ``tool_calls`` become
``functionCall`` parts and ``tool`` messages ``functionResponse`` parts (named after
the call they answer); tools become ``functionDeclarations``; sampling goes into
``generationConfig``. Gemini -> OpenAI: text and ``functionCall`` parts, finish
reasons and ``usageMetadata``. The stream has no end marker: a stream that ends
without a ``finishReason`` was cut.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2

from ..config import ProviderConfig
from ..errors import InvalidRequest, RouterError
from .base import BackendModel, CallParams, Completion, EmbeddingResult, StreamPiece, checked_model
from .http import (
    HTTPBackend,
    accepted_failure,
    arguments_object,
    embedding_response_limit,
    iter_sse,
    loads_object,
    malformed,
    parse_data_url,
    path_segment,
)

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "LANGUAGE": "stop",
    "OTHER": "stop",
    "IMAGE_OTHER": "stop",
    "NO_IMAGE": "stop",
    "MALFORMED_FUNCTION_CALL": "stop",
    "UNEXPECTED_TOOL_CALL": "stop",
    "TOO_MANY_TOOL_CALLS": "stop",
}

# JSON-Schema keywords Gemini's OpenAPI-subset schema rejects.
_UNSUPPORTED_SCHEMA_KEYS = {"$schema", "additionalProperties", "strict", "$id", "$comment"}

_AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mp3"}


def finish_reason(provider: str, reason: str, has_tool_calls: bool) -> str:
    try:
        mapped = FINISH_REASONS[reason]
    except KeyError:
        raise accepted_failure(f"Provider '{provider}' sent an unknown finishReason '{reason}'") from None
    return "tool_calls" if mapped == "stop" and has_tool_calls else mapped


# Resource collections a model name may already name (``models/gemini-2.0-flash``).
_COLLECTIONS = ("models/", "tunedModels/")


def _resource(model: str) -> tuple[str, str]:
    """The model's collection (``models/``, or ``tunedModels/``) and id."""
    model = checked_model(model)
    for collection in _COLLECTIONS:
        if model.startswith(collection):
            return collection, model.removeprefix(collection)
    return "models/", model


def _model_name(model: str) -> str:
    """The model's resource name, as a request body names it: ``models/<id>``."""
    collection, model_id = _resource(model)
    return collection + model_id


def _model_path(model: str) -> str:
    """The model's resource name as the URL path it is put in, the id one
    percent-encoded segment: no model id (a checked one has no ``..`` segment, ``?`` or
    space, but may have ``/`` or ``:``) can add a path segment, start a query or name
    another method."""
    collection, model_id = _resource(model)
    return collection + path_segment(model_id)


# --------------------------------------------------------------------------- request


def _clean_schema(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _clean_schema(item) for key, item in value.items() if key not in _UNSUPPORTED_SCHEMA_KEYS}
    if isinstance(value, list):
        return [_clean_schema(item) for item in value]
    return value


def _text_of(message: chat_pb2.ChatMessage) -> str:
    which = message.WhichOneof("content")
    if which == "text":
        return message.text
    if which == "parts":
        return "".join(part.text for part in message.parts.parts if part.WhichOneof("part") == "text")
    return ""


def _parts(message: chat_pb2.ChatMessage) -> list[dict[str, Any]]:
    which = message.WhichOneof("content")
    if which == "text":
        return [{"text": message.text}] if message.text else []
    parts: list[dict[str, Any]] = []
    if which == "parts":
        for part in message.parts.parts:
            kind = part.WhichOneof("part")
            if kind == "text" and part.text:
                parts.append({"text": part.text})
            elif kind == "refusal" and part.refusal:
                parts.append({"text": part.refusal})
            elif kind == "image_url":
                data_url = parse_data_url(part.image_url.url)
                if data_url is not None:
                    parts.append({"inlineData": {"mimeType": data_url[0], "data": data_url[1]}})
                else:
                    parts.append({"fileData": {"fileUri": part.image_url.url, "mimeType": "image/jpeg"}})
            elif kind == "input_audio":
                mime = _AUDIO_TYPES.get(part.input_audio.format, "audio/wav")
                parts.append({"inlineData": {"mimeType": mime, "data": part.input_audio.data}})
    return parts


def _function_response(text: str) -> dict[str, Any]:
    """Gemini wants an object: a JSON object result as is, anything else wrapped."""
    try:
        value = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        value = text
    return value if isinstance(value, dict) else {"result": value}


def request_to_gemini(request: router_pb2.ChatRequest, max_tokens: int) -> dict[str, Any]:
    """The body to POST to {base_url}/models/{model}:generateContent (or the streaming twin)."""
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for message in request.messages:
        role = message.role
        if role in ("system", "developer"):
            text = _text_of(message)
            if text:
                system.append(text)
            continue
        if role == "tool":
            name = call_names.get(message.tool_call_id)
            if name is None:
                raise InvalidRequest(
                    f"tool message answers unknown tool_call_id '{message.tool_call_id}'", param="messages"
                )
            response = {"name": name, "response": _function_response(_text_of(message))}
            target_role, parts = "user", [{"functionResponse": response}]
        elif role == "assistant":
            parts = _parts(message)
            for call in message.tool_calls:
                call_names[call.id] = call.function.name
                function_call = {"name": call.function.name, "args": arguments_object(call.function.arguments)}
                parts.append({"functionCall": function_call})
            target_role = "model"
        else:
            target_role, parts = "user", _parts(message)
        if not parts:
            continue
        if contents and contents[-1]["role"] == target_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": target_role, "parts": parts})
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    config: dict[str, Any] = {"maxOutputTokens": max_tokens}
    sampling = request.sampling
    for source, target in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if sampling.HasField(source):
            config[target] = getattr(sampling, source)
    if sampling.stop:
        config["stopSequences"] = list(sampling.stop)
    if request.response_format_json:
        response_format = orjson.loads(request.response_format_json)
        if response_format.get("type") in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
        schema = (response_format.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    body["generationConfig"] = config
    if request.tools:
        declarations = []
        for tool in request.tools:
            function = tool.function
            declaration: dict[str, Any] = {"name": function.name}
            if function.description:
                declaration["description"] = function.description
            if function.parameters_json:
                declaration["parameters"] = _clean_schema(orjson.loads(function.parameters_json))
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
        mode = request.tool_choice.mode
        calling: dict[str, Any] | None = None
        if mode == chat_pb2.TOOL_CHOICE_MODE_NONE:
            calling = {"mode": "NONE"}
        elif mode == chat_pb2.TOOL_CHOICE_MODE_AUTO:
            calling = {"mode": "AUTO"}
        elif mode == chat_pb2.TOOL_CHOICE_MODE_REQUIRED:
            calling = {"mode": "ANY"}
        elif mode == chat_pb2.TOOL_CHOICE_MODE_FUNCTION:
            calling = {"mode": "ANY", "allowedFunctionNames": [request.tool_choice.function_name]}
        if calling is not None:
            body["toolConfig"] = {"functionCallingConfig": calling}
    return body


# --------------------------------------------------------------------------- response


def _usage(data: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) tokens; thinking counts as completion, the cached
    content as a part of the prompt."""
    usage = data.get("usageMetadata")
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("promptTokenCount") or 0)
    completion = int(usage.get("candidatesTokenCount") or 0) + int(usage.get("thoughtsTokenCount") or 0)
    return prompt, completion, max(0, int(usage.get("cachedContentTokenCount") or 0))


def _call_id(call: dict[str, Any]) -> str:
    return str(call.get("id") or f"call_{uuid.uuid4().hex[:24]}")


def completion_from_gemini(provider: str, data: dict[str, Any], fallback_model: str) -> Completion:
    try:
        candidates = data.get("candidates") or []
        message = chat_pb2.ChatMessage(role="assistant")
        if not candidates:
            # The prompt itself was blocked: no candidate, a promptFeedback.blockReason.
            if (data.get("promptFeedback") or {}).get("blockReason"):
                message.text = ""
                blocked = _usage(data) or (0, 0, 0)
                return Completion(message, "content_filter", blocked[0], blocked[1], fallback_model)
            raise malformed(provider)
        candidate = candidates[0]
        texts: list[str] = []
        for part in (candidate.get("content") or {}).get("parts") or []:
            if "functionCall" in part:
                call = part["functionCall"]
                message.tool_calls.add(
                    id=_call_id(call),
                    type="function",
                    function=chat_pb2.FunctionCall(
                        name=str(call["name"]), arguments=orjson.dumps(call.get("args") or {}).decode()
                    ),
                )
            elif "text" in part and not part.get("thought"):
                texts.append(str(part["text"]))
        if texts or not message.tool_calls:
            message.text = "".join(texts)
        usage = _usage(data)
        if usage is None:
            raise malformed(provider, "response (no usageMetadata)")
        reason = str(candidate.get("finishReason") or "STOP")
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise malformed(provider) from error
    return Completion(
        message=message,
        finish_reason=finish_reason(provider, reason, bool(message.tool_calls)),
        prompt_tokens=usage[0],
        completion_tokens=usage[1],
        model=str(data.get("modelVersion") or fallback_model),
        cached_tokens=usage[2],
    )


class GeminiStreamTranslator:
    """streamGenerateContent chunks -> stream pieces; ``done`` once a finishReason arrived."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self._tool_calls = 0
        self._usage: tuple[int, int, int] | None = None
        self._hidden = 0  # hidden-reasoning tokens surfaced so far (a bound)

    def feed(self, chunk: dict[str, Any]) -> list[StreamPiece]:
        try:
            return self._feed(chunk)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise malformed(self.provider, "stream chunk") from error

    def _feed(self, chunk: dict[str, Any]) -> list[StreamPiece]:
        if "error" in chunk:
            error = chunk["error"] or {}
            raise accepted_failure(
                f"Provider '{self.provider}' failed mid-stream: {str(error.get('message'))[:300]}",
                retryable=int(error.get("code") or 0) in (429, 500, 503, 504),
            )
        usage = _usage(chunk)
        if usage is not None:
            self._usage = usage  # cumulative: the last one wins
        pieces: list[StreamPiece] = []
        # Thinking shows as thought parts (summaries, with includeThoughts) and as the
        # cumulative thoughtsTokenCount of a chunk's usage: surfaced as hidden tokens, the
        # larger of the two so far, so a stream cut before its end still pays for it.
        metadata = chunk.get("usageMetadata")
        thoughts = int(metadata.get("thoughtsTokenCount") or 0) if isinstance(metadata, dict) else 0
        candidates = chunk.get("candidates") or []
        if not candidates:
            if (chunk.get("promptFeedback") or {}).get("blockReason"):
                self.done = True
                pieces.append(StreamPiece(finish_reason="content_filter"))
                pieces.append(self._usage_piece())
            return pieces
        candidate = candidates[0]
        for part in (candidate.get("content") or {}).get("parts") or []:
            if "functionCall" in part:
                call = part["functionCall"]
                delta = chat_pb2.ToolCallDelta(
                    index=self._tool_calls,
                    id=_call_id(call),
                    type="function",
                    function=chat_pb2.FunctionCall(
                        name=str(call["name"]), arguments=orjson.dumps(call.get("args") or {}).decode()
                    ),
                )
                self._tool_calls += 1
                pieces.append(StreamPiece(tool_calls=[delta]))
            elif part.get("text"):
                if part.get("thought"):
                    # A thought summary: generated and billed, never shown (bound: its bytes).
                    hidden = len(str(part["text"]).encode())
                    self._hidden += hidden
                    pieces.append(StreamPiece(hidden_tokens=hidden))
                else:
                    pieces.append(StreamPiece(content=str(part["text"])))
        if thoughts > self._hidden:
            pieces.append(StreamPiece(hidden_tokens=thoughts - self._hidden))
            self._hidden = thoughts
        reason = candidate.get("finishReason")
        if reason:
            self.done = True
            pieces.append(StreamPiece(finish_reason=finish_reason(self.provider, str(reason), self._tool_calls > 0)))
            pieces.append(self._usage_piece())
        return pieces

    def _usage_piece(self) -> StreamPiece:
        if self._usage is None:
            return StreamPiece()
        return StreamPiece(prompt_tokens=self._usage[0], completion_tokens=self._usage[1], cached_tokens=self._usage[2])


# --------------------------------------------------------------------------- backend


class GeminiBackend(HTTPBackend):
    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, {"x-goog-api-key": config.api_key} if config.api_key else {})

    async def probe(self) -> None:
        await self._probe("/models", {"pageSize": 1})

    async def list_models(self) -> list[BackendModel]:
        try:
            data = orjson.loads(await self._get("/models", 5.0, {"pageSize": 1000})).get("models", [])
        except (RouterError, orjson.JSONDecodeError, AttributeError) as error:
            log.warning("listing models failed", extra={"provider": self.name, "error": str(error)})
            return []
        return [
            BackendModel(id=str(item["name"]).removeprefix("models/"), owned_by="google")
            for item in data
            if isinstance(item, dict) and "name" in item
        ]

    async def chat(self, request: router_pb2.ChatRequest, params: CallParams) -> Completion:
        body = orjson.dumps(request_to_gemini(request, params.max_tokens))
        path = f"/{_model_path(params.upstream_model)}:generateContent"
        content = await self._post(path, body, params.request_id, params.timeout)
        return completion_from_gemini(self.name, loads_object(self.name, content, "response"), params.upstream_model)

    async def stream(self, request: router_pb2.ChatRequest, params: CallParams) -> AsyncIterator[StreamPiece]:
        body = orjson.dumps(request_to_gemini(request, params.max_tokens))
        path = f"/{_model_path(params.upstream_model)}:streamGenerateContent?alt=sse"
        translator = GeminiStreamTranslator(self.name)
        async with (
            self._stream(path, body, params.request_id, params.timeout) as response,
            aclosing(iter_sse(response, self.config.max_event_bytes, self.name)) as events,
        ):
            async for _event, data in events:
                for piece in translator.feed(loads_object(self.name, data, "stream chunk")):
                    yield piece
        if not translator.done:
            raise accepted_failure(f"Provider '{self.name}' ended the stream without a finishReason")

    async def embed(self, texts: list[str], dimensions: int | None, params: CallParams) -> EmbeddingResult:
        name, path = _model_name(params.upstream_model), _model_path(params.upstream_model)
        requests = []
        for text in texts:
            item: dict[str, Any] = {"model": name, "content": {"parts": [{"text": text}]}}
            if dimensions is not None:
                item["outputDimensionality"] = dimensions
            requests.append(item)
        body = orjson.dumps({"requests": requests})
        limit = embedding_response_limit(self.config, len(texts), dimensions)
        content = await self._post(f"/{path}:batchEmbedContents", body, params.request_id, params.timeout, limit=limit)
        data = loads_object(self.name, content, "response")
        try:
            vectors = [[float(value) for value in item["values"]] for item in data["embeddings"]]
            usage = data.get("usageMetadata") or {}
            prompt_tokens = int(usage["promptTokenCount"]) if "promptTokenCount" in usage else None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise malformed(self.name) from error
        if len(vectors) != len(texts):
            raise malformed(self.name, f"embedding list ({len(vectors)} vectors for {len(texts)} inputs)")
        return EmbeddingResult(vectors=vectors, prompt_tokens=prompt_tokens, model=params.upstream_model)
