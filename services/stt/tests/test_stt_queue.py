"""The bounded work queue: places, engine threads, cancelled callers, and the gauges
of what waits for and holds an engine thread (process-wide: checked as deltas)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hoosh_stt.errors import Overloaded
from hoosh_stt.transcription import WorkQueue
from prometheus_client import REGISTRY


def gauges() -> tuple[float, float]:
    """(waiting for an engine thread, running on one)."""
    return REGISTRY.get_sample_value("hoosh_stt_queue_depth") or 0.0, REGISTRY.get_sample_value(
        "hoosh_stt_active"
    ) or 0.0


async def test_admission_is_bounded_by_workers_plus_queue() -> None:
    queue = WorkQueue(workers=1, max_queue=2, retry_after=3)
    tickets = [queue.admit() for _ in range(3)]
    with pytest.raises(Overloaded) as raised:
        queue.admit()
    assert raised.value.retry_after == 3 and raised.value.error_code == "stt_overloaded"
    tickets[0].close()
    tickets[0].close()  # closing twice frees one place, once
    assert queue.admitted == 2
    queue.admit().close()
    for ticket in tickets[1:]:
        ticket.close()
    assert queue.admitted == 0
    queue.shutdown()


async def test_jobs_run_one_per_worker_thread() -> None:
    queue = WorkQueue(workers=2, max_queue=4, retry_after=1)
    running = 0
    peak = 0
    lock = threading.Lock()
    release = threading.Event()

    def job() -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(10)
        with lock:
            running -= 1
        return threading.current_thread().name

    waiting_before, active_before = gauges()
    tickets = [queue.admit() for _ in range(5)]
    tasks = [asyncio.create_task(ticket.run(job)) for ticket in tickets]
    for _ in range(1000):  # bounded: the two threads start at once
        if running >= 2:
            break
        await asyncio.sleep(0.01)
    assert gauges() == (waiting_before + 3, active_before + 2)
    release.set()
    names = await asyncio.gather(*tasks)
    assert peak == 2
    assert gauges() == (waiting_before, active_before)
    assert all(name.startswith("hoosh-stt-engine") for name in names)
    for ticket in tickets:
        ticket.close()
    assert queue.admitted == 0
    queue.shutdown()


async def test_a_cancelled_caller_keeps_its_place_until_its_engine_job_ends() -> None:
    queue = WorkQueue(workers=1, max_queue=0, retry_after=1)
    started = threading.Event()
    release = threading.Event()

    def job() -> None:
        started.set()
        release.wait(10)

    ticket = queue.admit()

    async def caller() -> None:
        try:
            await ticket.run(job)
        finally:
            ticket.close()

    _, active_before = gauges()
    task = asyncio.create_task(caller())
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The thread still runs: its place stays taken, so the bound counts real work.
    assert queue.admitted == 1
    assert gauges()[1] == active_before + 1
    with pytest.raises(Overloaded):
        queue.admit()
    release.set()
    for _ in range(200):
        if queue.admitted == 0:
            break
        await asyncio.sleep(0.01)
    assert queue.admitted == 0
    assert gauges()[1] == active_before
    queue.admit().close()
    queue.shutdown()
