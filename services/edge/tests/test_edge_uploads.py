"""Uploads spool into HOOSH_EDGE_UPLOAD_DIR, within HOOSH_EDGE_UPLOAD_MAX_SPOOL_BYTES per
process (503 upload_capacity beyond); the STT service is the in-process fake."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hoosh_edge.config import Settings
from pydantic import ValidationError

from .backends import Backends
from .conftest import Edge, MakeEdge
from .test_edge_app import assert_envelope

PATH = "/v1/audio/transcriptions"
MB = 1024 * 1024


@pytest.fixture
async def edge(make_edge: MakeEdge, backends: Backends, tmp_path: Path) -> Edge:
    return await make_edge(
        stt_addr=backends.address,
        edge_upload_dir=tmp_path,
        edge_max_audio_bytes=2 * MB,
        edge_upload_max_spool_bytes=3 * MB,
    )


def upload(size: int) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("a.wav", b"RIFF" + b"\x00" * (size - 4), "audio/wav")}


async def test_a_large_upload_spills_into_the_upload_dir(edge: Edge, backends: Backends, tmp_path: Path) -> None:
    response = await edge.client.post(PATH, data={"model": "whisper-tiny.en"}, files=upload(int(1.5 * MB)))
    assert response.status_code == 200, response.text
    assert response.json()["text"] == "ok"
    # While the STT call ran, the edge held the spilled upload open inside the upload dir.
    assert any(path.startswith(str(tmp_path)) for path in backends.stt.open_files), backends.stt.open_files
    assert list(tmp_path.iterdir()) == []  # and nothing is left behind


async def test_uploads_beyond_the_spool_budget_get_503(edge: Edge, backends: Backends) -> None:
    backends.stt.gate = asyncio.Event()
    first = asyncio.create_task(edge.client.post(PATH, data={"model": "whisper-tiny.en"}, files=upload(int(1.8 * MB))))
    await asyncio.wait_for(backends.stt.entered.wait(), 10)  # the first upload is held
    second = await edge.client.post(PATH, data={"model": "whisper-tiny.en"}, files=upload(int(1.8 * MB)))
    error = assert_envelope(second, 503)
    assert error["code"] == "upload_capacity"
    assert second.headers["retry-after"] == "1"
    backends.stt.gate.set()
    assert (await first).status_code == 200
    third = await edge.client.post(PATH, data={"model": "whisper-tiny.en"}, files=upload(int(1.8 * MB)))
    assert third.status_code == 200, third.text  # the budget came back


def test_the_upload_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a directory"):
        Settings(edge_upload_dir=tmp_path / "missing")


def test_one_largest_upload_must_fit_the_spool_budget() -> None:
    with pytest.raises(ValidationError, match="UPLOAD_MAX_SPOOL_BYTES"):
        Settings(edge_max_audio_bytes=10 * MB, edge_upload_max_spool_bytes=5 * MB)
