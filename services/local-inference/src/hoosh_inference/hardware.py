"""Facts about this host: NVIDIA GPUs through NVML (pynvml from nvidia-ml-py),
and the CPUs this process may use. Everything degrades to "no GPU" when there
is no NVIDIA driver or library."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .engine import EngineName

log = logging.getLogger(__name__)

EngineSetting = Literal["auto", "llama.cpp", "vllm"]


@dataclass(frozen=True, slots=True)
class Accelerator:
    name: str
    memory_total_bytes: int
    memory_free_bytes: int


@dataclass(frozen=True, slots=True)
class HardwareInfo:
    accelerators: tuple[Accelerator, ...]
    cpu_count: int


def gpus() -> tuple[Accelerator, ...]:
    """Every NVIDIA GPU NVML sees; empty without a driver (or without pynvml)."""
    try:
        with warnings.catch_warnings():
            # The deprecated "pynvml" shim package warns on import; nvidia-ml-py does not.
            warnings.simplefilter("ignore", FutureWarning)
            import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("no NVIDIA driver", extra={"reason": str(exc)})
        return ()
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(
                Accelerator(
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_bytes=int(memory.total),
                    memory_free_bytes=int(memory.free),
                )
            )
        return tuple(found)
    except pynvml.NVMLError as exc:
        log.warning("NVML query failed", extra={"reason": str(exc)})
        return ()
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def cpu_count() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU
    quota (a container limited to 2 CPUs on a 64-core node gets 2)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def probe() -> HardwareInfo:
    """GPUs and CPUs now (NVML calls block briefly: run off the event loop)."""
    return HardwareInfo(accelerators=gpus(), cpu_count=cpu_count())


def vllm_installed() -> bool:
    """Whether vllm could be imported, without importing it (that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def choose_engine(setting: EngineSetting, *, has_gpu: bool, vllm_available: bool, vllm_model: str) -> EngineName:
    """``auto`` takes vLLM when a CUDA GPU is present, vllm is installed and a vLLM
    model is configured; llama.cpp otherwise. An explicit setting is obeyed."""
    if setting == "auto":
        return "vllm" if has_gpu and vllm_available and vllm_model else "llama.cpp"
    return setting
