"""PipeliningRedis on the real Redis: script calls issued together travel as one
pipeline on one connection, and each caller still gets exactly its own reply or error."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hoosh_metering.redis import PipeliningRedis, announce_written, connect_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

ECHO = "redis.call('INCR', KEYS[1]); return {ARGV[1], redis.call('GET', KEYS[1])}"
SET_KEY = "redis.call('SET', KEYS[1], ARGV[1]); return 1"
# Keeps Redis busy for ARGV[1] ms: whatever reaches it meanwhile waits behind the script.
BUSY = (
    "local t = redis.call('TIME'); local start = t[1] * 1000000 + t[2]; "
    "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1]) * 1000; return 1"
)
FAILS_ON_BOOM = "if ARGV[1] == 'boom' then return redis.error_reply('ERR boom ' .. ARGV[1]) end; return ARGV[1]"


def _created(client: PipeliningRedis) -> int:
    """Connections the client's pool has opened so far."""
    pool = client.connection_pool
    return len(pool._available_connections) + len(pool._in_use_connections)


async def test_concurrent_script_calls_share_one_pipeline_and_each_gets_its_own_reply(redis_url: str) -> None:
    client = connect_redis(redis_url, max_connections=64)
    assert isinstance(client, PipeliningRedis)
    key = f"test:pipelining:{uuid.uuid4().hex}"
    script = client.register_script(ECHO)
    try:
        await script(keys=[key], args=["warm"])  # loads the script; one connection
        replies = await asyncio.gather(*(script(keys=[key], args=[f"call-{n}"]) for n in range(50)))
        assert [reply[0] for reply in replies] == [f"call-{n}".encode() for n in range(50)]
        # Every call ran once, in order: the counter saw 2..51.
        assert sorted(int(reply[1]) for reply in replies) == list(range(2, 52))
        # Fifty separate calls would have opened up to fifty connections.
        assert _created(client) == 1
    finally:
        await client.delete(key)
        await client.aclose()


async def test_a_script_error_is_its_callers_alone(redis_url: str) -> None:
    client = connect_redis(redis_url)
    script = client.register_script(FAILS_ON_BOOM)
    try:
        await script(keys=[], args=["warm"])
        results = await asyncio.gather(
            script(keys=[], args=["a"]),
            script(keys=[], args=["boom"]),
            script(keys=[], args=["c"]),
            return_exceptions=True,
        )
        assert results[0] == b"a" and results[2] == b"c"
        assert isinstance(results[1], ResponseError) and "boom" in str(results[1])
    finally:
        await client.aclose()


async def test_scripts_flushed_from_redis_are_loaded_again_within_a_batch(redis_url: str) -> None:
    client = connect_redis(redis_url)
    marker = uuid.uuid4().hex
    script = client.register_script(f"return ARGV[1] .. '{marker}'")  # a script Redis has not seen
    try:
        results = await asyncio.gather(*(script(keys=[], args=[str(n)]) for n in range(10)))
        assert results == [f"{n}{marker}".encode() for n in range(10)]
    finally:
        await client.aclose()


async def test_an_unreachable_redis_fails_every_call_of_the_batch() -> None:
    client = connect_redis("redis://127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    script = client.register_script(ECHO)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(script(keys=["k"], args=[str(n)]) for n in range(4)), return_exceptions=True), 30
        )
        assert all(isinstance(result, RedisConnectionError | OSError) for result in results), results
    finally:
        await client.aclose()


@pytest.mark.parametrize("command", ["set", "get"])
async def test_other_commands_go_out_as_they_come(redis_url: str, command: str) -> None:
    client = connect_redis(redis_url)
    assert isinstance(client, PipeliningRedis)
    key = f"test:pipelining:{uuid.uuid4().hex}"
    try:
        await client.set(key, "v")
        if command == "get":
            assert await asyncio.gather(*(client.get(key) for _ in range(5))) == [b"v"] * 5
        else:
            await asyncio.gather(*(client.set(f"{key}:{n}", n) for n in range(5)))
            assert [await client.get(f"{key}:{n}") for n in range(5)] == [str(n).encode() for n in range(5)]
        # Not batched: concurrent plain commands each took a connection of their own.
        assert _created(client) > 1
    finally:
        await client.delete(key, *(f"{key}:{n}" for n in range(5)))
        await client.aclose()


async def test_a_caller_that_left_before_the_batch_is_not_sent_and_the_others_get_their_replies(redis_url: str) -> None:
    client = connect_redis(redis_url)
    key = f"test:pipelining:{uuid.uuid4().hex}"
    script = client.register_script(ECHO)
    try:
        await script(keys=[key], args=["warm"])  # the counter is 1
        calls = [asyncio.ensure_future(script(keys=[key], args=[str(n)])) for n in range(5)]
        await asyncio.sleep(0)  # every call is queued; the batch leaves on the next turn
        calls[2].cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        # The others got their own replies, and only they ran.
        assert [results[n][0] for n in (0, 1, 3, 4)] == [b"0", b"1", b"3", b"4"]  # type: ignore[index]
        assert sorted(int(results[n][1]) for n in (0, 1, 3, 4)) == [2, 3, 4, 5]  # type: ignore[index]
        assert await client.get(key) == b"5"  # four ran, not five
    finally:
        await client.delete(key)
        await client.aclose()


async def test_an_announced_call_is_written_before_its_reply_and_runs_before_later_commands(own_redis_url: str) -> None:
    client = connect_redis(own_redis_url)
    holder = connect_redis(own_redis_url)
    reader = connect_redis(own_redis_url)
    key = "test:announced"
    script, busy = client.register_script(SET_KEY), holder.register_script(BUSY)
    try:
        await script(keys=[key], args=["warm"])
        await busy(args=[0])
        await reader.ping()  # connected before Redis is held: its GET goes out at once
        holding = asyncio.ensure_future(busy(args=[400]))  # Redis is busy for 400 ms
        await asyncio.sleep(0.1)
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with announce_written(written):
            call = asyncio.ensure_future(script(keys=[key], args=["committed"]))  # a lone call
        await asyncio.wait_for(asyncio.shield(written), 5)
        assert not call.done() and not holding.done()  # written; Redis has not run it yet
        # Sent after `written`, on another connection, while Redis is still busy: run
        # after the script all the same (an early `written` would read "warm").
        assert await reader.get(key) == b"committed"
        assert await call == 1 and await holding == 1
    finally:
        for each in (client, holder, reader):
            await each.aclose()


async def test_written_is_not_announced_before_the_call_is_written(own_redis_url: str) -> None:
    client = connect_redis(own_redis_url, max_connections=1, socket_timeout=10)
    pusher = connect_redis(own_redis_url)
    key, queue = "test:announced-late", "test:announced-queue"
    script = client.register_script(SET_KEY)
    try:
        await script(keys=[key], args=["warm"])
        blocking = asyncio.ensure_future(client.blpop([queue], timeout=5))  # holds the only connection
        await asyncio.sleep(0.1)
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with announce_written(written):
            call = asyncio.ensure_future(script(keys=[key], args=["committed"]))
        await asyncio.sleep(0.2)
        assert not written.done() and not call.done()  # no connection: nothing written yet
        await pusher.rpush(queue, "go")  # the connection comes back to the pool
        await asyncio.wait_for(asyncio.shield(written), 5)
        assert await call == 1 and tuple(await blocking) == (queue.encode(), b"go")
    finally:
        for each in (client, pusher):
            await each.aclose()


async def test_an_announced_call_that_cannot_be_written_still_releases_its_waiter() -> None:
    client = connect_redis("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    script = client.register_script(SET_KEY)
    written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        with announce_written(written):
            call = asyncio.ensure_future(script(keys=["k"], args=["v"]))
        with pytest.raises(RedisConnectionError):
            await call
        assert written.done()  # its caller is not left waiting for a write that never came
    finally:
        await client.aclose()
