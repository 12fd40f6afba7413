"""Stream bounds only ever grow by declaration: NATS applies a lowered bound at once by
deleting the oldest events, which may not be audited yet. And a publisher's declaration
(``may_update=False``) never changes an existing stream at all: it names what differs."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import ClassVar

import nats
import pytest
from hoosh_common.eventbus import StreamPolicy, ensure_stream
from hoosh_common.eventbus_settings import EventBusSettings
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StreamInfo
from pydantic_settings import SettingsConfigDict

NATS_URL = "nats://127.0.0.1:4222"


async def test_a_smaller_bound_from_one_service_never_deletes_events() -> None:
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    suffix = uuid.uuid4().hex[:10]
    stream, prefix = f"TEST_BOUNDS_{suffix}", f"testbounds{suffix}"
    try:
        await ensure_stream(js, stream, prefix, policy=StreamPolicy(max_msgs=100, max_bytes=1 << 20))
        for i in range(50):
            await js.publish(f"{prefix}.x", b"e", headers={"Nats-Msg-Id": f"e{i}"})
        info = await ensure_stream(js, stream, prefix, policy=StreamPolicy(max_msgs=10, max_bytes=1 << 10))
        assert info.state.messages == 50  # nothing deleted
        assert (info.config.max_msgs, info.config.max_bytes) == (100, 1 << 20)  # kept
        info = await ensure_stream(js, stream, prefix, policy=StreamPolicy(max_msgs=60, max_bytes=1 << 19))
        assert (info.config.max_msgs, info.config.max_bytes) == (60, 1 << 19)  # lower, and still above what it holds
        info = await ensure_stream(js, stream, prefix, policy=StreamPolicy(max_msgs=200, max_bytes=2 << 20))
        assert (info.config.max_msgs, info.config.max_bytes) == (200, 2 << 20)  # raised
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        await nc.close()


def test_a_work_queue_takes_no_max_age() -> None:
    with pytest.raises(ValueError, match="max_age"):
        StreamPolicy(retention="workqueue", max_age=60)


# -- a publisher's declaration (may_update=False) -----------------------------------------


class PublisherSettings(EventBusSettings):
    model_config = SettingsConfigDict(env_prefix="HOOSH_TEST_UNUSED_", extra="ignore")


class ConsumerSettings(PublisherSettings):
    publishes_events: ClassVar[bool] = False


@contextlib.asynccontextmanager
async def fresh_stream() -> AsyncIterator[tuple[JetStreamContext, str, str]]:
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    suffix = uuid.uuid4().hex[:10]
    stream, prefix = f"TEST_NOUPDATE_{suffix}", f"testnoupdate{suffix}"
    try:
        yield js, stream, prefix
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        await nc.close()


def never_updates(js: JetStreamContext, monkeypatch: pytest.MonkeyPatch) -> None:
    async def update_stream(*args: object, **kwargs: object) -> StreamInfo:
        raise AssertionError("a declaration with may_update=False sent STREAM.UPDATE")

    monkeypatch.setattr(js, "update_stream", update_stream)


async def test_a_declaration_that_may_not_update_never_changes_an_existing_stream(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    audit = StreamPolicy(max_msgs=100, max_bytes=1 << 20)
    async with fresh_stream() as (js, stream, prefix):
        before = (await ensure_stream(js, stream, prefix, policy=audit)).config
        for i in range(50):
            await js.publish(f"{prefix}.x", b"e", headers={"Nats-Msg-Id": f"e{i}"})
        never_updates(js, monkeypatch)

        # The same declaration: nothing to say.
        with caplog.at_level(logging.WARNING, logger="hoosh_common.eventbus"):
            info = await ensure_stream(js, stream, prefix, policy=audit, may_update=False)
        assert info.config == before and caplog.records == []

        # A smaller bound, a larger one, another duplicate window, replicas: all left, each named.
        other = StreamPolicy(max_msgs=1, max_bytes=2 << 20, replicas=1)
        with caplog.at_level(logging.WARNING, logger="hoosh_common.eventbus"):
            info = await ensure_stream(js, stream, prefix, duplicate_window=7.0, policy=other, may_update=False)
        assert info.config == before and info.state.messages == 50
        now = await js.stream_info(stream)
        assert now.config == before and now.state.messages == 50  # nothing deleted, nothing changed
        [record] = caplog.records
        assert record.levelno == logging.WARNING
        differences = record.__dict__["differences"]
        assert differences == {
            "duplicate_window": {"stream": 120.0, "declared": 7.0},
            "max_bytes": {"stream": 1 << 20, "declared": 2 << 20},
            "max_msgs": {"stream": 100, "declared": 1},
        }
        message = record.getMessage()
        assert "max_msgs: stream 100, declared 1" in message and "duplicate_window" in message

        # Another retention and no bounds at all: named, not applied.
        caplog.clear()
        limits = StreamPolicy(retention="limits", max_age=60, max_bytes=1 << 20, max_msgs=100)
        with caplog.at_level(logging.WARNING, logger="hoosh_common.eventbus"):
            await ensure_stream(js, stream, prefix, policy=limits, may_update=False)
        assert set(caplog.records[-1].__dict__["differences"]) == {"retention", "max_age"}
        assert (await js.stream_info(stream)).config == before


async def test_a_declaration_that_may_not_update_creates_a_missing_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = StreamPolicy(max_msgs=100, max_bytes=1 << 20)
    async with fresh_stream() as (js, stream, prefix):
        never_updates(js, monkeypatch)
        info = await ensure_stream(js, stream, prefix, policy=policy, may_update=False)
        assert (info.config.max_msgs, info.config.max_bytes) == (100, 1 << 20)
        assert info.config.discard == DiscardPolicy.NEW


async def test_publishers_settings_never_update_the_stream_and_the_audits_do(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert PublisherSettings.publishes_events and not ConsumerSettings.publishes_events
    async with fresh_stream() as (js, stream, prefix):
        await ensure_stream(js, stream, prefix, policy=StreamPolicy(max_bytes=1 << 20))
        publisher = PublisherSettings(nats_stream_retention="workqueue", nats_stream_max_bytes=4 << 20)
        with caplog.at_level(logging.WARNING, logger="hoosh_common.eventbus"):
            info = await publisher.declare_stream(js, stream, prefix)
        assert info.config.max_bytes == 1 << 20
        assert caplog.records[-1].__dict__["differences"] == {"max_bytes": {"stream": 1 << 20, "declared": 4 << 20}}

        consumer = ConsumerSettings(nats_stream_retention="workqueue", nats_stream_max_bytes=4 << 20)
        info = await consumer.declare_stream(js, stream, prefix)
        assert info.config.max_bytes == 4 << 20  # the audit reconciles
