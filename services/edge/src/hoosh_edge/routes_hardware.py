"""Hardware: what hoosh's hosts have (GET /v1/hardware) and where a model would fit
(POST /v1/hardware/placement). Both are admin only: they disclose the hosts' GPUs and
their free memory.

GET /v1/hardware asks, now and concurrently: this edge's own host, the STT service
(its GetHardware, when configured) and the router, which asks every local-inference
worker it calls (the router is the workers' only caller; the edge never dials one).
A service that does not answer is an entry with its ``error`` set and empty facts,
never a 5xx: ``service`` "stt" or "local-inference" for a worker that did not answer,
"router" when the router itself did not (its workers are then unknown).

POST /v1/hardware/placement estimates the memory a model needs
(``hoosh_common.hardware.estimate``: weights + KV cache + a stated overhead), lists the
local GPUs of the same aggregation that hold it with headroom, and the cloud offers of
the shipped price table (``hoosh_common/gpu_prices.json``) that would, cheapest first.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Depends, Request
from hoosh.router.v1 import router_pb2
from hoosh.stt.v1 import stt_pb2
from hoosh_common import hardware
from hoosh_common.hardware import HostFacts, Precision
from pydantic import ConfigDict, Field
from starlette.responses import Response

from .protocol import JsonInt, OpenAIModel
from .responses import OrjsonResponse
from .routing import BACKEND, EdgeState, edge, errors, grpc_metadata, parse_body
from .scopes import admin_only

router = APIRouter(tags=["hardware"], dependencies=[Depends(admin_only)])

PLACEMENT_PATH = "/v1/hardware/placement"
# Bounds that keep every answer an exact 64-bit integer (and the inputs physical).
MAX_PARAMETERS = 1e15
MAX_CONTEXT = 2**24
MAX_BATCH = 256
MAX_LAYERS = 512
MAX_KV_HEADS = 256
MAX_HEAD_DIM = 1024


# --------------------------------------------------------------------------- wire models


class GpuInfo(OpenAIModel):
    index: int = Field(description="NVML's device index")
    name: str
    memory_total_bytes: int | None = Field(
        description="null: NVML cannot read this GPU's memory (unified-memory parts such as GH200 or GB10)"
    )
    memory_used_bytes: int | None = Field(description="null when memory_total_bytes is")
    memory_free_bytes: int | None = Field(description="null when memory_total_bytes is")
    utilization_percent: int | None = Field(description="GPU busy over NVML's last sample period; null: unknown")
    temperature_celsius: int | None = Field(description="null: the device has no readable sensor")
    power_watts: float | None = Field(description="Power draw now; null: not supported by the device")


class HostHardware(OpenAIModel):
    service: str = Field(description="edge | stt | local-inference; router when the router did not answer")
    instance: str = Field(description="The edge's host name; the address a worker is reached at")
    gpus: list[GpuInfo] = Field(description="Every NVIDIA GPU NVML sees; empty without a GPU, driver or NVML")
    driver_version: str | None = Field(description="NVIDIA driver version; null without one")
    cuda_version: str | None = Field(description="CUDA version the driver supports, e.g. 12.4; null without one")
    cpu_count: int = Field(description="CPUs the service may use (affinity, cgroup quota); 0 when it did not answer")
    memory_total_bytes: int = Field(description="RAM the service may use (cgroup limit, else the host's)")
    memory_available_bytes: int
    container: bool = Field(description="Runs in a container")
    kubernetes: bool = Field(description="Runs in a Kubernetes pod")
    error: str | None = Field(description="Why this service gave no facts; null when it answered")


class HardwareResponse(OpenAIModel):
    hosts: list[HostHardware] = Field(description="The edge first, then stt, then each local-inference worker")


# JSON integers from 1 to a bound (3.0 counts as 3; true and "3" do not), the bounds
# inside the type so that the document shows them as minimum / maximum.
ContextLength = Annotated[int, Field(strict=False, ge=1, le=MAX_CONTEXT), JsonInt]
Batch = Annotated[int, Field(strict=False, ge=1, le=MAX_BATCH), JsonInt]
Layers = Annotated[int, Field(strict=False, ge=1, le=MAX_LAYERS), JsonInt]
KvHeads = Annotated[int, Field(strict=False, ge=1, le=MAX_KV_HEADS), JsonInt]
HeadDim = Annotated[int, Field(strict=False, ge=1, le=MAX_HEAD_DIM), JsonInt]


class PlacementRequest(OpenAIModel):
    """A model to place. A shape field left out (layers, kv_heads, head_dim) comes from
    the shipped table of common shapes, by the nearest parameter count."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    parameters: float = Field(
        gt=0, le=MAX_PARAMETERS, description="The model's parameter count: 7e9 (not 7) for a 7B model"
    )
    quantization: Precision = Field(description="Weights' precision: bytes per parameter 4, 2, 2, 1, 1, 0.5")
    context_length: ContextLength = Field(description="Tokens per sequence")
    batch: Batch = Field(default=1, description="Sequences served at once")
    layers: Layers | None = Field(default=None, description="Transformer layers (default: from the table)")
    kv_heads: KvHeads | None = Field(
        default=None, description="Key/value heads: fewer than the attention heads with GQA (default: from the table)"
    )
    head_dim: HeadDim | None = Field(default=None, description="Dimension of one head (default: from the table)")
    kv_cache_dtype: Precision | None = Field(
        default=None, description="KV cache precision (default: fp32 for fp32 weights, else fp16)"
    )


class PlacementFit(OpenAIModel):
    service: str
    instance: str
    gpu_index: int
    name: str
    free_bytes: int = Field(description="The GPU's free memory now")
    headroom_bytes: int = Field(description="What stays free once the model is loaded (free_bytes - total_bytes)")


class CloudAlternative(OpenAIModel):
    provider: str
    gpu: str
    gpu_memory_bytes: int = Field(description="Memory of one GPU")
    count: int = Field(description="GPUs in the instance (the smallest offer of this GPU that fits)")
    hourly_usd: float = Field(description="On-demand price of the whole instance per hour, from the shipped table")
    instance: str = Field(description="The provider's instance type")


class UnansweredHost(OpenAIModel):
    service: str
    instance: str
    error: str


class PlacementResponse(OpenAIModel):
    parameters: float
    quantization: Precision
    context_length: int
    batch: int
    layers: int
    kv_heads: int
    head_dim: int
    kv_cache_dtype: Precision
    shape_source: Literal["request", "table", "request+table"] = Field(
        description="Where layers, kv_heads and head_dim came from"
    )
    shape_model: str | None = Field(description="The table's model whose shape was used; null: all from the request")
    weights_bytes: int = Field(description="parameters x bytes per parameter of quantization")
    kv_cache_bytes: int = Field(description="2 x layers x kv_heads x head_dim x context_length x batch x bytes")
    overhead_bytes: int = Field(description="overhead_rule")
    total_bytes: int = Field(description="weights + KV cache + overhead")
    overhead_rule: str
    headroom_rule: str
    fits: list[PlacementFit] = Field(description="Local GPUs that hold the model alone with headroom, most first")
    cloud: list[CloudAlternative] = Field(description="Cloud offers that hold it, cheapest first")
    prices_as_of: str = Field(description="When the shipped price table was compiled")
    prices_note: str = Field(description="What the price table is, and that the operator may edit it")
    unanswered: list[UnansweredHost] = Field(description="Services whose GPUs are unknown (not in fits)")


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True, slots=True)
class Host:
    service: str
    instance: str
    facts: HostFacts | None
    error: str | None = None


def _rpc_error(error: grpc.aio.AioRpcError, what: str) -> str:
    code = error.code()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{what} does not implement GetHardware"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{what} did not answer in time"
    return f"{what} did not answer: {code.name}"


async def _edge_host() -> Host:
    return Host("edge", socket.gethostname(), await asyncio.to_thread(hardware.probe))


async def _stt_hosts(state: EdgeState, metadata: tuple[tuple[str, str], ...]) -> list[Host]:
    stub = state.clients.stt
    if stub is None:
        return []  # speech to text not configured
    address = state.settings.stt_addr
    try:
        reply = await stub.GetHardware(
            stt_pb2.GetHardwareRequest(), metadata=metadata, timeout=state.settings.edge_rpc_timeout_seconds
        )
    except grpc.aio.AioRpcError as error:
        return [Host("stt", address, None, _rpc_error(error, "the stt service"))]
    return [Host("stt", address, hardware.facts_from_message(reply))]


async def _worker_hosts(state: EdgeState, metadata: tuple[tuple[str, str], ...]) -> list[Host]:
    try:
        reply = await state.clients.router.GetHardware(
            router_pb2.GetHardwareRequest(), metadata=metadata, timeout=state.settings.edge_rpc_timeout_seconds
        )
    except grpc.aio.AioRpcError as error:
        return [Host("router", state.settings.router_addr, None, _rpc_error(error, "the router"))]
    return [
        Host("local-inference", worker.address, None, worker.error)
        if worker.error
        else Host("local-inference", worker.address, hardware.facts_from_message(worker.hardware))
        for worker in reply.workers
    ]


async def gather_hosts(request: Request) -> list[Host]:
    """The edge's own host, stt's and every local worker's, asked concurrently."""
    state, metadata = edge(request), grpc_metadata(request)
    own, stt, workers = await asyncio.gather(_edge_host(), _stt_hosts(state, metadata), _worker_hosts(state, metadata))
    return [own, *stt, *workers]


def host_json(host: Host) -> dict[str, Any]:
    """One host as GET /v1/hardware answers it (empty facts when it did not answer)."""
    facts = host.facts
    return {
        "service": host.service,
        "instance": host.instance,
        "gpus": [
            {
                "index": gpu.index,
                "name": gpu.name,
                "memory_total_bytes": gpu.memory_total_bytes,
                "memory_used_bytes": gpu.memory_used_bytes,
                "memory_free_bytes": gpu.memory_free_bytes,
                "utilization_percent": gpu.utilization_percent,
                "temperature_celsius": gpu.temperature_celsius,
                "power_watts": gpu.power_watts,
            }
            for gpu in (facts.gpus if facts else ())
        ],
        "driver_version": facts.driver_version if facts else None,
        "cuda_version": facts.cuda_version if facts else None,
        "cpu_count": facts.cpu_count if facts else 0,
        "memory_total_bytes": facts.memory_total_bytes if facts else 0,
        "memory_available_bytes": facts.memory_available_bytes if facts else 0,
        "container": facts.container if facts else False,
        "kubernetes": facts.kubernetes if facts else False,
        "error": host.error if facts is None else None,
    }


# --------------------------------------------------------------------------- routes


@router.get("/v1/hardware", response_model=HardwareResponse, responses=errors(403))
async def get_hardware(request: Request) -> Response:
    """Admin: the hardware of every hoosh host that has some to tell: this edge, the STT
    service and each local-inference worker (through the router). GPUs from NVML (name,
    memory, utilisation, temperature, power, driver and CUDA versions), CPUs and memory
    this service may use, container and Kubernetes. No GPU is a normal answer (an empty
    list); a service that does not answer is an entry with ``error`` set."""
    hosts = await gather_hosts(request)
    return OrjsonResponse({"hosts": [host_json(host) for host in hosts]})


@router.post(
    PLACEMENT_PATH,
    response_model=PlacementResponse,
    responses=errors(400, 403, *BACKEND),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PlacementRequest.model_json_schema()}},
        }
    },
)
async def placement(request: Request) -> Response:
    """Admin: the memory a model needs and where it fits. weights = parameters x bytes per
    parameter; KV cache = 2 x layers x kv_heads x head_dim x context_length x batch x
    bytes (kv_cache_dtype); overhead = 1 GiB + 10% of both. ``fits``: the local GPUs
    (of GET /v1/hardware) that hold it alone keeping 10% of their memory free; ``cloud``:
    the smallest offer per provider and GPU of the shipped price table that holds it,
    cheapest first."""
    body = await parse_body(request, PlacementRequest)
    need = hardware.estimate(
        body.parameters,
        body.quantization,
        body.context_length,
        body.batch,
        layers=body.layers,
        kv_heads=body.kv_heads,
        head_dim=body.head_dim,
        kv_cache_dtype=body.kv_cache_dtype,
    )
    hosts = await gather_hosts(request)
    answered = [(host.service, host.instance, host.facts) for host in hosts if host.facts is not None]
    table = hardware.shipped_gpu_prices()
    return OrjsonResponse(
        {
            "parameters": need.parameters,
            "quantization": need.quantization,
            "context_length": need.context_length,
            "batch": need.batch,
            "layers": need.layers,
            "kv_heads": need.kv_heads,
            "head_dim": need.head_dim,
            "kv_cache_dtype": need.kv_cache_dtype,
            "shape_source": need.shape_source,
            "shape_model": need.shape_model,
            "weights_bytes": need.weights_bytes,
            "kv_cache_bytes": need.kv_cache_bytes,
            "overhead_bytes": need.overhead_bytes,
            "total_bytes": need.total_bytes,
            "overhead_rule": hardware.OVERHEAD_RULE,
            "headroom_rule": hardware.HEADROOM_RULE,
            "fits": [
                {
                    "service": fit.service,
                    "instance": fit.instance,
                    "gpu_index": fit.gpu_index,
                    "name": fit.name,
                    "free_bytes": fit.free_bytes,
                    "headroom_bytes": fit.headroom_bytes,
                }
                for fit in hardware.local_fits(answered, need.total_bytes)
            ],
            "cloud": [
                {
                    "provider": offer.provider,
                    "gpu": offer.gpu,
                    "gpu_memory_bytes": offer.gpu_memory_bytes,
                    "count": offer.count,
                    "hourly_usd": float(offer.hourly_usd),
                    "instance": offer.instance,
                }
                for offer in hardware.cloud_options(need.total_bytes, table)
            ],
            "prices_as_of": table.as_of,
            "prices_note": table.about,
            "unanswered": [
                {"service": host.service, "instance": host.instance, "error": host.error or ""}
                for host in hosts
                if host.facts is None
            ],
        }
    )
