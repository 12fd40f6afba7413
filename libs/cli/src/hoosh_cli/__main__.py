"""The `hoosh` command: run, inspect and change hoosh from one place.

``hoosh up`` runs the whole gateway on this machine. Every other command talks to a
running edge over HTTP (``--url``, ``$HOOSH_URL``, the config file, else
http://127.0.0.1:8088) with the API key or the admin key (client.py says where each is
found; config.py describes ``~/.config/hoosh/config.toml``):

  status        every service's health, Redis, NATS, audit lag, outboxes (admin)
  models        the models the key may use
  chat          one message; the answer streams to the terminal token by token
  transcribe    speech to text, with upload and decoding progress
  keys          API keys: create, list, get, update, revoke (admin)
  pools         token pools: list, get, create, resize, update, reset, delete (admin)
  costs         the cost ledger as a table, grouped (--group-by, --since)
  audit         tail and show entries; verify the log offline; its checkpoint
  providers     each provider's breaker state, failures, latency (admin)
  hardware      GPUs, CPUs and memory per worker host; `hardware placement`
  reload        every service re-reads hoosh.yaml (admin)

Tables and progress are drawn with rich; ``--json`` on every command prints JSON for
scripts instead. Errors are one line on stderr, never a traceback. Exit status:

  0    ok
  1    the edge refused or failed (an error answer, a stream cut, a reload not applied,
       ``hoosh status`` finding something wrong)
  2    bad usage (unknown option, missing argument, unreadable file or config)
  3    the edge cannot be reached
  4    auth: no key found where one is needed, or the edge answered 401/403
  130  interrupted (Ctrl-C)

``hoosh audit verify`` keeps the verifier's own statuses: 0 valid, 1 not, 2 cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hoosh_common.logs import configure_logging

from . import audit, costs, hardware, inference, keys, pools, providers, reload, status, transcribe
from .client import one_line
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, CliError, UsageError
from .infra import ensure_nats, ensure_redis, stop_process
from .parser import Parser, common_options, port
from .stack import PUBLISHERS, Ports, Stack, StackConfig
from .terminal import clean

log = logging.getLogger("hoosh")
T = TypeVar("T")


def audit_key(state_dir: Path) -> str:
    """The audit HMAC key: $HOOSH_AUDIT_HMAC_KEY, else one generated once and kept
    in the state dir so the chain stays verifiable across restarts."""
    if os.environ.get("HOOSH_AUDIT_HMAC_KEY"):
        return os.environ["HOOSH_AUDIT_HMAC_KEY"]
    path = state_dir / "audit.key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _secret_file(path: Path, make: str) -> str:
    """The secret kept in ``path``, created 0600 (never readable by others, even
    briefly) with ``make`` the first time."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(make + "\n")
    return path.read_text().strip()


def signing_keys(state_dir: Path) -> dict[str, str]:
    """Each publishing service's event-signing key (hex), generated once into
    <state dir>/event-keys/<service>.key: events a previous run left in an outbox or
    the stream still verify after a restart."""
    return {
        service: _secret_file(state_dir / "event-keys" / f"{service}.key", secrets.token_hex(32))
        for service in PUBLISHERS
    }


def admin_key(state_dir: Path) -> str:
    """The edge's bootstrap admin key: $HOOSH_ADMIN_KEY, else one generated once into
    <state dir>/admin.key (0600), where `hoosh keys` finds it."""
    if os.environ.get("HOOSH_ADMIN_KEY", "").strip():
        return os.environ["HOOSH_ADMIN_KEY"].strip()
    path = state_dir / "admin.key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        # Created 0600 from the start: the key is never readable by others, even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("sk-hoosh-admin-" + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def default_config() -> Path | None:
    if os.environ.get("HOOSH_CONFIG"):
        return Path(os.environ["HOOSH_CONFIG"])
    candidate = Path("hoosh.yaml")
    return candidate if candidate.exists() else None


def banner(base_url: str, auth: str, state_dir: Path, ports: Ports | None = None) -> str:
    """What `hoosh up` prints once every service is healthy (never the admin key itself)."""
    ports = ports or Ports()
    key_source = "$HOOSH_ADMIN_KEY" if os.environ.get("HOOSH_ADMIN_KEY", "").strip() else state_dir / "admin.key"
    bearer = "" if auth == "open" else ' -H "Authorization: Bearer $KEY"'
    lines = [
        f"\nhoosh is up: {base_url}/v1  (OpenAPI docs: {base_url}/docs)\n",
        f"  curl {base_url}/v1/chat/completions -H 'Content-Type: application/json'{bearer} \\",
        '    -d \'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}]}\'\n',
        f"  curl {base_url}/v1/audio/transcriptions{bearer} -F file=@speech.wav -F model=whisper-tiny.en\n",
    ]
    if auth == "open":
        lines.append(
            "Auth is OPEN on loopback (127.0.0.1): requests without a key are served. "
            "`hoosh up --auth keys` requires a key for every request."
        )
    else:
        lines.append("Auth is on: every request needs an API key (Authorization: Bearer <key>).")
    lines += [
        f"Create a key (the admin key is in {key_source}):",
        "  hoosh keys create --name me --pool default",
        f"Prometheus metrics: http://127.0.0.1:{ports.edge_metrics}/metrics (edge) ... :{ports.stt_metrics} (stt); "
        "OTEL_EXPORTER_OTLP_ENDPOINT=... exports traces (docs/observability.md).",
        "\nCtrl-C stops everything.",
    ]
    return "\n".join(lines)


# What stops `hoosh up`: Ctrl-C, `kill`, and a hangup (the terminal closed, the SSH
# session dropped). Its services run in sessions of their own, so none of these reach
# them from the terminal (the router, budget and NATS would take a hangup for "reload
# your config" and outlive hoosh); `hoosh up` stops them itself, edge first.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """A stop signal came while hoosh was starting."""


async def unless_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result; if ``stop`` is set first, ``work`` is cancelled (what it started
    it stops on the way out) and Stopped raised."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise Stopped


def say(text: str, *, error: bool = False) -> None:
    """A line for the person at the terminal, if there still is one: after a hangup
    writing fails (EIO), and from then on stdout and stderr go to /dev/null so that
    nothing (the final flush included) stands in the way of stopping."""
    try:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                os.dup2(devnull, fd)
        os.close(devnull)


def stack_config(args: argparse.Namespace, state_dir: Path, redis_url: str, nats_url: str) -> StackConfig:
    """What `hoosh up` runs; a state dir it cannot write is a UsageError (exit 2)."""
    config_file: Path | None = None
    if args.config:
        config_file = Path(args.config).resolve()
        if not config_file.is_file():
            raise UsageError(f"--config {args.config}: no such file")
    ports = Ports.free() if args.free_ports else Ports()
    ports.edge = args.port
    try:
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)
        keys = (audit_key(state_dir), admin_key(state_dir), signing_keys(state_dir))
    except OSError as exc:
        raise UsageError(f"cannot use the state dir {state_dir}: {exc.strerror or exc}") from None
    return StackConfig(
        state_dir=state_dir,
        ports=ports,
        config_file=config_file,
        redis_url=redis_url,
        nats_url=nats_url,
        audit_key=keys[0],
        admin_key=keys[1],
        auth=args.auth,
        signing_keys=keys[2],
        # The internal plane closed as in production: mutual TLS from a development CA
        # (<state dir>/tls, renewed when near expiry) and a fresh token per calling service.
        tls_dir=state_dir / "tls",
        # Signals from the terminal reach `hoosh up` alone; it stops the services.
        own_session=True,
    )


async def up(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:  # first: from here on a signal stops whatever has started
        loop.add_signal_handler(sig, stop.set)
    state_dir = Path(args.state_dir).resolve()
    log_dir = state_dir / "logs"
    redis_url = os.environ.get("HOOSH_REDIS_URL", "redis://127.0.0.1:6379/0")
    nats_url = os.environ.get("HOOSH_NATS_URL", "nats://127.0.0.1:4222")
    config = stack_config(args, state_dir, redis_url, nats_url)
    stack = Stack(config)
    infra: list[subprocess.Popen[bytes]] = []
    exit_code = 0
    try:
        for ensure, url, name in ((ensure_redis, redis_url, "redis"), (ensure_nats, nats_url, "nats")):
            started = await unless_stopped(stop, ensure(url, state_dir / name, log_dir, own_session=True))
            if started is not None:
                infra.append(started)
        say(f"starting hoosh services (logs in {log_dir}) ...")
        await unless_stopped(stop, stack.start())
        say(banner(stack.base_url, args.auth, state_dir, config.ports))
        while not stop.is_set():
            if (dead := stack.failed()) is not None:
                log.error("service exited; stopping", extra={"service": dead.name})
                exit_code = 1
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    except Stopped:
        pass  # stopped while starting: what had started is stopped below
    except Exception as error:  # a service failed to start: say which, then clean up
        say(f"hoosh failed to start: {clean(str(error), multiline=True)}", error=True)
        exit_code = 1
    finally:
        say("stopping hoosh ...")
        stack.stop()
        for process in reversed(infra):
            stop_process(process)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    return exit_code


def build_parser() -> Parser:
    """The whole command line: ``up`` and every command group."""
    parser = Parser(
        prog="hoosh",
        description="hoosh AI inference gateway: run it (up), inspect it and change it. "
        "Exit 0 ok, 1 refused or failed, 2 bad usage, 3 edge unreachable, 4 auth failure, 130 interrupted.",
    )
    common_options(parser, state_dir=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up_parser = commands.add_parser(
        "up", help="run every service (and Redis/NATS if none is reachable)", description="run every service"
    )
    up_parser.add_argument(
        "--port", type=port, default=int(os.environ.get("HOOSH_EDGE_PORT", "8088")), help="the edge's port"
    )
    up_parser.add_argument(
        "--free-ports",
        action="store_true",
        help="every other service's gRPC and metrics port a free one (default: 50051-50055, 9460-9465): "
        "a second hoosh beside a running one",
    )
    up_parser.add_argument("--config", default=str(default_config() or ""), help="hoosh YAML config")
    up_parser.add_argument("--state-dir", default=os.environ.get("HOOSH_STATE_DIR", ".hoosh"))
    up_parser.add_argument(
        "--auth",
        choices=("open", "keys"),
        default=os.environ.get("HOOSH_AUTH", "open"),
        help="open (default): requests without a key are served, on loopback only; keys: every request needs one",
    )
    for module in (status, inference, transcribe, keys, pools, costs, audit, providers, hardware, reload):
        module.add_commands(commands)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (not ``up``): its exit status, every failure in one line."""
    try:
        code: int = args.run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`hoosh audit tail | head`): nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except BaseException as exc:
        return failure(exc)


def failure(exc: BaseException) -> int:
    """Say in one line (without terminal control) why the command failed; its exit status."""
    if isinstance(exc, CliError):
        say(f"hoosh: error: {one_line(str(exc), limit=2000)}", error=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        say("hoosh: interrupted", error=True)
        return EXIT_INTERRUPTED
    if not isinstance(exc, Exception) or os.environ.get("HOOSH_DEBUG"):
        raise exc  # SystemExit and the like; HOOSH_DEBUG=1 shows the traceback
    # The last resort: one line, never a traceback.
    say(f"hoosh: internal error: {type(exc).__name__}: {one_line(str(exc))}", error=True)
    return EXIT_FAILED


def run_up(args: argparse.Namespace) -> int:
    """``hoosh up`` until it is stopped: its exit status, a failure in one line."""
    configure_logging("cli", os.environ.get("HOOSH_LOG_LEVEL", "INFO"))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the health polls are not news
    from hoosh_common.runtime import run

    code = 0

    async def runner() -> None:
        nonlocal code
        code = await up(args)

    try:
        run(runner())
    except BaseException as exc:
        return failure(exc)
    return code


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.exit(run_command(args) if args.command != "up" else run_up(args))


if __name__ == "__main__":
    main()
