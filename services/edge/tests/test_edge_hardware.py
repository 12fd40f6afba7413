"""GET /v1/hardware and POST /v1/hardware/placement through the edge, against the real
services: the router (in-process, production servicer) with a local provider served by
the real local-inference process (llama.cpp, SmolLM2), the real STT service (Whisper
tiny.en), Redis for the keys. This machine has no NVIDIA GPU: every host answers an
empty GPU list and no driver, which is the normal answer there. A service that does not
answer is an entry with ``error`` set, never a 5xx. Placement answers are checked
against the formulas written out here. GET /v1/admin/status shows the workers as the
router polls them: the edge never dials one (the network policy forbids it)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh_common import hardware
from hoosh_edge.admin_status import AdminStatus
from hoosh_edge.routes_hardware import GpuInfo, HardwareResponse, Host, PlacementResponse, host_json
from hoosh_router.config import Catalogue

from tests.inprocess import Bus, RunningRouter, RunningStt, start_router, start_stt

from .conftest import ADMIN_KEY, Edge, MakeEdge, eventually, free_port
from .test_edge_tenancy import ADMIN, bearer

LOCAL_MODEL = "smollm2-135m-instruct"
HOST_KEYS = {
    "service",
    "instance",
    "gpus",
    "driver_version",
    "cuda_version",
    "cpu_count",
    "memory_total_bytes",
    "memory_available_bytes",
    "container",
    "kubernetes",
    "error",
}
GIB = 2**30


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real local-inference service as a process; its address once it answers."""
    port = free_port()
    env = {
        **os.environ,
        "HOOSH_INFERENCE_LISTEN": f"127.0.0.1:{port}",
        "HOOSH_INFERENCE_METRICS_LISTEN": "",
        "HOOSH_INFERENCE_THREADS": "2",
    }
    log_path = tmp_path_factory.mktemp("inference") / "inference.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "hoosh_inference"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the local worker never answered"
                    time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        process.wait(30)


def local_catalogue() -> Catalogue:
    return Catalogue.model_validate(
        {
            "providers": [{"name": "local", "type": "local", "models": [LOCAL_MODEL]}],
            "health": {"probe_interval_seconds": 0},
        }
    )


@dataclass
class Services:
    bus: Bus
    budget_key_prefix: str
    router: RunningRouter
    stt: RunningStt | None = None


@pytest.fixture
async def services(tenancy_prefix: str, worker: str) -> AsyncIterator[Services]:
    """The router (a local provider on the real worker) and its event stream; stt on demand."""
    bus = await Bus.create(name="TEST_HW")
    budget_prefix = f"{tenancy_prefix}budget:"
    router = await start_router(
        local_catalogue(),
        bus,
        key_prefix=f"{tenancy_prefix}router:",
        budget_key_prefix=budget_prefix,
        inference_addr=worker,
    )
    running = Services(bus, budget_prefix, router)
    try:
        yield running
    finally:
        if running.stt is not None:
            await running.stt.stop()
        await router.stop()
        await bus.close()


async def hardware_edge(make_edge: MakeEdge, **addresses: str) -> Edge:
    return await make_edge(auth="keys", admin_key=ADMIN_KEY, **addresses)


async def get_hosts(edge: Edge) -> list[dict[str, Any]]:
    response = await edge.client.get("/v1/hardware", headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    HardwareResponse.model_validate(body)  # the documented schema, strictly
    hosts: list[dict[str, Any]] = body["hosts"]
    for host in hosts:
        assert set(host) == HOST_KEYS, host  # the contract the CLI reads: these keys, no others
    return hosts


async def test_every_host_answers_its_facts(
    make_edge: MakeEdge, services: Services, stt_engine: Any, worker: str
) -> None:
    services.stt = await start_stt(stt_engine, services.bus, budget_key_prefix=services.budget_key_prefix)
    edge = await hardware_edge(make_edge, router_addr=services.router.address, stt_addr=services.stt.address)
    hosts = await get_hosts(edge)
    assert [(h["service"], h["instance"]) for h in hosts] == [
        ("edge", socket.gethostname()),
        ("stt", services.stt.address),
        ("local-inference", worker),
    ]
    here = hardware.probe()  # every service runs on this machine: the same facts
    for host in hosts:
        assert host["error"] is None
        # No NVIDIA GPU here: an empty list and no driver, a normal answer.
        assert (host["gpus"], host["driver_version"], host["cuda_version"]) == ([], None, None)
        assert host["cpu_count"] == here.cpu_count >= 1
        assert host["memory_total_bytes"] == here.memory_total_bytes > 0
        assert 0 < host["memory_available_bytes"] <= host["memory_total_bytes"]
        assert (host["container"], host["kubernetes"]) == (here.container, here.kubernetes)


async def test_the_worker_is_named_by_its_address(make_edge: MakeEdge, services: Services, worker: str) -> None:
    edge = await hardware_edge(make_edge, router_addr=services.router.address, stt_addr="")
    hosts = await get_hosts(edge)
    assert [(h["service"], h["instance"], h["error"]) for h in hosts] == [
        ("edge", socket.gethostname(), None),
        ("local-inference", worker, None),  # no stt configured: no stt entry
    ]


async def test_services_that_do_not_answer_are_entries_with_an_error(make_edge: MakeEdge, tenancy_prefix: str) -> None:
    # The router's worker address has nothing behind it, nor has the stt address.
    bus = await Bus.create(name="TEST_HW")
    gone_worker, gone_stt = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    router = await start_router(
        local_catalogue(),
        bus,
        key_prefix=f"{tenancy_prefix}router:",
        budget_key_prefix=f"{tenancy_prefix}budget:",
        inference_addr=gone_worker,
    )
    try:
        edge = await hardware_edge(make_edge, router_addr=router.address, stt_addr=gone_stt)
        edge_host, stt_host, worker_host = await get_hosts(edge)
    finally:
        await router.stop()
        await bus.close()
    assert edge_host["error"] is None and edge_host["cpu_count"] >= 1
    assert (stt_host["service"], stt_host["instance"]) == ("stt", gone_stt)
    assert (worker_host["service"], worker_host["instance"]) == ("local-inference", gone_worker)
    for host in (stt_host, worker_host):
        assert host["error"] and "did not answer" in host["error"]
        assert (host["gpus"], host["cpu_count"], host["memory_total_bytes"], host["driver_version"]) == ([], 0, 0, None)

    # The router itself away: one entry saying so (its workers are unknown), still 200.
    edge = await hardware_edge(make_edge, router_addr=f"127.0.0.1:{free_port()}", stt_addr="")
    own, router_host = await get_hosts(edge)
    assert own["service"] == "edge"
    assert router_host["service"] == "router" and "the router did not answer" in router_host["error"]


def test_gpu_memory_nvml_cannot_read_is_null_on_the_wire() -> None:
    """A unified-memory GPU's memory is unknown: null in GET /v1/hardware, not 0."""
    unified = hardware.Gpu(0, "NVIDIA GH200 480GB", None, None, None, 3, 40, 210.5)
    facts = hardware.HostFacts((unified,), "560.35.03", "12.6", 72, 480 * GIB, 400 * GIB, False, False)
    (gpu,) = host_json(Host("local-inference", "w:1", facts))["gpus"]
    GpuInfo.model_validate(gpu)
    assert (gpu["memory_total_bytes"], gpu["memory_used_bytes"], gpu["memory_free_bytes"]) == (None, None, None)


# --------------------------------------------------------------------------- the status page's workers


async def admin_status(edge: Edge) -> dict[str, Any]:
    response = await edge.client.get("/v1/admin/status", headers=ADMIN)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    AdminStatus.model_validate(page)
    return page


async def test_the_status_page_reads_the_workers_from_the_router(
    make_edge: MakeEdge, services: Services, worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shared environment names the worker (HOOSH_INFERENCE_ADDR, for the router): the
    # edge must not dial it. Here it names nothing at all, and the page is still right.
    monkeypatch.setenv("HOOSH_INFERENCE_ADDR", f"127.0.0.1:{free_port()}")
    edge = await hardware_edge(make_edge, router_addr=services.router.address, stt_addr="")

    async def polled() -> bool:
        return bool((await admin_status(edge))["workers"][0]["polled_at_ms"])

    await eventually(polled, "the router to poll its worker")
    page = await admin_status(edge)
    assert page["services"] == [{"service": "inference", "status": "SERVING", "detail": None}]
    (entry,) = page["workers"]
    assert (entry["address"], entry["providers"], entry["status"]) == (worker, ["local"], "SERVING")
    assert (entry["queue_depth"], entry["active_requests"], entry["reason"]) == (0, 0, None)
    assert entry["overload_queue"] >= 1 and entry["retry_after_seconds"] is None
    assert not [problem for problem in page["problems"] if "inference" in problem]


async def test_the_status_page_names_a_worker_the_router_cannot_reach(make_edge: MakeEdge, tenancy_prefix: str) -> None:
    bus = await Bus.create(name="TEST_HW")
    gone_worker = f"127.0.0.1:{free_port()}"
    router = await start_router(
        local_catalogue(),
        bus,
        key_prefix=f"{tenancy_prefix}router:",
        budget_key_prefix=f"{tenancy_prefix}budget:",
        inference_addr=gone_worker,
    )
    try:
        edge = await hardware_edge(make_edge, router_addr=router.address, stt_addr="")

        async def polled() -> bool:
            return bool((await admin_status(edge))["workers"][0]["status"] == "UNREACHABLE")

        await eventually(polled, "the router to find its worker gone")
        page = await admin_status(edge)
    finally:
        await router.stop()
        await bus.close()
    assert page["services"] == [{"service": "inference", "status": "UNREACHABLE", "detail": None}]
    (entry,) = page["workers"]
    assert entry["address"] == gone_worker and entry["reason"].startswith("UNAVAILABLE")
    assert f"the local inference worker at {gone_worker} does not answer the router: UNAVAILABLE" in "; ".join(
        page["problems"]
    )
    assert page["status"] == "degraded"

    # The router itself away: the workers are unknown, and the page says why (still 200).
    edge = await hardware_edge(make_edge, router_addr=f"127.0.0.1:{free_port()}", stt_addr="")
    page = await admin_status(edge)
    assert page["workers"] == []
    assert page["services"] == [
        {"service": "inference", "status": "UNKNOWN", "detail": "the router did not answer: UNAVAILABLE"}
    ]
    assert "inference is UNKNOWN: the router did not answer: UNAVAILABLE" in page["problems"]


async def test_hardware_is_for_admins(make_edge: MakeEdge, services: Services) -> None:
    edge = await hardware_edge(make_edge, router_addr=services.router.address, stt_addr="")
    _, key = await edge.tenancy.store.create(name=f"user-{uuid.uuid4().hex[:6]}", scope="user", pools=["default"])

    async def known() -> bool:
        return (await edge.client.get("/v1/models", headers=bearer(key))).status_code != 401

    await eventually(known, "the new key to reach the edge's cache")
    for response in (
        await edge.client.get("/v1/hardware", headers=bearer(key)),
        await edge.client.post("/v1/hardware/placement", json={"parameters": 7e9}, headers=bearer(key)),
    ):
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "insufficient_scope"
    assert (await edge.client.get("/v1/hardware")).status_code == 401


# --------------------------------------------------------------------------- placement


@pytest.fixture
async def edge(make_edge: MakeEdge, services: Services) -> Edge:
    return await hardware_edge(make_edge, router_addr=services.router.address, stt_addr="")


async def place(edge: Edge, **body: Any) -> dict[str, Any]:
    response = await edge.client.post("/v1/hardware/placement", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    PlacementResponse.model_validate(answer)
    return answer


def overhead(weights: int, kv_cache: int) -> int:
    """The stated rule: 1 GiB runtime + 10% of weights and KV cache."""
    return GIB + math.ceil(0.10 * (weights + kv_cache))


@pytest.mark.parametrize(
    ("parameters", "quantization", "bytes_per_parameter", "layers", "kv_heads", "head_dim"),
    [
        (7e9, "fp16", 2, 32, 8, 128),  # Llama 3 8B / Mistral 7B shape (GQA, 8 KV heads)
        (7e9, "int4", 0.5, 32, 8, 128),
        (70e9, "int4", 0.5, 80, 8, 128),  # Llama 3 70B shape
    ],
)
async def test_placement_at_8k_context_follows_the_formulas(
    edge: Edge,
    parameters: float,
    quantization: str,
    bytes_per_parameter: float,
    layers: int,
    kv_heads: int,
    head_dim: int,
) -> None:
    context, batch, kv_bytes = 8192, 1, 2  # a 16-bit KV cache by default
    answer = await place(edge, parameters=parameters, quantization=quantization, context_length=context)
    weights = math.ceil(parameters * bytes_per_parameter)
    kv_cache = 2 * layers * kv_heads * head_dim * context * batch * kv_bytes
    assert (answer["layers"], answer["kv_heads"], answer["head_dim"]) == (layers, kv_heads, head_dim)
    assert (answer["shape_source"], answer["kv_cache_dtype"], answer["batch"]) == ("table", "fp16", 1)
    assert answer["weights_bytes"] == weights
    assert answer["kv_cache_bytes"] == kv_cache
    assert answer["overhead_bytes"] == overhead(weights, kv_cache)
    assert answer["total_bytes"] == weights + kv_cache + overhead(weights, kv_cache)
    assert answer["fits"] == []  # no local GPU here
    # Cloud offers that hold it (N GPUs x 90% of one), cheapest first, one per provider and GPU.
    cloud = answer["cloud"]
    assert cloud and [c["hourly_usd"] for c in cloud] == sorted(c["hourly_usd"] for c in cloud)
    for offer in cloud:
        assert answer["total_bytes"] <= offer["count"] * offer["gpu_memory_bytes"] * 0.9
    assert answer["prices_as_of"] and "edit" in answer["prices_note"]
    assert answer["unanswered"] == []


async def test_placement_figures_by_hand(edge: Edge) -> None:
    seven = await place(edge, parameters=7e9, quantization="fp16", context_length=8192)
    assert (seven["weights_bytes"], seven["kv_cache_bytes"]) == (14_000_000_000, 1_073_741_824)
    seven_int4 = await place(edge, parameters=7e9, quantization="int4", context_length=8192)
    assert (seven_int4["weights_bytes"], seven_int4["kv_cache_bytes"]) == (3_500_000_000, 1_073_741_824)
    seventy = await place(edge, parameters=70e9, quantization="int4", context_length=8192)
    assert (seventy["weights_bytes"], seventy["kv_cache_bytes"]) == (35_000_000_000, 2_684_354_560)
    assert seventy["shape_model"] == "Llama 3 70B"
    # 7B int4 fits a single 16 GB T4; 70B int4 needs more than one 24 GB card.
    assert any(c["gpu"] == "T4 16GB" and c["count"] == 1 for c in seven_int4["cloud"])
    assert not any(c["gpu_memory_bytes"] < 40 * GIB and c["count"] == 1 for c in seventy["cloud"])


async def test_a_shape_given_in_the_request_is_used(edge: Edge) -> None:
    answer = await place(
        edge,
        parameters=7e9,
        quantization="fp16",
        context_length=4096,
        batch=4,
        kv_heads=32,  # Llama 2 7B: multi-head attention
        kv_cache_dtype="fp8",
    )
    assert (answer["layers"], answer["kv_heads"], answer["head_dim"]) == (32, 32, 128)
    assert answer["shape_source"] == "request+table"
    assert answer["kv_cache_bytes"] == 2 * 32 * 32 * 128 * 4096 * 4 * 1


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"parameters": 0, "quantization": "fp16", "context_length": 8192}, "parameters", "invalid_value"),
        ({"parameters": 7e9, "quantization": "int3", "context_length": 8192}, "quantization", "invalid_value"),
        ({"parameters": 7e9, "quantization": "fp16"}, "context_length", "missing_required_parameter"),
        ({"parameters": "7B", "quantization": "fp16", "context_length": 8192}, "parameters", "invalid_type"),
        ({"parameters": 7e9, "quantization": "fp16", "context_length": 8192, "batch": 0}, "batch", "invalid_value"),
        ({"parameters": 7e9, "quantization": "fp16", "context_length": 8192, "layer": 32}, "layer", None),
    ],
)
async def test_bad_placement_input_is_an_openai_400(
    edge: Edge, body: dict[str, Any], param: str, code: str | None
) -> None:
    response = await edge.client.post("/v1/hardware/placement", json=body, headers=ADMIN)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    if code is not None:
        assert error["code"] == code
    not_json = await edge.client.post(
        "/v1/hardware/placement", content=b"{", headers={**ADMIN, "content-type": "application/json"}
    )
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
