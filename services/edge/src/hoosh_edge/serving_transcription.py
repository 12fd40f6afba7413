"""Audio transcriptions: OpenAI's multipart form -> the STT service (client-streaming
gRPC, the upload in chunks) -> json, text, srt, vtt or verbose_json.

The STT service owns decoding, the queue bound, budgets and events; the edge owns the
form, the response formats and the body limit (set per route in the middleware).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from hoosh.stt.v1 import stt_pb2, stt_pb2_grpc
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_common.telemetry import request_metadata
from hoosh_tenancy import POOL_NAME
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import Response

from .errors import ClientClosedRequestError, EdgeError, InvalidRequestError, MappedError, validation_error
from .protocol import TranscriptionRequest
from .responses import OrjsonResponse
from .serving_chat import COST_HEADER, DisconnectWatch, Receive
from .uploads import UploadSpool

log = logging.getLogger(__name__)

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
CHUNK_BYTES = 256 * 1024  # one gRPC message of the upload
ADMITTED = ("hoosh-stt-admitted", "1")  # the STT service's go-ahead for the upload (stt.proto)
MODELS_CACHE_SECONDS = 30.0
MODELS_TIMEOUT_SECONDS = 2.0  # /v1/models must not wait long on an absent STT service
# A form's temperature as text: a decimal number from 0 to 1 (what the document promises).
TEMPERATURE_TEXT = r"0?\.[0-9]+|0(?:\.[0-9]*)?|1(?:\.0*)?"
_TEMPERATURE = re.compile(TEMPERATURE_TEXT)
_GRANULARITY = {"word": stt_pb2.TIMESTAMP_GRANULARITY_WORD, "segment": stt_pb2.TIMESTAMP_GRANULARITY_SEGMENT}


class SttNotConfiguredError(EdgeError):
    status_code = 503
    code = "service_unavailable"


# --------------------------------------------------------------------------- the form


def _form_fields(form: FormData) -> dict[str, Any]:
    """The text fields of the form as the request model expects them (lists for the [] fields)."""
    data: dict[str, Any] = {}
    for name in ("model", "language", "prompt", "response_format", "temperature", "pool"):
        value = form.get(name)
        if isinstance(value, UploadFile):
            raise InvalidRequestError(f"'{name}' must be a text field, not a file.", param=name, code="invalid_type")
        if value is not None and (value != "" or name in ("model", "response_format")):
            if name == "temperature" and not _TEMPERATURE.fullmatch(value):
                raise InvalidRequestError(
                    "Invalid value for 'temperature': a decimal number from 0 to 1.",
                    param="temperature",
                    code="invalid_value",
                )
            data[name] = value
    granularities = [*form.getlist("timestamp_granularities[]"), *form.getlist("timestamp_granularities")]
    if granularities:
        data["timestamp_granularities"] = granularities
    return data


async def read_form(request: Request, spool: UploadSpool) -> FormData:
    """The multipart form (one file at most, spooled where ``spool`` says); the caller
    closes it (temporary files)."""
    return await spool.read_multipart(request, max_files=1, max_fields=64)


def validate_form(form: FormData) -> tuple[TranscriptionRequest, UploadFile]:
    """Validate the form's fields and file; a missing or bad one is a 400 naming it."""
    data = _form_fields(form)
    try:
        body = TranscriptionRequest.model_validate(data)
    except ValidationError as exc:
        raise MappedError(validation_error(exc.errors(include_url=False), data)) from None
    upload = form.get("file")
    if upload is None:
        raise InvalidRequestError(
            "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
        )
    if not isinstance(upload, UploadFile):
        raise InvalidRequestError(
            "'file' must be a file upload (multipart/form-data with a filename), not a text field.",
            param="file",
            code="invalid_type",
        )
    return body, upload


def openapi_body() -> dict[str, Any]:
    """The multipart request body for the OpenAPI document (the form is parsed by hand): a
    field is text or left out, never null; an empty optional field counts as left out."""
    properties: dict[str, Any] = {"file": {"type": "string", "format": "binary", "description": "The audio file"}}
    for name, schema in TranscriptionRequest.model_json_schema()["properties"].items():
        # A form field is text or absent, never null.
        options = [option for option in schema.pop("anyOf", []) if option.get("type") != "null"]
        schema.update(options[0] if len(options) == 1 else {"anyOf": options} if options else {})
        if schema.get("default", 0) is None:
            del schema["default"]
        if name == "temperature":
            schema = {"type": "string", "pattern": f"^(?:|{TEMPERATURE_TEXT})$", "description": schema["description"]}
        elif name == "pool":  # empty: left out (the key's first pool)
            schema = {**schema, "minLength": 0, "pattern": f"^(?:|{POOL_NAME.pattern})$"}
        properties["timestamp_granularities[]" if name == "timestamp_granularities" else name] = schema
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file", "model"], "properties": properties}
                }
            },
        }
    }


# --------------------------------------------------------------------------- response formats


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: Iterable[stt_pb2.Segment]) -> str:
    """SubRip: numbered cues from 1, ``HH:MM:SS,mmm`` times."""
    cues = [
        f"{index}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for index, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def to_vtt(segments: Iterable[stt_pb2.Segment]) -> str:
    """WebVTT: the header, then cues with ``HH:MM:SS.mmm`` times."""
    cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def _usage(reply: stt_pb2.TranscribeResponse) -> dict[str, Any]:
    """OpenAI's duration usage, plus hoosh's exact cost in micro-dollars."""
    return {"type": "duration", "seconds": round(reply.duration, 3), "cost_usd_micros": reply.cost_usd_micros}


def to_verbose_json(reply: stt_pb2.TranscribeResponse, granularities: Sequence[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": reply.language_name or reply.language,
        "duration": round(reply.duration, 3),
        "text": reply.text,
    }
    if "word" in granularities:
        body["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in reply.words]
    if "segment" in granularities:
        body["segments"] = [
            {
                "id": s.id,
                "seek": s.seek,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": list(s.tokens),
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in reply.segments
        ]
    body["usage"] = _usage(reply)
    return body


def render(reply: stt_pb2.TranscribeResponse, body: TranscriptionRequest) -> Response:
    """The reply in the asked-for format, with OpenAI's content types; the cost in the
    ``X-Hoosh-Cost-Usd-Micros`` header whatever the format (text formats have no usage)."""
    fmt = body.response_format
    headers = {COST_HEADER: str(reply.cost_usd_micros)}
    if fmt == "json":
        return OrjsonResponse({"text": reply.text, "usage": _usage(reply)}, headers=headers)
    if fmt == "verbose_json":
        return OrjsonResponse(to_verbose_json(reply, body.timestamp_granularities), headers=headers)
    if fmt == "srt":
        text = to_srt(reply.segments)
    elif fmt == "vtt":
        text = to_vtt(reply.segments)
    else:
        text = reply.text + "\n"
    return Response(text, media_type="text/plain; charset=utf-8", headers=headers)


# --------------------------------------------------------------------------- the call


def to_options(
    body: TranscriptionRequest,
    filename: str,
    request_id: str,
    *,
    pool: str | None = None,
    caller: tenancy_pb2.Caller | None = None,
) -> stt_pb2.TranscribeOptions:
    granularities = body.timestamp_granularities if body.response_format == "verbose_json" else ["segment"]
    options = stt_pb2.TranscribeOptions(
        model=body.model,
        language=body.language or "",
        prompt=body.prompt or "",
        timestamp_granularities=sorted({_GRANULARITY[g] for g in granularities}),
        pool=pool or body.pool or "",
        request_id=request_id,
        filename=filename,
        caller=caller,
    )
    if body.temperature:
        options.temperature = body.temperature
    return options


class ServingTranscription:
    """POST /v1/audio/transcriptions and the STT half of /v1/models."""

    def __init__(self, stt: stt_pb2_grpc.SttServiceAsyncStub | None, *, timeout: float) -> None:
        self._stt = stt
        self._timeout = timeout
        self._models: tuple[float, list[stt_pb2.Model]] | None = None

    async def create(
        self,
        body: TranscriptionRequest,
        upload: UploadFile,
        request_id: str,
        receive: Receive,
        *,
        pool: str | None = None,
        caller: tenancy_pb2.Caller | None = None,
    ) -> Response:
        """Stream the upload to the STT service and render its reply.

        The options go first; the audio follows only once the service has admitted the
        request, so a refusal (unknown model, full queue) costs no upload. A client that
        goes away cancels the call (the service releases what it reserved).
        """
        if self._stt is None:
            raise SttNotConfiguredError("Speech-to-text is not configured on this gateway (HOOSH_STT_ADDR).")
        metadata = request_metadata(request_id)
        call = self._stt.Transcribe(metadata=metadata, timeout=self._timeout)
        watch = DisconnectWatch(receive, call)
        try:
            try:
                options = to_options(body, upload.filename or "", request_id, pool=pool, caller=caller)
                await call.write(stt_pb2.TranscribeRequest(options=options))
                if ADMITTED in tuple(await call.initial_metadata()):
                    while chunk := await upload.read(CHUNK_BYTES):
                        await call.write(stt_pb2.TranscribeRequest(audio=chunk))
                    await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the service answered before the upload ended: its status follows
            reply: stt_pb2.TranscribeResponse = await call
        except asyncio.CancelledError:
            if watch.fired:
                raise ClientClosedRequestError("The client closed the connection.") from None
            raise
        finally:
            watch.stop()
        return render(reply, body)

    async def models(self) -> list[stt_pb2.Model]:
        """The STT service's models (cached briefly); none when it is absent or down."""
        if self._stt is None:
            return []
        now = time.monotonic()
        if self._models is not None and now - self._models[0] < MODELS_CACHE_SECONDS:
            return self._models[1]
        try:
            reply = await self._stt.ListModels(
                stt_pb2.ListModelsRequest(), timeout=MODELS_TIMEOUT_SECONDS, metadata=request_metadata("")
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("speech-to-text models unavailable", extra={"error": exc.code().name})
            return []
        self._models = (now, list(reply.models))
        return self._models[1]
