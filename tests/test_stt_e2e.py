"""Speech to text through every service, as a user sends it: espeak-ng speaks a known
sentence, the official openai client uploads it to the edge, the STT service
transcribes it with the bundled Whisper tiny.en, charges the pool for the audio
seconds and publishes an event that the audit chain records."""

from __future__ import annotations

import asyncio
import io
import math
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from hoosh.stt.v1 import stt_pb2, stt_pb2_grpc
from hoosh_stt.wer import word_error_rate

from .conftest import LOCAL_MODEL, STT_MAX_QUEUE, STT_MODEL, STT_WORKERS, RunningStack
from .test_chat_e2e import audit, create_pool, pool_state, wait_for_audit

pytestmark = pytest.mark.slow  # loads the real Whisper model

SENTENCE = "the quick brown fox jumps over the lazy dog"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
SRT_CUE = re.compile(r"^\d+\n\d{2}:\d{2}:\d{2},\d{3} --> \d{2}:\d{2}:\d{2},\d{3}\n.+\n", re.MULTILINE)
VTT_CUE = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}\n.+\n", re.MULTILINE)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sentence as espeak-ng speaks it, a WAV file (scripts/install.sh installs espeak-ng)."""
    program = shutil.which("espeak-ng")
    assert program is not None, "espeak-ng is missing: run scripts/install.sh (it installs it with apt-get)"
    path = tmp_path_factory.mktemp("speech") / "sentence.wav"
    subprocess.run([program, "-w", str(path), SENTENCE], check=True, capture_output=True)
    return path


def client_for(hoosh: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hoosh.base_url}/v1", api_key="no-key-needed", max_retries=0)


def test_models_list_shows_the_speech_model_beside_the_chat_ones(hoosh: RunningStack) -> None:
    client = client_for(hoosh)
    ids = {model.id for model in client.models.list()}
    assert {STT_MODEL, LOCAL_MODEL} <= ids
    assert client.models.retrieve(STT_MODEL).id == STT_MODEL


def test_openai_client_transcribes_the_sentence(hoosh: RunningStack, speech: Path) -> None:
    with speech.open("rb") as audio:
        transcription = client_for(hoosh).audio.transcriptions.create(model=STT_MODEL, file=audio)
    assert word_error_rate(SENTENCE, transcription.text) <= 0.25, transcription.text
    assert transcription.usage is not None and transcription.usage.type == "duration"
    assert transcription.usage.seconds == pytest.approx(2.78, abs=0.1)


def test_every_response_format_comes_back_in_its_real_format(hoosh: RunningStack, speech: Path) -> None:
    client = client_for(hoosh)
    audio = speech.read_bytes()

    def create(**options: object) -> object:
        return client.audio.transcriptions.create(model=STT_MODEL, file=("speech.wav", audio), **options)

    text = create(response_format="text")
    assert isinstance(text, str) and text.endswith("\n") and word_error_rate(SENTENCE, text) <= 0.25

    srt = create(response_format="srt")
    assert isinstance(srt, str) and srt.startswith("1\n00:00:00,")
    cues = SRT_CUE.findall(srt)
    assert cues and word_error_rate(SENTENCE, " ".join(cue.split("\n")[2] for cue in cues)) <= 0.25

    vtt = create(response_format="vtt")
    assert isinstance(vtt, str) and vtt.startswith("WEBVTT\n\n") and VTT_CUE.findall(vtt)

    verbose = create(response_format="verbose_json")
    assert verbose.language == "english" and verbose.duration == pytest.approx(2.78, abs=0.1)
    assert word_error_rate(SENTENCE, verbose.text) <= 0.25
    assert verbose.segments and verbose.segments[0].id == 0 and verbose.segments[0].tokens
    assert verbose.segments[-1].end <= verbose.duration + 0.5
    assert verbose.words is None

    worded = create(response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert worded.segments and worded.words and len(worded.words) >= 7
    assert word_error_rate(SENTENCE, " ".join(word.word for word in worded.words)) <= 0.25
    starts = [word.start for word in worded.words]
    assert starts == sorted(starts) and all(word.start <= word.end for word in worded.words)

    only_words = create(response_format="verbose_json", timestamp_granularities=["word"])
    assert only_words.words and only_words.segments is None

    raw = httpx.post(
        f"{hoosh.base_url}{TRANSCRIPTIONS}",
        data={"model": STT_MODEL, "response_format": "srt"},
        files={"file": ("speech.wav", audio, "audio/wav")},
        timeout=60,
    )
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/plain")


async def test_the_pool_is_charged_for_the_audio_seconds_and_audit_records_each(
    hoosh: RunningStack, speech: Path
) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    client = openai.AsyncOpenAI(base_url=f"{hoosh.base_url}/v1", api_key="x", max_retries=0)
    audio = speech.read_bytes()
    charged: dict[str, int] = {}
    for _ in range(2):
        raw = await client.audio.transcriptions.with_raw_response.create(
            model=STT_MODEL, file=("speech.wav", audio), response_format="verbose_json", extra_body={"pool": pool}
        )
        seconds = raw.parse().duration
        charged[raw.headers["x-request-id"]] = math.ceil(seconds * 10)  # HOOSH_STT_TOKENS_PER_SECOND's default
    await client.close()

    state = pool_state(hoosh, pool)
    assert state["used"] == sum(charged.values()) and state["reserved"] == 0
    body = wait_for_audit(hoosh, set(charged))
    mine = [entry for entry in body["entries"] if entry["event_id"] in charged]
    assert len(mine) == len(charged) == 2  # one entry per transcription
    for entry in mine:
        payload = entry["payload"]
        assert entry["subject"].endswith("inference.completed")
        assert payload["kind"] == "transcription" and payload["pool"] == pool and payload["model"] == STT_MODEL
        assert int(payload["usage"]["prompt_tokens"]) == charged[entry["event_id"]]
    assert body["chain_valid"] is True


TEXT_FILE = b"This is a text file that was renamed to .wav; it holds no audio at all.\n" * 20


def upload(kind: str, speech: bytes) -> bytes:
    """The bytes of a test upload: the speech, cut, empty, text, or 30 MB."""
    return {
        "speech": lambda: speech,
        "half": lambda: speech[: len(speech) // 2],
        "empty": lambda: b"",
        "text": lambda: TEXT_FILE,
        "30mb": lambda: b"\x00" * (30 * 1024 * 1024),
    }[kind]()


@pytest.mark.parametrize(
    ("fields", "file", "status", "param", "code"),
    [
        ({"model": STT_MODEL}, None, 400, "file", "missing_required_parameter"),
        ({"model": STT_MODEL}, ("empty.wav", "empty"), 400, "file", "invalid_value"),
        ({"model": STT_MODEL}, ("notes.wav", "text"), 400, "file", "invalid_value"),
        ({"model": STT_MODEL}, ("cut.wav", "half"), 400, "file", "invalid_value"),
        ({"model": "whisper-large-v9"}, ("speech.wav", "speech"), 404, "model", "model_not_found"),
        (
            {"model": STT_MODEL, "response_format": "diarized_json"},
            ("speech.wav", "speech"),
            400,
            "response_format",
            None,
        ),
        ({"model": STT_MODEL}, ("big.wav", "30mb"), 413, None, "request_too_large"),
    ],
    ids=["no-file", "empty-file", "text-renamed-wav", "truncated-audio", "unknown-model", "bad-format", "30mb"],
)
async def test_bad_input_gets_an_openai_error_and_charges_nothing(
    hoosh: RunningStack,
    speech: Path,
    fields: dict[str, str],
    file: tuple[str, str] | None,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    pool = await create_pool(hoosh, capacity=1_000_000)
    files = None
    if file is not None:
        files = {"file": (file[0], upload(file[1], speech.read_bytes()), "audio/wav")}
    data = {**fields, "pool": pool}
    response = httpx.post(f"{hoosh.base_url}{TRANSCRIPTIONS}", data=data, files=files, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert response.headers.get("x-request-id")
    state = pool_state(hoosh, pool)
    assert (state["used"], state["reserved"]) == (0, 0)
    assert all(p["reserved"] == 0 for p in httpx.get(f"{hoosh.base_url}/v1/tokens/pools").json())
    assert audit(hoosh)["chain_valid"] is True
    # The service is still up.
    assert httpx.get(f"{hoosh.base_url}/v1/health/ready").json()["checks"]["stt"] == "SERVING"


def test_the_openai_client_sees_a_bad_file_as_a_bad_request(hoosh: RunningStack) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client_for(hoosh).audio.transcriptions.create(model=STT_MODEL, file=("notes.wav", TEXT_FILE))
    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_value" and raised.value.param == "file"


async def test_four_concurrent_transcriptions_all_succeed(hoosh: RunningStack, speech: Path) -> None:
    assert STT_WORKERS + STT_MAX_QUEUE == 4  # the stack admits exactly four at once
    client = openai.AsyncOpenAI(base_url=f"{hoosh.base_url}/v1", api_key="x", max_retries=0)
    audio = speech.read_bytes()
    replies = await asyncio.gather(
        *(client.audio.transcriptions.create(model=STT_MODEL, file=(f"s{i}.wav", audio)) for i in range(4))
    )
    await client.close()
    assert all(word_error_rate(SENTENCE, reply.text) <= 0.25 for reply in replies)


async def test_the_one_beyond_the_queue_bound_gets_503_and_the_admitted_ones_finish(
    hoosh: RunningStack, speech: Path
) -> None:
    """Every place in the STT queue is taken by an upload still in progress (straight
    to the service over gRPC, admitted before their audio arrives); the next request
    through the edge is refused with 503 at once instead of waiting."""
    pool = await create_pool(hoosh, capacity=1_000_000)
    audio = speech.read_bytes()
    async with hoosh.channel(hoosh.stt_addr) as channel:
        stub = stt_pb2_grpc.SttServiceStub(channel)
        held = []
        for index in range(STT_WORKERS + STT_MAX_QUEUE):
            call = stub.Transcribe(metadata=hoosh.credentials())
            options = stt_pb2.TranscribeOptions(model=STT_MODEL, pool=pool, request_id=f"held-{uuid.uuid4().hex}")
            await call.write(stt_pb2.TranscribeRequest(options=options))
            assert ("hoosh-stt-admitted", "1") in tuple(await call.initial_metadata()), index
            held.append(call)

        client = openai.AsyncOpenAI(base_url=f"{hoosh.base_url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as raised:
            await client.audio.transcriptions.create(model=STT_MODEL, file=("one-too-many.wav", audio))
        await client.close()
        assert raised.value.status_code == 503
        assert raised.value.code == "stt_overloaded"
        assert raised.value.response.headers.get("retry-after") == "1"

        async def finish(call: grpc.aio.StreamUnaryCall) -> stt_pb2.TranscribeResponse:
            for start in range(0, len(audio), 64 * 1024):
                await call.write(stt_pb2.TranscribeRequest(audio=audio[start : start + 64 * 1024]))
            await call.done_writing()
            return await call

        replies = await asyncio.gather(*(finish(call) for call in held))
    assert all(word_error_rate(SENTENCE, reply.text) <= 0.25 for reply in replies)
    assert pool_state(hoosh, pool)["used"] == sum(reply.charged_tokens for reply in replies)
    refused = raised.value.response.headers["x-request-id"]
    entry = next(e for e in wait_for_audit(hoosh, {refused})["entries"] if e["event_id"] == refused)
    assert entry["subject"].endswith("inference.failed")
    assert entry["payload"]["error_code"] == "stt_overloaded" and entry["payload"]["http_status"] == 503


def test_upload_in_other_containers(hoosh: RunningStack, speech: Path) -> None:
    """A FLAC made from the same speech (PyAV, no ffmpeg program) transcribes the same."""
    import av

    out = io.BytesIO()
    with av.open(str(speech)) as source, av.open(out, mode="w", format="flac") as target:
        stream = target.add_stream("flac", rate=source.streams.audio[0].rate)
        for frame in source.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                target.mux(packet)
        for packet in stream.encode(None):
            target.mux(packet)
    reply = client_for(hoosh).audio.transcriptions.create(model=STT_MODEL, file=("speech.flac", out.getvalue()))
    assert word_error_rate(SENTENCE, reply.text) <= 0.25
