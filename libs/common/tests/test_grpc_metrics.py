"""grpc_server_* metrics on a real grpc.aio server and client (loopback), with and
without OpenTelemetry's interceptor: each call moves started, handled (under the code
the client got) and the histogram's count by exactly one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hoosh_common import metrics
from hoosh_common.grpc_server import new_server
from hoosh_common.telemetry import capture_spans
from prometheus_client import REGISTRY

SERVICE = "hoosh.test.v1.Metered"
CHUNK = b"x" * 65536


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"not-found":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"slow":
        await asyncio.sleep(5)
    return b"ok:" + request


async def ticks(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """Slow ticks: a cut lands while the handler awaits."""
    while True:
        yield b"tick"
        await asyncio.sleep(0.01)


async def flood(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """As fast as flow control allows: a cut lands while gRPC writes a reply, the
    handler's generator suspended at its yield."""
    while True:
        yield CHUNK


async def gather(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    # Returns as soon as its requests end (nothing awaited after): a cancel and a
    # half-close look the same to it.
    count = 0
    async for _ in requests:
        count += 1
    return str(count).encode()


async def echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
    "Flood": grpc.unary_stream_rpc_method_handler(flood),
    "Gather": grpc.stream_unary_rpc_method_handler(gather),
    "Echo": grpc.stream_stream_rpc_method_handler(echo),
}
KINDS = {
    "Unary": "unary",
    "Ticks": "server_stream",
    "Flood": "server_stream",
    "Gather": "client_stream",
    "Echo": "bidi_stream",
}


@dataclass
class Counts:
    started: float
    handled: dict[str, float]
    histogram_count: float

    def minus(self, before: Counts) -> Counts:
        codes = set(self.handled) | set(before.handled)
        handled = {code: self.handled.get(code, 0) - before.handled.get(code, 0) for code in codes}
        return Counts(
            self.started - before.started,
            {code: value for code, value in handled.items() if value},
            self.histogram_count - before.histogram_count,
        )


def counts(method: str) -> Counts:
    """This method's samples in the process-wide registry (metrics are process-global:
    tests compare deltas)."""
    labels = {"grpc_type": KINDS[method], "grpc_service": SERVICE, "grpc_method": method}
    started = REGISTRY.get_sample_value("grpc_server_started_total", labels) or 0
    histogram = REGISTRY.get_sample_value("grpc_server_handling_seconds_count", labels) or 0
    handled: dict[str, float] = {}
    for family in REGISTRY.collect():
        if family.name != "grpc_server_handled":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and all(sample.labels[k] == v for k, v in labels.items()):
                handled[sample.labels["grpc_code"]] = sample.value
    return Counts(started, handled, histogram)


@contextlib.contextmanager
def one_call(method: str) -> Iterator[Callable[[], Counts]]:
    before = counts(method)
    yield lambda: counts(method).minus(before)


async def settled(delta: Callable[[], Counts], timeout: float = 5.0) -> Counts:
    """The delta once the server has counted the call (a cut is counted on the server's
    own time), then a moment more: a second count would show."""
    for _ in range(int(timeout / 0.01)):
        if delta().handled:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    return delta()


def exactly_one(delta: Counts, code: str) -> None:
    assert delta.handled == {code: 1}, delta
    assert delta.started == 1 and delta.histogram_count == 1, delta


@dataclass
class Rig:
    channel: grpc.aio.Channel

    def unary(self) -> Any:
        return self.channel.unary_unary(f"/{SERVICE}/Unary")

    def stream(self, method: str) -> Any:
        return self.channel.unary_stream(f"/{SERVICE}/{method}")

    def gather(self, **options: Any) -> Any:
        return self.channel.stream_unary(f"/{SERVICE}/Gather")(**options)

    def echo(self) -> Any:
        return self.channel.stream_stream(f"/{SERVICE}/Echo")()


@pytest.fixture(params=["plain", "exporting"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    """A server from new_server(): exporting, OpenTelemetry's interceptor is there too."""
    with capture_spans() if request.param == "exporting" else contextlib.nullcontext():
        server = new_server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield Rig(channel)
        finally:
            await server.stop(0)


async def test_unary_ok(rig: Rig) -> None:
    with one_call("Unary") as delta:
        assert await rig.unary()(b"hello") == b"ok:hello"
        exactly_one(delta(), "OK")  # counted before the reply left: no waiting


async def test_unary_abort_counts_its_code(rig: Rig) -> None:
    with one_call("Unary") as delta:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rig.unary()(b"not-found")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        exactly_one(await settled(delta), "NOT_FOUND")


async def test_unary_past_its_deadline_is_deadline_exceeded(rig: Rig) -> None:
    with one_call("Unary") as delta:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rig.unary()(b"slow", timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        exactly_one(await settled(delta), "DEADLINE_EXCEEDED")


@pytest.mark.parametrize("method", ["Ticks", "Flood"])
async def test_server_stream_cut_by_the_client_is_cancelled(rig: Rig, method: str) -> None:
    for _ in range(5):
        with one_call(method) as delta:
            call = rig.stream(method)(b"")
            assert await call.read()
            call.cancel()
            exactly_one(await settled(delta), "CANCELLED")


async def test_client_stream_cancelled_by_the_client_is_cancelled_not_ok(rig: Rig) -> None:
    # The handler sees its requests end and returns a reply; the call was cancelled.
    for _ in range(10):
        with one_call("Gather") as delta:
            call = rig.gather()
            await call.write(b"a")
            await asyncio.sleep(0.01)  # the request is in: the handler is reading
            call.cancel()
            exactly_one(await settled(delta), "CANCELLED")


async def test_client_stream_half_closed_is_ok(rig: Rig) -> None:
    for _ in range(10):
        with one_call("Gather") as delta:
            call = rig.gather()
            await call.write(b"a")
            await call.write(b"b")
            await call.done_writing()
            assert await call == b"2"
            exactly_one(delta(), "OK")


async def test_client_stream_past_its_deadline_is_deadline_exceeded(rig: Rig) -> None:
    with one_call("Gather") as delta:
        call = rig.gather(timeout=0.2)
        await call.write(b"a")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        exactly_one(await settled(delta), "DEADLINE_EXCEEDED")


async def test_bidi_stream_cancelled_by_the_client_is_cancelled_not_ok(rig: Rig) -> None:
    for _ in range(10):
        with one_call("Echo") as delta:
            call = rig.echo()
            await call.write(b"a")
            assert await call.read() == b"a"
            call.cancel()
            exactly_one(await settled(delta), "CANCELLED")


async def test_bidi_stream_to_its_end_is_ok(rig: Rig) -> None:
    with one_call("Echo") as delta:
        call = rig.echo()
        await call.write(b"a")
        assert await call.read() == b"a"
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        exactly_one(await settled(delta), "OK")


async def test_the_servicer_handler_is_wrapped_once_per_method(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """new_server() puts the metrics interceptor last, so it sees the servicer's own
    handler on every call (OpenTelemetry's, before it, builds a new one per call)."""
    wraps: list[str] = []
    real_wrap = metrics._wrap

    def counting_wrap(handler: grpc.RpcMethodHandler, method: str, *args: Any) -> grpc.RpcMethodHandler:
        wraps.append(method)
        return real_wrap(handler, method, *args)

    monkeypatch.setattr(metrics, "_wrap", counting_wrap)
    with one_call("Unary") as delta:
        for _ in range(5):
            await rig.unary()(b"x")
        assert delta().handled == {"OK": 5} and delta().histogram_count == 5
    assert wraps.count(f"/{SERVICE}/Unary") <= 1  # 0: wrapped by an earlier test on this server


def test_the_handling_histogram_reaches_minutes() -> None:
    assert metrics.GRPC_HANDLING_BUCKETS[: len(metrics.FAST_BUCKETS)] == metrics.FAST_BUCKETS
    assert {60.0, 120.0, 300.0, 600.0} <= set(metrics.GRPC_HANDLING_BUCKETS)
    buckets = {
        sample.labels["le"]
        for family in REGISTRY.collect()
        if family.name == "grpc_server_handling_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }
    assert not buckets or "600.0" in buckets
