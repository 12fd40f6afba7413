"""Checkpoints: signed, stored in the real Redis, only ever moving forward."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hoosh_audit.checkpoint import Checkpoint, CheckpointStore, CheckpointWriter, checkpoint_key
from hoosh_audit.errors import CheckpointConflict, CheckpointError
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog

from .helpers import entries, wait_until


def test_a_checkpoint_is_signed_and_parses_back(keyring: Keyring) -> None:
    checkpoint = Checkpoint.sign(keyring, seq=12, mac="ab" * 32, segment="seg-000000000010.jsonl", ts_ms=1700)
    text = checkpoint.to_json()
    assert json.loads(text) == {
        "kind": "hoosh.audit.checkpoint",
        "v": 1,
        "seq": 12,
        "mac": "ab" * 32,
        "segment": "seg-000000000010.jsonl",
        "ts_ms": 1700,
        "kid": keyring.current_id,
        "sig": checkpoint.sig,
    }
    assert Checkpoint.parse(text) == checkpoint
    assert checkpoint.signature_error(keyring) == ""
    moved = Checkpoint.parse(text.replace('"seq":12', '"seq":11'))
    assert "signature does not match" in moved.signature_error(keyring)
    assert "unknown key id" in checkpoint.signature_error(Keyring.single(b"y" * 32, "other"))
    for bad in ("{}", "[]", "nope", text.replace('"v":1', '"v":2'), text.replace('"seq":12', '"seq":"12"')):
        with pytest.raises(CheckpointError):
            Checkpoint.parse(bad)


def test_the_key_names_stream_and_consumer() -> None:
    assert checkpoint_key("hoosh:audit:", "HOOSH_EVENTS", "audit") == "hoosh:audit:HOOSH_EVENTS:audit:checkpoint"


async def test_the_store_only_moves_forward(store: CheckpointStore, keyring: Keyring) -> None:
    assert await store.read() is None
    first = Checkpoint.sign(keyring, seq=5, mac="a" * 64, segment="seg-000000000001.jsonl", ts_ms=1)
    later = Checkpoint.sign(keyring, seq=9, mac="b" * 64, segment="seg-000000000001.jsonl", ts_ms=2)
    await store.write(first)
    assert await store.read() == first
    await store.write(first)  # the same again: fine
    await store.write(later)
    assert await store.read() == later

    with pytest.raises(CheckpointConflict, match="ahead of this log"):
        await store.write(first)  # backwards: refused, the evidence stays
    fork = Checkpoint.sign(keyring, seq=9, mac="c" * 64, segment="seg-000000000001.jsonl", ts_ms=3)
    with pytest.raises(CheckpointConflict):
        await store.write(fork)  # the same seq with another mac: a rewritten log
    assert await store.read() == later

    moved = await store.archive("test")
    assert moved == f"{store.key}:superseded:test"
    assert await store.read() is None
    assert await store.archive("again") is None


async def test_an_unreadable_stored_value_is_an_error_and_replaced(
    store: CheckpointStore, redis_client: aioredis.Redis, keyring: Keyring
) -> None:
    await redis_client.set(store.key, "garbage")
    with pytest.raises(CheckpointError):
        await store.read()
    fresh = Checkpoint.sign(keyring, seq=1, mac="a" * 64, segment="seg-000000000001.jsonl", ts_ms=1)
    await store.write(fresh)
    assert await store.read() == fresh


async def test_the_writer_stores_the_head_after_batches(
    log_dir: Path, store: CheckpointStore, keyring: Keyring
) -> None:
    audit_log = await AuditLog.open(log_dir, keyring, segment_max_bytes=3000)
    writer = CheckpointWriter(store, audit_log)
    task = asyncio.create_task(writer.run())
    try:
        for first in range(1, 30, 4):
            await audit_log.append_batch(entries(4, start=first))
            writer.notify()

        async def stored_head() -> bool:
            found = await store.read()
            return found is not None and found.seq == audit_log.last_seq

        await wait_until(stored_head, "the head in Redis")
        stored = await store.read()
        assert stored is not None
        assert (stored.mac, stored.segment) == (audit_log.last_mac, audit_log.head_segment)
        assert stored.signature_error(keyring) == ""
        assert (await audit_log.integrity()).checkpoint_seq == audit_log.last_seq
    finally:
        await writer.stop()
        await task
        audit_log.close()


async def test_a_refused_checkpoint_marks_the_chain_invalid(
    log_dir: Path, store: CheckpointStore, keyring: Keyring
) -> None:
    # Another log (or this one before it was cut back) is further on.
    ahead = Checkpoint.sign(keyring, seq=1000, mac="d" * 64, segment="seg-000000000990.jsonl", ts_ms=1)
    await store.write(ahead)
    audit_log = await AuditLog.open(log_dir, keyring)
    writer = CheckpointWriter(store, audit_log)
    await audit_log.append_batch(entries(3))
    assert await writer.write_now() is False
    integrity = await audit_log.integrity()
    assert not integrity.valid and "ahead of this log" in integrity.error
    assert await store.read() == ahead  # left as evidence
    audit_log.close()
