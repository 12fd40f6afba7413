"""STT settings, read once from the environment (prefix ``HOOSH_``), and the model
catalogue: the bundled Whisper tiny.en plus any CTranslate2 Whisper models named by path."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from hoosh_common.eventbus_settings import EventBusSettings
from hoosh_common.events import DEFAULT_STREAM, SUBJECT_PREFIX
from hoosh_common.internal_plane import InternalPlaneSettings
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from .engine import BUNDLED_MODEL, ModelSpec, bundled_model_dir

__all__ = ["BUNDLED_MODEL", "OPENAI_MAX_UPLOAD_BYTES", "ModelSpec", "SttSettings", "bundled_model_dir", "model_specs"]

OPENAI_MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's documented 25 MB (26214400 bytes)


class SttSettings(EventBusSettings, InternalPlaneSettings):
    """Everything the STT service reads from the environment (the event bus's included)."""

    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")

    stt_listen: str = Field(default="127.0.0.1:50055", description="gRPC listen address")
    stt_metrics_listen: str = Field(
        default="127.0.0.1:9465", description="Prometheus /metrics address (host:port); empty: not served"
    )
    # The budget's Redis, used in-process through hoosh_metering (the budget service's defaults).
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="redis://host:port/db, or redis+cluster://host:port"
    )
    budget_key_prefix: str = "hoosh:budget:"
    # How a transcription's reservation whose lease ran out is settled (the budget
    # service's setting of the same name): "commit" charges it whole, "release" gives it back.
    budget_expiry_policy: Literal["commit", "release"] = "commit"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_stream: str = DEFAULT_STREAM
    subject_prefix: str = SUBJECT_PREFIX

    stt_engine: Literal["auto", "faster-whisper", "whisperx"] = Field(
        default="auto", description="auto: whisperx when CUDA and whisperx are present, faster-whisper otherwise"
    )
    stt_device: Literal["auto", "cpu", "cuda"] = "auto"
    stt_compute_type: str = Field(
        default="", description="CTranslate2 compute type; empty: int8 on CPU, float16 on CUDA"
    )
    stt_cpu_threads: int = Field(default=0, ge=0, description="CTranslate2 threads per transcription; 0: its default")
    # JSON object in the environment: {"whisper-small": "/models/whisper-small-ct2"}.
    stt_models: dict[str, Path] = Field(default_factory=dict, description="Extra CTranslate2 Whisper models by path")
    stt_beam_size: int = Field(default=5, ge=1, le=20)
    stt_batch_size: int = Field(default=16, ge=1, description="whisperx: segments decoded per GPU batch")
    stt_align_model_dir: Path | None = Field(
        default=None, description="whisperx: where alignment models are cached (word timings need one locally)"
    )

    stt_workers: int = Field(default=1, ge=1, description="Transcriptions running at once")
    stt_max_queue: int = Field(default=8, ge=0, description="Requests that may wait beyond the running ones")
    stt_decode_workers: int = Field(default=2, ge=1, description="Uploads decoded at once")
    stt_max_audio_bytes: int = Field(default=OPENAI_MAX_UPLOAD_BYTES, gt=0)
    # 25 MiB lasts 2 h at 29 kbps; speech is usually uploaded at 32-128 kbps (27 min to
    # 1.8 h in 25 MiB): only very low bitrates or padded/silent files run longer.
    # Refused (400 audio_too_long) before decoding, so never charged.
    stt_max_audio_seconds: float = Field(default=2 * 3600.0, gt=0, description="Longest audio accepted")
    stt_window_seconds: float = Field(
        default=300.0, ge=30.0, le=1800.0, description="Audio decoded and transcribed at a time (bounds memory)"
    )
    stt_vad_filter: bool = Field(default=True, description="Drop non-speech (Silero VAD) before Whisper sees it")
    stt_tokens_per_second: float = Field(default=10.0, gt=0, description="Pool tokens charged per second of audio")
    # The local engines are priced only here (USD per minute of audio, a decimal; 0: free);
    # the cost is returned to the client, recorded in the event and the cost ledger.
    stt_price_per_minute_usd: Decimal = Field(default=Decimal(0), ge=0, description="USD per minute of audio")
    stt_lease_seconds: int = Field(default=1800, gt=0, description="Budget lease of one transcription")
    stt_retry_after_seconds: int = Field(default=1, ge=0, description="Retry-After sent with stt_overloaded")

    @field_validator("stt_listen")
    @classmethod
    def _address_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a gRPC address (host:port) is required")
        return value.strip()


def model_specs(settings: SttSettings) -> list[ModelSpec]:
    """The bundled model first, then the configured ones (a configured id may replace it)."""
    extra = {name: path for name, path in settings.stt_models.items()}
    configured = extra.pop(BUNDLED_MODEL, None)
    specs = [ModelSpec(BUNDLED_MODEL, configured or bundled_model_dir())]
    specs += [ModelSpec(name, path) for name, path in extra.items()]
    for spec in specs:
        if not (spec.path / "model.bin").is_file():
            raise FileNotFoundError(f"model '{spec.id}': {spec.path} holds no CTranslate2 model (model.bin)")
    return specs
