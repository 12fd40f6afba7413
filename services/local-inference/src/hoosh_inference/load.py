"""Whether this worker should be sent new work: the status the router polls (GetStatus)
and obeys (a worker that says it is overloaded or out of memory gets no request until
it says otherwise).

- **overloaded**: the requests waiting for the engine reached
  ``HOOSH_INFERENCE_OVERLOAD_QUEUE`` (default ``HOOSH_INFERENCE_MAX_QUEUE``: the point at
  which the next one would be refused with ``queue_full``).
- **out of memory**: the engine itself failed for lack of memory within the last
  ``HOOSH_INFERENCE_OOM_HOLD_SECONDS`` (``is_out_of_memory``: an engine fault only, never
  a client's error, whose text may carry what the client sent), or the GPU the engine
  uses has less free memory than ``HOOSH_INFERENCE_GPU_MEMORY_FLOOR_BYTES`` (sampled
  through NVML every ``HOOSH_INFERENCE_STATUS_SAMPLE_SECONDS``, off the event loop).

Which GPU the floor watches (``engine_gpu_ordinals``): llama.cpp's main GPU (CUDA device
0 of this process: the worker sets no ``main_gpu``, offloads no layers, and so splits
none across devices), and only when llama.cpp is built with GPU offload. The floor is
not applied to vLLM: it reserves ``gpu_memory_utilization`` of its GPU(s) for weights
and KV cache up front, so little free memory is its normal state, not a warning; its
own out-of-memory errors are what counts there. CUDA device numbers map to NVML's
devices as ``hoosh_common.hardware.cuda_gpus`` says (exact for UUIDs, by index
otherwise).

``retry_after_seconds`` says how long a refusing worker expects to keep refusing: the
rest of an out-of-memory hold, a sample interval for the floor, a second for a queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from hoosh_common.hardware import Gpu, cuda_gpus, nvidia_gpus

from .engine import Engine
from .errors import InferenceError, InvalidRequest, ModelNotFound, QueueFull

log = logging.getLogger(__name__)

MIB = 2**20
# Errors about the request, not the engine: what they say may be the client's words (a
# model name, a template's complaint about the messages), so they never count.
CLIENT_ERRORS: tuple[type[InferenceError], ...] = (InvalidRequest, ModelNotFound, QueueFull)
# Libraries whose OutOfMemoryError class is a real device allocation failure.
_OOM_MODULES = frozenset({"torch", "cupy"})
# How the RuntimeErrors that CUDA, torch and llama.cpp raise for a failed allocation
# begin: torch's "CUDA out of memory. Tried to allocate ..." (before its OutOfMemoryError
# class) and "CUDA error: out of memory" / "CUDA error: CUBLAS_STATUS_ALLOC_FAILED ...",
# the driver API's "CUDA_ERROR_OUT_OF_MEMORY", ggml's "ggml_...: cudaMalloc failed: out of
# memory", and llama-cpp-python's "llama_decode returned -2" (GGML_STATUS_ALLOC_FAILED).
# Anchored at the start, so a message that merely quotes something (a template's
# complaint about the messages) never matches.
_ENGINE_OOM = re.compile(
    r"(?:CUDA out of memory"
    r"|CUDA error: (?:out of memory|CUBLAS_STATUS_ALLOC_FAILED)"
    r"|CUDA_ERROR_OUT_OF_MEMORY"
    r"|ggml_\w+: \w+ failed: out of memory"
    r"|llama_(?:decode|encode) returned -2$)",
    re.IGNORECASE,
)
# llama.cpp's main GPU: CUDA device 0 of this process (LlamaEngine passes no main_gpu,
# n_gpu_layers or tensor_split: the defaults, nothing split across devices).
LLAMA_MAIN_GPU = 0


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from (``from``, else the context it was raised in)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__


def _oom_class(error: BaseException) -> bool:
    """A MemoryError, or torch's (cupy's) OutOfMemoryError, by class and module."""
    if isinstance(error, MemoryError):
        return True
    return any(
        cls.__name__ == "OutOfMemoryError" and cls.__module__.split(".")[0] in _OOM_MODULES
        for cls in type(error).__mro__
    )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether the engine ran out of memory: ``error`` is no client error (nor a
    cancellation), and it or what it was raised from is a MemoryError, torch's
    OutOfMemoryError, or a RuntimeError raised by the engine (CUDA, torch, llama.cpp)
    whose message begins by saying an allocation failed. hoosh's own errors are never
    read for their text (their messages may quote the request), other exception types
    neither, and the chain is not followed past a client error."""
    if not isinstance(error, Exception) or isinstance(error, CLIENT_ERRORS):
        return False
    for link in _chain(error):
        if isinstance(link, CLIENT_ERRORS):
            return False
        if isinstance(link, InferenceError):
            continue
        if _oom_class(link):
            return True
        if isinstance(link, RuntimeError) and _ENGINE_OOM.match(str(link)):
            return True
    return False


def llama_offloads_to_gpu() -> bool:
    """Whether the installed llama.cpp is built with a GPU backend (CUDA, ...)."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def engine_gpu_ordinals(engine_name: str) -> tuple[int, ...]:
    """The CUDA devices (of this process) whose free memory the floor watches for this
    engine: llama.cpp's main GPU when it has a GPU backend; none for vLLM (see above)."""
    if engine_name == "llama.cpp" and llama_offloads_to_gpu():
        return (LLAMA_MAIN_GPU,)
    return ()


def visible_gpu_free_bytes(
    ordinals: Sequence[int] = (LLAMA_MAIN_GPU,),
    environ: Mapping[str, str] | None = None,
    read: Callable[[], Sequence[Gpu]] = lambda: nvidia_gpus().gpus,
) -> int | None:
    """The least free memory of these CUDA devices of this process; None when none of
    them is known, or none has readable memory (unified memory: NVML says NOT_SUPPORTED)."""
    free = [gpu.memory_free_bytes for gpu in cuda_gpus(read(), ordinals, environ) if gpu.memory_free_bytes is not None]
    return min(free) if free else None


@dataclass(frozen=True, slots=True)
class LoadStatus:
    overloaded: bool
    out_of_memory: bool
    reason: str  # empty when the worker takes work
    queue_depth: int
    overload_queue: int
    active_requests: int
    retry_after_seconds: int = 0  # while refusing: when to ask again (at least 1); 0 otherwise

    @property
    def refusing(self) -> bool:
        return self.overloaded or self.out_of_memory


class LoadMonitor:
    """This worker's load and memory state. ``status()`` is cheap (no I/O): the GPU
    memory is sampled by ``run()`` in the background, and only when a floor applies."""

    def __init__(
        self,
        engine: Engine,
        *,
        overload_queue: int,
        gpu_memory_floor_bytes: int = 0,
        oom_hold_seconds: float = 30.0,
        gpu_free_bytes: Callable[[], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``gpu_free_bytes``: the free memory the floor is held against (default: that
        of the GPUs ``engine_gpu_ordinals`` names for this engine; with none, no floor)."""
        if overload_queue < 1:
            raise ValueError("overload_queue must be at least 1")
        self._engine = engine
        self.overload_queue = overload_queue
        self._floor = gpu_memory_floor_bytes
        if gpu_free_bytes is None and self._floor > 0:
            ordinals = engine_gpu_ordinals(engine.name)
            if ordinals:
                gpu_free_bytes = partial(visible_gpu_free_bytes, ordinals)
            else:
                log.info(
                    "no GPU memory floor for this engine",
                    extra={
                        "engine": engine.name,
                        "why": "vLLM reserves its GPU memory up front" if engine.name == "vllm" else "it uses no GPU",
                    },
                )
                self._floor = 0
        self._hold = oom_hold_seconds
        self._gpu_free_bytes = gpu_free_bytes or (lambda: None)
        self._clock = clock
        self._oom_until = 0.0
        self._oom_reason = ""
        self._gpu_free: int | None = None
        self._sample_seconds = 1.0
        self._was_refusing = False

    @property
    def gpu_memory_floor_bytes(self) -> int:
        """The floor in force (0: none, e.g. for vLLM or an engine on CPU)."""
        return self._floor

    def record_failure(self, error: BaseException) -> None:
        """A generation failed: when the engine ran out of memory, refuse work for the
        hold time. A client's error never counts (``is_out_of_memory``)."""
        if not is_out_of_memory(error):
            return
        self._oom_until = self._clock() + self._hold
        self._oom_reason = f"the engine ran out of memory ({type(error).__name__}) in the last {self._hold:g}s"
        log.warning("engine out of memory", extra={"error": repr(error)[:300], "hold_seconds": self._hold})

    def sample(self) -> None:
        """Read the GPUs' free memory now (blocking: NVML)."""
        self._gpu_free = self._gpu_free_bytes()

    async def run(self, interval: float) -> None:
        """Sample the GPU memory every ``interval`` seconds until cancelled (nothing to do
        without a floor)."""
        self._sample_seconds = interval
        if self._floor <= 0:
            return
        while True:
            try:
                await asyncio.to_thread(self.sample)
            except Exception as error:  # a failed sample must not end the sampling
                log.warning("GPU memory sample failed", extra={"error": repr(error)})
            await asyncio.sleep(interval)

    def status(self) -> LoadStatus:
        depth = self._engine.queue_depth
        reasons: list[str] = []
        waits: list[float] = []
        overloaded = depth >= self.overload_queue
        if overloaded:
            reasons.append(f"overloaded: {depth} requests waiting (bound {self.overload_queue})")
            waits.append(1.0)
        out_of_memory = False
        held = self._oom_until - self._clock()
        if held > 0:
            out_of_memory = True
            reasons.append(f"out of memory: {self._oom_reason}")
            waits.append(held)
        free = self._gpu_free
        if self._floor > 0 and free is not None and free < self._floor:
            out_of_memory = True
            reasons.append(
                f"out of memory: {free // MIB} MiB of GPU memory free, under the floor {self._floor // MIB} MiB"
            )
            waits.append(self._sample_seconds)
        status = LoadStatus(
            overloaded=overloaded,
            out_of_memory=out_of_memory,
            reason="; ".join(reasons),
            queue_depth=depth,
            overload_queue=self.overload_queue,
            active_requests=self._engine.active_requests,
            retry_after_seconds=max(1, math.ceil(max(waits))) if waits else 0,
        )
        if status.refusing != self._was_refusing:
            self._was_refusing = status.refusing
            if status.refusing:
                log.warning("refusing new work", extra={"reason": status.reason})
            else:
                log.info("taking new work again")
        return status
