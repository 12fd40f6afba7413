"""Embeddings, and the router's provider-health and cache views: the validated
OpenAI request -> router gRPC -> OpenAI JSON."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_common.telemetry import request_metadata

from .errors import ClientClosedRequestError
from .protocol import EmbeddingRequest
from .serving_chat import DisconnectWatch, Receive


def to_embed_request(
    request: EmbeddingRequest,
    request_id: str,
    *,
    pool: str | None = None,
    caller: tenancy_pb2.Caller | None = None,
) -> router_pb2.EmbedRequest:
    out = router_pb2.EmbedRequest(
        request_id=request_id,
        model=request.model,
        input=request.texts,
        pool=pool or request.pool or "default",
        caller=caller,
    )
    if request.dimensions is not None:
        out.dimensions = request.dimensions
    if request.user is not None:
        out.user = request.user
    return out


def _encode(values: Any, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return list(values)


def embeddings_to_dict(reply: router_pb2.EmbedResponse, *, model: str, encoding_format: str) -> dict[str, Any]:
    """The ``list`` of ``embedding`` objects OpenAI answers with."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": _encode(item.values, encoding_format), "index": item.index}
            for item in reply.data
        ],
        "model": reply.model or model,
        "usage": {
            "prompt_tokens": reply.usage.prompt_tokens,
            "total_tokens": reply.usage.total_tokens,
            "cost_usd_micros": reply.usage.cost_usd_micros,  # hoosh's extension: exact micro-dollars
        },
    }


def provider_health_to_dict(item: router_pb2.ProviderHealth) -> dict[str, Any]:
    return {
        "name": item.name,
        "type": item.type,
        "base_url": item.base_url,
        "state": item.state,
        "consecutive_failures": item.consecutive_failures,
        "last_error": item.last_error or None,
        "last_error_at": item.last_error_at_ms or None,
        "open_until": item.open_until_ms or None,
        "latency_ms": item.latency_ms or None,
        "rpm_limit": item.rpm_limit or None,
        "tpm_limit": item.tpm_limit or None,
    }


def cache_stats_to_dict(reply: router_pb2.GetCacheStatsResponse) -> dict[str, Any]:
    lookups = reply.hits + reply.misses
    return {
        "enabled": reply.enabled,
        "hits": reply.hits,
        "misses": reply.misses,
        "stores": reply.stores,
        "entries": reply.entries,
        "hit_rate": round(reply.hits / lookups, 4) if lookups else 0.0,
        "ttl_seconds": reply.ttl_seconds,
    }


class ServingEmbeddings:
    """POST /v1/embeddings against the router."""

    def __init__(self, router: router_pb2_grpc.RouterServiceAsyncStub, *, timeout: float) -> None:
        self._router = router
        self._timeout = timeout

    async def create(
        self,
        request: EmbeddingRequest,
        request_id: str,
        receive: Receive,
        *,
        pool: str | None = None,
        caller: tenancy_pb2.Caller | None = None,
    ) -> dict[str, Any]:
        """Embed the input; a client disconnect cancels the router call (releasing its reservation)."""
        metadata = request_metadata(request_id)
        embed_request = to_embed_request(request, request_id, pool=pool, caller=caller)
        call = self._router.Embed(embed_request, metadata=metadata, timeout=self._timeout)
        watch = DisconnectWatch(receive, call)
        try:
            reply = await call
        except asyncio.CancelledError:
            if watch.fired:
                raise ClientClosedRequestError("The client closed the connection.") from None
            raise
        finally:
            watch.stop()
        return embeddings_to_dict(reply, model=request.model, encoding_format=request.encoding_format)
