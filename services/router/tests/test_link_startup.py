"""A router that cannot take its local link's path stops at once with the reason, before
it connects to anything (NATS here is a closed port: a router that went on would retry
it for ever)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("taken", ["a file", "a live router"])
def test_a_router_that_cannot_have_its_link_exits_with_the_reason(tmp_path: Path, taken: str) -> None:
    directory = Path(os.path.realpath("/tmp")) / f"hoosh-link-start-{os.getpid()}-{taken.replace(' ', '-')}"
    directory.mkdir(exist_ok=True)
    path = directory / "router.sock"
    holder = None
    if taken == "a file":
        path.write_text("not a socket")
    else:
        from hoosh_common.link import LinkServer

        holder = LinkServer(str(path), lambda writer: None, None)  # type: ignore[arg-type,return-value]
        holder.bind()  # holds the path's lock, as a running router does
    env = {
        **os.environ,
        "HOOSH_ROUTER_LINK_SOCKET": str(path),
        "HOOSH_ROUTER_LISTEN": f"127.0.0.1:{closed_port()}",
        "HOOSH_ROUTER_METRICS_LISTEN": "",
        "HOOSH_NATS_URL": f"nats://127.0.0.1:{closed_port()}",
        "HOOSH_EVENTS_OUTBOX_DIR": str(tmp_path / "outbox"),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hoosh_router"], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        if holder is not None:
            holder.stop_listening()
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()
    assert done.returncode == 1, done.stderr[-2000:]
    assert "hoosh-router: the local link:" in done.stderr
    assert "Traceback" not in done.stderr
