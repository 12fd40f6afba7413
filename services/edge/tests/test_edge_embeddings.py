"""POST /v1/embeddings, GET /v1/health/providers and GET /v1/cache/stats at the edge:
validation, the OpenAI shapes (base64 included) and the cache header. The router
channel points at a closed port, so valid requests end in a real 503."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest
from hoosh.router.v1 import router_pb2
from hoosh_edge.protocol import CacheStats, EmbeddingRequest, EmbeddingResponse, ProviderHealth
from hoosh_edge.serving_chat import cache_headers
from hoosh_edge.serving_embeddings import (
    cache_stats_to_dict,
    embeddings_to_dict,
    provider_health_to_dict,
    to_embed_request,
)

from .conftest import ADMIN_KEY, MakeEdge
from .test_edge_app import assert_envelope

EMBEDDINGS = "/v1/embeddings"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi"}, "model"),
        ({"model": "e"}, "input"),
        ({"model": "e", "input": []}, "input"),
        ({"model": "e", "input": ""}, "input"),
        ({"model": "e", "input": ["ok", ""]}, "input"),
        ({"model": "e", "input": [1, 2, 3]}, "input"),
        ({"model": "e", "input": [[1, 2]]}, "input"),
        ({"model": "e", "input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "e", "input": "hi", "dimensions": 0}, "dimensions"),
    ],
    ids=["no-model", "no-input", "empty-list", "empty-string", "empty-item", "tokens", "token-lists", "format", "dims"],
)
async def test_bad_embedding_requests_are_400(client: httpx.AsyncClient, body: dict, param: str) -> None:
    assert_envelope(await client.post(EMBEDDINGS, json=body), 400, param=param)


async def test_a_valid_request_reaches_the_router(client: httpx.AsyncClient) -> None:
    response = await client.post(EMBEDDINGS, json={"model": "e", "input": ["a", "b"]})
    assert_envelope(response, 503)


async def test_health_and_cache_views_need_the_router(make_edge: MakeEdge) -> None:
    client = (await make_edge(admin_key=ADMIN_KEY)).client
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert_envelope(await client.get("/v1/health/providers", headers=admin), 503)
    assert_envelope(await client.get("/v1/cache/stats", headers=admin), 503)


def test_the_router_request() -> None:
    request = EmbeddingRequest.model_validate({"model": "e", "input": "one", "dimensions": 4, "user": "u"})
    out = to_embed_request(request, "rid")
    assert (out.request_id, out.model, list(out.input), out.dimensions, out.user, out.pool) == (
        "rid",
        "e",
        ["one"],
        4,
        "u",
        "default",
    )
    assert not to_embed_request(EmbeddingRequest(model="e", input=["x"]), "r").HasField("dimensions")


def test_floats_and_base64_shapes() -> None:
    reply = router_pb2.EmbedResponse(
        model="e-1",
        provider="p",
        data=[router_pb2.Embedding(index=0, values=[0.5, -0.25]), router_pb2.Embedding(index=1, values=[1.0, 0.0])],
    )
    reply.usage.prompt_tokens = reply.usage.total_tokens = 7
    reply.usage.cost_usd_micros = 3
    floats = embeddings_to_dict(reply, model="e", encoding_format="float")
    EmbeddingResponse.model_validate(floats)
    assert floats["data"][0] == {"object": "embedding", "embedding": [0.5, -0.25], "index": 0}
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7, "cost_usd_micros": 3}
    assert floats["model"] == "e-1"
    packed = embeddings_to_dict(reply, model="e", encoding_format="base64")["data"][0]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(packed)) == (0.5, -0.25)


def test_health_and_cache_shapes() -> None:
    health = provider_health_to_dict(
        router_pb2.ProviderHealth(name="a", type="anthropic", state="open", consecutive_failures=3, last_error="503")
    )
    ProviderHealth.model_validate(health)
    assert health["last_error_at"] is None and health["rpm_limit"] is None and health["consecutive_failures"] == 3
    stats = cache_stats_to_dict(router_pb2.GetCacheStatsResponse(enabled=True, hits=3, misses=1, ttl_seconds=60))
    CacheStats.model_validate(stats)
    assert stats["hit_rate"] == 0.75
    assert cache_stats_to_dict(router_pb2.GetCacheStatsResponse())["hit_rate"] == 0.0


def test_the_cache_header_only_when_the_cache_was_asked() -> None:
    assert cache_headers("hit") == {"X-Hoosh-Cache": "hit"}
    assert cache_headers("") is None
