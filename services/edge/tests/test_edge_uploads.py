"""Uploads spool into HOOSH_EDGE_UPLOAD_DIR, within HOOSH_EDGE_UPLOAD_MAX_SPOOL_BYTES per
process (503 upload_capacity beyond); the STT service is the real one in-process
(conftest's ``stt``: Whisper tiny.en behind one engine thread).

To keep an upload in flight, a test takes that engine thread the way another
transcription would, through the service's own work queue: the edge's upload is then
admitted and waits its turn, its spool held, until the test lets the thread go."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hoosh_edge.config import Settings
from pydantic import ValidationError

from tests.inprocess import RunningStt

from .conftest import STT_MODEL, Edge, MakeEdge, Stack, eventually, open_files
from .test_edge_app import assert_envelope

PATH = "/v1/audio/transcriptions"
MB = 1024 * 1024
RATE, CHANNELS, WIDTH = 48_000, 2, 2  # 192,000 bytes a second


@pytest.fixture
async def edge(make_edge: MakeEdge, stack: Stack, stt: RunningStt, tmp_path: Path) -> Edge:
    return await make_edge(
        **stack.addresses(),
        edge_upload_dir=tmp_path,
        edge_max_audio_bytes=2 * MB,
        edge_upload_max_spool_bytes=3 * MB,
    )


def silence(size: int) -> bytes:
    """A WAV file of silence about ``size`` bytes long."""
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setnchannels(CHANNELS)
        target.setsampwidth(WIDTH)
        target.setframerate(RATE)
        target.writeframes(b"\x00" * ((size - 44) // (CHANNELS * WIDTH) * CHANNELS * WIDTH))
    return out.getvalue()


def upload(size: int) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("a.wav", silence(size), "audio/wav")}


@contextlib.asynccontextmanager
async def engine_taken(stt: RunningStt) -> AsyncIterator[None]:
    """The STT's only engine thread, held by a job of the test's admitted through the
    service's queue (as another transcription would be) until the block ends."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    ticket = stt.queue.admit()
    job = asyncio.ensure_future(ticket.run(hold))
    try:
        assert await asyncio.to_thread(started.wait, 10), "the engine thread was not taken"
        yield
    finally:
        release.set()
        await job
        ticket.close()


async def admitted(stt: RunningStt, count: int) -> None:
    """Wait until ``count`` transcriptions are admitted by the STT service."""

    async def reached() -> bool:
        return bool(stt.queue.admitted >= count)

    await eventually(reached, f"{count} admitted transcriptions")


async def test_a_large_upload_spills_into_the_upload_dir(
    edge: Edge, stack: Stack, stt: RunningStt, tmp_path: Path
) -> None:
    form = {"model": STT_MODEL, "response_format": "verbose_json"}
    async with engine_taken(stt):
        sent = asyncio.create_task(edge.client.post(PATH, data=form, files=upload(int(1.5 * MB))))
        await admitted(stt, 2)  # the edge's call reached the STT service and waits for the engine
        # Meanwhile the edge holds the spilled upload open inside the upload dir.
        held = [path for path in open_files() if path.startswith(str(tmp_path))]
        assert held, open_files()
    response = await sent
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "" and body["duration"] == pytest.approx(1.5 * MB / (RATE * CHANNELS * WIDTH), abs=0.01)
    assert list(tmp_path.iterdir()) == []  # and nothing is left behind
    pool = await stack.pool("default")  # charged by the seconds the STT service decoded
    assert pool.used >= 1.5 * MB / (RATE * CHANNELS * WIDTH) * 10 and pool.reserved == 0


async def test_uploads_beyond_the_spool_budget_get_503(edge: Edge, stt: RunningStt) -> None:
    async with engine_taken(stt):
        first = asyncio.create_task(edge.client.post(PATH, data={"model": STT_MODEL}, files=upload(int(1.8 * MB))))
        await admitted(stt, 2)  # the first upload is held, its 1.8 MB spooled
        second = await edge.client.post(PATH, data={"model": STT_MODEL}, files=upload(int(1.8 * MB)))
        error = assert_envelope(second, 503)
        assert error["code"] == "upload_capacity"
        assert second.headers["retry-after"] == "1"
        assert stt.queue.admitted == 2  # refused by the edge: it never reached the STT service
    assert (await first).status_code == 200
    third = await edge.client.post(PATH, data={"model": STT_MODEL}, files=upload(int(1.8 * MB)))
    assert third.status_code == 200, third.text  # the budget came back


def test_the_upload_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a directory"):
        Settings(edge_upload_dir=tmp_path / "missing")


def test_one_largest_upload_must_fit_the_spool_budget() -> None:
    with pytest.raises(ValidationError, match="UPLOAD_MAX_SPOOL_BYTES"):
        Settings(edge_max_audio_bytes=10 * MB, edge_upload_max_spool_bytes=5 * MB)
