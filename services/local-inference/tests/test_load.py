"""The worker's own word on its load (GetStatus): overloaded once the requests waiting for
the real SmolLM2 engine reach the bound, and taking work again when they drain; out of
memory after an engine failure caused by a lack of memory (for the hold time, which its
retry-after counts down) or while the GPU the engine uses has less free memory than the
floor. A client's error never counts, whatever it says."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh_common.grpc_errors import RETRY_AFTER, metadata_dict
from hoosh_common.hardware import Gpu
from hoosh_inference.config import DEFAULT_MODEL_ID
from hoosh_inference.errors import EngineFailure, InvalidRequest, ModelNotFound, QueueFull
from hoosh_inference.llama_engine import LlamaEngine
from hoosh_inference.load import (
    LoadMonitor,
    engine_gpu_ordinals,
    is_out_of_memory,
    llama_offloads_to_gpu,
    visible_gpu_free_bytes,
)
from hoosh_inference.server import InferenceServicer

Stub = inference_pb2_grpc.InferenceServiceStub
MIB = 2**20


@pytest.fixture
async def tight(idle: LlamaEngine) -> AsyncIterator[Stub]:
    """The real engine behind a servicer whose worker is overloaded from 1 waiting request."""
    server = grpc.aio.server()
    servicer = InferenceServicer(idle, load=LoadMonitor(idle, overload_queue=1))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield inference_pb2_grpc.InferenceServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


def long_request() -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        model=DEFAULT_MODEL_ID,
        messages=[chat_pb2.ChatMessage(role="user", text="Write a very long story about a dragon and a knight.")],
    )
    request.sampling.max_tokens = 400
    return request


async def test_a_queue_at_its_bound_reports_overloaded_and_recovers(
    tight: Stub, idle: LlamaEngine, wait_until: Callable[..., Awaitable[None]]
) -> None:
    quiet = await tight.GetStatus(inference_pb2.GetStatusRequest())
    assert (quiet.overloaded, quiet.out_of_memory, quiet.reason) == (False, False, "")
    assert (quiet.queue_depth, quiet.overload_queue, quiet.active_requests) == (0, 1, 0)

    # One generating, three waiting behind it (the engine's queue takes 4).
    calls = [tight.GenerateStream(long_request()) for _ in range(4)]
    readers = [asyncio.ensure_future(call.read()) for call in calls]
    try:
        await wait_until(lambda: idle.queue_depth >= 1)
        busy = await tight.GetStatus(inference_pb2.GetStatusRequest())
        assert busy.overloaded and not busy.out_of_memory
        assert busy.queue_depth >= busy.overload_queue == 1
        assert busy.active_requests == 1
        assert busy.reason.startswith("overloaded:") and "waiting" in busy.reason
    finally:
        for call in calls:
            call.cancel()
        for reader in readers:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
    await wait_until(lambda: idle.pending == 0)
    again = await tight.GetStatus(inference_pb2.GetStatusRequest())
    assert (again.overloaded, again.out_of_memory, again.reason, again.queue_depth) == (False, False, "", 0)


async def test_the_default_bound_is_the_engine_queue(stub: Stub, engine: LlamaEngine) -> None:
    status = await stub.GetStatus(inference_pb2.GetStatusRequest())
    assert status.overload_queue == engine.max_queue
    assert not status.overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def raised_from(cause: BaseException) -> EngineFailure:
    """An engine failure as the engines raise it: ``raise EngineFailure(...) from cause``."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise EngineFailure("The local model failed while generating.") from inner
    except EngineFailure as failure:
        return failure


def test_an_out_of_memory_failure_refuses_work_for_the_hold_time(engine: LlamaEngine) -> None:
    clock = Clock()
    monitor = LoadMonitor(engine, overload_queue=4, oom_hold_seconds=30, clock=clock)
    monitor.record_failure(raised_from(ValueError("bad grammar")))  # not a memory failure
    assert not monitor.status().out_of_memory
    assert monitor.status().retry_after_seconds == 0

    monitor.record_failure(raised_from(RuntimeError("CUDA error: out of memory")))
    status = monitor.status()
    assert status.out_of_memory and not status.overloaded and status.refusing
    assert status.reason.startswith("out of memory:")
    assert status.retry_after_seconds == 30  # the whole hold, not "a second"
    clock.now += 20.5
    assert monitor.status().retry_after_seconds == 10  # what is left of it, rounded up
    clock.now += 9.4
    assert monitor.status().out_of_memory and monitor.status().retry_after_seconds == 1
    clock.now += 0.2
    assert not monitor.status().out_of_memory and monitor.status().reason == ""


class OutOfMemoryError(RuntimeError):
    """torch.OutOfMemoryError as torch defines it (the class is matched by name and module)."""


OutOfMemoryError.__module__ = "torch"


def test_what_counts_as_running_out_of_memory() -> None:
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(raised_from(MemoryError()))
    # llama.cpp's allocation failure and torch's OutOfMemoryError, by class and text.
    assert is_out_of_memory(
        RuntimeError("ggml_backend_cuda_buffer_type_alloc_buffer: cudaMalloc failed: out of memory")
    )
    assert is_out_of_memory(raised_from(OutOfMemoryError("CUDA ran dry")))
    assert not is_out_of_memory(QueueFull("busy"))
    assert not is_out_of_memory(raised_from(KeyError("x")))
    assert not is_out_of_memory(type("OutOfMemoryError", (Exception,), {})("someone else's class"))
    # What engines raise: torch before its OutOfMemoryError class, CUDA, llama-cpp-python.
    for text in (
        "CUDA out of memory. Tried to allocate 20.00 MiB",
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "llama_decode returned -2",
    ):
        assert is_out_of_memory(raised_from(RuntimeError(text))), text
    assert not is_out_of_memory(raised_from(RuntimeError("llama_decode returned -1")))


def test_a_clients_error_never_counts_whatever_it_says() -> None:
    """A model name, a message the template rejects: the client's words, not the engine's."""
    assert not is_out_of_memory(ModelNotFound("The model 'qwen-OutOfMemory' does not exist on this host."))
    assert not is_out_of_memory(ModelNotFound("The model 'CUDA error: out of memory' does not exist."))
    assert not is_out_of_memory(InvalidRequest("The model's chat template rejected the messages: out of memory"))
    # Not even when something memory-like is in its chain: the request was refused.
    assert not is_out_of_memory(raised_from(ModelNotFound("The model 'qwen-OutOfMemory' does not exist.")))
    try:
        raise InvalidRequest("bad") from MemoryError()
    except InvalidRequest as refused:
        assert not is_out_of_memory(refused)
    # hoosh's own errors are not read for text: only what the engine raised is.
    assert not is_out_of_memory(EngineFailure("The model 'out of memory' failed."))
    assert not is_out_of_memory(raised_from(ValueError("prompt mentions out of memory")))
    assert not is_out_of_memory(raised_from(RuntimeError("template error near 'CUDA out of memory'")))


async def test_a_model_named_out_of_memory_does_not_stop_the_worker(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    """Any key may name any model (a glob local provider passes it on): the worker says it
    does not exist, and keeps taking work for everyone."""
    for model in ("qwen-OutOfMemory", "cuda_error_out_of_memory", "llama out of memory"):
        request = long_request()
        request.model = model
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(request)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        status = await stub.GetStatus(inference_pb2.GetStatusRequest())
        assert (status.out_of_memory, status.reason) == (False, "")


async def test_a_refusing_worker_says_when_to_ask_again(engine: LlamaEngine) -> None:
    """GetStatus carries retry-after (as an error does) while the worker refuses: the rest
    of its out-of-memory hold."""
    monitor = LoadMonitor(engine, overload_queue=64, oom_hold_seconds=30)
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine, load=monitor), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            call = stub.GetStatus(inference_pb2.GetStatusRequest())
            assert not (await call).out_of_memory
            assert RETRY_AFTER not in metadata_dict(await call.trailing_metadata())

            monitor.record_failure(raised_from(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
            call = stub.GetStatus(inference_pb2.GetStatusRequest())
            assert (await call).out_of_memory
            assert 29 <= int(metadata_dict(await call.trailing_metadata())[RETRY_AFTER]) <= 30
    finally:
        await server.stop(None)


def test_free_gpu_memory_under_the_floor_is_out_of_memory(engine: LlamaEngine) -> None:
    free = [100 * MIB]
    monitor = LoadMonitor(engine, overload_queue=4, gpu_memory_floor_bytes=256 * MIB, gpu_free_bytes=lambda: free[0])
    assert not monitor.status().out_of_memory  # nothing sampled yet
    monitor.sample()
    status = monitor.status()
    assert status.out_of_memory and "100 MiB" in status.reason and "256 MiB" in status.reason
    assert status.retry_after_seconds == 1  # the next sample may clear it
    free[0] = 4096 * MIB
    monitor.sample()
    assert not monitor.status().out_of_memory


def test_without_a_gpu_the_floor_never_trips(engine: LlamaEngine) -> None:
    """This machine has no NVIDIA driver: the real sampler finds no GPU, nothing to refuse."""
    assert visible_gpu_free_bytes() is None
    monitor = LoadMonitor(engine, overload_queue=4, gpu_memory_floor_bytes=2**40)
    monitor.sample()
    assert not monitor.status().out_of_memory


GIB = 2**30
# A host of four GPUs: this worker's is device 0; device 3 is another tenant's, nearly full;
# device 2 has unified memory (NVML cannot read it).
HOST = (
    Gpu(0, "NVIDIA L4", 24 * GIB, 4 * GIB, 20 * GIB, uuid="GPU-0d1c2b3a-0000-4000-8000-000000000000"),
    Gpu(1, "NVIDIA L4", 24 * GIB, 2 * GIB, 22 * GIB, uuid="GPU-1e2f3a4b-0000-4000-8000-000000000001"),
    Gpu(2, "NVIDIA GH200 480GB", None, None, None, uuid="GPU-2a3b4c5d-0000-4000-8000-000000000002"),
    Gpu(3, "NVIDIA L4", 24 * GIB, 24 * GIB - 10 * MIB, 10 * MIB, uuid="GPU-3f4e5d6c-0000-4000-8000-000000000003"),
)


def free_of(ordinals: tuple[int, ...] = (0,), **environ: str) -> int | None:
    return visible_gpu_free_bytes(ordinals, environ, read=lambda: HOST)


def test_the_floor_watches_the_gpu_the_engine_uses_not_the_hosts() -> None:
    # Unset: CUDA device 0 only; the other tenant's full GPU 3 is not this worker's.
    assert free_of() == 20 * GIB
    # Indices are NVML's (exact under CUDA_DEVICE_ORDER=PCI_BUS_ID); UUIDs are exact.
    assert free_of(CUDA_VISIBLE_DEVICES="1") == 22 * GIB
    assert free_of(CUDA_VISIBLE_DEVICES="3,0") == 10 * MIB
    assert free_of(CUDA_VISIBLE_DEVICES="GPU-1e2f3a4b") == 22 * GIB
    assert free_of((0, 1), CUDA_VISIBLE_DEVICES="0,3") == 10 * MIB
    # Unknown memory (unified) or an unknown device is no reading, never "0 free".
    assert free_of(CUDA_VISIBLE_DEVICES="2") is None
    assert free_of(CUDA_VISIBLE_DEVICES="MIG-0d1c2b3a-0000-4000-8000-000000000000") is None
    assert free_of(CUDA_VISIBLE_DEVICES="") is None


def test_a_gpu_whose_memory_nvml_cannot_read_is_not_out_of_memory(engine: LlamaEngine) -> None:
    monitor = LoadMonitor(
        engine,
        overload_queue=4,
        gpu_memory_floor_bytes=256 * MIB,
        gpu_free_bytes=lambda: free_of(CUDA_VISIBLE_DEVICES="2"),
    )
    monitor.sample()
    assert not monitor.status().out_of_memory


def test_which_engines_the_floor_applies_to(engine: LlamaEngine) -> None:
    """vLLM reserves its GPU memory up front (little free is its normal state): no floor,
    its own out-of-memory errors count. llama.cpp: its main GPU, when built for one."""
    assert engine_gpu_ordinals("vllm") == ()
    assert engine_gpu_ordinals("llama.cpp") == ((0,) if llama_offloads_to_gpu() else ())
    monitor = LoadMonitor(engine, overload_queue=4, gpu_memory_floor_bytes=256 * MIB)
    assert monitor.gpu_memory_floor_bytes == (256 * MIB if llama_offloads_to_gpu() else 0)
