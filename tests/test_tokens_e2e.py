"""The token-budget endpoints through the edge, against the real budget service and Redis."""

from __future__ import annotations

import httpx

from .conftest import RunningStack, admin_headers
from .test_chat_e2e import create_pool, pool_state


async def test_check_reserve_and_report_by_reservation_id(hoosh: RunningStack) -> None:
    pool = await create_pool(hoosh, capacity=100)
    base = f"{hoosh.base_url}/v1/tokens"
    assert httpx.post(f"{base}/check", json={"pool": pool, "tokens": 100}).json() == {"allowed": True, "available": 100}
    assert httpx.post(f"{base}/check", json={"pool": pool, "tokens": 101}).json()["allowed"] is False

    reserved = httpx.post(f"{base}/reserve", json={"pool": pool, "tokens": 60}).json()
    assert reserved["reserved"] is True and reserved["available"] == 40
    assert pool_state(hoosh, pool)["reserved"] == 60
    refused = httpx.post(f"{base}/reserve", json={"pool": pool, "tokens": 41})
    assert refused.status_code == 200 and refused.json() == {"reserved": False, "available": 40, "reservation_id": None}

    report = {"pool": pool, "reserved": 60, "actual": 25, "reservation_id": reserved["reservation_id"]}
    committed = httpx.post(f"{base}/report", json=report)
    assert committed.status_code == 200 and committed.json() == {"used": 25, "available": 75}
    assert pool_state(hoosh, pool)["reserved"] == 0
    again = httpx.post(f"{base}/report", json=report)  # exactly once: the second report changes nothing
    assert again.status_code == 409 and again.json()["error"]["param"] == "reservation_id"
    assert pool_state(hoosh, pool)["used"] == 25


async def test_report_without_reservation_id_is_untracked_usage_only(hoosh: RunningStack) -> None:
    pool = await create_pool(hoosh, capacity=100)
    base = f"{hoosh.base_url}/v1/tokens"
    # Untracked usage is an operator's correction: admin only (a user key gets 403).
    assert httpx.post(f"{base}/report", json={"pool": pool, "actual": 7}).status_code == 403
    untracked = httpx.post(f"{base}/report", json={"pool": pool, "actual": 7}, headers=admin_headers(hoosh))
    assert untracked.status_code == 200 and untracked.json() == {"used": 7, "available": 93}
    # Ending a leased reservation by a bare count would free it twice when its lease expires.
    bare = httpx.post(f"{base}/report", json={"pool": pool, "reserved": 5, "actual": 5}, headers=admin_headers(hoosh))
    assert bare.status_code == 400 and bare.json()["error"]["param"] == "reservation_id"
    assert pool_state(hoosh, pool)["used"] == 7


def test_unknown_pool_is_404_on_token_endpoints(hoosh: RunningStack) -> None:
    base = f"{hoosh.base_url}/v1/tokens"
    for path, body in (("check", {"pool": "nope", "tokens": 1}), ("reserve", {"pool": "nope", "tokens": 1})):
        response = httpx.post(f"{base}/{path}", json=body)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "pool_not_found"
