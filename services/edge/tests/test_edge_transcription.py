"""POST /v1/audio/transcriptions: the form, the per-route body limit, the error mapping
of the STT service's codes, and the response formats, with the STT channel pointed at
a closed port (a real channel to nothing); and a few requests through the real STT
service in-process (conftest's ``stt``: Whisper tiny.en on the CPU), kept few because
each is a real transcription. The whole stack as processes is in tests/test_stt_e2e.py.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hoosh.stt.v1 import stt_pb2
from hoosh_edge.errors import to_api_error
from hoosh_edge.protocol import TranscriptionRequest, TranscriptionVerboseResponse
from hoosh_edge.serving_transcription import render, to_options, to_srt, to_verbose_json, to_vtt

from tests.inprocess import RunningStt

from .conftest import STT_MODEL, MakeEdge, Stack
from .test_edge_app import CHAT, assert_envelope

PATH = "/v1/audio/transcriptions"
WAV = b"RIFF" + b"\x00" * 100


def form(**fields: Any) -> dict[str, Any]:
    return {"model": "whisper-tiny.en", **fields}


@pytest.mark.parametrize(
    ("data", "files", "param"),
    [
        ({}, {"file": ("a.wav", WAV, "audio/wav")}, "model"),
        (form(), None, "file"),
        (form(file="not a file"), None, "file"),
        (form(response_format="diarized_json"), {"file": ("a.wav", WAV)}, "response_format"),
        (form(response_format="xml"), {"file": ("a.wav", WAV)}, "response_format"),
        (form(temperature="1.5"), {"file": ("a.wav", WAV)}, "temperature"),
        (form(temperature="warm"), {"file": ("a.wav", WAV)}, "temperature"),
        (form(**{"timestamp_granularities[]": "char"}), {"file": ("a.wav", WAV)}, "timestamp_granularities[0]"),
    ],
    ids=["no-model", "no-file", "file-as-text", "diarized", "xml", "temp-1.5", "temp-text", "granularity"],
)
async def test_bad_forms_are_400_naming_the_field(
    client: httpx.AsyncClient, data: dict[str, Any], files: dict[str, Any] | None, param: str
) -> None:
    if files is None:  # httpx sends a urlencoded body without files: force multipart with an empty part list
        response = await client.post(PATH, data=data, files={"unused": ("", b"")} if "file" not in data else None)
    else:
        response = await client.post(PATH, data=data, files=files)
    error = assert_envelope(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


async def test_a_valid_form_reaches_the_stt_service(client: httpx.AsyncClient) -> None:
    response = await client.post(PATH, data=form(), files={"file": ("a.wav", WAV, "audio/wav")})
    error = assert_envelope(response, 503)  # the closed port: the form was accepted and sent on
    assert error["code"] == "service_unavailable"


def spoken(text: str, directory: Path) -> bytes:
    """``text`` spoken by espeak-ng, as WAV bytes."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise RuntimeError("espeak-ng is needed for the speech tests: scripts/install.sh installs it (apt-get)")
    path = directory / "speech.wav"
    subprocess.run([program, "-w", str(path), text], check=True, capture_output=True)
    return path.read_bytes()


async def test_speech_through_the_real_stt_service(
    make_edge: MakeEdge, stack: Stack, stt: RunningStt, tmp_path: Path
) -> None:
    edge = await make_edge(**stack.addresses())
    audio = spoken("the quick brown fox jumps over the lazy dog", tmp_path)
    form = {"model": STT_MODEL, "response_format": "verbose_json", "pool": "team-a"}
    response = await edge.client.post(PATH, data=form, files={"file": ("fox.wav", audio, "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "quick brown fox" in body["text"].lower()
    assert body["language"] == "english" and body["duration"] > 1 and body["segments"]
    # Charged to the pool the edge authorized, by audio seconds; one event for audit.
    [(name, event)] = await stack.router_events()
    assert (name, event.kind, event.pool, event.model) == ("inference.completed", "transcription", "team-a", STT_MODEL)
    assert (await stack.pool("team-a")).used == event.usage.total_tokens > 0
    # The STT service's own refusals come back in OpenAI's shape.
    bad_model = await edge.client.post(PATH, data={"model": "whisper-9"}, files={"file": ("fox.wav", audio)})
    assert assert_envelope(bad_model, 404, param="model")["code"] == "model_not_found"
    not_audio = await edge.client.post(PATH, data={"model": STT_MODEL}, files={"file": ("a.wav", WAV)})
    assert assert_envelope(not_audio, 400, param="file")["type"] == "invalid_request_error"
    assert (await stack.pool("team-a")).used == event.usage.total_tokens  # refusals are not charged


async def test_without_an_stt_address_the_route_says_so(make_edge: Callable[..., Any]) -> None:
    client = (await make_edge(stt_addr="")).client
    response = await client.post(PATH, data=form(), files={"file": ("a.wav", WAV)})
    error = assert_envelope(response, 503)
    assert "HOOSH_STT_ADDR" in error["message"]
    assert "stt" not in (await client.get("/v1/health/ready")).json()["checks"]


async def test_the_upload_route_has_its_own_body_limit(make_edge: Callable[..., Any]) -> None:
    client = (await make_edge(edge_max_body_bytes=1000, edge_max_audio_bytes=5000)).client
    big = b"\x00" * 3000
    # 3 kB: over the JSON routes' limit, under the upload route's.
    assert_envelope(await client.post(CHAT, content=big, headers={"content-type": "application/json"}), 413)
    assert_envelope(await client.post(PATH, data=form(), files={"file": ("a.wav", big)}), 503)
    response = await client.post(PATH, data=form(), files={"file": ("a.wav", b"\x00" * 6000)})
    error = assert_envelope(response, 413)
    assert "5000" in error["message"]


@pytest.mark.parametrize(
    ("code", "trailing", "status", "error_code"),
    [
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            (("hoosh-error-code", "stt_overloaded"), ("hoosh-error-type", "api_error"), ("retry-after", "1")),
            503,
            "stt_overloaded",
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            (("hoosh-error-code", "budget_exhausted"), ("hoosh-error-type", "insufficient_quota")),
            429,
            "budget_exhausted",
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            (("hoosh-error-code", "request_too_large"), ("hoosh-error-param", "file")),
            413,
            "request_too_large",
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, (("hoosh-error-code", "invalid_value"),), 400, "invalid_value"),
    ],
)
def test_stt_codes_map_to_the_status_a_client_expects(
    code: grpc.StatusCode, trailing: tuple[tuple[str, str], ...], status: int, error_code: str
) -> None:
    error = to_api_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details="x"))
    assert (error.status, error.code) == (status, error_code)
    if status == 503:
        assert error.headers == {"Retry-After": "1"}


REPLY = stt_pb2.TranscribeResponse(
    text="The quick brown fox. It jumps.",
    language="en",
    language_name="english",
    duration=3725.5,
    segments=[
        stt_pb2.Segment(id=0, seek=0, start=0.0, end=1.5, text=" The quick brown fox.", tokens=[1, 2]),
        stt_pb2.Segment(id=1, seek=150, start=3723.25, end=3725.5, text=" It jumps.", tokens=[3]),
    ],
    words=[stt_pb2.Word(word="The", start=0.0, end=0.3), stt_pb2.Word(word="quick", start=0.3, end=0.6)],
)


def test_srt_and_vtt_are_real_subtitle_files() -> None:
    assert to_srt(REPLY.segments) == (
        "1\n00:00:00,000 --> 00:00:01,500\nThe quick brown fox.\n\n2\n01:02:03,250 --> 01:02:05,500\nIt jumps.\n"
    )
    assert to_vtt(REPLY.segments) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nThe quick brown fox.\n\n01:02:03.250 --> 01:02:05.500\nIt jumps.\n"
    )


def test_verbose_json_follows_the_granularities() -> None:
    both = to_verbose_json(REPLY, ["segment", "word"])
    TranscriptionVerboseResponse.model_validate(both)
    assert both["language"] == "english" and both["task"] == "transcribe"
    assert [s["id"] for s in both["segments"]] == [0, 1] and both["words"][1]["word"] == "quick"
    assert both["usage"] == {"type": "duration", "seconds": 3725.5, "cost_usd_micros": 0}
    assert "words" not in to_verbose_json(REPLY, ["segment"])
    assert "segments" not in to_verbose_json(REPLY, ["word"])


def test_render_content_types() -> None:
    text = render(REPLY, TranscriptionRequest(model="m", response_format="text"))
    assert text.media_type == "text/plain; charset=utf-8" and text.body == b"The quick brown fox. It jumps.\n"
    json_ = render(REPLY, TranscriptionRequest(model="m"))
    assert json_.media_type == "application/json" and b'"text":"The quick brown fox. It jumps."' in json_.body


def test_options_ask_for_words_only_with_verbose_json() -> None:
    verbose = TranscriptionRequest(model="m", response_format="verbose_json", timestamp_granularities=["word"])
    assert list(to_options(verbose, "a.wav", "rid").timestamp_granularities) == [stt_pb2.TIMESTAMP_GRANULARITY_WORD]
    srt = TranscriptionRequest(model="m", response_format="srt", timestamp_granularities=["word"])
    options = to_options(srt, "a.wav", "rid")
    assert list(options.timestamp_granularities) == [stt_pb2.TIMESTAMP_GRANULARITY_SEGMENT]
    assert not options.HasField("temperature")
    assert to_options(TranscriptionRequest(model="m", temperature=0.4), "", "r").temperature == pytest.approx(0.4)


def test_the_options_carry_the_authorized_pool_and_the_caller() -> None:
    from hoosh.tenancy.v1 import tenancy_pb2

    caller = tenancy_pb2.Caller(key_id="key_1", team="a")
    options = to_options(TranscriptionRequest(model="m"), "a.wav", "rid", pool="team-a", caller=caller)
    assert (options.pool, options.caller) == ("team-a", caller)
    assert not to_options(TranscriptionRequest(model="m"), "a.wav", "rid").HasField("caller")
