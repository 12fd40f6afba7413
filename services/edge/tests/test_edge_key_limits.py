"""A key's RPM, TPM and concurrency on /v1/tokens/reserve, counted by
hoosh_metering's KeyLimiter in the real Redis (the windows the router counts chats in),
and a user key's single reservation capped at its TPM.

Keys and limit windows live under the test's fresh prefix; the budget and the router
are the real services in-process (conftest's ``stack``), on the same Redis prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from hoosh_metering.errors import RateLimited
from hoosh_metering.limits import KeyLimiter, KeyLimits
from hoosh_metering.redis import RedisClient, connect_redis

from .conftest import REDIS_URL, Edge, MakeEdge, Stack, free_port
from .test_edge_app import CHAT, USER, assert_envelope
from .test_edge_tenancy import ADMIN, bearer, create_key, edge_on

RESERVE = "/v1/tokens/reserve"


@pytest.fixture
async def edge(make_edge: MakeEdge, stack: Stack) -> Edge:
    return await edge_on(make_edge, stack)


@pytest.fixture
async def router_limiter(edge: Edge) -> AsyncIterator[KeyLimiter]:
    """A limiter of another process (the router's), on its own client: same Redis, same prefix."""
    client: RedisClient = connect_redis(REDIS_URL)
    yield KeyLimiter(client, edge.settings.budget_key_prefix)
    await client.aclose()


async def reserve(edge: Edge, key: str, tokens: int, pool: str = "team-a") -> Any:
    return await edge.client.post(RESERVE, json={"pool": pool, "tokens": tokens}, headers=bearer(key))


def assert_rate_limited(response: Any) -> dict[str, Any]:
    error = assert_envelope(response, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert int(response.headers["retry-after"]) >= 1
    return error


async def test_rpm_counts_each_reservation(edge: Edge, stack: Stack) -> None:
    key, _ = await create_key(edge, pools=["team-a"], rpm=2)
    assert (await reserve(edge, key, 5)).json()["reserved"] is True
    assert (await reserve(edge, key, 5)).json()["reserved"] is True
    error = assert_rate_limited(await reserve(edge, key, 5))
    assert "rpm" in error["message"]
    assert (await stack.pool("team-a")).reserved == 2 * 5  # the refused call never reached the budget


async def test_tpm_counts_the_reserved_tokens(edge: Edge, stack: Stack) -> None:
    key, _ = await create_key(edge, pools=["team-a"], tpm=10)
    assert (await reserve(edge, key, 6)).json()["reserved"] is True
    error = assert_rate_limited(await reserve(edge, key, 6))  # 6 + 6 > 10
    assert "tpm" in error["message"]
    assert (await reserve(edge, key, 4)).json()["reserved"] is True  # 6 + 4 fits
    assert_rate_limited(await reserve(edge, key, 1))
    assert (await stack.pool("team-a")).reserved == 6 + 4


async def test_a_user_keys_reservation_is_capped_at_its_tpm(edge: Edge, stack: Stack) -> None:
    key, _ = await create_key(edge, pools=["team-a"], tpm=10)
    error = assert_envelope(await reserve(edge, key, 11), 400, param="tokens")
    assert "at most 10 tokens" in error["message"] and "tpm" in error["message"]
    assert (await stack.pool("team-a")).reserved == 0
    assert (await reserve(edge, key, 10)).json()["reserved"] is True  # exactly its TPM: allowed
    # Without a TPM nothing caps it; admin keys are not capped (their limits still count).
    # (default is the roomy pool: 1,000,000 tokens.)
    unlimited, _ = await create_key(edge, pools=["default"], rpm=100)
    assert (await reserve(edge, unlimited, 500_000, pool="default")).json()["reserved"] is True
    admin, _ = await create_key(edge, scope="admin", tpm=10)
    assert (await reserve(edge, admin, 50)).json()["reserved"] is True
    assert_rate_limited(await reserve(edge, admin, 1))
    big = await edge.client.post(RESERVE, json={"pool": "default", "tokens": 400_000}, headers=ADMIN)
    assert big.json()["reserved"] is True  # the bootstrap admin has no limits
    assert ((await stack.pool("team-a")).reserved, (await stack.pool("default")).reserved) == (60, 900_000)


async def test_tokens_the_budget_refused_are_given_back_to_tpm(edge: Edge) -> None:
    key, _ = await create_key(edge, pools=["team-a", "org"], tpm=10)
    # Deleted since: the budget answers NOT_FOUND.
    assert (await edge.client.delete("/v1/admin/pools/org", headers=ADMIN)).status_code == 200
    assert assert_envelope(await reserve(edge, key, 8, pool="org"), 404)["code"] == "pool_not_found"
    assert (await reserve(edge, key, 8)).json()["reserved"] is True  # nothing was reserved above: TPM is 8
    assert_rate_limited(await reserve(edge, key, 8))


async def test_the_call_holds_a_concurrency_slot_the_reservation_does_not(
    edge: Edge, router_limiter: KeyLimiter
) -> None:
    key, record = await create_key(edge, pools=["team-a"], max_concurrency=1)
    # Reservations outlive their calls: one after another, each call frees its slot.
    for _ in range(3):
        assert (await reserve(edge, key, 5)).json()["reserved"] is True
    # A chat of the same key in flight at the router holds the only slot.
    limits = KeyLimits(max_concurrency=1)
    await router_limiter.admit(record["id"], "chat-1", limits, 0)
    error = assert_rate_limited(await reserve(edge, key, 5))
    assert "concurrency" in error["message"]
    await router_limiter.finish(record["id"], "chat-1", limits, estimated_tokens=0, actual_tokens=0)
    assert (await reserve(edge, key, 5)).json()["reserved"] is True


async def test_the_router_and_the_edge_count_in_the_same_windows(edge: Edge, router_limiter: KeyLimiter) -> None:
    key, record = await create_key(edge, pools=["team-a"], rpm=100, tpm=100)
    # The router admitted chats of this key worth 95 tokens this minute.
    await router_limiter.admit(record["id"], "chat-1", KeyLimits(rpm=100, tpm=100), 95)
    assert_rate_limited(await reserve(edge, key, 10))
    assert (await reserve(edge, key, 5)).json()["reserved"] is True
    # And the router sees what the edge reserved: the window is full.
    with pytest.raises(RateLimited) as caught:
        await router_limiter.admit(record["id"], "chat-2", KeyLimits(rpm=100, tpm=100), 1)
    assert caught.value.limit == "tpm"


async def test_a_limit_redis_that_cannot_answer_is_503(make_edge: MakeEdge, stack: Stack) -> None:
    # Key records on the real Redis; the edge's budget Redis (the limit windows) is down.
    edge = await edge_on(make_edge, stack, redis_url=f"redis://127.0.0.1:{free_port()}/0", tenancy_redis_url=REDIS_URL)
    limited, _ = await create_key(edge, pools=["team-a"], rpm=10)
    error = assert_envelope(await reserve(edge, limited, 5), 503)
    assert (error["code"], error["type"]) == ("budget_unavailable", "api_error")
    assert (await stack.pool("team-a")).reserved == 0  # nothing is reserved unmetered
    # A key without limits costs no limiter round trip.
    free, _ = await create_key(edge, pools=["team-a"])
    assert (await reserve(edge, free, 5)).json()["reserved"] is True
    assert (await stack.pool("team-a")).reserved == 5


async def test_the_router_enforces_the_limits_the_edge_passes(edge: Edge, stack: Stack) -> None:
    """The edge hands the key's limits to the router with each chat (the Caller); the
    router counts them in the same windows and refuses past them, before any upstream call."""
    key, _ = await create_key(edge, pools=["team-a"], rpm=2)
    body = {"model": "gpt-4o", "messages": [USER]}
    assert (await edge.client.post(CHAT, json=body, headers=bearer(key))).status_code == 200
    assert (await reserve(edge, key, 5)).json()["reserved"] is True  # the edge's call: the same window
    for stream in (False, True):
        error = assert_rate_limited(await edge.client.post(CHAT, json={**body, "stream": stream}, headers=bearer(key)))
        assert "rpm" in error["message"]
    assert stack.upstream_requests() == 1
    # A key without limits is not counted at all: as many chats as it likes.
    free, _ = await create_key(edge, pools=["team-a"])
    for _ in range(3):
        assert (await edge.client.post(CHAT, json=body, headers=bearer(free))).status_code == 200
