"""Facts about this host's hardware, and what a model needs to fit on it.

**Facts** (``probe``): every NVIDIA GPU through NVML (``pynvml`` from nvidia-ml-py:
index, name, memory, utilisation, temperature, power, driver and CUDA versions), the
CPUs and the memory this process may use (cgroup limits win over the host's), and
whether it runs in a container or a Kubernetes pod. No NVIDIA driver, no NVML library
or no pynvml is a normal answer: no GPUs, and ``gpu_status`` says why. A field NVML
cannot read for a device (not supported, no permission) is None, never a crash and
never a made-up 0: a GPU with unified memory (GH200, GB10) answers NOT_SUPPORTED for its
memory, which is then unknown, not empty. Local-inference and stt answer these facts over
gRPC (``hardware_message``); the edge reads them back (``facts_from_message``) and
aggregates them.

**Placement** (``estimate``, ``local_fits``, ``cloud_options``): the memory a model
needs (weights + KV cache + a runtime margin) from its parameter count, quantisation,
context and batch; which local GPUs hold it with headroom; and which cloud GPU offers
would, from the shipped price table ``gpu_prices.json``.

NVML calls block (and the first one loads a library): call ``probe`` off the event loop.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

import orjson
from hoosh.inference.v1 import inference_pb2
from hoosh.stt.v1 import stt_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
ROOT = Path("/")

# --------------------------------------------------------------------------- facts


@dataclass(frozen=True, slots=True)
class Gpu:
    """One NVIDIA GPU as NVML reports it; a field NVML could not read is None. The three
    memory fields come from one NVML call: all None or none (NOT_SUPPORTED on GPUs with
    unified memory). ``uuid`` (``GPU-...``, what CUDA_VISIBLE_DEVICES may name) is read
    locally only: it does not cross the wire."""

    index: int
    name: str
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    utilization_percent: int | None = None
    temperature_celsius: int | None = None
    power_watts: float | None = None
    uuid: str | None = None


@dataclass(frozen=True, slots=True)
class GpuReport:
    """What NVML says: the GPUs, driver and CUDA versions, and ``status``: ``"ok"``, or
    in words why there are no GPUs (no pynvml, no library, no driver)."""

    gpus: tuple[Gpu, ...]
    driver_version: str | None
    cuda_version: str | None
    status: str


@dataclass(frozen=True, slots=True)
class HostFacts:
    gpus: tuple[Gpu, ...]
    driver_version: str | None
    cuda_version: str | None
    cpu_count: int
    memory_total_bytes: int
    memory_available_bytes: int
    container: bool
    kubernetes: bool
    gpu_status: str = "ok"  # why ``gpus`` is empty, when it is (not sent over gRPC)


NVML_OK = "ok"


def _import_pynvml() -> ModuleType | None:
    try:
        with warnings.catch_warnings():
            # The deprecated "pynvml" shim package warns on import; nvidia-ml-py does not.
            warnings.simplefilter("ignore", FutureWarning)
            import pynvml
    except ImportError:
        return None
    module: ModuleType = pynvml
    return module


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def cuda_version_text(version: int) -> str:
    """NVML's CUDA driver version integer (``12040``) as ``"12.4"``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def read_gpu(nvml: ModuleType, index: int) -> Gpu | None:
    """Device ``index`` through ``nvml`` (pynvml, initialised). Each reading NVML refuses
    (NOT_SUPPORTED on a device without a sensor, NO_PERMISSION, ...) is None; a device
    NVML cannot even open (lost, being reset) is None altogether."""

    def optional(call: Callable[..., T], *args: Any) -> T | None:
        try:
            return call(*args)
        except nvml.NVMLError:
            return None

    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        log.warning("NVML cannot open a GPU", extra={"index": index, "reason": str(exc)})
        return None
    name = optional(nvml.nvmlDeviceGetName, handle)
    memory = optional(nvml.nvmlDeviceGetMemoryInfo, handle)
    utilization = optional(nvml.nvmlDeviceGetUtilizationRates, handle)
    # The versioned call first; drivers older than it (FUNCTION_NOT_FOUND) have the old one.
    temperature = optional(nvml.nvmlDeviceGetTemperatureV, handle, nvml.NVML_TEMPERATURE_GPU)
    if temperature is None:
        temperature = optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    milliwatts = optional(nvml.nvmlDeviceGetPowerUsage, handle)
    uuid = optional(nvml.nvmlDeviceGetUUID, handle)
    # A memory reading of total 0 is no reading either (no GPU has no memory; the wire
    # uses 0 for "unknown").
    if memory is not None and not int(memory.total):
        memory = None
    return Gpu(
        index=index,
        name=_text(name) if name is not None else f"GPU {index}",
        memory_total_bytes=int(memory.total) if memory is not None else None,
        memory_used_bytes=int(memory.used) if memory is not None else None,
        memory_free_bytes=int(memory.free) if memory is not None else None,
        utilization_percent=int(utilization.gpu) if utilization is not None else None,
        temperature_celsius=int(temperature) if temperature is not None else None,
        power_watts=round(int(milliwatts) / 1000, 3) if milliwatts is not None else None,
        uuid=_text(uuid) if uuid is not None else None,
    )


def nvidia_gpus() -> GpuReport:
    """Every NVIDIA GPU NVML sees (all of them: CUDA_VISIBLE_DEVICES does not hide a
    device from NVML). Without pynvml, the NVML library or a loaded driver: no GPUs and
    a status saying which, never an exception."""
    nvml = _import_pynvml()
    if nvml is None:
        return GpuReport((), None, None, "pynvml (nvidia-ml-py) is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        # NVMLError_LibraryNotFound (no libnvidia-ml.so.1), NVMLError_DriverNotLoaded, ...
        log.debug("no NVIDIA GPU", extra={"reason": str(exc)})
        return GpuReport((), None, None, f"no NVIDIA GPU: {exc}")
    try:
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            driver = None
        try:
            cuda = cuda_version_text(int(nvml.nvmlSystemGetCudaDriverVersion_v2()))
        except nvml.NVMLError:
            cuda = None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            log.warning("NVML cannot count the GPUs", extra={"reason": str(exc)})
            return GpuReport((), driver, cuda, f"NVML cannot count the GPUs: {exc}")
        found = (read_gpu(nvml, index) for index in range(count))
        return GpuReport(tuple(gpu for gpu in found if gpu is not None), driver, cuda, NVML_OK)
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def cuda_visible_devices(environ: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: its entries in order (the first is CUDA
    device 0 of this process) up to the first one CUDA would reject (``-1`` or junk hides
    every later one); None when unset (every device); empty for none."""
    env = os.environ if environ is None else environ
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries: list[str] = []
    for part in (part.strip() for part in value.split(",")):
        if not (part.isdigit() or (part[:4] in ("GPU-", "MIG-") and len(part) > 4)):
            break
        entries.append(part)
    return tuple(entries)


def _by_uuid(gpus: Iterable[Gpu], entry: str) -> Gpu | None:
    """The one GPU whose NVML UUID begins with ``entry`` (CUDA accepts a unique prefix)."""
    wanted = entry.lower()
    found = [gpu for gpu in gpus if gpu.uuid is not None and gpu.uuid.lower().startswith(wanted)]
    return found[0] if len(found) == 1 else None


def cuda_gpus(
    gpus: Iterable[Gpu], ordinals: Iterable[int], environ: Mapping[str, str] | None = None
) -> tuple[Gpu, ...]:
    """The NVML devices behind these CUDA device numbers of this process (``ordinals``:
    0 is the first device CUDA shows it), as far as they can be known:

    - an entry of ``CUDA_VISIBLE_DEVICES`` given as a UUID (``GPU-...``, or a unique
      prefix) is the NVML device with that UUID: exact;
    - an entry given as an index, or every device when the variable is unset, is taken
      as NVML's index. That is exact under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (NVML numbers
      devices by PCI bus). CUDA's default order (FASTEST_FIRST) puts the fastest device
      first, which differs on a host of mixed GPU models: there, set PCI_BUS_ID or give
      UUIDs;
    - a MIG instance (``MIG-...``) is not an NVML device of its own (its memory is not
      its parent's): unknown, left out, as is an entry matching no device.
    """
    devices = tuple(gpus)
    by_index = {gpu.index: gpu for gpu in devices}
    visible = cuda_visible_devices(environ)
    chosen: list[Gpu] = []
    for ordinal in ordinals:
        gpu: Gpu | None = None
        if visible is None:
            gpu = by_index.get(ordinal)
        elif 0 <= ordinal < len(visible):
            entry = visible[ordinal]
            if entry.isdigit():
                gpu = by_index.get(int(entry))
            elif entry.startswith("GPU-"):
                gpu = _by_uuid(devices, entry)
        if gpu is not None and gpu not in chosen:
            chosen.append(gpu)
    return tuple(chosen)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_number(text: str | None) -> int | None:
    """A cgroup limit file's value; None for "max", -1, junk or an absent file."""
    if text is None:
        return None
    value = text.split()[0] if text.split() else ""
    if value == "max":
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number >= 0 else None


def cpu_count(root: Path = ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup's CPU quota
    (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``): a container
    limited to 2 CPUs on a 64-core node gets 2."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    cgroup = root / "sys/fs/cgroup"
    quota: int | None = None
    period: int | None = None
    v2 = _read(cgroup / "cpu.max")
    if v2 is not None and len(v2.split()) >= 2:
        quota, period = _cgroup_number(v2), _cgroup_number(v2.split()[1])
    else:
        quota = _cgroup_number(_read(cgroup / "cpu/cpu.cfs_quota_us"))
        period = _cgroup_number(_read(cgroup / "cpu/cpu.cfs_period_us"))
    if quota is not None and period:
        count = min(count, max(1, math.ceil(quota / period)))
    return max(1, count)


# cgroup v1 writes "no limit" as the largest page-aligned int64.
_UNLIMITED = 2**62


def memory(root: Path = ROOT) -> tuple[int, int]:
    """(total, available) bytes of RAM for this process: the host's (/proc/meminfo
    MemTotal, MemAvailable), capped by the cgroup's limit (v2 ``memory.max`` less
    ``memory.current``; v1 ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``)."""
    total = available = 0
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if not fields or not fields[0].isdigit():
            continue
        if key == "MemTotal":
            total = int(fields[0]) * 1024
        elif key == "MemAvailable":
            available = int(fields[0]) * 1024
    cgroup = root / "sys/fs/cgroup"
    limit = _cgroup_number(_read(cgroup / "memory.max"))
    used = _cgroup_number(_read(cgroup / "memory.current"))
    if limit is None and used is None:
        limit = _cgroup_number(_read(cgroup / "memory/memory.limit_in_bytes"))
        used = _cgroup_number(_read(cgroup / "memory/memory.usage_in_bytes"))
    if limit is not None and limit < _UNLIMITED:
        total = min(total, limit) if total else limit
        available = min(available, max(0, limit - (used or 0))) if available else max(0, limit - (used or 0))
    return total, available


_CONTAINER_HINTS = ("docker", "kubepods", "containerd", "libpod", "lxc", "crio", "podman")


def in_container(root: Path = ROOT) -> bool:
    """Docker's ``/.dockerenv``, Podman's ``/run/.containerenv``, or a container
    runtime named in this process's or PID 1's cgroups."""
    if (root / ".dockerenv").exists() or (root / "run/.containerenv").exists():
        return True
    for path in (root / "proc/self/cgroup", root / "proc/1/cgroup"):
        text = (_read(path) or "").lower()
        if any(hint in text for hint in _CONTAINER_HINTS):
            return True
    return False


def in_kubernetes(environ: Mapping[str, str] | None = None, root: Path = ROOT) -> bool:
    """The kubelet sets ``KUBERNETES_SERVICE_HOST`` in every pod; a pod that mounts a
    service account token has its directory too."""
    env = os.environ if environ is None else environ
    return bool(env.get("KUBERNETES_SERVICE_HOST")) or (root / "var/run/secrets/kubernetes.io/serviceaccount").is_dir()


def probe() -> HostFacts:
    """This host's facts now. Blocks briefly (NVML): run it off the event loop."""
    report = nvidia_gpus()
    total, available = memory()
    kubernetes = in_kubernetes()
    return HostFacts(
        gpus=report.gpus,
        driver_version=report.driver_version,
        cuda_version=report.cuda_version,
        cpu_count=cpu_count(),
        memory_total_bytes=total,
        memory_available_bytes=available,
        container=kubernetes or in_container(),
        kubernetes=kubernetes,
        gpu_status=report.status,
    )


# --------------------------------------------------------------------------- the wire

HardwareMessage = TypeVar("HardwareMessage", inference_pb2.GetHardwareResponse, stt_pb2.GetHardwareResponse)


def hardware_message(facts: HostFacts, message: type[HardwareMessage]) -> HardwareMessage:
    """The facts as local-inference's or stt's ``GetHardwareResponse`` (the same fields).

    ``Accelerator``'s memory fields are plain int64s: unknown memory travels as 0 in all
    three (unset), which ``facts_from_message`` reads back as None (a total of 0 bytes
    is no GPU's real answer). The UUID stays local."""
    reply = message(
        accelerators=[
            inference_pb2.Accelerator(
                index=gpu.index,
                name=gpu.name,
                memory_total_bytes=gpu.memory_total_bytes or 0,
                memory_used_bytes=gpu.memory_used_bytes if gpu.memory_total_bytes else 0,
                memory_free_bytes=gpu.memory_free_bytes if gpu.memory_total_bytes else 0,
                utilization_percent=gpu.utilization_percent,
                temperature_celsius=gpu.temperature_celsius,
                power_watts=gpu.power_watts,
            )
            for gpu in facts.gpus
        ],
        cpu_count=facts.cpu_count,
        memory_total_bytes=facts.memory_total_bytes,
        memory_available_bytes=facts.memory_available_bytes,
        container=facts.container,
        kubernetes=facts.kubernetes,
    )
    if facts.driver_version is not None:
        reply.driver_version = facts.driver_version
    if facts.cuda_version is not None:
        reply.cuda_version = facts.cuda_version
    return reply


def facts_from_message(message: inference_pb2.GetHardwareResponse | stt_pb2.GetHardwareResponse) -> HostFacts:
    """The facts a worker answered (``hardware_message``'s inverse; unset optionals are
    None, and so is the memory of a GPU whose total is 0: NVML could not read it)."""
    return HostFacts(
        gpus=tuple(
            Gpu(
                index=a.index,
                name=a.name,
                memory_total_bytes=a.memory_total_bytes or None,
                memory_used_bytes=a.memory_used_bytes if a.memory_total_bytes else None,
                memory_free_bytes=a.memory_free_bytes if a.memory_total_bytes else None,
                utilization_percent=a.utilization_percent if a.HasField("utilization_percent") else None,
                temperature_celsius=a.temperature_celsius if a.HasField("temperature_celsius") else None,
                power_watts=a.power_watts if a.HasField("power_watts") else None,
            )
            for a in message.accelerators
        ),
        driver_version=message.driver_version if message.HasField("driver_version") else None,
        cuda_version=message.cuda_version if message.HasField("cuda_version") else None,
        cpu_count=message.cpu_count,
        memory_total_bytes=message.memory_total_bytes,
        memory_available_bytes=message.memory_available_bytes,
        container=message.container,
        kubernetes=message.kubernetes,
    )


# --------------------------------------------------------------------------- placement

Precision = Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4"]
BYTES_PER_PARAMETER: dict[Precision, float] = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}
GIB = 2**30
# The overhead rule: a fixed 1 GiB for the runtime (CUDA context, cuBLAS/NCCL workspaces,
# the engine itself) plus 10% of weights + KV cache for activations and allocator slack.
RUNTIME_OVERHEAD_BYTES = GIB
ACTIVATION_FRACTION = 0.10
# The headroom rule: a GPU holds the model when, with it loaded, at least 10% of the GPU's
# memory is still free (other processes, fragmentation, peaks the margin above missed).
HEADROOM_FRACTION = 0.10
OVERHEAD_RULE = "1 GiB runtime (CUDA context, workspaces) + 10% of (weights + KV cache) for activations"
HEADROOM_RULE = (
    "a GPU fits when its free memory minus total_bytes is at least 10% of its total memory; "
    "a cloud offer of N GPUs fits when total_bytes <= N x 90% of one GPU's memory (weights and KV cache "
    "split across them)"
)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The attention shape of a well-known model of about ``parameters`` parameters."""

    name: str
    parameters: float
    layers: int
    kv_heads: int
    head_dim: int


# Common dense decoder shapes, from the models' published configs (num_hidden_layers,
# num_key_value_heads, head_dim). 7B is the grouped-query shape of Llama 3 8B and
# Mistral 7B (8 KV heads); Llama 2 7B (multi-head, 32 KV heads) needs kv_heads: 32 sent.
# 13B is Llama 2 13B, which has no GQA (40 KV heads).
MODEL_SHAPES: tuple[ModelShape, ...] = (
    ModelShape("SmolLM2 135M", 0.135e9, 30, 3, 64),
    ModelShape("Qwen2.5 0.5B", 0.5e9, 24, 2, 64),
    ModelShape("Llama 3.2 1B", 1.0e9, 16, 8, 64),
    ModelShape("Llama 3.2 3B", 3.0e9, 28, 8, 128),
    ModelShape("Llama 3 8B / Mistral 7B", 7.0e9, 32, 8, 128),
    ModelShape("Llama 2 13B", 13.0e9, 40, 40, 128),
    ModelShape("Code Llama 34B", 34.0e9, 48, 8, 128),
    ModelShape("Llama 3 70B", 70.0e9, 80, 8, 128),
    ModelShape("Llama 3.1 405B", 405.0e9, 126, 8, 128),
)


def nearest_shape(parameters: float) -> ModelShape:
    """The table's shape nearest to ``parameters`` (on a log scale: 8B is a 7B, 10B a 13B)."""
    return min(MODEL_SHAPES, key=lambda shape: abs(math.log(parameters) - math.log(shape.parameters)))


@dataclass(frozen=True, slots=True)
class Estimate:
    parameters: float
    quantization: Precision
    context_length: int
    batch: int
    layers: int
    kv_heads: int
    head_dim: int
    kv_cache_dtype: Precision
    shape_source: Literal["request", "table", "request+table"]
    shape_model: str | None  # the table entry that filled in the shape; None when the request gave it all
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes


def estimate(
    parameters: float,
    quantization: Precision,
    context_length: int,
    batch: int = 1,
    *,
    layers: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    kv_cache_dtype: Precision | None = None,
) -> Estimate:
    """The memory a model needs to serve ``batch`` sequences of ``context_length`` tokens:

    - weights = parameters x bytes per parameter of ``quantization`` (rounded up);
    - KV cache = 2 (K and V) x layers x kv_heads x head_dim x context x batch x bytes of
      ``kv_cache_dtype`` (default: fp32 for fp32 weights, else fp16: quantised weights
      keep a 16-bit cache unless told);
    - overhead = ``OVERHEAD_RULE``.

    A shape field not given comes from the table entry nearest in parameter count.
    """
    given = (layers, kv_heads, head_dim)
    shape = None if all(value is not None for value in given) else nearest_shape(parameters)
    layers = layers if layers is not None else shape.layers if shape else 0
    kv_heads = kv_heads if kv_heads is not None else shape.kv_heads if shape else 0
    head_dim = head_dim if head_dim is not None else shape.head_dim if shape else 0
    source: Literal["request", "table", "request+table"] = (
        "request" if shape is None else "table" if all(value is None for value in given) else "request+table"
    )
    kv_dtype: Precision = kv_cache_dtype or ("fp32" if quantization == "fp32" else "fp16")
    weights = math.ceil(parameters * BYTES_PER_PARAMETER[quantization])
    kv_cache = math.ceil(2 * layers * kv_heads * head_dim * context_length * batch * BYTES_PER_PARAMETER[kv_dtype])
    overhead = RUNTIME_OVERHEAD_BYTES + math.ceil(ACTIVATION_FRACTION * (weights + kv_cache))
    return Estimate(
        parameters=parameters,
        quantization=quantization,
        context_length=context_length,
        batch=batch,
        layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_cache_dtype=kv_dtype,
        shape_source=source,
        shape_model=shape.name if shape else None,
        weights_bytes=weights,
        kv_cache_bytes=kv_cache,
        overhead_bytes=overhead,
    )


def headroom(gpu_memory_total: int, gpu_memory_free: int, needed: int) -> int | None:
    """Bytes left free on a GPU once ``needed`` is loaded, when that keeps the headroom
    rule (``HEADROOM_FRACTION`` of its total memory); None when it does not fit."""
    left = gpu_memory_free - needed
    return left if left >= math.ceil(HEADROOM_FRACTION * gpu_memory_total) else None


@dataclass(frozen=True, slots=True)
class LocalFit:
    service: str
    instance: str
    gpu_index: int
    name: str
    free_bytes: int
    headroom_bytes: int


def local_fits(hosts: Iterable[tuple[str, str, HostFacts]], needed: int) -> list[LocalFit]:
    """Every GPU of these (service, instance, facts) that holds ``needed`` bytes on its own
    with headroom, most headroom first (the same GPU reported twice, by two services on one
    host, is listed twice: the facts do not say it is one). A GPU whose memory NVML could
    not read is not listed: nothing says it fits."""
    fits = []
    for service, instance, facts in hosts:
        for gpu in facts.gpus:
            if gpu.memory_total_bytes is None or gpu.memory_free_bytes is None:
                continue
            left = headroom(gpu.memory_total_bytes, gpu.memory_free_bytes, needed)
            if left is not None:
                fits.append(LocalFit(service, instance, gpu.index, gpu.name, gpu.memory_free_bytes, left))
    return sorted(fits, key=lambda fit: (-fit.headroom_bytes, fit.service, fit.instance, fit.gpu_index))


@dataclass(frozen=True, slots=True)
class CloudOffer:
    """An on-demand instance with ``count`` GPUs of one kind, at ``hourly_usd`` for the whole instance."""

    provider: str
    instance: str
    gpu: str
    gpu_memory_bytes: int
    count: int
    hourly_usd: Decimal


@dataclass(frozen=True, slots=True)
class GpuPriceTable:
    about: str
    as_of: str
    offers: tuple[CloudOffer, ...]


def parse_gpu_prices(data: Mapping[str, Any]) -> GpuPriceTable:
    """The price table from its JSON form; ValueError naming what is wrong."""
    try:
        gpus = {name: int(entry["memory_mib"]) * 2**20 for name, entry in data["gpus"].items()}
        offers = []
        for entry in data["offers"]:
            gpu = str(entry["gpu"])
            if gpu not in gpus:
                raise ValueError(f"offer {entry.get('instance')!r} names an unknown gpu {gpu!r}")
            price = Decimal(str(entry["hourly_usd"]))
            count = int(entry["count"])
            if not price.is_finite() or price < 0 or count < 1:
                raise ValueError(f"offer {entry.get('instance')!r}: a price >= 0 and a count >= 1, please")
            offers.append(CloudOffer(str(entry["provider"]), str(entry["instance"]), gpu, gpus[gpu], count, price))
        return GpuPriceTable(str(data.get("about", "")), str(data.get("as_of", "")), tuple(offers))
    except (KeyError, TypeError, AttributeError, ArithmeticError) as exc:
        raise ValueError(f"malformed GPU price table: {exc!r}") from exc


@cache
def shipped_gpu_prices() -> GpuPriceTable:
    """``gpu_prices.json`` beside this module (a shipped table the operator may edit)."""
    text = resources.files(__package__).joinpath("gpu_prices.json").read_bytes()
    return parse_gpu_prices(orjson.loads(text))


def cloud_options(needed: int, table: GpuPriceTable) -> list[CloudOffer]:
    """Per provider and GPU kind, the smallest offer that holds ``needed`` bytes under the
    headroom rule; cheapest first."""
    best: dict[tuple[str, str], CloudOffer] = {}
    for offer in table.offers:
        if needed > offer.count * offer.gpu_memory_bytes * (1 - HEADROOM_FRACTION):
            continue
        key = (offer.provider, offer.gpu)
        kept = best.get(key)
        if kept is None or (offer.count, offer.hourly_usd) < (kept.count, kept.hourly_usd):
            best[key] = offer
    return sorted(best.values(), key=lambda offer: (offer.hourly_usd, offer.provider, offer.gpu))
