"""A three-node NATS JetStream cluster on loopback, a stream at three replicas, a
publisher sending continuously, and the stream leader killed with SIGKILL under load
and brought back: every event the publisher acked (or kept in its outbox) is in the
stream exactly once, read back with a consumer, and nothing else is."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import nats.errors
from hoosh.events.v1 import events_pb2
from hoosh_common import events
from hoosh_common.eventbus import EventPublisher, EventPublishError, StreamPolicy, ensure_stream
from hoosh_common.outbox import Outbox
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from .test_outbox_crash import OwnNats, free_port, read_all_ids, with_retries

PRODUCERS = 4


async def wait_until(check: Callable[[], bool | Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def replicas_current(js: JetStreamContext, stream: str) -> bool:
    """Every replica online and caught up with the leader."""
    try:
        cluster = (await js.stream_info(stream)).cluster
    except nats.errors.Error:
        return False
    peers = (cluster.replicas or []) if cluster is not None else []
    return (
        cluster is not None
        and cluster.leader is not None
        and len(peers) == 2
        and all(peer.current and not peer.offline for peer in peers)
    )


async def test_a_replicated_stream_loses_and_doubles_nothing_when_a_node_is_killed(tmp_path: Path) -> None:
    client_ports = [free_port() for _ in range(3)]
    cluster_ports = [free_port() for _ in range(3)]
    cluster_name = f"hoosh-test-{uuid.uuid4().hex[:6]}"
    nodes = [
        OwnNats(
            tmp_path / f"n{i}",
            name=f"n{i}",
            port=client_ports[i],
            cluster_port=cluster_ports[i],
            routes=[p for j, p in enumerate(cluster_ports) if j != i],
            cluster_name=cluster_name,
        )
        for i in range(3)
    ]
    suffix = uuid.uuid4().hex[:10]
    stream, prefix = f"CLUSTER_{suffix}", f"cluster{suffix}"
    nc: NATS | None = None
    publisher: EventPublisher | None = None
    try:
        for node in nodes:
            node.start()
        nc = await nats.connect(
            servers=[node.url for node in nodes], max_reconnect_attempts=-1, reconnect_time_wait=0.1, connect_timeout=2
        )
        js = nc.jetstream()
        policy = StreamPolicy(max_bytes=256 * 1024 * 1024, replicas=3)
        info = await with_retries(lambda: ensure_stream(js, stream, prefix, policy=policy), timeout=30)
        assert info.config.num_replicas == 3

        publisher = EventPublisher(
            nc,
            js,
            stream,
            prefix,
            outbox=Outbox(tmp_path / "outbox"),
            max_attempts=4,
            ack_timeout=1.0,
            backoff_max=0.3,
            drain_backoff_max=0.3,
        )
        await publisher.start()
        acked: list[str] = []
        kept: list[str] = []
        refused: list[str] = []
        attempted: list[str] = []
        stop = asyncio.Event()

        async def produce(worker: int) -> None:
            n = 0
            while not stop.is_set():
                event_id = f"w{worker}-{n}"
                n += 1
                attempted.append(event_id)
                message = events_pb2.InferenceCompleted(request_id=event_id, model="m")
                assert publisher is not None
                try:
                    ack = await publisher.publish(events.SUBJECT_COMPLETED, message, event_id)
                except EventPublishError:
                    refused.append(event_id)
                    continue
                (kept if ack is None else acked).append(event_id)
                await asyncio.sleep(0.001)

        producers = [asyncio.create_task(produce(w)) for w in range(PRODUCERS)]
        await asyncio.sleep(2.0)
        assert len(acked) > 0

        cluster = (await with_retries(lambda: js.stream_info(stream))).cluster
        assert cluster is not None and cluster.leader is not None
        victim = next(node for node in nodes if node.name == cluster.leader)
        victim.kill()  # the stream leader dies under load
        killed_at = len(acked) + len(kept)

        # The two survivors elect a new leader (NATS' raft waits 4-9 s for a dead one)
        # and acks resume; meanwhile events wait in the outbox.
        async def new_leader() -> str:
            leader = (await js.stream_info(stream)).cluster
            if leader is None or leader.leader in (None, victim.name):
                raise nats.errors.TimeoutError
            return str(leader.leader)

        await with_retries(new_leader, timeout=30)
        acked_then = len(acked)
        await wait_until(lambda: len(acked) > acked_then + 100, timeout=20)
        assert len(acked) + len(kept) > killed_at

        victim.start()  # it comes back with its store and catches up
        await wait_until(lambda: replicas_current(js, stream), timeout=30)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*producers)

        outbox = publisher.outbox
        assert outbox is not None
        for _ in range(300):  # 30 s at most
            if not outbox.count:
                break
            await asyncio.sleep(0.1)
        assert outbox.count == 0
        assert refused == []  # the outbox had room: nothing was turned away
        assert publisher.stats.kept > 0  # some events did wait for the new leader

        ids = await with_retries(lambda: read_all_ids(js, stream))
        counts = collections.Counter(ids)
        assert [i for i, n in counts.items() if n > 1] == []  # nothing stored twice
        assert set(acked) <= set(ids) and set(kept) <= set(ids)  # nothing acked or kept is lost
        assert set(ids) <= set(attempted)
        assert len(ids) == len(acked) + len(kept)
    finally:
        if publisher is not None:
            await publisher.close(grace=1)
        if nc is not None:
            with contextlib.suppress(nats.errors.Error):
                await nc.close()
        for node in nodes:
            node.stop()
