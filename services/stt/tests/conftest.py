"""Fixtures for the STT tests: real speech from espeak-ng, the real tiny.en model,
and a real stack in-process — the metering store and the key limiter on the real
Redis (unique key prefix, as the STT service uses them: in-process) and the event
publisher on the real NATS (unique stream) — behind an in-process grpc.aio STT
server on a free port, built by ``new_server()`` as the service builds it; and the
process's /metrics on a free port, scraped over HTTP with the Prometheus parser."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import av
import grpc
import nats
import nats.js.errors
import numpy as np
import pytest
from hoosh.stt.v1 import stt_pb2, stt_pb2_grpc
from hoosh_common.eventbus import EventPublisher, ensure_stream
from hoosh_common.grpc_server import new_server
from hoosh_common.prices import AudioPrice
from hoosh_common.telemetry import capture_spans
from hoosh_metering.limits import KeyLimiter
from hoosh_metering.pools import BudgetStore, PoolSpec, PoolView
from hoosh_metering.redis import RedisClient, connect_redis
from hoosh_stt.budget import SttBudget
from hoosh_stt.config import BUNDLED_MODEL, ModelSpec, bundled_model_dir
from hoosh_stt.faster_whisper_engine import FasterWhisperEngine
from hoosh_stt.server import SttServicer
from hoosh_stt.server import add_to_server as add_stt
from hoosh_stt.transcription import TranscriptionService, WorkQueue
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.scraping import Samples, metrics_port, scrape, value  # noqa: F401 - re-exported, and the fixture

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
SENTENCE = "the quick brown fox jumps over the lazy dog"
TOKENS_PER_SECOND = 10.0


def espeak(text: str, path: Path) -> bytes:
    """Render ``text`` to a WAV file with espeak-ng (22.05 kHz mono) and return its bytes."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise RuntimeError("espeak-ng is needed for the speech tests: scripts/install.sh installs it (apt-get)")
    subprocess.run([program, "-w", str(path), text], check=True, capture_output=True)
    return path.read_bytes()


def encode(wav: bytes, container: str, codec: str, rate: int | None = None) -> bytes:
    """Re-encode a WAV into another container with PyAV (no sox or ffmpeg program)."""
    out = io.BytesIO()
    with av.open(io.BytesIO(wav)) as source, av.open(out, mode="w", format=container) as target:
        in_stream = source.streams.audio[0]
        stream = target.add_stream(codec, rate=rate or in_stream.rate)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=stream.rate)
        for frame in source.decode(in_stream):
            frame.pts = None
            for resampled in resampler.resample(frame):
                for packet in stream.encode(resampled):
                    target.mux(packet)
        for resampled in resampler.resample(None):
            for packet in stream.encode(resampled):
                target.mux(packet)
        for packet in stream.encode(None):
            target.mux(packet)
    return out.getvalue()


def silent_mp3(minutes: int) -> bytes:
    """``minutes`` of silence as a mono MP3 at 8 kbps (8 kHz), about 60 KB a minute: the
    hostile upload of issue 9 (an hour is 3.6 MB; seven hours fit under 25 MiB).

    One minute is encoded (without Xing or ID3 headers) and its frames repeated: MP3
    is a plain sequence of frames, so the repetition is a valid file, built in
    milliseconds whatever its length."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp3", options={"write_xing": "0", "id3v2_version": "0"}) as target:
        stream = target.add_stream("libmp3lame", rate=8_000)
        stream.layout = "mono"
        stream.bit_rate = 8_000
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 60 * 8_000), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            target.mux(packet)
    return out.getvalue() * minutes


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The sentence, spoken by espeak-ng, as WAV bytes."""
    return espeak(SENTENCE, tmp_path_factory.mktemp("speech") / "sentence.wav")


@pytest.fixture(scope="session")
def engine() -> FasterWhisperEngine:
    """The bundled tiny.en, int8 on the CPU, loaded once for the session."""
    loaded = FasterWhisperEngine([ModelSpec(BUNDLED_MODEL, bundled_model_dir())], workers=1)
    loaded.load()
    return loaded


@pytest.fixture
def silence() -> Callable[[float], np.ndarray]:
    return lambda seconds: np.zeros(int(seconds * 16_000), dtype=np.float32)


@dataclass
class SttStack:
    stub: stt_pb2_grpc.SttServiceStub
    store: BudgetStore
    budget: SttBudget
    service: TranscriptionService
    js: JetStreamContext
    stream: str
    prefix: str
    limiter: KeyLimiter  # the callers' own limits, on the store's Redis and key prefix
    redis: RedisClient
    spans: InMemorySpanExporter | None = None  # with stack_options {"trace": True}

    async def pool(self, capacity: int = 1_000_000, parent: str | None = None) -> str:
        name = f"pool-{uuid.uuid4().hex[:8]}"
        await self.store.create_pool(PoolSpec(name, capacity, parent=parent))
        return name

    async def pool_state(self, name: str) -> PoolView:
        return await self.store.get_pool(name)


@pytest.fixture
def stack_options() -> dict[str, int]:
    """Override per test (indirectly) to change the queue bound, the byte limit,
    (``max_audio_seconds``, default 600) the duration limit,
    (``price_per_minute_micros``, default 0) the audio's price or (``trace``, default
    off) to record spans: the server is then built inside ``capture_spans()``, so it
    has the tracing interceptor, and ``SttStack.spans`` holds what it records."""
    return {"workers": 1, "max_queue": 4, "max_audio_bytes": 25 * 1024 * 1024}


@pytest.fixture
async def stt(engine: FasterWhisperEngine, stack_options: dict[str, int]) -> AsyncIterator[SttStack]:
    """The metering store and the STT gRPC server in-process, events on a fresh stream."""
    suffix = uuid.uuid4().hex[:12]
    key_prefix = f"test:stt:{suffix}:"
    redis = connect_redis(REDIS_URL)
    store = BudgetStore(redis, key_prefix, default_lease_seconds=300)
    await store.start()
    budget = SttBudget(store, lease_seconds=300)
    limiter = KeyLimiter(redis, key_prefix)
    nc: NATS = await nats.connect(NATS_URL)
    js = nc.jetstream()
    stream, prefix = f"TEST_STT_{suffix}", f"teststt{suffix}"
    await ensure_stream(js, stream, prefix)
    publisher = EventPublisher(nc, js, stream, prefix)

    service = TranscriptionService(
        engine,
        budget,
        publisher,
        WorkQueue(stack_options["workers"], stack_options["max_queue"], retry_after=1),
        tokens_per_second=TOKENS_PER_SECOND,
        max_audio_bytes=stack_options["max_audio_bytes"],
        max_audio_seconds=stack_options.get("max_audio_seconds", 600),
        limiter=limiter,
        price=AudioPrice(per_minute=stack_options.get("price_per_minute_micros", 0)),
    )
    tracing = contextlib.ExitStack()
    spans = tracing.enter_context(capture_spans()) if stack_options.get("trace") else None
    stt_server = new_server()
    with contextlib.ExitStack() as undo:
        undo.callback(tracing.close)  # capture is process-wide: never leave it on
        add_stt(SttServicer(service), stt_server)
        stt_port = stt_server.add_insecure_port("127.0.0.1:0")
        await stt_server.start()
        undo.pop_all()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stt_port}")
    try:
        yield SttStack(
            stub=stt_pb2_grpc.SttServiceStub(channel),
            store=store,
            budget=budget,
            service=service,
            js=js,
            stream=stream,
            prefix=prefix,
            limiter=limiter,
            redis=redis,
            spans=spans,
        )
    finally:
        await channel.close()
        await stt_server.stop(None)
        tracing.close()
        await publisher.drain()
        service._decoder.shutdown(wait=True)  # the engine is the session's: only this service's threads
        service._queue.shutdown()
        await budget.close()
        await store.close()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
        await nc.close()
        keys = [key async for key in redis.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def transcribe(
    stub: stt_pb2_grpc.SttServiceStub,
    messages: list[stt_pb2.TranscribeRequest],
    metadata: tuple[tuple[str, str], ...] = (),
) -> stt_pb2.TranscribeResponse:
    """One Transcribe call as the edge makes it: the options, then — once the server
    has admitted the request (initial metadata) — the audio, message by message. A
    refusal before the upload (bad options, full queue) is raised with its real status.
    ``metadata``: what the edge sends with it (x-request-id, traceparent)."""
    call = stub.Transcribe(metadata=metadata or None)
    if not messages:
        await call.done_writing()
        return await call
    await call.write(messages[0])
    if ("hoosh-stt-admitted", "1") in tuple(await call.initial_metadata()):
        for message in messages[1:]:
            await call.write(message)
        await call.done_writing()
    return await call


def requests(audio: bytes, chunk_size: int = 64 * 1024, **options: object) -> list[stt_pb2.TranscribeRequest]:
    """The messages of one Transcribe call: options, then the audio in chunks."""
    options.setdefault("model", BUNDLED_MODEL)
    first = stt_pb2.TranscribeRequest(options=stt_pb2.TranscribeOptions(**options))  # type: ignore[arg-type]
    chunks = [stt_pb2.TranscribeRequest(audio=audio[i : i + chunk_size]) for i in range(0, len(audio), chunk_size)]
    return [first, *chunks]
