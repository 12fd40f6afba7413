"""The `hoosh` command. `hoosh up` runs the whole gateway on this machine; `hoosh keys`
and `hoosh pools` manage API keys and token pools through the edge's admin API;
`hoosh audit` verifies the audit log offline."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from hoosh_common.logs import configure_logging

from . import admin, audit
from .infra import ensure_nats, ensure_redis
from .stack import PUBLISHERS, Ports, Stack, StackConfig

log = logging.getLogger("hoosh")


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


def banner(base_url: str, auth: str, state_dir: Path) -> str:
    """What `hoosh up` prints once every service is healthy (never the admin key itself)."""
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
        "Prometheus metrics: http://127.0.0.1:9460/metrics (edge) ... :9465 (stt); "
        "OTEL_EXPORTER_OTLP_ENDPOINT=... exports traces (docs/observability.md).",
        "\nCtrl-C stops everything.",
    ]
    return "\n".join(lines)


async def up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    redis_url = os.environ.get("HOOSH_REDIS_URL", "redis://127.0.0.1:6379/0")
    nats_url = os.environ.get("HOOSH_NATS_URL", "nats://127.0.0.1:4222")
    infra: list[subprocess.Popen[bytes]] = []
    for started in (
        await ensure_redis(redis_url, state_dir / "redis", log_dir),
        await ensure_nats(nats_url, state_dir / "nats", log_dir),
    ):
        if started is not None:
            infra.append(started)

    config = StackConfig(
        state_dir=state_dir,
        ports=Ports(edge=args.port),
        config_file=Path(args.config).resolve() if args.config else None,
        redis_url=redis_url,
        nats_url=nats_url,
        audit_key=audit_key(state_dir),
        admin_key=admin_key(state_dir),
        auth=args.auth,
        signing_keys=signing_keys(state_dir),
        # The internal plane closed as in production: mutual TLS from a development CA
        # (<state dir>/tls, renewed when near expiry) and a fresh token per calling service.
        tls_dir=state_dir / "tls",
    )
    stack = Stack(config)
    print(f"starting hoosh services (logs in {log_dir}) ...", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    exit_code = 0
    try:
        await stack.start()
        print(banner(stack.base_url, args.auth, state_dir), flush=True)
        while not stop.is_set():
            if (dead := stack.failed()) is not None:
                log.error("service exited; stopping", extra={"service": dead.name})
                exit_code = 1
                break
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    except Exception as error:  # a service failed to start: say which, then clean up
        print(f"hoosh failed to start: {error}", file=sys.stderr, flush=True)
        exit_code = 1
    finally:
        print("stopping hoosh ...", flush=True)
        stack.stop()
        for process in reversed(infra):
            process.terminate()
            process.wait(10)
    return exit_code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hoosh", description="hoosh AI inference gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="run every service (and Redis/NATS if none is reachable)")
    up_parser.add_argument("--port", type=int, default=int(os.environ.get("HOOSH_EDGE_PORT", "8088")))
    up_parser.add_argument("--config", default=str(default_config() or ""), help="hoosh YAML config")
    up_parser.add_argument("--state-dir", default=os.environ.get("HOOSH_STATE_DIR", ".hoosh"))
    up_parser.add_argument(
        "--auth",
        choices=("open", "keys"),
        default=os.environ.get("HOOSH_AUTH", "open"),
        help="open (default): requests without a key are served, on loopback only; keys: every request needs one",
    )
    admin.add_commands(commands)
    audit.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in ("keys", "pools", "costs"):
        sys.exit(admin.run(args))
    if args.command == "audit":
        sys.exit(audit.run(args))
    configure_logging("cli", os.environ.get("HOOSH_LOG_LEVEL", "INFO"))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the health polls are not news
    if args.command == "up":
        from hoosh_common.runtime import run

        code = 0

        async def runner() -> None:
            nonlocal code
            code = await up(args)

        run(runner())
        sys.exit(code)


if __name__ == "__main__":
    main()
