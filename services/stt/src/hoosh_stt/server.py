"""gRPC transport for the STT service: thin, typed, maps SttError to statuses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc
from hoosh.stt.v1 import stt_pb2, stt_pb2_grpc
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_common.logs import request_id_var
from hoosh_common.telemetry import extract_context
from hoosh_metering.limits import KeyLimits
from opentelemetry import context as otel_context
from opentelemetry import trace

from .errors import InvalidRequest, SttError
from .transcription import TranscriptionRequest, TranscriptionResult, TranscriptionService

SERVICE_NAME = stt_pb2.DESCRIPTOR.services_by_name["SttService"].full_name
# Initial metadata sent once a transcription holds its place in the queue, before its
# upload is read: a client streaming a long upload knows early it will not be refused.
ADMITTED_METADATA = (("hoosh-stt-admitted", "1"),)

tracer = trace.get_tracer("hoosh.stt")


def _request_id(options: stt_pb2.TranscribeOptions, metadata: tuple[tuple[str, str | bytes], ...]) -> str:
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

    async def Transcribe(
        self, request_iterator: AsyncIterator[stt_pb2.TranscribeRequest], context: grpc.aio.ServicerContext
    ) -> stt_pb2.TranscribeResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "options":
            error = InvalidRequest("The first message of a transcription must carry its options.")
            context.set_trailing_metadata(error.trailing_metadata())
            await context.abort(error.status, error.message)
        assert first is not None  # abort raised otherwise
        metadata = context.invocation_metadata() or ()
        request_id = _request_id(first.options, metadata)
        request_id_var.set(request_id)

        async def admitted() -> None:
            await context.send_initial_metadata(ADMITTED_METADATA)

        token = otel_context.attach(extract_context(metadata))
        try:
            with tracer.start_as_current_span(
                "hoosh.stt.transcribe",
                attributes={
                    "hoosh.model": first.options.model,
                    "hoosh.pool": first.options.pool,
                    "hoosh.key_id": first.options.caller.key_id,
                },
            ) as span:
                result = await self._service.transcribe(
                    to_request(first.options), _audio(request_iterator), request_id, admitted
                )
                span.set_attributes({"hoosh.audio_seconds": result.duration, "hoosh.tokens": result.charged_tokens})
            return to_response(result, request_id)
        except SttError as error:
            context.set_trailing_metadata(error.trailing_metadata())
            await context.abort(error.status, error.message)
            raise  # unreachable: abort raises
        finally:
            otel_context.detach(token)

    async def ListModels(
        self, request: stt_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> stt_pb2.ListModelsResponse:
        return stt_pb2.ListModelsResponse(
            models=[
                stt_pb2.Model(id=m.id, owned_by="hoosh", created=self._created, engine=m.engine)
                for m in self._service.models()
            ]
        )


def add_to_server(servicer: SttServicer, server: grpc.aio.Server) -> None:
    stt_pb2_grpc.add_SttServiceServicer_to_server(servicer, server)
