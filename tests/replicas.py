"""Extra replicas of hoosh services beside a running stack (a second edge, a second
router, a router with a short lease), and Redis servers of a test's own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hoosh_cli.stack import Stack, StackConfig, free_port


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to settle anything."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# The environment variable that sets each service's own port.
_LISTEN = {
    "hoosh_router": "HOOSH_ROUTER_LISTEN",
    "hoosh_budget": "HOOSH_BUDGET_LISTEN",
    "hoosh_audit": "HOOSH_AUDIT_LISTEN",
}
_HEALTH = {
    "hoosh_router": "hoosh.router.v1.RouterService",
    "hoosh_budget": "hoosh.budget.v1.BudgetService",
    "hoosh_audit": "hoosh.audit.v1.AuditService",
    "hoosh_edge": "http",
}
# The service each module runs (its token, callers and certificate in the stack's environment).
_SERVICE = {"hoosh_router": "router", "hoosh_budget": "budget", "hoosh_audit": "audit", "hoosh_edge": "edge"}


@dataclass
class Replicas:
    """Processes started beside a stack with its environment plus overrides; stopped together."""

    config: StackConfig
    log_dir: Path
    started: list[Replica] = field(default_factory=list)

    def start(self, module: str, overrides: dict[str, str] | None = None, timeout: float = 60.0) -> Replica:
        port = free_port()
        # Each process owns its outbox directory (a lock): a replica gets its own.
        env = {
            **os.environ,
            **self.config.environment(_SERVICE[module]),
            "HOOSH_EVENTS_OUTBOX_DIR": str(self.log_dir / f"outbox-{port}"),
            # The stack's local link is its own router's: a replica router must not
            # take its socket, a replica edge must reach the router it is given.
            "HOOSH_ROUTER_LINK_SOCKET": "",
            **(overrides or {}),
        }
        # Metrics on a port of the replica's own choosing (the stack's are taken).
        for service in ("EDGE", "ROUTER", "BUDGET", "INFERENCE", "AUDIT", "STT"):
            env[f"HOOSH_{service}_METRICS_LISTEN"] = "127.0.0.1:0"
        if module == "hoosh_edge":
            env["HOOSH_EDGE_PORT"] = str(port)
        else:
            env[_LISTEN[module]] = f"127.0.0.1:{port}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_dir / f"{module}-{port}.log"
        with open(log_file, "ab") as sink:
            process = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=sink, stderr=subprocess.STDOUT)
        replica = Replica(module, port, process, log_file)
        self.started.append(replica)
        # Its own loop in a thread: callers may be sync tests or async ones (with a running loop).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(
                lambda: asyncio.run(_wait_healthy(Stack(self.config), replica, _HEALTH[module], timeout))
            ).result()
        return replica

    def stop_all(self) -> None:
        for replica in reversed(self.started):
            replica.stop()
        self.started.clear()


async def _wait_healthy(stack: Stack, replica: Replica, health: str, timeout: float) -> None:
    from hoosh_cli.stack import ServiceProcess

    service = ServiceProcess(replica.name, replica.name, health, replica.port)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if replica.process.poll() is not None:
            raise RuntimeError(f"{replica.name} exited: {replica.log_file.read_text(errors='replace')[-3000:]}")
        if await stack._is_healthy(service, replica.address):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{replica.name} on {replica.port} not healthy within {timeout:.0f}s")


class OwnRedis:
    """A redis-server of the test's own on a free loopback port, with an append-only
    file so that a stop and a start keep its data."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--dir", str(self.directory),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("own redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
