"""When a nats-server a test started is ready, as its own log says.

A TCP probe of the port is not enough: between a free port being chosen and the server
binding it, another process of the suite (the other pytest process runs its own Redis
and NATS servers) can take it; the server then exits on "address already in use" while
the probe, and the test after it, talk to that stranger (CI once saw "nats: empty
response from server when expecting INFO message" that way). The log is the server's
own: "Server is ready" there means this process listens, and the lines before it name
the ports it chose (port -1: the kernel picks a free one as the server binds it, so no
other process can take it first).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

RANDOM_PORT = -1  # nats-server: listen on a port the kernel picks
READY = "Server is ready"
CLIENT_PORT = re.compile(r"Listening for client connections on \S+:(\d+)")
MONITORING_PORT = re.compile(r"Starting http monitor on \S+:(\d+)")


@dataclass(frozen=True)
class Listening:
    port: int
    http_port: int | None  # None: no monitoring port configured


def log_size(log_path: Path) -> int:
    """Where the next start's lines begin (a restarted server appends to its log)."""
    return log_path.stat().st_size if log_path.exists() else 0


def wait_ready(process: subprocess.Popen[bytes], log_path: Path, offset: int, timeout: float = 20.0) -> Listening:
    """The ports ``process`` listens on, once its log (what it wrote after ``offset``)
    says it is ready; RuntimeError with the log's tail when it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        exited = process.poll() is not None  # before the read: an exit's last words are in it
        text = log_path.read_bytes()[offset:].decode(errors="replace") if log_path.exists() else ""
        if READY in text:
            client = CLIENT_PORT.search(text)
            if client is None:
                raise RuntimeError(f"nats-server ready without a client port in its log: {text[-2000:]}")
            monitoring = MONITORING_PORT.search(text)
            return Listening(int(client.group(1)), int(monitoring.group(1)) if monitoring else None)
        if exited:
            raise RuntimeError(f"nats-server exited ({process.returncode}): {text[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait(10)
            raise RuntimeError(f"nats-server not ready within {timeout:g} s (killed): {text[-2000:]}")
        time.sleep(0.02)
