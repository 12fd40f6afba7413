"""KeyRecord, key generation and hashing: pure, no Redis."""

from __future__ import annotations

import hashlib
import re

import pytest
from hoosh_tenancy import ANONYMOUS, BOOTSTRAP_ADMIN, KeyRecord, generate_key, hash_key, valid_model_id
from pydantic import ValidationError


def test_keys_are_256_random_bits_with_the_prefix() -> None:
    keys = {generate_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in list(keys)[:20]:
        assert re.fullmatch(r"sk-hoosh-[A-Za-z0-9_-]{43}", key)


def test_hash_is_sha256_hex() -> None:
    assert hash_key("sk-hoosh-x") == hashlib.sha256(b"sk-hoosh-x").hexdigest()
    assert hash_key(b"sk-hoosh-x") == hash_key("sk-hoosh-x")


def record(**fields: object) -> KeyRecord:
    return KeyRecord.model_validate({"id": "key_1", "name": "n", **fields})


def test_a_user_key_without_pools_gets_default() -> None:
    assert record().pools == ("default",)
    assert record().default_pool == "default"
    assert record(pools=["team-a", "org"]).default_pool == "team-a"
    assert record(pools=["*"]).default_pool == "default"


def test_pools() -> None:
    key = record(pools=["team-a", "org", "team-a"])
    assert key.pools == ("team-a", "org")  # duplicates dropped, order kept
    assert key.allows_pool("team-a") and key.allows_pool("org")
    assert not key.allows_pool("team-b")
    assert record(pools=["*"]).allows_pool("anything")
    assert BOOTSTRAP_ADMIN.allows_pool("anything") and ANONYMOUS.allows_pool("anything")


@pytest.mark.parametrize("pool", ["", "a b", "{tag}", "x" * 65, "semi;colon"])
def test_bad_pool_names_are_refused(pool: str) -> None:
    with pytest.raises(ValidationError):
        record(pools=[pool])


def test_models_exact_and_patterns_as_requested() -> None:
    key = record(models=["gpt-4o-mini", "slow-*", "local/llama-[0-9]*"])
    assert key.allows_model("gpt-4o-mini")
    assert not key.allows_model("gpt-4o")
    assert key.allows_model("slow-1")
    # provider/model is matched as given: "slow-*" does not cover provider "slow".
    assert not key.allows_model("slow/o1-pro-expensive")
    assert key.allows_model("local/llama-3")
    assert not key.allows_model("local/mistral")
    assert not key.allows_model("GPT-4O-MINI")  # case-sensitive
    assert record(models=["*"]).allows_model("anything/at-all")
    assert BOOTSTRAP_ADMIN.allows_model("x")


def test_the_model_memo_is_bounded() -> None:
    key = record(models=["p-*"])
    for n in range(5000):
        key.allows_model(f"q-{n}")
    assert len(key.__dict__["_checks"].memo) <= 1024


@pytest.mark.parametrize("model", ["", "has space", "a" * 257, "x;y", "emoji-\u00e9", "a\nb"])
def test_bad_model_ids(model: str) -> None:
    assert not valid_model_id(model)
    with pytest.raises(ValidationError):
        record(models=[model])


@pytest.mark.parametrize("model", ["upstream/../../admin", "a/./b", "a//b", "/a", "a/", "..", "."])
def test_path_segments_cannot_traverse(model: str) -> None:
    assert not valid_model_id(model)


@pytest.mark.parametrize("model", ["gpt-4o", "openai/gpt-4o", "a.b_c:d@e+f", "x" * 256])
def test_good_model_ids(model: str) -> None:
    assert valid_model_id(model)


def test_usable_revoked_and_expired() -> None:
    assert record().usable(1000)
    assert not record(revoked_at=5).usable(1000)
    assert record(expires_at=1001).usable(1000)
    assert not record(expires_at=1000).usable(1000)


def test_caller() -> None:
    key = record(team="t", user="u", rpm=10, tpm=1000, max_concurrency=2)
    caller = key.caller()
    assert (caller.key_id, caller.key_name, caller.team, caller.user, caller.admin) == ("key_1", "n", "t", "u", False)
    assert (caller.rpm, caller.tpm, caller.max_concurrency) == (10, 1000, 2)
    assert key.caller() is caller  # built once
    assert record().caller().rpm == 0  # unlimited
    assert BOOTSTRAP_ADMIN.caller().admin


def test_records_compare_by_value_and_round_trip() -> None:
    key = record(models=["a-*"], pools=["p"])
    key.caller()
    key.allows_model("a-1")
    again = KeyRecord.model_validate_json(key.model_dump_json())
    assert again == key
