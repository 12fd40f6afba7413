"""The cost ledger through the whole stack: every call priced once, in integer
micro-dollars, returned to the client (usage extension and header; the last stream
chunk), recorded in the event, and added up by GET /v1/costs to the micro-dollar."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hoosh_common.prices import AudioPrice, TokenPrice, default_table, usd_to_micros

from .conftest import STT_MODEL, STT_PRICE_PER_MINUTE_USD, RunningStack
from .test_stt_e2e import speech  # noqa: F401 - the spoken sentence fixture
from .test_tenancy_e2e import admin_client, audit_entry, make_key, make_pool

pytestmark = pytest.mark.slow

# tests/conftest.py prices the `upstream` provider by configuration (chat and embeddings);
# the Gemini stand-in's models are priced by the shipped table.
UPSTREAM = TokenPrice(input=usd_to_micros("0.15"), cached_input=usd_to_micros("0.15"), output=usd_to_micros("0.6"))
MESSAGES = [{"role": "user", "content": "Tell me about the sea and the lighthouse keeper."}]


@pytest.fixture
def admin(hoosh: RunningStack) -> Iterator[httpx.Client]:
    with admin_client(hoosh.base_url, hoosh.admin_key) as client:
        yield client


def cost_of(usage: Any) -> int:
    """hoosh's usage extension, as the official client keeps it (an unknown field)."""
    extra = usage.model_extra or {}
    return int(extra["cost_usd_micros"])


def ledger(base_url: str, key: str, **query: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url}/v1/costs", params=query, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_every_cost_a_client_is_told_adds_up_to_the_ledger(
    hoosh: RunningStack,
    admin: httpx.Client,
    speech: Path,  # noqa: F811 - the fixture imported above
) -> None:
    team = make_pool(admin, 10_000_000)
    key, key_id = make_key(admin, [team])
    client = openai.OpenAI(base_url=f"{hoosh.base_url}/v1", api_key=key, max_retries=0)
    told: list[int] = []

    # Blocking, priced by configuration: the body's usage and the header agree.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=16)
    completion = raw.parse()
    assert completion.usage is not None
    cost = cost_of(completion.usage)
    assert int(raw.headers["x-hoosh-cost-usd-micros"]) == cost
    assert cost == UPSTREAM.cost(completion.usage.prompt_tokens, completion.usage.completion_tokens) > 0
    told.append(cost)

    # Blocking, priced by the shipped table (the provider configures no price).
    gemini = client.chat.completions.create(model="gemini-2.0-flash", messages=MESSAGES, max_tokens=16)
    assert gemini.usage is not None
    listed = default_table().chat("gemini", "gemini-2.0-flash")
    assert listed is not None and listed.input > 0
    assert cost_of(gemini.usage) == listed.cost(gemini.usage.prompt_tokens, gemini.usage.completion_tokens) > 0
    told.append(cost_of(gemini.usage))

    # Streamed: the usage chunk carries the cost.
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    final = chunks[-1].usage
    assert final is not None and not chunks[-1].choices
    assert cost_of(final) == UPSTREAM.cost(final.prompt_tokens, final.completion_tokens) > 0
    told.append(cost_of(final))

    # Embeddings: input only.
    embedded = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["the sea", "a lamp"])
    vectors = embedded.parse()
    cost = cost_of(vectors.usage)
    assert int(embedded.headers["x-hoosh-cost-usd-micros"]) == cost == UPSTREAM.cost(vectors.usage.prompt_tokens, 0) > 0
    told.append(cost)

    # A transcription: priced per minute of audio (tests/conftest.py prices the local Whisper).
    with speech.open("rb") as audio:
        heard = httpx.post(
            f"{hoosh.base_url}/v1/audio/transcriptions",
            data={"model": STT_MODEL, "response_format": "json"},
            files={"file": ("speech.wav", audio, "audio/wav")},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
    assert heard.status_code == 200, heard.text
    usage = heard.json()["usage"]
    cost = int(usage["cost_usd_micros"])
    assert int(heard.headers["x-hoosh-cost-usd-micros"]) == cost
    per_minute = AudioPrice(per_minute=usd_to_micros(STT_PRICE_PER_MINUTE_USD))
    # The reply's duration is rounded to the millisecond; the charge used the exact one.
    assert abs(cost - per_minute.cost(round(usage["seconds"] * 1000))) <= 1 and cost > 0
    told.append(cost)

    # An abandoned stream: the client left before any cost reached it; the router read the
    # rest for the provider's usage, charged it, and the event says what it cost.
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 64, "stream": True, "pool": team}
    with httpx.stream(
        "POST", f"{hoosh.base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # hang up after the first words
    payload = audit_entry(admin, request_id)["payload"]
    left = int(payload.get("cost_usd_micros", 0))
    usage = payload.get("usage") or {}
    assert left == UPSTREAM.cost(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))) > 0

    # The ledger, as the key sees it: exactly what it was told, plus the abandoned stream.
    expected = sum(told) + left
    deadline = time.monotonic() + 10
    report = ledger(hoosh.base_url, key, group_by="key_id")
    while report["total"]["cost_usd_micros"] != expected and time.monotonic() < deadline:
        time.sleep(0.1)  # the abandoned stream's commit lands after its drain
        report = ledger(hoosh.base_url, key, group_by="key_id")
    assert report["total"]["cost_usd_micros"] == expected
    assert report["total"]["requests"] == 6
    assert [line["key_id"] for line in report["data"]] == [key_id]
    assert report["total"]["cost_usd"] == f"{expected // 1_000_000}.{expected % 1_000_000:06d}"

    # By model: each model's line is the sum of its calls.
    lines = ledger(hoosh.base_url, key, group_by="model")["data"]
    by_model = {line["model"]: line["cost_usd_micros"] for line in lines}
    assert by_model["gemini-2.0-flash"] == told[1]
    assert sum(by_model.values()) == expected

    # The pool's money counter moved by the same amount, and admin sees the same lines.
    assert admin.get(f"/v1/admin/pools/{team}").json()["used_usd_micros"] == expected
    seen_by_admin = admin.get("/v1/costs", params={"key_id": key_id, "group_by": "pool"}).json()
    assert seen_by_admin["data"] == [
        {
            "pool": team,
            "requests": 6,
            "prompt_tokens": seen_by_admin["total"]["prompt_tokens"],
            "completion_tokens": seen_by_admin["total"]["completion_tokens"],
            "cost_usd_micros": expected,
            "cost_usd": report["total"]["cost_usd"],
        }
    ]


def test_a_user_key_sees_only_its_own_costs(hoosh: RunningStack, admin: httpx.Client) -> None:
    team = make_pool(admin, 1_000_000)
    spender, _ = make_key(admin, [team])
    onlooker, _ = make_key(admin, [team])
    client = openai.OpenAI(base_url=f"{hoosh.base_url}/v1", api_key=spender, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=8)
    assert ledger(hoosh.base_url, spender)["total"]["cost_usd_micros"] > 0
    # Same pool, another key: none of the spender's charges, whatever it asks for.
    assert ledger(hoosh.base_url, onlooker)["data"] == []
    assert ledger(hoosh.base_url, onlooker, pool=team)["data"] == []


def test_bad_ranges_get_a_clear_400(hoosh: RunningStack, admin: httpx.Client) -> None:
    for query in (
        {"start": "yesterday"},
        {"start": "2026-02-01", "end": "2026-01-01"},
        {"start": "2020-01-01", "end": "2026-01-01"},
        {"group_by": "colour"},
    ):
        response = admin.get("/v1/costs", params=query)
        assert response.status_code == 400, (query, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
