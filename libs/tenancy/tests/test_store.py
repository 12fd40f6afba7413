"""KeyStore against the real Redis: records by hash only, CRUD, change notices."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from hoosh_tenancy import InvalidKeyRecord, KeyNotFound, KeyStore, hash_key


async def test_create_stores_only_the_hash(store: KeyStore, redis: aioredis.Redis, prefix: str) -> None:
    record, key = await store.create(name="ci", team="a", pools=["team-a"], models=["gpt-*"], rpm=5)
    assert key.startswith("sk-hoosh-") and record.id.startswith("key_")
    assert record.created_at > 0 and record.revoked_at is None
    assert await store.get(record.id) == record
    assert await store.by_hash(hash_key(key)) == record
    assert await store.by_hash(hash_key(key + "x")) is None
    # Nothing in Redis holds the key itself.
    async for name in redis.scan_iter(match=f"{prefix}*"):
        kind = (await redis.type(name)).decode()
        if kind == "string":
            values = [await redis.get(name)]
        elif kind == "hash":
            values = list((await redis.hgetall(name)).values())
        else:  # the sorted set of changed records: hashes only
            assert kind == "zset"
            values = await redis.zrange(name, 0, -1)
        assert all(key.encode() not in (value or b"") for value in values)
        assert key.encode() not in name


async def test_list_update_and_revoke(store: KeyStore) -> None:
    first, _ = await store.create(name="one")
    second, _ = await store.create(name="two", scope="admin")
    assert {r.id for r in await store.list()} == {first.id, second.id}

    updated = await store.update(first.id, name="uno", pools=["p1", "p2"], models=["m"], tpm=100, expires_at=2**40)
    assert (updated.name, updated.pools, updated.models, updated.tpm, updated.expires_at) == (
        "uno",
        ("p1", "p2"),
        ("m",),
        100,
        2**40,
    )
    cleared = await store.update(first.id, tpm=None, expires_at=None)
    assert cleared.tpm is None and cleared.expires_at is None and cleared.name == "uno"

    revoked = await store.revoke(first.id)
    assert revoked.revoked_at is not None
    assert (await store.revoke(first.id)).revoked_at == revoked.revoked_at  # idempotent
    assert (await store.get(first.id)).revoked_at == revoked.revoked_at


async def test_errors(store: KeyStore) -> None:
    with pytest.raises(KeyNotFound):
        await store.get("key_nope")
    with pytest.raises(KeyNotFound):
        await store.revoke("key_nope")
    record, _ = await store.create(name="x")
    with pytest.raises(InvalidKeyRecord, match="cannot be changed: scope"):
        await store.update(record.id, scope="admin")
    with pytest.raises(InvalidKeyRecord, match="pools"):
        await store.update(record.id, pools=["bad name"])
    with pytest.raises(InvalidKeyRecord, match="name"):
        await store.create(name="")


async def test_concurrent_updates_all_land(store: KeyStore) -> None:
    record, _ = await store.create(name="x")
    await asyncio.gather(*(store.update(record.id, rpm=n + 1) for n in range(20)), store.revoke(record.id))
    final = await store.get(record.id)
    assert final.revoked_at is not None  # the revocation was not lost to a concurrent update
    assert final.rpm is not None


async def test_every_write_publishes_a_notice(store: KeyStore, redis: aioredis.Redis) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(store.channel)
    assert (await pubsub.get_message(timeout=1.0))["type"] == "subscribe"
    record, key = await store.create(name="x")
    await store.update(record.id, name="y")
    await store.revoke(record.id)
    notices = []
    while len(notices) < 3:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert message is not None
        notices.append(json.loads(message["data"]))
    assert [n["op"] for n in notices] == ["create", "update", "revoke"]
    assert {n["hash"] for n in notices} == {hash_key(key)}
    assert {n["id"] for n in notices} == {record.id}
    await pubsub.aclose()


async def test_every_write_bumps_the_version_and_names_what_changed(store: KeyStore, redis: aioredis.Redis) -> None:
    assert await store.changed_since(0) == (0, [])
    pubsub = redis.pubsub()
    await pubsub.subscribe(store.channel)
    assert (await pubsub.get_message(timeout=1.0))["type"] == "subscribe"
    first, first_key = await store.create(name="one")
    second, second_key = await store.create(name="two")
    await store.update(first.id, name="uno")
    await store.revoke(second.id)
    versions = []
    while len(versions) < 4:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert message is not None
        versions.append(json.loads(message["data"])["version"])
    assert versions == [1, 2, 3, 4]  # each notice carries the version its write made
    await pubsub.aclose()

    assert await store.changed_since(4) == (4, [])
    assert await store.changed_since(3) == (4, [hash_key(second_key)])
    version, changed = await store.changed_since(0)
    assert (version, sorted(changed)) == (4, sorted([hash_key(first_key), hash_key(second_key)]))
    version, records = await store.load_all()
    assert version == 4 and records[hash_key(first_key)].name == "uno"
    assert records[hash_key(second_key)].revoked_at is not None
    missing = hash_key(first_key + "x")
    assert await store.by_hashes([hash_key(first_key), missing]) == {
        hash_key(first_key): records[hash_key(first_key)],
        missing: None,
    }
