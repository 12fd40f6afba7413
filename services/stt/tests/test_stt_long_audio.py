"""Issue 9's hostile upload against the real service process: silence as a mono MP3
at 8 kbps, one hour (3.6 MB) and seven hours (25 MB, under the 25 MiB upload limit).

The STT service runs as ``python -m hoosh_stt`` in a subprocess with its default
limits (2 h, 300 s windows, VAD on), on the real Redis budget and NATS, so its peak
resident memory (``VmHWM``, reset before each request through ``clear_refs``) is
measured on the process that did the work. Before windowing, the one-hour file alone
took the process from 280 MB to 3.5 GB."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest
from hoosh.stt.v1 import stt_pb2_grpc
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import connect_redis

from .conftest import NATS_URL, REDIS_URL, TOKENS_PER_SECOND, requests, scrape, silent_mp3, transcribe, value

pytestmark = pytest.mark.slow  # loads the real Whisper model in a process of its own

# Kubernetes gives stt 2 Gi. Idle, the process holds about 280 MB (model, gRPC, NATS);
# one window of audio through VAD and Whisper adds a few hundred MB at most.
PEAK_RSS_BOUND_MB = 768
START_TIMEOUT_S = 90.0


@dataclass
class SttProcess:
    process: subprocess.Popen[bytes]
    address: str
    key_prefix: str
    log: Path
    metrics_port: int

    def status(self, field: str) -> int:
        """A ``/proc/<pid>/status`` figure in MB (VmHWM: the peak resident set)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) // 1024
        raise AssertionError(f"{field} is not in /proc/{self.process.pid}/status")

    def reset_peak(self) -> None:
        """Start VmHWM again from the current resident set (Linux: clear_refs 5). Where
        that is not allowed the peak stays the process's lifetime one: stricter."""
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(stt: SttProcess) -> None:
    """Until the service accepts connections: it binds its port only once the model is
    loaded and Redis and NATS are reached. (A socket, not a gRPC call: the test process
    keeps to grpc.aio, which does not mix well with the synchronous stack.)"""
    host, port = stt.address.rsplit(":", 1)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if stt.process.poll() is not None:
            raise AssertionError(f"hoosh_stt exited ({stt.process.returncode}): {stt.log.read_text()[-2000:]}")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"hoosh_stt did not start: {stt.log.read_text()[-2000:]}") from None
            time.sleep(0.2)


async def _cleanup(key_prefix: str, stream: str) -> None:
    redis = connect_redis(REDIS_URL)
    keys = [key async for key in redis.scan_iter(match=f"{key_prefix}*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()
    nc = await nats.connect(NATS_URL)
    with contextlib.suppress(Exception):  # absent if the service never started
        await nc.jetstream().delete_stream(stream)
    await nc.close()


@pytest.fixture(scope="module")
def stt_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SttProcess]:
    suffix = uuid.uuid4().hex[:12]
    key_prefix, stream = f"test:sttlong:{suffix}:", f"TEST_STTLONG_{suffix}"
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("HOOSH_")  # the defaults are what is under test
    }
    address = f"127.0.0.1:{_free_port()}"
    metrics_port = _free_port()
    env.update(
        HOOSH_STT_LISTEN=address,
        HOOSH_STT_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",  # not the default: a running stack may hold it
        HOOSH_REDIS_URL=REDIS_URL,
        HOOSH_BUDGET_KEY_PREFIX=key_prefix,
        HOOSH_NATS_URL=NATS_URL,
        HOOSH_NATS_STREAM=stream,
        HOOSH_SUBJECT_PREFIX=f"teststtlong{suffix}",
        HOOSH_STT_ENGINE="faster-whisper",
        HOOSH_STT_DEVICE="cpu",
        HOOSH_STT_TOKENS_PER_SECOND=str(TOKENS_PER_SECOND),
    )
    log = tmp_path_factory.mktemp("stt") / "stt.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "hoosh_stt"], env=env, stdout=sink, stderr=subprocess.STDOUT)
    stt = SttProcess(process, address, key_prefix, log, metrics_port)
    try:
        _wait_ready(stt)
        yield stt
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        asyncio.run(_cleanup(key_prefix, stream))


@pytest.fixture(scope="module")
def one_hour() -> bytes:
    audio = silent_mp3(60)
    assert len(audio) < 3_700_000
    return audio


@pytest.fixture(scope="module")
def seven_hours() -> bytes:
    audio = silent_mp3(7 * 60)
    assert len(audio) <= 25 * 1024 * 1024  # admitted by the byte limit: only its duration refuses it
    return audio


@contextlib.asynccontextmanager
async def _pool(stt: SttProcess) -> AsyncIterator[tuple[BudgetStore, str]]:
    """A fresh pool in the service's budget, and the store to read it back."""
    redis = connect_redis(REDIS_URL)
    store = BudgetStore(redis, stt.key_prefix, default_lease_seconds=300)
    try:
        await store.start()
        name = f"pool-{uuid.uuid4().hex[:8]}"
        await store.create_pool(PoolSpec(name, 10_000_000))
        yield store, name
    finally:
        await store.close()
        await redis.aclose()


async def test_seven_hours_of_silence_is_refused_with_400_before_decoding(
    stt_process: SttProcess, seven_hours: bytes
) -> None:
    async with _pool(stt_process) as (store, pool):
        idle = stt_process.status("VmRSS")
        before = await scrape(stt_process.metrics_port)
        stt_process.reset_peak()
        started = time.monotonic()
        async with grpc.aio.insecure_channel(stt_process.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await transcribe(stt_pb2_grpc.SttServiceStub(channel), requests(seven_hours, pool=pool))
        elapsed = time.monotonic() - started
        peak = stt_process.status("VmHWM")
        print(f"\n7 h of silence (25 MB): refused in {elapsed:.1f} s; VmRSS idle {idle} MB, VmHWM {peak} MB")
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailing = {key: str(value) for key, value in raised.value.trailing_metadata() or ()}
        assert (trailing["hoosh-error-code"], trailing["hoosh-error-param"]) == ("audio_too_long", "file")
        assert "maximum of 7200 seconds" in (raised.value.details() or "")
        view = await store.get_pool(pool)
        assert (view.used, view.reserved) == (0, 0)
        # Only the upload itself was held (25 MB, twice while it is joined): nothing decoded.
        assert peak < PEAK_RSS_BOUND_MB and peak - idle < 150
        after = await scrape(stt_process.metrics_port)  # the process's own /metrics
        series = {"model": "whisper-tiny.en", "status": "audio_too_long"}
        assert (
            value(after, "hoosh_stt_requests_total", **series) - value(before, "hoosh_stt_requests_total", **series)
            == 1
        )


async def test_an_hour_of_silence_is_charged_by_duration_in_bounded_memory_and_says_nothing(
    stt_process: SttProcess, one_hour: bytes
) -> None:
    async with _pool(stt_process) as (store, pool):
        idle = stt_process.status("VmRSS")
        before = await scrape(stt_process.metrics_port)
        stt_process.reset_peak()
        started = time.monotonic()
        async with grpc.aio.insecure_channel(stt_process.address) as channel:
            reply = await transcribe(
                stt_pb2_grpc.SttServiceStub(channel), requests(one_hour, pool=pool, request_id="req-one-hour")
            )
        elapsed = time.monotonic() - started
        peak = stt_process.status("VmHWM")
        print(f"\n1 h of silence (3.6 MB): transcribed in {elapsed:.1f} s; VmRSS idle {idle} MB, VmHWM {peak} MB")
        assert peak < PEAK_RSS_BOUND_MB
        assert reply.duration == pytest.approx(3611.5, abs=1.0)  # 60 one-minute blocks, each padded by the encoder
        assert reply.charged_tokens == math.ceil(reply.duration * TOKENS_PER_SECOND)
        view = await store.get_pool(pool)
        assert (view.used, view.reserved) == (reply.charged_tokens, 0)
        # The voice-activity filter keeps Whisper from hallucinating on silence ("You You You ...").
        assert len(reply.text.split()) <= 2, reply.text[:200]
        # The process's own /metrics and its log line for this request.
        after = await scrape(stt_process.metrics_port)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("hoosh_stt_requests_total", model="whisper-tiny.en", status="ok") == 1
        assert moved("hoosh_stt_audio_seconds_total", model="whisper-tiny.en") == pytest.approx(reply.duration)
        assert moved("hoosh_stt_duration_seconds_count", model="whisper-tiny.en") == 1
        lines = [json.loads(line) for line in stt_process.log.read_text().splitlines() if line.startswith("{")]
        [line] = [line for line in lines if line["msg"] == "transcription finished" and line["status"] == "ok"]
        assert (line["request_id"], line["service"]) == ("req-one-hour", "stt")
