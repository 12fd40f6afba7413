"""Router, budget, audit and speech-to-text as in-process grpc.aio servers that record what the edge
sends them: real gRPC on a real port, with just enough behaviour to answer (pools and
manual reservations with owners, a fixed model list, echoing chats).

They exist to check the edge's side of the contract (the pool, model and Caller it
passes, the owner/kind of token reservations, the filters of ListPools and
ListEntries) and its mapping of the budget's statuses; the services themselves are
tested in their own packages and end to end in tests/.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh.stt.v1 import stt_pb2, stt_pb2_grpc
from hoosh_common.grpc_errors import error_metadata

MODELS = ("gpt-4o-mini", "gpt-4o", "slow-1", "local/llama-3", "text-embedding-3-small")
STT_MODELS = ("whisper-tiny.en",)
SERVICES = (
    "hoosh.router.v1.RouterService",
    "hoosh.budget.v1.BudgetService",
    "hoosh.audit.v1.AuditService",
    "hoosh.stt.v1.SttService",
)


@dataclass
class Recorder:
    """Every request a fake received, by method name (latest last)."""

    calls: dict[str, list[Any]] = field(default_factory=dict)

    def record(self, method: str, request: Message) -> None:
        self.calls.setdefault(method, []).append(request)

    def last(self, method: str) -> Any:
        return self.calls[method][-1]

    def count(self, method: str) -> int:
        return len(self.calls.get(method, ()))


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, error_code: str | None = None
) -> None:
    if error_code:
        context.set_trailing_metadata(error_metadata("invalid_request_error", error_code))
    await context.abort(code, message)


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def Chat(self, request: router_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("Chat", request)
        return router_pb2.ChatResponse(
            id="x",
            model=request.model,
            created=1,
            choices=[
                chat_pb2.Choice(
                    index=0, message=chat_pb2.ChatMessage(role="assistant", text="ok"), finish_reason="stop"
                )
            ],
            usage=chat_pb2.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
        )

    async def ChatStream(
        self, request: router_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ChatStreamResponse]:
        self.recorder.record("ChatStream", request)
        delta = chat_pb2.Delta(role="assistant", content="ok")
        yield router_pb2.ChatStreamResponse(
            id="x",
            model=request.model,
            created=1,
            choices=[chat_pb2.ChunkChoice(index=0, delta=delta, finish_reason="stop")],
        )

    async def ListModels(self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("ListModels", request)
        return router_pb2.ListModelsResponse(models=[router_pb2.Model(id=m, owned_by="test") for m in MODELS])

    async def Embed(self, request: router_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("Embed", request)
        reply = router_pb2.EmbedResponse(
            model=request.model, data=[router_pb2.Embedding(index=0, values=[0.5])], provider="p"
        )
        reply.usage.prompt_tokens = reply.usage.total_tokens = 1
        return reply

    async def GetProviderHealth(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("GetProviderHealth", request)
        return router_pb2.GetProviderHealthResponse(
            providers=[router_pb2.ProviderHealth(name="p", type="openai", state="closed")]
        )

    async def GetCacheStats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("GetCacheStats", request)
        return router_pb2.GetCacheStatsResponse(enabled=True, hits=1, misses=1, ttl_seconds=60)


@dataclass
class Reservation:
    pool: str
    tokens: int
    owner: str
    kind: str
    ended: bool = False


class FakeBudget(budget_pb2_grpc.BudgetServiceServicer):
    """Pools by name, manual reservations with owner and kind (the contract of
    docs/tenancy.md: owner/kind given on Commit must match)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.pools: dict[str, budget_pb2.Pool] = {}
        self.reservations: dict[str, Reservation] = {}
        self.unavailable = False  # answer UNAVAILABLE budget_unavailable (Redis down)

    def add_pool(self, name: str, capacity: int = 1000, parent: str = "") -> None:
        chain = [name, *self.pools[parent].chain] if parent else [name]
        self.pools[name] = budget_pb2.Pool(
            name=name, capacity=capacity, available=capacity, parent=parent, period="none", timezone="UTC", chain=chain
        )

    async def _pool(self, name: str, context: grpc.aio.ServicerContext) -> budget_pb2.Pool:
        if self.unavailable:
            context.set_trailing_metadata(error_metadata("api_error", "budget_unavailable"))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "The budget store is unavailable.")
        if name not in self.pools:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"Unknown pool '{name}'", "pool_not_found")
        return self.pools[name]

    async def GetPool(self, request: budget_pb2.GetPoolRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("GetPool", request)
        return budget_pb2.GetPoolResponse(pool=await self._pool(request.pool, context))

    async def ListPools(self, request: budget_pb2.ListPoolsRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("ListPools", request)
        names = set(request.names) or set(self.pools)
        return budget_pb2.ListPoolsResponse(pools=[p for n, p in sorted(self.pools.items()) if n in names])

    async def Check(self, request: budget_pb2.CheckRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("Check", request)
        pool = await self._pool(request.pool, context)
        return budget_pb2.CheckResponse(allowed=pool.available >= request.tokens, pool=pool, available=pool.available)

    async def Reserve(self, request: budget_pb2.ReserveRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("Reserve", request)
        pool = await self._pool(request.pool, context)
        self.reservations[request.reservation_id] = Reservation(
            request.pool, request.tokens, request.owner, request.kind or "manual"
        )
        return budget_pb2.ReserveResponse(reservation_id=request.reservation_id, pool=pool, tokens=request.tokens)

    async def Commit(self, request: budget_pb2.CommitRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("Commit", request)
        pool = await self._pool(request.pool, context)
        held = self.reservations.get(request.reservation_id)
        if held is None:
            return budget_pb2.CommitResponse(pool=pool, already_ended=True, state="unknown")
        if (request.owner and request.owner != held.owner) or (request.kind and request.kind != held.kind):
            await _abort(
                context, grpc.StatusCode.PERMISSION_DENIED, "The reservation is not yours.", "reservation_not_owned"
            )
        if held.ended:
            return budget_pb2.CommitResponse(pool=pool, already_ended=True, state="committed")
        held.ended = True
        return budget_pb2.CommitResponse(pool=pool, state="committed")

    async def Report(self, request: budget_pb2.ReportRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("Report", request)
        return budget_pb2.ReportResponse(pool=await self._pool(request.pool, context))

    async def CreatePool(self, request: budget_pb2.CreatePoolRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("CreatePool", request)
        spec = request.spec
        if spec.name in self.pools:
            await _abort(context, grpc.StatusCode.ALREADY_EXISTS, f"Pool '{spec.name}' exists")
        if spec.parent:
            await self._pool(spec.parent, context)
        self.add_pool(spec.name, spec.capacity, spec.parent)
        pool = self.pools[spec.name]
        pool.period = spec.period or "none"
        pool.timezone = spec.timezone or "UTC"
        if spec.HasField("cap_usd_micros"):
            pool.cap_usd_micros = spec.cap_usd_micros
        return budget_pb2.CreatePoolResponse(pool=pool)

    async def UpdatePool(self, request: budget_pb2.UpdatePoolRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("UpdatePool", request)
        pool = await self._pool(request.name, context)
        if request.HasField("capacity"):
            pool.capacity = pool.available = request.capacity
        if request.HasField("cap_usd_micros"):
            pool.cap_usd_micros = request.cap_usd_micros
        if request.clear_cap_usd:
            pool.ClearField("cap_usd_micros")
        return budget_pb2.UpdatePoolResponse(pool=pool)

    async def DeletePool(self, request: budget_pb2.DeletePoolRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("DeletePool", request)
        await self._pool(request.name, context)
        if any(p.parent == request.name for p in self.pools.values()):
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"Pool '{request.name}' has children")
        del self.pools[request.name]
        return budget_pb2.DeletePoolResponse()

    async def ResetPool(self, request: budget_pb2.ResetPoolRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("ResetPool", request)
        pool = await self._pool(request.name, context)
        pool.used = 0
        return budget_pb2.ResetPoolResponse(pool=pool)


class FakeAudit(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def ListEntries(self, request: audit_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("ListEntries", request)
        return audit_pb2.ListEntriesResponse(total=0, chain_valid=True)


class FakeStt(stt_pb2_grpc.SttServiceServicer):
    """Admits every upload (the ``hoosh-stt-admitted`` go-ahead), reads it, answers one segment."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.gate: asyncio.Event | None = None  # set: each call waits for it before answering
        self.entered = asyncio.Event()  # set once a call arrived
        self.open_files: list[str] = []  # what this process had open when the last call arrived

    async def Transcribe(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        first = await anext(aiter(request_iterator))
        self.recorder.record("Transcribe", first)
        self.open_files = _open_files()
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        await context.send_initial_metadata((("hoosh-stt-admitted", "1"),))
        size = 0
        async for chunk in request_iterator:
            size += len(chunk.audio)
        segment = stt_pb2.Segment(id=0, start=0.0, end=1.0, text=" ok", tokens=[1])
        return stt_pb2.TranscribeResponse(
            request_id=first.options.request_id,
            model=first.options.model,
            text="ok",
            language="en",
            language_name="english",
            duration=1.0,
            segments=[segment],
            words=[stt_pb2.Word(word="ok", start=0.0, end=1.0)],
        )

    async def ListModels(self, request: stt_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("SttListModels", request)
        return stt_pb2.ListModelsResponse(models=[stt_pb2.Model(id=m, owned_by="test") for m in STT_MODELS])


def _open_files() -> list[str]:
    """The paths this process has open (Linux: /proc/self/fd), deleted temporary files included."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


@dataclass
class Backends:
    """The fakes on one in-process server, which reports every service SERVING (grpc.health.v1)."""

    address: str
    recorder: Recorder
    budget: FakeBudget
    server: grpc.aio.Server
    stt: FakeStt


async def start_backends() -> Backends:
    recorder = Recorder()
    budget = FakeBudget(recorder)
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(FakeRouter(recorder), server)
    budget_pb2_grpc.add_BudgetServiceServicer_to_server(budget, server)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(FakeAudit(recorder), server)
    stt = FakeStt(recorder)
    stt_pb2_grpc.add_SttServiceServicer_to_server(stt, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for service in SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return Backends(f"127.0.0.1:{port}", recorder, budget, server, stt)
