"""``python -m hoosh_audit``: consume events into the chain and serve queries.

``python -m hoosh_audit verify [DIR]``: verify a log offline against its last
checkpoint (keys from HOOSH_AUDIT_HMAC_KEY[S], checkpoint from Redis or
``--checkpoint``), print the report as JSON, exit 0 if valid, 1 if not, 2 if it
cannot run. The same as ``hoosh audit verify``.
"""

# ruff: noqa: E402  (the imports below come after skip_aiohttp_for_nats)

from __future__ import annotations

from hoosh_common.lean_imports import skip_aiohttp_for_nats

skip_aiohttp_for_nats()  # before anything imports nats: see hoosh_common.lean_imports

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path

import nats
import nats.errors
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh_common import grpc_server, runtime
from hoosh_common.eventbus import nats_inbox_prefix
from hoosh_common.logs import configure_logging
from hoosh_common.metrics import serve_metrics
from hoosh_common.telemetry import configure_tracing
from redis.exceptions import RedisError

from hoosh_audit import metrics
from hoosh_audit.checkpoint import Checkpoint, CheckpointStore, CheckpointWriter, connect
from hoosh_audit.cli import add_verify_arguments, run_verify
from hoosh_audit.config import AuditSettings, load_settings
from hoosh_audit.consumer import AuditConsumer
from hoosh_audit.errors import AuditError, CheckpointError, ConfigError, LogBehindCheckpoint
from hoosh_audit.log import AuditLog
from hoosh_audit.server import AuditServicer

log = logging.getLogger("hoosh_audit")

SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
GRACE_SECONDS = 10.0
CHECKPOINT_READ_SECONDS = 10.0


async def read_checkpoint(store: CheckpointStore) -> Checkpoint | None:
    """The stored checkpoint; None when there is none, or when Redis stays away (then
    the whole log is verified on open and checkpoints resume when Redis is back)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CHECKPOINT_READ_SECONDS
    delay = 0.2
    while True:
        try:
            return await store.read()
        except (RedisError, OSError) as exc:
            if loop.time() >= deadline:
                log.warning(
                    "cannot read the audit checkpoint; verifying the whole log instead",
                    extra={"key": store.key, "error": repr(exc)},
                )
                return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def open_log(settings: AuditSettings, store: CheckpointStore) -> AuditLog:
    """Open the log against its checkpoint. A log that ends before it (or a checkpoint
    that does not verify) stops the service, unless the loss is accepted: then the
    checkpoint is moved aside, as evidence, and the log goes on from its files."""
    options = {
        "segment_max_bytes": settings.audit_segment_max_bytes,
        "segment_max_age_s": settings.audit_segment_max_age_seconds,
        "subject_prefix": settings.subject_prefix,
    }
    try:
        checkpoint = await read_checkpoint(store)
        return await AuditLog.open(settings.audit_dir, settings.keyring, checkpoint=checkpoint, **options)
    except (LogBehindCheckpoint, CheckpointError) as exc:
        if not settings.accept_checkpoint_loss:
            raise
        moved = await store.archive(str(time.time_ns() // 1_000_000))
        log.error(
            "the audit log does not match its checkpoint; the loss is accepted and the checkpoint moved aside",
            extra={"error": str(exc), "checkpoint_moved_to": moved},
        )
        return await AuditLog.open(settings.audit_dir, settings.keyring, checkpoint=None, **options)


async def watch_integrity(audit_log: AuditLog, interval: float) -> None:
    """Look for segments changed behind the service's back; log each change of state."""
    last_error = ""
    while True:
        integrity = await audit_log.integrity()
        metrics.CHAIN_VALID.set(1 if integrity.valid else 0)
        if integrity.error != last_error:
            if integrity.valid:
                log.info("the audit chain verifies again", extra={"head_seq": integrity.head_seq})
            else:
                metrics.VERIFY_FAILED_PERIODIC.inc()
                log.error("the audit chain does not verify", extra={"problem": integrity.error})
            last_error = integrity.error
        await asyncio.sleep(interval)


async def serve(settings: AuditSettings) -> int:
    """Run the consumer and the gRPC server until SIGTERM/SIGINT; the exit status."""
    redis = connect(settings.redis_url)
    store = CheckpointStore(redis, settings.checkpoint_key)
    try:
        audit_log = await open_log(settings, store)
    except BaseException:
        await redis.aclose()
        raise
    log.info(
        "audit log opened",
        extra={"dir": str(settings.audit_dir), "entries": audit_log.last_seq, "segment": audit_log.head_segment},
    )
    writer = CheckpointWriter(store, audit_log)
    writer.notify()  # entries written after the last checkpoint (a crash before it was stored)
    nc = await nats.connect(
        servers=[s.strip() for s in settings.nats_url.split(",")],
        name="hoosh-audit",
        max_reconnect_attempts=-1,
        inbox_prefix=nats_inbox_prefix(settings.nats_url),
    )
    js = nc.jetstream()
    verifier = settings.event_verifier()
    if verifier is None:
        log.warning(
            "no publisher keys (HOOSH_AUDIT_PUBLISHER_KEYS): events are recorded without checking who "
            "published them; development only (HOOSH_ENV=production refuses to start so)"
        )
    else:
        log.info("events must be signed by a publisher key", extra={"key_ids": verifier.key_ids})
    consumer = AuditConsumer(
        js,
        audit_log,
        stream=settings.nats_stream,
        subject_prefix=settings.subject_prefix,
        durable=settings.audit_consumer,
        on_durable=writer.notify,
        stream_policy=settings.stream_policy(),
        duplicate_window=settings.nats_duplicate_window_seconds,
        verifier=verifier,
    )
    server = grpc_server.new_server()
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit_log), server)

    writer_task = asyncio.create_task(writer.run(), name="audit-checkpoints")
    watch_task = asyncio.create_task(
        watch_integrity(audit_log, settings.audit_integrity_check_seconds), name="audit-integrity"
    )
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
        watch_task.cancel()
        await writer.stop()  # the last head reaches Redis (bounded wait)
        for task in (watch_task, writer_task):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await nc.drain()  # flushes the last acks
        except nats.errors.Error as exc:
            log.warning("NATS drain failed", extra={"error": repr(exc)})
        await redis.aclose()
        audit_log.close()
        log.info("audit stopped")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hoosh_audit", description="hoosh audit: the HMAC-chained record of every event"
    )
    sub = parser.add_subparsers(dest="command")
    verify_parser = sub.add_parser("verify", help="verify an audit log offline against its last checkpoint")
    add_verify_arguments(verify_parser, default_dir="./.hoosh/audit")
    args = parser.parse_args(argv)

    configure_logging("audit")
    try:
        if args.command == "verify":
            return run_verify(args, default_dir=Path("./.hoosh/audit"))
        settings = load_settings()
        configure_tracing("audit")
        # The edge alone calls the audit (its query API).
        grpc_server.configure_plane(settings.internal_plane("audit", callers=["edge"]))
        try:
            serve_metrics(settings.audit_metrics_listen)
        except (OSError, ValueError) as exc:  # port taken, or not host:port
            raise ConfigError(f"HOOSH_AUDIT_METRICS_LISTEN={settings.audit_metrics_listen!r}: {exc}") from None
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
