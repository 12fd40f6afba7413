"""The engine choice from this host's facts. The facts themselves (GPUs through NVML,
CPUs, memory, container) are ``hoosh_common.hardware``'s, shared with stt and the edge."""

from __future__ import annotations

import importlib.util
from typing import Literal

from hoosh_common.hardware import Gpu, HostFacts, cpu_count, probe

from .engine import EngineName

__all__ = ["EngineSetting", "Gpu", "HostFacts", "choose_engine", "cpu_count", "probe", "vllm_installed"]

EngineSetting = Literal["auto", "llama.cpp", "vllm"]


def vllm_installed() -> bool:
    """Whether vllm could be imported, without importing it (that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def choose_engine(setting: EngineSetting, *, has_gpu: bool, vllm_available: bool, vllm_model: str) -> EngineName:
    """``auto`` takes vLLM when a CUDA GPU is present, vllm is installed and a vLLM
    model is configured; llama.cpp otherwise. An explicit setting is obeyed."""
    if setting == "auto":
        return "vllm" if has_gpu and vllm_available and vllm_model else "llama.cpp"
    return setting
