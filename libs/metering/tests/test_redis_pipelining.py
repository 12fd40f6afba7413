"""PipeliningRedis on the real Redis: script calls take one multiplexed connection
(hoosh_metering.script_connection), calls issued together travel as one write, and each
caller still gets exactly its own reply or error; nothing waits past its timeout."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hoosh_common.devca import make_ca
from hoosh_metering.redis import PipeliningRedis, announce_written, connect_redis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .conftest import OwnRedis, _free_ports

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


@contextlib.asynccontextmanager
async def _held(url: str, ms: int) -> AsyncIterator[None]:
    """Redis runs a script for ``ms`` ms, sent on a connection of its own: whatever
    reaches it meanwhile waits behind it. The script ran to its end when the block ends."""
    holder = connect_redis(url, socket_timeout=10)
    busy = holder.register_script(BUSY)
    try:
        await busy(args=[0])  # loaded and connected: the long call goes out at once
        holding = asyncio.ensure_future(busy(args=[ms]))
        await asyncio.sleep(0.1)  # it has reached Redis
        yield
        assert await holding == 1
    finally:
        await holder.aclose()


async def _named(observer: PipeliningRedis, name: str) -> list[dict[str, object]]:
    """The connections Redis has open under this client name."""
    return [each for each in await observer.client_list() if each.get("name") == name]


async def test_concurrent_script_calls_share_one_connection_and_each_gets_its_own_reply(redis_url: str) -> None:
    name = f"lane-{uuid.uuid4().hex[:8]}"
    client = connect_redis(f"{redis_url}?client_name={name}", max_connections=64)
    observer = connect_redis(redis_url)
    assert isinstance(client, PipeliningRedis) and isinstance(observer, PipeliningRedis)
    key = f"test:pipelining:{uuid.uuid4().hex}"
    script = client.register_script(ECHO)
    try:
        await script(keys=[key], args=["warm"])  # loads the script (SCRIPT LOAD goes through the pool)
        pooled = _created(client)
        replies = await asyncio.gather(*(script(keys=[key], args=[f"call-{n}"]) for n in range(50)))
        assert [reply[0] for reply in replies] == [f"call-{n}".encode() for n in range(50)]
        # Every call ran once, in order: the counter saw 2..51.
        assert [int(reply[1]) for reply in replies] == list(range(2, 52))
        # Fifty separate calls would have opened up to fifty connections: Redis sees the
        # script connection and the pool's, no more, and the pool opened none for them.
        assert _created(client) == pooled
        assert len(await _named(observer, name)) == 1 + pooled
    finally:
        await client.delete(key)
        await client.aclose()
        await observer.aclose()


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


async def test_written_is_not_announced_before_the_call_is_written(own_redis: OwnRedis) -> None:
    # Database 1: opening the connection waits for SELECT's answer, and Redis is stopped.
    client = connect_redis(own_redis.url(db=1), socket_timeout=10, socket_connect_timeout=10)
    key = "test:announced-late"
    script = client.register_script(SET_KEY)
    try:
        await client.script_load(SET_KEY)  # no NOSCRIPT round trip later
        own_redis.process.send_signal(signal.SIGSTOP)
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with announce_written(written):
            call = asyncio.ensure_future(script(keys=[key], args=["committed"]))
        await asyncio.sleep(0.3)
        assert not written.done() and not call.done()  # still opening: nothing written yet
        own_redis.process.send_signal(signal.SIGCONT)
        await asyncio.wait_for(asyncio.shield(written), 5)
        assert await asyncio.wait_for(call, 5) == 1
        assert await client.get(key) == b"committed"
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
        await client.aclose()


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


async def test_an_overdue_reply_fails_the_calls_waiting_and_the_next_call_gets_a_new_connection(
    own_redis: OwnRedis,
) -> None:
    client = connect_redis(own_redis.url(), socket_timeout=0.3)
    script = client.register_script(SET_KEY)
    try:
        await script(keys=["k"], args=["warm"])
        async with _held(own_redis.url(), 1500):  # Redis answers nobody for 1.5 s
            results = await asyncio.wait_for(
                asyncio.gather(*(script(keys=["k"], args=[str(n)]) for n in range(3)), return_exceptions=True), 5
            )
            assert all(isinstance(result, RedisTimeoutError) for result in results), results
        assert await script(keys=["k"], args=["after"]) == 1  # a new connection
        assert await client.get("k") == b"after"
    finally:
        await client.aclose()


async def test_a_connection_killed_under_the_calls_fails_them_and_the_next_call_opens_another(
    own_redis: OwnRedis,
) -> None:
    name = f"lane-{uuid.uuid4().hex[:8]}"
    client = connect_redis(f"{own_redis.url()}?client_name={name}", socket_timeout=10)
    killer = connect_redis(own_redis.url(), socket_timeout=10)
    script = client.register_script(SET_KEY)
    try:
        await script(keys=["k"], args=["warm"])
        [lane] = [each for each in await _named(killer, name) if each.get("cmd") == "evalsha"]  # the script connection
        await killer.ping()
        async with _held(own_redis.url(), 400):
            waiting = asyncio.ensure_future(script(keys=["k"], args=["lost"]))  # queued behind the busy script
            # The kill reaches Redis after the queued call; it closes the connection before
            # that call's reply is written back.
            killing = asyncio.ensure_future(killer.client_kill_filter(_id=lane["id"]))
            await asyncio.sleep(0.1)
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(waiting, 5)
            assert await killing == 1
        assert await script(keys=["k"], args=["next"]) == 1
        assert await client.get("k") == b"next"
    finally:
        for each in (client, killer):
            await each.aclose()


async def test_a_connection_redis_closed_while_idle_is_opened_again_without_an_error(own_redis: OwnRedis) -> None:
    client = connect_redis(own_redis.url(), socket_timeout=2)
    script = client.register_script(SET_KEY)
    try:
        assert await script(keys=["k"], args=["before"]) == 1
        await client.execute_command("CLIENT", "KILL", "TYPE", "normal")  # every connection, this one's too
        await asyncio.sleep(0.1)  # the event loop sees the script connection closed
        assert await script(keys=["k"], args=["after"]) == 1  # reopened, not failed
    finally:
        await client.aclose()


async def test_credentials_database_and_decoding_come_from_the_url(own_redis: OwnRedis) -> None:
    admin = connect_redis(own_redis.url())
    user, password = f"lane{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    try:
        await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
        good = connect_redis(f"redis://{user}:{password}@127.0.0.1:{own_redis.port}/3?decode_responses=true")
        script = good.register_script(SET_KEY)
        echo = good.register_script("return ARGV[1]")
        try:
            assert await script(keys=["in-three"], args=["v"]) == 1
            assert await echo(args=["text"]) == "text"  # decoded, as redis-py would
            assert await admin.execute_command("SELECT", 0) and not await admin.exists("in-three")
        finally:
            await good.aclose()
        third = connect_redis(own_redis.url(db=3))
        try:
            assert await third.get("in-three") == b"v"
        finally:
            await third.aclose()
        bad = connect_redis(f"redis://{user}:wrong@127.0.0.1:{own_redis.port}/0")
        try:
            with pytest.raises(AuthenticationError):
                await bad.register_script(SET_KEY)(keys=["k"], args=["v"])
        finally:
            await bad.aclose()
    finally:
        await admin.aclose()


async def test_a_unix_socket_url_reaches_the_same_redis(own_redis: OwnRedis) -> None:
    client = connect_redis(f"unix://{own_redis.socket_path}?db=0")
    tcp = connect_redis(own_redis.url())
    try:
        assert await client.register_script(SET_KEY)(keys=["via-unix"], args=["v"]) == 1
        assert await tcp.get("via-unix") == b"v"
    finally:
        await client.aclose()
        await tcp.aclose()


async def test_a_closed_client_refuses_script_calls_and_fails_the_waiting_ones(own_redis: OwnRedis) -> None:
    client = connect_redis(own_redis.url(), socket_timeout=10)
    script = client.register_script(SET_KEY)
    await script(keys=["k"], args=["warm"])
    async with _held(own_redis.url(), 400):
        waiting = asyncio.ensure_future(script(keys=["k"], args=["v"]))
        await asyncio.sleep(0.05)
        await client.aclose()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(RedisConnectionError):
            await script(keys=["k"], args=["later"])


async def test_a_redis_that_refuses_the_connection_fails_the_call_once_with_its_reason(own_redis: OwnRedis) -> None:
    admin = connect_redis(own_redis.url())
    client = connect_redis(own_redis.url(), socket_timeout=2, socket_connect_timeout=2)
    try:
        await admin.ping()  # the one client Redis will have
        await admin.config_set("maxclients", 1)
        rejected = int((await admin.info("stats"))["rejected_connections"])
        with pytest.raises(RedisConnectionError, match="max number of clients"):
            await asyncio.wait_for(client.register_script(SET_KEY)(keys=["k"], args=["v"]), 10)
        # One connection tried for the call, not a storm of them.
        assert int((await admin.info("stats"))["rejected_connections"]) - rejected == 1
    finally:
        await admin.config_set("maxclients", 10000)
        await client.aclose()
        await admin.aclose()


async def test_closing_the_client_while_its_connection_opens_fails_the_call_without_cancelling_it(
    own_redis: OwnRedis,
) -> None:
    # Database 1: the opening waits for SELECT's answer, and Redis is stopped.
    client = connect_redis(own_redis.url(db=1), socket_timeout=10, socket_connect_timeout=10)
    try:
        own_redis.process.send_signal(signal.SIGSTOP)
        call = asyncio.ensure_future(client.evalsha("0" * 40, 0))
        await asyncio.sleep(0.2)
        assert not call.done()
        await client.aclose()
        with pytest.raises(RedisConnectionError, match="closed"):
            await asyncio.wait_for(call, 5)
    finally:
        own_redis.process.send_signal(signal.SIGCONT)


async def test_a_tls_url_verifies_the_server_and_carries_script_calls(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is needed"
    good, other = make_ca(tmp_path / "ca", services=["redis"]), make_ca(tmp_path / "other", services=["redis"])
    [port] = _free_ports(1)
    tls = ["--tls-cert-file", str(good / "redis.pem"), "--tls-key-file", str(good / "redis-key.pem")]
    tls += ["--tls-ca-cert-file", str(good / "ca.pem"), "--tls-auth-clients", "no", "--appendonly", "no"]
    server = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", *tls],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trusted = connect_redis(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={good / 'ca.pem'}")
    stranger = connect_redis(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other / 'ca.pem'}", socket_connect_timeout=5)
    try:
        for _ in range(100):
            try:
                await trusted.ping()  # through redis-py's pool: the server is up
                break
            except RedisConnectionError:
                await asyncio.sleep(0.05)
        assert await trusted.register_script(SET_KEY)(keys=["over-tls"], args=["v"]) == 1
        assert await trusted.get("over-tls") == b"v"
        with pytest.raises(RedisConnectionError):  # a server whose certificate its CA did not sign
            await stranger.register_script(SET_KEY)(keys=["k"], args=["v"])
    finally:
        await trusted.aclose()
        await stranger.aclose()
        server.terminate()
        server.wait(10)
