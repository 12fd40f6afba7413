"""gRPC transport for hoosh.inference.v1.InferenceService: converts protobuf
messages to the engine's plain types and engine errors to gRPC statuses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractContextManager, aclosing, nullcontext
from contextvars import Token
from typing import Any

import grpc
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh_common.grpc_errors import RETRY_AFTER, error_metadata
from hoosh_common.hardware import hardware_message
from hoosh_common.logs import request_id_var
from hoosh_common.metrics import OTHER
from hoosh_common.telemetry import exporting, extract_context
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue

from . import hardware, metrics
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
    collect,
)
from .errors import (
    EngineUnavailable,
    InferenceError,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
)
from .load import LoadMonitor

log = logging.getLogger(__name__)
tracer = trace.get_tracer("hoosh.inference")

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# Generate and GenerateStream take chat messages: the conventions' "chat" operation.
OPERATION = "chat"

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


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Serves one loaded engine. Long-lived objects come in through the constructor."""

    def __init__(
        self,
        engine: Engine,
        probe_hardware: Callable[[], hardware.HostFacts] = hardware.probe,
        load: LoadMonitor | None = None,
    ) -> None:
        """``load``: the monitor GetStatus answers from (default: overloaded once the
        engine's queue is at ``max_queue``, or 64; no GPU memory floor)."""
        self._engine = engine
        self._probe_hardware = probe_hardware
        self._load = load or LoadMonitor(engine, overload_queue=getattr(engine, "max_queue", None) or 64)
        served = [model.id for model in engine.models()]
        self._model_id = served[0]
        self._served = frozenset(served)
        metrics.watch_engine(engine)

    async def Generate(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[inference_pb2.GenerateRequest, inference_pb2.GenerateResponse],
    ) -> inference_pb2.GenerateResponse:
        self._bind_request_id(request.request_id, context)
        token = _attach_caller_context(context)
        try:
            # The engines' own generate is this same join of their stream; joining the
            # measured stream here times the first token of unary calls too.
            result = await collect(self._generation(request, stream=False), self._model_id)
        except InferenceError as error:
            await _abort(context, error)
            raise  # unreachable: abort raises
        finally:
            _detach(token)
        return inference_pb2.GenerateResponse(
            text=result.text, finish_reason=result.finish_reason, usage=_usage(result.usage), model=result.model
        )

    async def GenerateStream(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[inference_pb2.GenerateRequest, inference_pb2.GenerateStreamResponse],
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        self._bind_request_id(request.request_id, context)
        token = _attach_caller_context(context)
        try:
            # aclosing: when the client goes away (this task is cancelled) the engine
            # stream is closed at once, which stops the generation at the next token.
            async with aclosing(self._generation(request, stream=True)) as chunks:
                async for chunk in chunks:
                    yield _stream_response(chunk)
        except InferenceError as error:
            await _abort(context, error)
        finally:
            _detach(token)

    async def _generation(
        self, request: inference_pb2.GenerateRequest, *, stream: bool
    ) -> AsyncGenerator[StreamChunk, None]:
        """The engine's stream for one request, measured: the metrics, one log line and,
        while spans are exported, a GenAI span under the call's server span."""
        started = time.perf_counter()
        timer = metrics.GenerationTimer(
            OPERATION, metrics.label_for(request.model, self._served, self._model_id), started
        )
        span = self._start_span(request, stream) if exporting() else None
        final: StreamChunk | None = None
        error_type = ""
        try:
            async with aclosing(self._engine.stream(to_request(request))) as chunks:
                async for chunk in chunks:
                    if timer.first is None:
                        timer.first = time.perf_counter()
                    if chunk.usage is not None:
                        final = chunk
                    yield chunk
        except InferenceError as error:
            error_type = error.code
            self._load.record_failure(error)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            error_type = "cancelled"  # the client went away (or, after the final chunk, the join ended)
            raise
        except Exception as error:
            error_type = OTHER
            self._load.record_failure(error)
            log.exception("generation failed")
            raise
        finally:
            self._finish(timer, span, final, error_type or OTHER, stream)

    def _start_span(self, request: inference_pb2.GenerateRequest, stream: bool) -> trace.Span:
        model = request.model or self._model_id
        sampling = request.sampling
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": self._engine.name,
            "gen_ai.request.model": model,
            "gen_ai.request.stream": stream,
        }
        if sampling.HasField("max_tokens"):
            attributes["gen_ai.request.max_tokens"] = sampling.max_tokens
        if sampling.HasField("temperature"):
            attributes["gen_ai.request.temperature"] = sampling.temperature
        if sampling.HasField("top_p"):
            attributes["gen_ai.request.top_p"] = sampling.top_p
        if sampling.HasField("seed"):
            attributes["gen_ai.request.seed"] = sampling.seed
        if sampling.stop:
            attributes["gen_ai.request.stop_sequences"] = list(sampling.stop)
        # The conventions' name; a model this host does not serve stays out of it.
        name = f"{OPERATION} {model}" if model in self._served else OPERATION
        # The current context is the gRPC server span the interceptor started.
        return tracer.start_span(name, kind=trace.SpanKind.INTERNAL, attributes=attributes)

    def _finish(
        self,
        timer: metrics.GenerationTimer,
        span: trace.Span | None,
        final: StreamChunk | None,
        error_type: str,
        stream: bool,
    ) -> None:
        ended = time.perf_counter()
        duration_ms = round((ended - timer.started) * 1000, 1)
        # The final chunk reached the caller: the generation is done, whatever closed the stream.
        if final is not None and final.usage is not None:
            usage = final.usage
            timer.finished(ended, usage.prompt_tokens, usage.completion_tokens)
            first_ms = round(((timer.first or ended) - timer.started) * 1000, 1)
            if span is not None:
                span.set_attributes(
                    {
                        "gen_ai.response.model": self._model_id,
                        "gen_ai.response.finish_reasons": [final.finish_reason or "stop"],
                        "gen_ai.usage.input_tokens": usage.prompt_tokens,
                        "gen_ai.usage.output_tokens": usage.completion_tokens,
                    }
                )
            with _current(span):
                log.info(
                    "generation finished",
                    extra={
                        "model": self._model_id,
                        "engine": self._engine.name,
                        "stream": stream,
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "finish_reason": final.finish_reason,
                        "duration_ms": duration_ms,
                        "time_to_first_token_ms": first_ms,
                    },
                )
        else:
            timer.failed(ended, error_type)
            if span is not None:
                span.set_attribute("error.type", error_type)
                span.set_status(trace.Status(trace.StatusCode.ERROR))
            if error_type == "cancelled":
                with _current(span):
                    log.info("generation cancelled", extra={"model": timer.model, "duration_ms": duration_ms})
        if span is not None:
            span.end()

    async def ListModels(
        self,
        request: inference_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[inference_pb2.ListModelsRequest, inference_pb2.ListModelsResponse],
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.LocalModel(id=m.id, engine=m.engine, context_length=m.context_length)
                for m in self._engine.models()
            ]
        )

    async def CountTokens(
        self,
        request: inference_pb2.CountTokensRequest,
        context: grpc.aio.ServicerContext[inference_pb2.CountTokensRequest, inference_pb2.CountTokensResponse],
    ) -> inference_pb2.CountTokensResponse:
        try:
            messages = tuple(to_message(m) for m in request.messages)
            count = await self._engine.count_tokens(request.model, messages)
        except InferenceError as error:
            await _abort(context, error)
            raise  # unreachable: abort raises
        return inference_pb2.CountTokensResponse(prompt_tokens=count)

    async def GetHardware(
        self,
        request: inference_pb2.GetHardwareRequest,
        context: grpc.aio.ServicerContext[inference_pb2.GetHardwareRequest, inference_pb2.GetHardwareResponse],
    ) -> inference_pb2.GetHardwareResponse:
        facts = await asyncio.to_thread(self._probe_hardware)
        return hardware_message(facts, inference_pb2.GetHardwareResponse)

    async def GetStatus(
        self,
        request: inference_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[inference_pb2.GetStatusRequest, inference_pb2.GetStatusResponse],
    ) -> inference_pb2.GetStatusResponse:
        status = self._load.status()
        if status.refusing:
            # When to ask again, as an error says it (GetStatusResponse has no field for it):
            # the rest of an out-of-memory hold, not just the next second.
            context.set_trailing_metadata(((RETRY_AFTER, str(status.retry_after_seconds)),))
        return inference_pb2.GetStatusResponse(
            overloaded=status.overloaded,
            out_of_memory=status.out_of_memory,
            reason=status.reason,
            queue_depth=status.queue_depth,
            overload_queue=status.overload_queue,
            active_requests=status.active_requests,
        )

    @staticmethod
    def _bind_request_id(request_id: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Each RPC runs in its own task, so this only tags this request's logs.
        if not request_id:
            request_id = dict(_metadata_pairs(context)).get("x-request-id", "")
        request_id_var.set(request_id)


def _attach_caller_context(context: grpc.aio.ServicerContext[Any, Any]) -> Token[Context] | None:
    """Make the caller's trace current, so this call's log lines carry its trace id.
    While spans are exported the interceptor's server span is current already."""
    if exporting():
        return None
    return otel_context.attach(extract_context(_metadata_pairs(context)))


def _detach(token: Token[Context] | None) -> None:
    if token is not None:
        otel_context.detach(token)


def _current(span: trace.Span | None) -> AbstractContextManager[object]:
    """``span`` as the current one (for a log line's span id), or nothing."""
    return trace.use_span(span, end_on_exit=False) if span is not None else nullcontext()


def _metadata_pairs(context: grpc.aio.ServicerContext[Any, Any]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: InferenceError) -> None:
    status = status_for(error)
    log.info(
        "request refused" if status != grpc.StatusCode.INTERNAL else "request failed",
        extra={"code": error.code, "status": status.name},
    )
    await context.abort(status, error.message, trailing_metadata=trailing_metadata(error))
