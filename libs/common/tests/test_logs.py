"""configure_logging: records leave the caller on a queue; a listener thread formats and
writes them, with the ids the caller had when it logged; everything queued is written at
exit; a slow consumer makes lines drop, never the caller wait."""

from __future__ import annotations

import contextvars
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hoosh_common import logs
from hoosh_common.logs import JsonFormatter, configure_logging, request_id_var, shutdown_logging
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
log = logging.getLogger("hoosh_test_logs")


class Stream:
    """A stream that notes which thread wrote each piece."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.release.set()

    def write(self, text: str) -> int:
        self.release.wait()
        self.writes.append((threading.current_thread().name, text))
        return len(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in "".join(text for _, text in self.writes).splitlines()]


@pytest.fixture
def logging_state() -> Iterator[None]:
    """configure_logging takes over the root logger: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        shutdown_logging()
        root.handlers[:] = handlers
        root.setLevel(level)


def a_span() -> NonRecordingSpan:
    return NonRecordingSpan(
        SpanContext(trace_id=TRACE_ID, span_id=SPAN_ID, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    )


def test_a_line_written_by_the_listener_carries_the_ids_the_caller_had(logging_state: None) -> None:
    stream = Stream()
    configure_logging("svc", "INFO", stream=stream)
    shown = ["as", "logged"]

    def in_request() -> None:
        request_id_var.set("req-42")
        with trace.use_span(a_span()):
            log.info("handled %s", shown, extra={"route": "/v1/chat"})

    contextvars.copy_context().run(in_request)
    shown.append("changed after the call")
    log.info("outside any request")
    shutdown_logging()

    inside, outside = stream.lines()
    assert inside["request_id"] == "req-42"
    assert inside["trace_id"] == f"{TRACE_ID:032x}" and inside["span_id"] == f"{SPAN_ID:016x}"
    assert inside["msg"] == "handled ['as', 'logged']"  # rendered when logged
    assert inside["route"] == "/v1/chat" and inside["service"] == "svc" and inside["level"] == "info"
    assert "request_id" not in outside and "trace_id" not in outside and "span_id" not in outside
    assert {thread for thread, _ in stream.writes} == {"hoosh-log-writer"}  # not the caller's thread


def test_an_exceptions_traceback_is_in_its_line(logging_state: None) -> None:
    stream = Stream()
    configure_logging("svc", "INFO", stream=stream)
    try:
        {}["missing"]
    except KeyError:
        log.exception("lookup failed")
    shutdown_logging()
    [line] = stream.lines()
    assert line["msg"] == "lookup failed" and line["level"] == "error"
    assert line["exc"].startswith("Traceback (most recent call last):") and "KeyError: 'missing'" in line["exc"]


def test_the_formatter_used_directly_reads_the_current_context() -> None:
    record = log.makeRecord(log.name, logging.INFO, __file__, 1, "direct", None, None)
    token = request_id_var.set("req-7")
    try:
        with trace.use_span(a_span()):
            line = json.loads(JsonFormatter("svc").format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "req-7" and line["trace_id"] == f"{TRACE_ID:032x}"


def test_configuring_twice_keeps_one_writer_and_loses_nothing(logging_state: None) -> None:
    first, second = Stream(), Stream()
    configure_logging("edge", "INFO", stream=first)
    for i in range(100):
        log.info("main %d", i)
    configure_logging("edge", "INFO", stream=second)  # as a worker does after the main process
    # What the first configuration queued is written before it returns.
    assert [line["msg"] for line in first.lines()] == [f"main {i}" for i in range(100)]
    log.info("worker")
    assert len(logging.getLogger().handlers) == 1
    assert sum(thread.name == "hoosh-log-writer" for thread in threading.enumerate()) == 1
    shutdown_logging()
    assert [line["msg"] for line in second.lines()] == ["worker"]
    assert sum(thread.name == "hoosh-log-writer" for thread in threading.enumerate()) == 0
    log.info("after shutdown")  # written directly, on this thread
    assert second.writes[-1][0] == threading.current_thread().name
    assert second.lines()[-1]["msg"] == "after shutdown"


def test_a_stalled_consumer_drops_lines_and_never_blocks_the_caller(
    logging_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "MAX_QUEUED", 10)
    stream = Stream()
    stream.release.clear()  # the consumer is stuck
    configure_logging("svc", "INFO", stream=stream)
    started = time.perf_counter()
    for i in range(50):
        log.info("line %d", i)
    assert time.perf_counter() - started < 0.5  # the caller did not wait for the stuck write
    stream.release.set()
    shutdown_logging()
    lines = stream.lines()
    [notice] = [line for line in lines if line["msg"].startswith("log lines dropped")]
    written = [line for line in lines if line["msg"].startswith("line ")]
    assert 10 <= len(written) < 50
    assert len(written) + notice["dropped"] == 50
    assert [line["msg"] for line in written] == sorted((line["msg"] for line in written), key=lambda m: int(m[5:]))


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )


def test_everything_queued_is_written_at_exit() -> None:
    done = run_python(
        """
        import logging
        from hoosh_common.logs import configure_logging
        configure_logging("exit-test", "INFO")
        log = logging.getLogger("exit-test")
        for i in range(1000):
            log.info("line %d", i)
        """  # and exits at once, the listener still writing
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["msg"] for line in lines] == [f"line {i}" for i in range(1000)]


def test_lines_from_two_threads_do_not_interleave() -> None:
    done = run_python(
        """
        import logging, threading
        from hoosh_common.logs import configure_logging
        configure_logging("threads-test", "INFO")
        log = logging.getLogger("threads-test")

        def speak(letter):
            for i in range(1000):
                log.info("%s %d %s", letter, i, letter * 3000)

        threads = [threading.Thread(target=speak, args=(letter,)) for letter in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for raw in done.stderr.splitlines():
        letter, number, text = json.loads(raw)["msg"].split(" ")  # a torn line would not parse
        assert text == letter * 3000
        seen[letter].append(int(number))
    assert seen == {"a": list(range(1000)), "b": list(range(1000))}


def test_a_forked_child_writes_its_own_lines_and_not_its_parents() -> None:
    done = run_python(
        """
        import logging, os, sys, time
        from hoosh_common.logs import configure_logging
        configure_logging("fork-test", "INFO")
        log = logging.getLogger("fork-test")
        log.info("parent before")
        time.sleep(0.2)  # written before the fork
        pid = os.fork()
        if pid == 0:
            log.info("child")
            sys.exit(0)  # a normal exit: its queue is written at exit
        os.waitpid(pid, 0)
        log.info("parent after")
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(json.loads(line)["msg"] for line in done.stderr.splitlines()) == [
        "child",
        "parent after",
        "parent before",
    ]
