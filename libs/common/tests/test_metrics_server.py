"""The /metrics server: scrapes in the text format, drops a client that is too slow to
send its request, bounds its connections, logs nothing per request, fails fast on a
port it cannot bind."""

from __future__ import annotations

import contextlib
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from hoosh_common.metrics import MetricsServer, serve_metrics, start_metrics_server
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families


def registry_with_counter() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("hoosh_test_things", "Things.", ["kind"], registry=registry).labels("a").inc(3)
    return registry


@contextlib.contextmanager
def metrics_server(timeout_s: float = 10.0, max_connections: int = 16) -> Iterator[MetricsServer]:
    server = start_metrics_server(
        "127.0.0.1:0", registry_with_counter(), timeout_s=timeout_s, max_connections=max_connections
    )
    assert server is not None
    try:
        yield server
    finally:
        server.close()


def scrape(port: int, timeout: float = 5.0) -> tuple[int, str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def closed_by_server(conn: socket.socket, within: float) -> float | None:
    """Seconds until the server closed ``conn`` (EOF or reset), or None if it was still
    open after ``within``."""
    started = time.monotonic()
    conn.settimeout(within)
    try:
        data = conn.recv(1)
    except TimeoutError:
        return None
    except ConnectionError:
        return time.monotonic() - started
    assert data == b"", data  # nothing was asked: nothing but the close may come back
    return time.monotonic() - started


def test_a_scrape_returns_the_text_format() -> None:
    with metrics_server() as server:
        status, content_type, body = scrape(server.server_port)
    assert status == 200 and content_type.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    [sample] = [s for s in families["hoosh_test_things"].samples if s.name == "hoosh_test_things_total"]
    assert sample.labels == {"kind": "a"} and sample.value == 3


def test_serve_metrics_keeps_its_contract() -> None:
    assert serve_metrics("") is None and serve_metrics("off") is None and serve_metrics(" OFF ") is None
    port = serve_metrics("127.0.0.1:0", registry_with_counter())  # a daemon thread, never stopped: like a service
    assert port and scrape(port)[0] == 200


def test_a_port_that_cannot_be_bound_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            serve_metrics(f"127.0.0.1:{taken.getsockname()[1]}", registry_with_counter())


def test_a_client_that_sends_nothing_is_dropped_after_the_timeout() -> None:
    with metrics_server(timeout_s=0.5) as server, socket.create_connection(("127.0.0.1", server.server_port)) as idle:
        elapsed = closed_by_server(idle, within=5.0)
        assert elapsed is not None, "an idle connection was kept past the timeout"
        assert 0.3 < elapsed < 2.5
        assert scrape(server.server_port)[0] == 200


def test_a_client_that_trickles_its_request_is_dropped_at_the_deadline() -> None:
    # A byte now and then resets a plain per-read timeout for ever; the request as a
    # whole must arrive within the timeout.
    with metrics_server(timeout_s=0.6) as server, socket.create_connection(("127.0.0.1", server.server_port)) as slow:
        started = time.monotonic()
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        closed_after = None
        while time.monotonic() - started < 5.0:
            try:
                slow.sendall(b"X-Slow: 1\r\n")
                readable, _, _ = select.select([slow], [], [], 0.1)
                if readable and slow.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except ConnectionError:
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None, "a trickling client was kept for 5 s"
        assert closed_after < 2.0


def test_connections_past_the_bound_are_closed_at_once_and_scrapes_resume() -> None:
    timeout_s = 1.5
    with metrics_server(timeout_s=timeout_s, max_connections=2) as server:
        address = ("127.0.0.1", server.server_port)
        with socket.create_connection(address) as first, socket.create_connection(address) as second:
            # Accepted in order: these two hold both slots until the timeout.
            with socket.create_connection(address) as third:
                elapsed = closed_by_server(third, within=1.0)
                assert elapsed is not None, "a connection past the bound was kept open"
                assert elapsed < 0.5
            with pytest.raises((urllib.error.URLError, ConnectionError)):  # refused while full (no reply)
                scrape(server.server_port, timeout=1.0)
            # The idle ones time out and free their slots.
            assert closed_by_server(first, within=timeout_s + 2) is not None
            assert closed_by_server(second, within=1.0) is not None
        for _ in range(3):
            assert scrape(server.server_port)[0] == 200


def test_nothing_is_logged_per_request(capfd: pytest.CaptureFixture[str]) -> None:
    with metrics_server(timeout_s=0.3) as server:
        scrape(server.server_port)
        with socket.create_connection(("127.0.0.1", server.server_port)) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1 extra\r\n\r\n")  # malformed: answered 400, not logged
            conn.settimeout(2)
            assert b"400" in b"".join(iter(lambda: conn.recv(4096), b""))
        with socket.create_connection(("127.0.0.1", server.server_port)) as idle:
            assert closed_by_server(idle, within=3) is not None
    out, err = capfd.readouterr()
    assert out == "" and err == ""
