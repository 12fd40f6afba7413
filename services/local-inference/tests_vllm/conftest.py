"""vLLM 0.33 on the CPU with its engine core stubbed (stub_core.py), around the tiny
models tiny_models.py makes. Nothing is downloaded: the models are made here, and the
hub is off."""

from __future__ import annotations

import importlib.util
import os

# Before vLLM is imported: the CPU platform (the wheel is a CUDA build and no GPU is
# here), nothing fetched, vLLM's loggers left to propagate (caplog sees them), no stats.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import tiny_models
from hoosh_inference.vllm_engine import VllmEngine

if importlib.util.find_spec("vllm") is None:
    # Not `make test-vllm`'s venv (`pytest services/local-inference` in .venv, say):
    # nothing here can run without vLLM.
    collect_ignore_glob = ["test_*.py"]

if TYPE_CHECKING:
    from stub_core import StubEngineCore

MODEL_ID = "tiny"
CONTEXT = 256


@dataclass
class Served:
    """A VllmEngine built by ``VllmEngine.start`` (real vLLM) and its stubbed core."""

    engine: VllmEngine
    core: StubEngineCore


async def serve(model: Path) -> Served:
    import stub_core

    cores: list[stub_core.StubEngineCore] = []
    with stub_core.installed(cores):
        engine = await VllmEngine.start(
            model_id=MODEL_ID, model=str(model), max_model_len=CONTEXT, engine_args={"disable_log_stats": True}
        )
    (core,) = cores
    return Served(engine, core)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "chatml": tiny_models.chatml_model(root / "chatml"),
        "mistral": tiny_models.mistral_model(root / "mistral"),
    }


@pytest.fixture(scope="session")
async def chatml(models: dict[str, Path]) -> AsyncIterator[Served]:
    served = await serve(models["chatml"])
    yield served
    await served.engine.close()


@pytest.fixture(scope="session")
async def mistral(models: dict[str, Path]) -> AsyncIterator[Served]:
    served = await serve(models["mistral"])
    yield served
    await served.engine.close()


@pytest.fixture
async def fresh(models: dict[str, Path]) -> AsyncIterator[Served]:
    """An engine of its own, for a test that kills or closes it."""
    served = await serve(models["chatml"])
    yield served
    await served.engine.close()


@pytest.fixture
def wait_until() -> Callable[[Callable[[], bool]], Awaitable[None]]:
    import asyncio

    async def wait(predicate: Callable[[], bool], limit: float = 30.0) -> None:
        for _ in range(int(limit / 0.01)):
            if predicate():
                return
            await asyncio.sleep(0.01)
        assert predicate(), "condition never became true"

    return wait
