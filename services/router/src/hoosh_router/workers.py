"""The local-inference workers as more than backends: their own word on their load
(overloaded, out of memory), which keeps requests away from them, and their hardware,
which the edge aggregates (GET /v1/hardware).

Only ``LocalBackend``s have either; every other backend is never refused here."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable

import grpc
from hoosh.router.v1 import router_pb2

from .backends.base import Backend
from .backends.local import LocalBackend, Refusal
from .config import ProviderConfig

# A status holds this many poll intervals (at least STATUS_HOLD_MIN_SECONDS): a poller
# that stops (or a worker that stops answering) lets the refusal lapse.
STATUS_HOLD_INTERVALS = 3
STATUS_HOLD_MIN_SECONDS = 2.0
HARDWARE_TIMEOUT_SECONDS = 5.0


def refusal(backend: Backend) -> str | None:
    """Why ``backend`` takes no work now, in its own words (for logs and admins); None
    when it does (or cannot say)."""
    return backend.refusal() if isinstance(backend, LocalBackend) else None


def refusing(backend: Backend) -> Refusal | None:
    """What keeps ``backend`` from taking work now (overloaded, out of memory); None: nothing."""
    return backend.refusing() if isinstance(backend, LocalBackend) else None


def retry_after(backend: Backend) -> float | None:
    """Seconds until a refusing worker expects to take work again; None when it is not refusing."""
    return backend.retry_after() if isinstance(backend, LocalBackend) else None


def _by_address(entries: Iterable[tuple[ProviderConfig, Backend]]) -> dict[str, tuple[LocalBackend, list[str]]]:
    """Each local worker once (several local providers may share one), with its providers."""
    by_address: dict[str, tuple[LocalBackend, list[str]]] = {}
    for config, backend in entries:
        if isinstance(backend, LocalBackend):
            by_address.setdefault(backend.address, (backend, []))[1].append(config.name)
    return by_address


def worker_states(entries: Iterable[tuple[ProviderConfig, Backend]]) -> list[router_pb2.WorkerState]:
    """Each local worker as this router last polled it (no call: what the poller heard)."""
    states = []
    for address, (backend, providers) in _by_address(entries).items():
        state = router_pb2.WorkerState(
            address=address, providers=providers, error=backend.poll_error, polled_at_ms=backend.polled_at_ms
        )
        status = backend.status()
        if status is not None:
            state.status.CopyFrom(status)
        wait = backend.retry_after()
        if wait is not None:
            state.retry_after_seconds = math.ceil(wait)
        states.append(state)
    return states


def local_backends(backends: Iterable[Backend]) -> list[LocalBackend]:
    return [backend for backend in backends if isinstance(backend, LocalBackend)]


async def poll_status(backends: Iterable[Backend], interval: float) -> None:
    """Ask every local worker whether it takes work (each answer holds a few intervals)."""
    hold = max(STATUS_HOLD_MIN_SECONDS, STATUS_HOLD_INTERVALS * interval)
    wait = max(0.1, min(interval, 1.0))
    await asyncio.gather(*(backend.poll_status(wait, hold) for backend in local_backends(backends)))


async def _worker_hardware(
    backend: LocalBackend, providers: list[str], wait_seconds: float
) -> router_pb2.WorkerHardware:
    entry = router_pb2.WorkerHardware(address=backend.address, providers=providers)
    status = backend.status()
    if status is not None:
        entry.status.CopyFrom(status)
    try:
        entry.hardware.CopyFrom(await backend.hardware(wait_seconds))
    except grpc.aio.AioRpcError as error:
        code = error.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            entry.error = "the worker does not implement GetHardware"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            entry.error = f"the worker did not answer within {wait_seconds:g}s"
        else:
            entry.error = f"the worker did not answer: {code.name}: {error.details() or ''}".rstrip(": ")
    return entry


async def workers_hardware(
    entries: Iterable[tuple[ProviderConfig, Backend]], wait_seconds: float = HARDWARE_TIMEOUT_SECONDS
) -> router_pb2.GetHardwareResponse:
    """Each local worker's hardware, asked now, once per address (several local providers
    may share one worker); a worker that does not answer has its ``error`` set."""
    answers = await asyncio.gather(
        *(_worker_hardware(backend, providers, wait_seconds) for backend, providers in _by_address(entries).values())
    )
    return router_pb2.GetHardwareResponse(workers=answers)
