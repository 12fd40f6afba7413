"""``python -m hoosh_audit``: consume events into the chain and serve queries.

``python -m hoosh_audit verify [--file PATH]``: verify a log offline (key from
HOOSH_AUDIT_HMAC_KEY), print the result as JSON, exit 0 if valid, 1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

import nats
import nats.errors
import orjson
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh_common import grpc_server, runtime
from hoosh_common.logs import configure_logging
from hoosh_common.telemetry import configure_tracing

from hoosh_audit.chain import AuditLog, verify
from hoosh_audit.config import AuditSettings, load_settings
from hoosh_audit.consumer import AuditConsumer
from hoosh_audit.errors import AuditError
from hoosh_audit.server import AuditServicer

log = logging.getLogger("hoosh_audit")

SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
GRACE_SECONDS = 10.0


async def serve(settings: AuditSettings) -> int:
    """Run the consumer and the gRPC server until SIGTERM/SIGINT; the exit status."""
    audit_log = await AuditLog.open(settings.audit_file, settings.key_bytes)
    log.info("audit log opened", extra={"file": str(settings.audit_file), "entries": audit_log.last_seq})
    nc = await nats.connect(
        servers=[s.strip() for s in settings.nats_url.split(",")],
        name="hoosh-audit",
        max_reconnect_attempts=-1,
    )
    js = nc.jetstream()
    consumer = AuditConsumer(
        js,
        audit_log,
        stream=settings.nats_stream,
        subject_prefix=settings.subject_prefix,
        durable=settings.audit_consumer,
    )
    server = grpc_server.new_server()
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit_log), server)

    consumer_task = asyncio.create_task(consumer.run(), name="audit-consumer")
    serve_task = asyncio.create_task(
        grpc_server.serve(
            server, settings.audit_listen, [SERVICE_NAME], grace_seconds=GRACE_SECONDS, on_stop=consumer.stop
        ),
        name="audit-grpc",
    )
    status = 0
    try:
        done, _ = await asyncio.wait({consumer_task, serve_task}, return_when=asyncio.FIRST_COMPLETED)
        if consumer_task in done and not serve_task.done():
            # The consumer cannot go on (e.g. the log is unwritable): stop serving too.
            exc = consumer_task.exception()
            log.error("audit consumer stopped; shutting down", exc_info=exc)
            status = 1
            serve_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serve_task
            await server.stop(GRACE_SECONDS)
        elif serve_task.exception() is not None:
            log.error("gRPC server failed", exc_info=serve_task.exception())
            status = 1
        else:
            await consumer_task  # stopped by on_stop: the batch in hand is acked
    finally:
        await consumer.stop()
        try:
            await nc.drain()  # flushes the last acks
        except nats.errors.Error as exc:
            log.warning("NATS drain failed", extra={"error": repr(exc)})
        audit_log.close()
        log.info("audit stopped")
    return status


def _verify_command(file: Path | None) -> int:
    settings = load_settings()
    path = file or settings.audit_file
    result = verify(path, settings.key_bytes)
    out = {
        "file": str(path),
        "valid": result.valid,
        "entries": result.count,
        "first_bad_seq": result.first_bad_seq,
        "error": result.error,
    }
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0 if result.valid else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hoosh_audit", description="hoosh audit: the HMAC-chained record of every event"
    )
    sub = parser.add_subparsers(dest="command")
    verify_parser = sub.add_parser("verify", help="verify an audit log offline")
    verify_parser.add_argument("--file", type=Path, default=None, help="log file (default: HOOSH_AUDIT_DIR)")
    args = parser.parse_args(argv)

    configure_logging("audit")
    try:
        if args.command == "verify":
            return _verify_command(args.file)
        settings = load_settings()
        configure_tracing("audit")
        status = 0

        async def _main() -> None:
            nonlocal status
            status = await serve(settings)

        runtime.run(_main())
        return status
    except AuditError as exc:
        log.error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
