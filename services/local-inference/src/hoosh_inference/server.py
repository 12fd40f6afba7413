"""gRPC transport for hoosh.inference.v1.InferenceService: converts protobuf
messages to the engine's plain types and engine errors to gRPC statuses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import grpc
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh_common.grpc_errors import error_metadata
from hoosh_common.logs import request_id_var
from hoosh_common.telemetry import extract_context
from opentelemetry import trace

from . import hardware
from .engine import (
    AudioPart,
    ContentPart,
    Engine,
    GenerationRequest,
    ImagePart,
    Message,
    SamplingOptions,
    StreamChunk,
    TextPart,
    Tool,
    ToolCall,
    Usage,
)
from .errors import (
    EngineUnavailable,
    InferenceError,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("hoosh.inference")

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name

_STATUS: tuple[tuple[type[InferenceError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailable, grpc.StatusCode.UNAVAILABLE),
)

_TOOL_CHOICE = {
    chat_pb2.TOOL_CHOICE_MODE_NONE: "none",
    chat_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    chat_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
}


def status_for(error: InferenceError) -> grpc.StatusCode:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return grpc.StatusCode.INTERNAL


def trailing_metadata(error: InferenceError) -> tuple[tuple[str, str], ...]:
    """Error details for the caller, the same keys the router uses."""
    return error_metadata(error.error_type, error.code, error.param, error.retry_after)


# -- protobuf -> engine types ------------------------------------------------


def _part(part: chat_pb2.ContentPart) -> ContentPart:
    kind = part.WhichOneof("part")
    if kind == "text":
        return TextPart(part.text)
    if kind == "refusal":
        return TextPart(part.refusal)
    if kind == "image_url":
        return ImagePart(url=part.image_url.url, detail=part.image_url.detail)
    if kind == "input_audio":
        return AudioPart(data=part.input_audio.data, format=part.input_audio.format)
    raise InvalidRequest("A content part has no content.", param="messages")


def to_message(message: chat_pb2.ChatMessage) -> Message:
    kind = message.WhichOneof("content")
    content: str | tuple[ContentPart, ...] | None
    if kind == "text":
        content = message.text
    elif kind == "parts":
        content = tuple(_part(p) for p in message.parts.parts)
    else:
        content = None
    return Message(
        role=message.role,
        content=content,
        name=message.name,
        tool_calls=tuple(
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in message.tool_calls
        ),
        tool_call_id=message.tool_call_id,
    )


def to_sampling(params: chat_pb2.SamplingParams) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        temperature=params.temperature if params.HasField("temperature") else None,
        top_p=params.top_p if params.HasField("top_p") else None,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
        presence_penalty=params.presence_penalty if params.HasField("presence_penalty") else 0.0,
        frequency_penalty=params.frequency_penalty if params.HasField("frequency_penalty") else 0.0,
    )


def to_request(request: inference_pb2.GenerateRequest) -> GenerationRequest:
    tools = tuple(
        Tool(name=t.function.name, description=t.function.description, parameters_json=t.function.parameters_json)
        for t in request.tools
    )
    mode = request.tool_choice.mode
    if mode == chat_pb2.TOOL_CHOICE_MODE_FUNCTION:
        tool_choice = request.tool_choice.function_name
    else:
        # OpenAI: "auto" when tools are present, "none" otherwise.
        tool_choice = _TOOL_CHOICE.get(mode, "auto" if tools else "none")
    return GenerationRequest(
        model=request.model,
        messages=tuple(to_message(m) for m in request.messages),
        sampling=to_sampling(request.sampling),
        request_id=request.request_id,
        tools=tools,
        tool_choice=tool_choice,
    )


def _usage(usage: Usage) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _stream_response(chunk: StreamChunk) -> inference_pb2.GenerateStreamResponse:
    if chunk.usage is None:
        return inference_pb2.GenerateStreamResponse(text=chunk.text)
    return inference_pb2.GenerateStreamResponse(
        text=chunk.text, finish_reason=chunk.finish_reason or "", usage=_usage(chunk.usage)
    )


# -- servicer ----------------------------------------------------------------


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """Serves one loaded engine. Long-lived objects come in through the constructor."""

    def __init__(self, engine: Engine, probe_hardware: Callable[[], hardware.HardwareInfo] = hardware.probe) -> None:
        self._engine = engine
        self._probe_hardware = probe_hardware

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        self._bind_request_id(request.request_id, context)
        span = tracer.start_span(
            "hoosh.inference.generate",
            context=extract_context(_metadata_pairs(context)),
            attributes={"hoosh.model": request.model, "hoosh.engine": self._engine.name},
        )
        try:
            result = await self._engine.generate(to_request(request))
            span.set_attribute("hoosh.completion_tokens", result.usage.completion_tokens)
        except InferenceError as error:
            span.set_attribute("hoosh.error_code", error.code)
            await _abort(context, error)
            raise  # unreachable: abort raises
        finally:
            span.end()
        return inference_pb2.GenerateResponse(
            text=result.text, finish_reason=result.finish_reason, usage=_usage(result.usage), model=result.model
        )

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        self._bind_request_id(request.request_id, context)
        span = tracer.start_span(
            "hoosh.inference.generate_stream",
            context=extract_context(_metadata_pairs(context)),
            attributes={"hoosh.model": request.model, "hoosh.engine": self._engine.name},
        )
        try:
            # aclosing: when the client goes away (this task is cancelled) the engine
            # stream is closed at once, which stops the generation at the next token.
            async with aclosing(self._engine.stream(to_request(request))) as chunks:
                async for chunk in chunks:
                    yield _stream_response(chunk)
        except InferenceError as error:
            span.set_attribute("hoosh.error_code", error.code)
            await _abort(context, error)
        finally:
            span.end()

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.LocalModel(id=m.id, engine=m.engine, context_length=m.context_length)
                for m in self._engine.models()
            ]
        )

    async def CountTokens(
        self, request: inference_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.CountTokensResponse:
        try:
            messages = tuple(to_message(m) for m in request.messages)
            count = await self._engine.count_tokens(request.model, messages)
        except InferenceError as error:
            await _abort(context, error)
            raise  # unreachable: abort raises
        return inference_pb2.CountTokensResponse(prompt_tokens=count)

    async def GetHardware(
        self, request: inference_pb2.GetHardwareRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetHardwareResponse:
        info = await asyncio.to_thread(self._probe_hardware)
        return inference_pb2.GetHardwareResponse(
            accelerators=[
                inference_pb2.Accelerator(
                    name=a.name, memory_total_bytes=a.memory_total_bytes, memory_free_bytes=a.memory_free_bytes
                )
                for a in info.accelerators
            ],
            cpu_count=info.cpu_count,
        )

    @staticmethod
    def _bind_request_id(request_id: str, context: grpc.aio.ServicerContext) -> None:
        # Each RPC runs in its own task, so this only tags this request's logs.
        if not request_id:
            request_id = dict(_metadata_pairs(context)).get("x-request-id", "")
        request_id_var.set(request_id)


def _metadata_pairs(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    return [(k, v) for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)]


async def _abort(context: grpc.aio.ServicerContext, error: InferenceError) -> None:
    status = status_for(error)
    log.info(
        "request refused" if status != grpc.StatusCode.INTERNAL else "request failed",
        extra={"code": error.code, "status": status.name},
    )
    await context.abort(status, error.message, trailing_metadata=trailing_metadata(error))
