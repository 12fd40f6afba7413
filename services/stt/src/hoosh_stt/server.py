"""gRPC transport for the STT service: thin, typed, maps SttError to statuses."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractContextManager, nullcontext

import grpc
from hoosh.stt.v1 import stt_pb2, stt_pb2_grpc
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_common import hardware
from hoosh_common.logs import request_id_var
from hoosh_common.metrics import OTHER
from hoosh_common.telemetry import exporting, extract_context
from hoosh_metering.limits import KeyLimits
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from . import metrics
from .errors import ClientCancelled, EngineFailure, InvalidRequest, SttError
from .transcription import DEFAULT_POOL, TranscriptionRequest, TranscriptionResult, TranscriptionService

SERVICE_NAME = stt_pb2.DESCRIPTOR.services_by_name["SttService"].full_name
# Initial metadata sent once a transcription holds its place in the queue, before its
# upload is read: a client streaming a long upload knows early it will not be refused.
ADMITTED_METADATA = (("hoosh-stt-admitted", "1"),)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("hoosh.stt")
OPERATION = "transcription"  # gen_ai.operation.name, and the span name's first word


def _request_id(options: stt_pb2.TranscribeOptions, metadata: Iterable[tuple[str, str | bytes]]) -> str:
    if options.request_id:
        return options.request_id
    for key, value in metadata:
        if key == "x-request-id" and isinstance(value, str) and value:
            return value
    return uuid.uuid4().hex


def key_limits(caller: tenancy_pb2.Caller) -> KeyLimits | None:
    """The caller's own limits (0 = unlimited); None when it has none (no Redis call at all)."""
    if not (caller.rpm or caller.tpm or caller.max_concurrency):
        return None
    return KeyLimits(rpm=caller.rpm or None, tpm=caller.tpm or None, max_concurrency=caller.max_concurrency or None)


def to_request(options: stt_pb2.TranscribeOptions) -> TranscriptionRequest:
    """The domain request from the wire options."""
    return TranscriptionRequest(
        model=options.model,
        language=options.language,
        prompt=options.prompt,
        temperature=options.temperature if options.HasField("temperature") else None,
        word_timestamps=stt_pb2.TIMESTAMP_GRANULARITY_WORD in options.timestamp_granularities,
        pool=options.pool,
        user=options.user,
        filename=options.filename,
        key_id=options.caller.key_id,
        limits=key_limits(options.caller),
    )


def to_response(result: TranscriptionResult, request_id: str) -> stt_pb2.TranscribeResponse:
    transcript = result.transcript
    return stt_pb2.TranscribeResponse(
        request_id=request_id,
        model=result.model,
        text=transcript.text,
        language=transcript.language,
        language_name=result.language_name,
        duration=result.duration,
        segments=[
            stt_pb2.Segment(
                id=s.id,
                seek=s.seek,
                start=s.start,
                end=s.end,
                text=s.text,
                tokens=s.tokens,
                temperature=s.temperature,
                avg_logprob=s.avg_logprob,
                compression_ratio=s.compression_ratio,
                no_speech_prob=s.no_speech_prob,
            )
            for s in transcript.segments
        ],
        words=[
            stt_pb2.Word(word=w.word, start=w.start, end=w.end, probability=w.probability) for w in transcript.words
        ],
        charged_tokens=result.charged_tokens,
        cost_usd_micros=result.cost_usd_micros,
    )


async def _audio(requests: AsyncIterator[stt_pb2.TranscribeRequest]) -> AsyncIterator[bytes]:
    """The audio bytes of every message after the first; a second options message is an error."""
    async for message in requests:
        if message.WhichOneof("payload") == "options":
            raise InvalidRequest("Only the first message of a transcription may carry options.")
        if message.audio:
            yield message.audio


class SttServicer(stt_pb2_grpc.SttServiceServicer):
    def __init__(self, service: TranscriptionService) -> None:
        self._service = service
        self._created = int(time.time())  # when these models were loaded
        self._served = frozenset(model.id for model in service.models())

    async def Transcribe(
        self,
        request_iterator: AsyncIterator[stt_pb2.TranscribeRequest],
        context: grpc.aio.ServicerContext[stt_pb2.TranscribeRequest, stt_pb2.TranscribeResponse],
    ) -> stt_pb2.TranscribeResponse:
        started = time.perf_counter()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "options":
            error = InvalidRequest("The first message of a transcription must carry its options.")
            metrics.failed(OTHER, error.error_code)
            context.set_trailing_metadata(error.trailing_metadata())
            await context.abort(error.status, error.message)
        assert first is not None  # abort raised otherwise
        options = first.options
        metadata = context.invocation_metadata() or ()
        request_id = _request_id(options, metadata)
        request_id_var.set(request_id)
        model = metrics.label_for(options.model, self._served)

        async def admitted() -> None:
            await context.send_initial_metadata(ADMITTED_METADATA)

        # Not exporting: the caller's trace becomes current (log lines and events carry
        # it). Exporting: extract_context is the interceptor's server span, already current.
        token = otel_context.attach(extract_context(metadata))
        failure: SttError | None = None
        try:
            with self._span(options) as span:
                try:
                    result = await self._service.transcribe(
                        to_request(options), _audio(request_iterator), request_id, admitted
                    )
                except SttError as error:
                    failure = error
                    self._failed(span, model, options, error.error_code, started)
                except asyncio.CancelledError:  # the client went away
                    self._failed(span, model, options, ClientCancelled.error_code, started)
                    raise
                except Exception:
                    self._failed(span, model, options, EngineFailure.error_code, started)
                    raise
                else:
                    self._succeeded(span, model, options, result, started)
            if failure is not None:
                context.set_trailing_metadata(failure.trailing_metadata())
                await context.abort(failure.status, failure.message)
            return to_response(result, request_id)
        finally:
            otel_context.detach(token)

    def _span(self, options: stt_pb2.TranscribeOptions) -> AbstractContextManager[trace.Span | None]:
        """A GenAI span for the transcription while spans are exported; nothing otherwise
        (the hot path pays no span it would not export)."""
        if not exporting():
            return nullcontext()
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": self._service.engine_name,
            "gen_ai.request.model": options.model,
            "hoosh.pool": options.pool or DEFAULT_POOL,
        }
        if options.caller.key_id:
            attributes["hoosh.key_id"] = options.caller.key_id
        # The conventions' name; a model this host does not serve stays out of it.
        name = f"{OPERATION} {options.model}" if options.model in self._served else OPERATION
        return tracer.start_as_current_span(name, kind=trace.SpanKind.INTERNAL, attributes=attributes)

    def _succeeded(
        self,
        span: trace.Span | None,
        model: str,
        options: stt_pb2.TranscribeOptions,
        result: TranscriptionResult,
        started: float,
    ) -> None:
        elapsed = time.perf_counter() - started
        metrics.succeeded(model, result.duration, elapsed, result.cost_usd_micros)
        if span is not None:
            span.set_attributes(
                {
                    "gen_ai.response.model": result.model,
                    "hoosh.audio_seconds": result.duration,
                    "hoosh.charged_tokens": result.charged_tokens,
                    "hoosh.cost_usd_micros": result.cost_usd_micros,
                    "hoosh.pool_chain": list(result.pool_chain),
                }
            )
        log.info(
            "transcription finished",
            extra={
                "model": result.model,
                "status": metrics.OK,
                "pool": options.pool or DEFAULT_POOL,
                "key_id": options.caller.key_id,
                "audio_seconds": round(result.duration, 3),
                "charged_tokens": result.charged_tokens,
                "cost_usd_micros": result.cost_usd_micros,
                "duration_ms": round(elapsed * 1000, 1),
            },
        )

    def _failed(
        self, span: trace.Span | None, model: str, options: stt_pb2.TranscribeOptions, code: str, started: float
    ) -> None:
        metrics.failed(model, code)
        if span is not None:
            span.set_attribute("error.type", code)
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        log.info(
            "transcription finished",
            extra={
                "model": options.model[:128],  # as asked (a refusal may name a model not served)
                "status": code,
                "pool": options.pool or DEFAULT_POOL,
                "key_id": options.caller.key_id,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )

    async def ListModels(
        self,
        request: stt_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[stt_pb2.ListModelsRequest, stt_pb2.ListModelsResponse],
    ) -> stt_pb2.ListModelsResponse:
        return stt_pb2.ListModelsResponse(
            models=[
                stt_pb2.Model(id=m.id, owned_by="hoosh", created=self._created, engine=m.engine)
                for m in self._service.models()
            ]
        )

    async def GetHardware(
        self,
        request: stt_pb2.GetHardwareRequest,
        context: grpc.aio.ServicerContext[stt_pb2.GetHardwareRequest, stt_pb2.GetHardwareResponse],
    ) -> stt_pb2.GetHardwareResponse:
        """This host's GPUs, CPUs, memory and container facts (NVML blocks: off the loop)."""
        facts = await asyncio.to_thread(hardware.probe)
        return hardware.hardware_message(facts, stt_pb2.GetHardwareResponse)


def add_to_server(servicer: SttServicer, server: grpc.aio.Server) -> None:
    stt_pb2_grpc.add_SttServiceServicer_to_server(servicer, server)
