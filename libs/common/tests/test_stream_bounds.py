"""Stream bounds only ever grow by declaration: NATS applies a lowered bound at once by
deleting the oldest events, which may not be audited yet."""

from __future__ import annotations

import contextlib
import uuid

import nats
import pytest
from hoosh_common.eventbus import StreamPolicy, ensure_stream

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
