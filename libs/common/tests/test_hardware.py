"""hoosh_common.hardware: the host facts and the placement arithmetic.

The NVML path is tested against pynvml's own behaviour, not a Python fake of it:

- here (no NVIDIA driver) the real ``pynvml.nvmlInit`` raises ``NVMLError_LibraryNotFound``
  (or ``DriverNotLoaded``), and the facts are a plain "no GPU" answer;
- the field mapping runs through pynvml's real wrappers (its ctypes loader, structs,
  versioned calls and error classes) against a stand-in NVML *library*: a few C
  functions with NVML's signatures, compiled by the test into ``libnvidia-ml.so.1`` and
  found by pynvml's own ``CDLL("libnvidia-ml.so.1")`` through LD_LIBRARY_PATH, in a
  child process. Its values are in NVML's units (bytes, milliwatts, CUDA as 12040), its
  second GPU answers NOT_SUPPORTED for temperature and power as a T4 in a VM may (and,
  with ``STANDIN_NVML_UNIFIED=1``, for its memory too, as a unified-memory GH200 or GB10
  does), and it has no ``nvmlDeviceGetTemperatureV`` (an older driver), so the fallback
  runs too.

On a real GPU host, ``scripts/gpu_facts.py`` prints what this module reads there.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hoosh.inference.v1 import inference_pb2
from hoosh.stt.v1 import stt_pb2
from hoosh_common import hardware
from hoosh_common.hardware import Gpu, HostFacts

GIB = 2**30
H100_UUID = "GPU-5e3b7a10-94c2-4f3e-8a51-0c7d2e6f9b14"
T4_UUID = "GPU-a4c1e8d2-1b7f-4e90-9d36-5f28c0b7e3a1"

# --------------------------------------------------------------------------- NVML, for real


def test_without_an_nvidia_library_there_are_no_gpus_and_no_error() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded) as exc:
        reason = str(exc)
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver: scripts/gpu_facts.py shows its facts")
    report = hardware.nvidia_gpus()
    assert report == hardware.GpuReport((), None, None, f"no NVIDIA GPU: {reason}")
    facts = hardware.probe()
    assert (facts.gpus, facts.driver_version, facts.cuda_version) == ((), None, None)
    assert facts.gpu_status == report.status
    assert facts.cpu_count >= 1 and facts.memory_total_bytes >= facts.memory_available_bytes > 0


def test_device_calls_without_nvml_refuse_and_read_gpu_gives_up_cleanly() -> None:
    """pynvml's device calls with no library loaded raise NVMLError_Uninitialized: a device
    that cannot be opened is left out, never a crash."""
    pynvml = pytest.importorskip("pynvml")
    if pynvml.nvmlLib is not None:
        pytest.skip("NVML is loaded in this process")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetHandleByIndex(0)
    assert hardware.read_gpu(pynvml, 0) is None


STANDIN_NVML = r"""
#include <stdio.h>
#include <stdlib.h>

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;

#define NOT_SUPPORTED 3
#define H100_UUID "GPU-5e3b7a10-94c2-4f3e-8a51-0c7d2e6f9b14"
#define T4_UUID "GPU-a4c1e8d2-1b7f-4e90-9d36-5f28c0b7e3a1"
static int device(void *handle) { return (int)(unsigned long)handle - 1; }

int nvmlInitWithFlags(unsigned int flags) {
    const char *result = getenv("STANDIN_NVML_INIT");
    return result ? atoi(result) : 0;
}
int nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(int result) {
    return result == 9 ? "Driver Not Loaded" : result == NOT_SUPPORTED ? "Not Supported" : "Unknown Error";
}
int nvmlSystemGetDriverVersion(char *out, unsigned int size) { snprintf(out, size, "550.54.15"); return 0; }
int nvmlSystemGetCudaDriverVersion_v2(int *version) { *version = 12040; return 0; }
int nvmlDeviceGetCount_v2(unsigned int *count) { *count = 2; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **handle) {
    if (index > 1) return 2;
    *handle = (void *)(unsigned long)(index + 1);
    return 0;
}
int nvmlDeviceGetName(void *handle, char *out, unsigned int size) {
    snprintf(out, size, "%s", device(handle) == 0 ? "NVIDIA H100 80GB HBM3" : "Tesla T4");
    return 0;
}
int nvmlDeviceGetMemoryInfo(void *handle, nvmlMemory_t *memory) {
    if (device(handle) == 1 && getenv("STANDIN_NVML_UNIFIED")) return NOT_SUPPORTED;
    memory->total = device(handle) == 0 ? 85520809984ULL : 16106127360ULL;
    memory->used = device(handle) == 0 ? 20971520000ULL : 0ULL;
    memory->free = memory->total - memory->used;
    return 0;
}
int nvmlDeviceGetUUID(void *handle, char *out, unsigned int size) {
    snprintf(out, size, "%s", device(handle) == 0 ? H100_UUID : T4_UUID);
    return 0;
}
int nvmlDeviceGetUtilizationRates(void *handle, nvmlUtilization_t *rates) {
    rates->gpu = device(handle) == 0 ? 37 : 0;
    rates->memory = 5;
    return 0;
}
int nvmlDeviceGetTemperature(void *handle, int sensor, unsigned int *celsius) {
    if (device(handle) == 1 || sensor != 0) return NOT_SUPPORTED;
    *celsius = 41;
    return 0;
}
int nvmlDeviceGetPowerUsage(void *handle, unsigned int *milliwatts) {
    if (device(handle) == 1) return NOT_SUPPORTED;
    *milliwatts = 123456;
    return 0;
}
"""

PROBE = (
    "import dataclasses, json\n"
    "from hoosh_common import hardware\n"
    "print(json.dumps(dataclasses.asdict(hardware.probe())))"
)


@pytest.fixture(scope="module")
def standin_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler for the stand-in NVML library")
    directory = tmp_path_factory.mktemp("nvml")
    source = directory / "standin_nvml.c"
    source.write_text(STANDIN_NVML)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(directory / "libnvidia-ml.so.1"), str(source)], check=True)
    return directory


def probe_with(library: Path, **env: str) -> dict[str, Any]:
    """``probe()`` in a child process whose pynvml loads the stand-in library."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={"LD_LIBRARY_PATH": str(library), "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    facts: dict[str, Any] = json.loads(result.stdout)
    return facts


def test_the_field_mapping_through_pynvml(standin_library: Path) -> None:
    facts = probe_with(standin_library)
    assert facts["driver_version"] == "550.54.15"
    assert facts["cuda_version"] == "12.4"  # NVML's 12040
    assert facts["gpu_status"] == "ok"
    h100, t4 = facts["gpus"]
    assert h100 == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 85520809984,
        "memory_used_bytes": 20971520000,
        "memory_free_bytes": 85520809984 - 20971520000,
        "utilization_percent": 37,
        "temperature_celsius": 41,  # through nvmlDeviceGetTemperature: this "driver" has no ...TemperatureV
        "power_watts": 123.456,  # NVML's milliwatts
        "uuid": H100_UUID,
    }
    # What the device does not support is null; a real 0 stays 0.
    assert (t4["name"], t4["utilization_percent"], t4["temperature_celsius"], t4["power_watts"]) == (
        "Tesla T4",
        0,
        None,
        None,
    )
    assert t4["memory_free_bytes"] == t4["memory_total_bytes"] == 16106127360


def test_memory_nvml_cannot_read_is_unknown_not_zero(standin_library: Path) -> None:
    """A unified-memory GPU (GH200, GB10) answers NOT_SUPPORTED for its memory: the three
    memory fields are null, not 0 (which a worker would read as "no memory free")."""
    h100, unified = probe_with(standin_library, STANDIN_NVML_UNIFIED="1")["gpus"]
    assert (unified["memory_total_bytes"], unified["memory_used_bytes"], unified["memory_free_bytes"]) == (
        None,
        None,
        None,
    )
    assert (unified["name"], unified["utilization_percent"], unified["uuid"]) == ("Tesla T4", 0, T4_UUID)
    assert h100["memory_total_bytes"] == 85520809984  # the other device is read as before


CUDA_GPUS = (
    "import json, sys\n"
    "from hoosh_common import hardware\n"
    "gpus = hardware.nvidia_gpus().gpus\n"
    "print(json.dumps([g.index for g in hardware.cuda_gpus(gpus, [int(o) for o in sys.argv[1:]])]))"
)


def cuda_devices(library: Path, *ordinals: int, **env: str) -> list[int]:
    """The NVML indices behind these CUDA ordinals, read through pynvml and the stand-in."""
    result = subprocess.run(
        [sys.executable, "-c", CUDA_GPUS, *map(str, ordinals)],
        env={"LD_LIBRARY_PATH": str(library), "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    indices: list[int] = json.loads(result.stdout)
    return indices


def test_cuda_devices_map_to_nvml_devices(standin_library: Path) -> None:
    # Unset: CUDA device 0 is NVML's device 0 (the other GPU is not this process's business).
    assert cuda_devices(standin_library, 0) == [0]
    assert cuda_devices(standin_library, 0, 1) == [0, 1]
    # By index (NVML's order: exact under CUDA_DEVICE_ORDER=PCI_BUS_ID).
    assert cuda_devices(standin_library, 0, CUDA_VISIBLE_DEVICES="1") == [1]
    assert cuda_devices(standin_library, 0, 1, CUDA_VISIBLE_DEVICES="1,0") == [1, 0]
    # By UUID, or a unique prefix of one, as CUDA accepts: exact whatever the order.
    assert cuda_devices(standin_library, 0, CUDA_VISIBLE_DEVICES=T4_UUID) == [1]
    assert cuda_devices(standin_library, 0, CUDA_VISIBLE_DEVICES="GPU-a4c1e8d2") == [1]
    assert cuda_devices(standin_library, 0, CUDA_VISIBLE_DEVICES="GPU-" + "0" * 8) == []  # no such device
    # A MIG instance is no NVML device of its own; none visible, or hidden by -1: nothing.
    assert cuda_devices(standin_library, 0, CUDA_VISIBLE_DEVICES="MIG-5e3b7a10-94c2-4f3e-8a51-0c7d2e6f9b14") == []
    assert cuda_devices(standin_library, 0, CUDA_VISIBLE_DEVICES="") == []
    assert cuda_devices(standin_library, 0, CUDA_VISIBLE_DEVICES="-1,0") == []
    assert cuda_devices(standin_library, 1, CUDA_VISIBLE_DEVICES="0") == []  # ordinal 1 does not exist


def test_what_cuda_visible_devices_lets_cuda_see() -> None:
    assert hardware.cuda_visible_devices({}) is None
    assert hardware.cuda_visible_devices({"CUDA_VISIBLE_DEVICES": "0,2"}) == ("0", "2")
    assert hardware.cuda_visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == ()
    assert hardware.cuda_visible_devices({"CUDA_VISIBLE_DEVICES": "1,-1,3"}) == ("1",)  # CUDA stops at -1
    assert hardware.cuda_visible_devices({"CUDA_VISIBLE_DEVICES": f" {T4_UUID} ,1"}) == (T4_UUID, "1")
    assert hardware.cuda_visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-,1"}) == ()


def test_a_driver_that_is_not_loaded_is_a_plain_no_gpu_answer(standin_library: Path) -> None:
    facts = probe_with(standin_library, STANDIN_NVML_INIT="9")  # NVML_ERROR_DRIVER_NOT_LOADED
    assert (facts["gpus"], facts["driver_version"], facts["cuda_version"]) == ([], None, None)
    assert facts["gpu_status"] == "no NVIDIA GPU: Driver Not Loaded"
    assert facts["cpu_count"] >= 1


# --------------------------------------------------------------------------- CPUs, memory, container


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cpu_count_is_capped_by_the_cgroup_quota(tmp_path: Path) -> None:
    usable = hardware.cpu_count(tmp_path)  # no cgroup files: the affinity mask
    assert usable >= 1
    write(tmp_path, "sys/fs/cgroup/cpu.max", "150000 100000\n")  # v2: 1.5 CPUs -> 2
    assert hardware.cpu_count(tmp_path) == min(usable, 2)
    write(tmp_path, "sys/fs/cgroup/cpu.max", "max 100000\n")
    assert hardware.cpu_count(tmp_path) == usable
    v1 = tmp_path / "v1"
    write(v1, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "50000\n")  # v1: half a CPU -> 1
    write(v1, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    assert hardware.cpu_count(v1) == 1
    write(v1, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    assert hardware.cpu_count(v1) == usable


MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8192000 kB\n"


def test_memory_is_the_hosts_capped_by_the_cgroup_limit(tmp_path: Path) -> None:
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert hardware.memory(tmp_path) == (16384000 * 1024, 8192000 * 1024)
    write(tmp_path, "sys/fs/cgroup/memory.max", f"{4 * GIB}\n")  # v2: a 4 GiB container, 1 GiB used
    write(tmp_path, "sys/fs/cgroup/memory.current", f"{GIB}\n")
    assert hardware.memory(tmp_path) == (4 * GIB, 3 * GIB)
    write(tmp_path, "sys/fs/cgroup/memory.max", "max\n")
    assert hardware.memory(tmp_path) == (16384000 * 1024, 8192000 * 1024)
    v1 = tmp_path / "v1"
    write(v1, "proc/meminfo", MEMINFO)
    write(v1, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert hardware.memory(v1) == (16384000 * 1024, 8192000 * 1024)
    write(v1, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{2 * GIB}\n")
    write(v1, "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{GIB // 2}\n")
    assert hardware.memory(v1) == (2 * GIB, GIB + GIB // 2)


def test_this_machine_reads_real_numbers() -> None:
    total, available = hardware.memory()
    assert total >= available > 0


def test_container_and_kubernetes(tmp_path: Path) -> None:
    assert not hardware.in_container(tmp_path)
    write(tmp_path, "proc/self/cgroup", "0::/user.slice/user-1000.slice/session-2.scope\n")
    assert not hardware.in_container(tmp_path)
    write(tmp_path, "proc/1/cgroup", "12:memory:/kubepods/burstable/pod1234/abcd\n")
    assert hardware.in_container(tmp_path)
    docker = tmp_path / "docker"
    write(docker, ".dockerenv", "")
    assert hardware.in_container(docker)
    podman = tmp_path / "podman"
    write(podman, "run/.containerenv", "engine=podman\n")
    assert hardware.in_container(podman)

    assert not hardware.in_kubernetes({}, tmp_path)
    assert hardware.in_kubernetes({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, tmp_path)
    (tmp_path / "var/run/secrets/kubernetes.io/serviceaccount").mkdir(parents=True)
    assert hardware.in_kubernetes({}, tmp_path)


# --------------------------------------------------------------------------- the wire


FACTS = HostFacts(
    gpus=(
        Gpu(0, "NVIDIA L4", 24 * GIB, GIB, 23 * GIB, 12, 55, 71.25),
        Gpu(1, "Tesla T4", 16 * GIB, 0, 16 * GIB, 0, None, None),
    ),
    driver_version="550.54.15",
    cuda_version="12.4",
    cpu_count=8,
    memory_total_bytes=64 * GIB,
    memory_available_bytes=40 * GIB,
    container=True,
    kubernetes=True,
)


@pytest.mark.parametrize("message", [inference_pb2.GetHardwareResponse, stt_pb2.GetHardwareResponse])
def test_facts_cross_the_wire_unchanged(message: Any) -> None:
    wire = message.FromString(hardware.hardware_message(FACTS, message).SerializeToString())
    assert hardware.facts_from_message(wire) == FACTS
    bare = HostFacts((), None, None, 2, GIB, GIB, False, False)
    wire = message.FromString(hardware.hardware_message(bare, message).SerializeToString())
    assert not wire.HasField("driver_version") and hardware.facts_from_message(wire) == bare


@pytest.mark.parametrize("message", [inference_pb2.GetHardwareResponse, stt_pb2.GetHardwareResponse])
def test_unknown_gpu_memory_crosses_the_wire_as_unknown(message: Any) -> None:
    """Accelerator's memory fields are plain int64s: unknown memory travels unset (0) and
    comes back null, never as a GPU with 0 bytes free."""
    unified = HostFacts(
        (Gpu(0, "NVIDIA GH200 480GB", None, None, None, 3, 40, 210.5),),
        "560.35.03",
        "12.6",
        72,
        480 * GIB,
        400 * GIB,
        False,
        False,
    )
    wire = message.FromString(hardware.hardware_message(unified, message).SerializeToString())
    assert hardware.facts_from_message(wire) == unified
    assert hardware.local_fits([("local-inference", "w:1", unified)], GIB) == []  # nothing says it fits


# --------------------------------------------------------------------------- placement


def test_placement_formulas() -> None:
    """weights = parameters x bytes per parameter; KV cache = 2 x layers x kv_heads x
    head_dim x context x batch x bytes; overhead = 1 GiB + 10% of both."""
    seven_fp16 = hardware.estimate(7e9, "fp16", 8192)
    assert (seven_fp16.layers, seven_fp16.kv_heads, seven_fp16.head_dim) == (32, 8, 128)
    assert seven_fp16.weights_bytes == 7_000_000_000 * 2 == 14_000_000_000
    assert seven_fp16.kv_cache_bytes == 2 * 32 * 8 * 128 * 8192 * 1 * 2 == 1_073_741_824
    assert seven_fp16.overhead_bytes == GIB + math.ceil(0.10 * (14_000_000_000 + 1_073_741_824))
    assert seven_fp16.total_bytes == 14_000_000_000 + 1_073_741_824 + seven_fp16.overhead_bytes

    seven_int4 = hardware.estimate(7e9, "int4", 8192)
    assert seven_int4.weights_bytes == 7_000_000_000 // 2 == 3_500_000_000
    assert seven_int4.kv_cache_dtype == "fp16"  # quantised weights, a 16-bit cache
    assert seven_int4.kv_cache_bytes == 2 * 32 * 8 * 128 * 8192 * 1 * 2

    seventy_int4 = hardware.estimate(70e9, "int4", 8192)
    assert (seventy_int4.layers, seventy_int4.kv_heads, seventy_int4.head_dim) == (80, 8, 128)
    assert seventy_int4.weights_bytes == 35_000_000_000
    assert seventy_int4.kv_cache_bytes == 2 * 80 * 8 * 128 * 8192 * 1 * 2 == 2_684_354_560
    assert seventy_int4.shape_model == "Llama 3 70B" and seventy_int4.shape_source == "table"


def test_shapes_from_the_request_win_and_say_so() -> None:
    llama2 = hardware.estimate(7e9, "fp16", 4096, 2, kv_heads=32)  # Llama 2 7B: no GQA
    assert (llama2.layers, llama2.kv_heads, llama2.head_dim) == (32, 32, 128)
    assert llama2.shape_source == "request+table"
    assert llama2.kv_cache_bytes == 2 * 32 * 32 * 128 * 4096 * 2 * 2
    own = hardware.estimate(1.5e9, "bf16", 1000, layers=10, kv_heads=2, head_dim=64, kv_cache_dtype="fp8")
    assert (own.shape_source, own.shape_model) == ("request", None)
    assert own.kv_cache_bytes == 2 * 10 * 2 * 64 * 1000 * 1
    assert hardware.estimate(7e9, "fp32", 10).kv_cache_dtype == "fp32"
    # The nearest shape on a log scale: 8B is the 7B shape, 10B the 13B one, a tiny count the smallest.
    assert hardware.nearest_shape(8e9).layers == 32
    assert hardware.nearest_shape(10e9).kv_heads == 40
    assert hardware.nearest_shape(5e-324).name == "SmolLM2 135M"


def test_local_fits_keep_a_tenth_of_the_gpu_free() -> None:
    hosts = [("local-inference", "w1:50053", FACTS), ("stt", "stt:50055", FACTS)]
    need = 20 * GIB  # the L4 has 23 GiB free: 3 GiB left, over its 2.4 GiB tenth
    fits = hardware.local_fits(hosts, need)
    assert [(f.service, f.gpu_index, f.headroom_bytes) for f in fits] == [
        ("local-inference", 0, 3 * GIB),
        ("stt", 0, 3 * GIB),
    ]
    assert hardware.local_fits(hosts, 21 * GIB) == []  # 2 GiB left < 2.4 GiB
    small = hardware.local_fits(hosts, GIB)
    assert [(f.gpu_index, f.headroom_bytes) for f in small][:2] == [(0, 22 * GIB), (0, 22 * GIB)]
    assert {f.gpu_index for f in small} == {0, 1}


def test_the_shipped_price_table() -> None:
    table = hardware.shipped_gpu_prices()
    assert table.as_of and "edit" in table.about
    kinds = {offer.gpu for offer in table.offers}
    assert {"H100 80GB", "A100 80GB", "A100 40GB", "L4 24GB", "A10G 24GB", "T4 16GB"} <= kinds
    assert {offer.provider for offer in table.offers} == {"aws", "gcp", "azure", "lambda"}
    need = hardware.estimate(7e9, "fp16", 8192).total_bytes
    options = hardware.cloud_options(need, table)
    prices = [offer.hourly_usd for offer in options]
    assert prices == sorted(prices) and options
    for offer in options:
        assert need <= offer.count * offer.gpu_memory_bytes * 0.9
        smaller = [
            o for o in table.offers if (o.provider, o.gpu) == (offer.provider, offer.gpu) and o.count < offer.count
        ]
        assert all(need > o.count * o.gpu_memory_bytes * 0.9 for o in smaller)
    assert len({(o.provider, o.gpu) for o in options}) == len(options)  # one offer per provider and GPU
    # 405B at fp16 is more than any one instance of the table holds.
    assert hardware.cloud_options(hardware.estimate(405e9, "fp16", 8192).total_bytes, table) == []


def test_a_malformed_price_table_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown gpu"):
        hardware.parse_gpu_prices(
            {"gpus": {}, "offers": [{"provider": "x", "instance": "i", "gpu": "Z", "count": 1, "hourly_usd": "1"}]}
        )
    with pytest.raises(ValueError, match="malformed"):
        hardware.parse_gpu_prices({"offers": []})
