"""Print this host's hardware facts as hoosh reads them, for a GPU host.

    python scripts/gpu_facts.py [--json] [--require-gpu] [--compare-nvidia-smi]

The same function the services answer GetHardware with (``hoosh_common.hardware.probe``:
pynvml from nvidia-ml-py, the cgroup-aware CPU and memory readings, container and
Kubernetes detection), so what it prints is what GET /v1/hardware shows for this host.
``--compare-nvidia-smi`` also asks ``nvidia-smi`` for each GPU's name and memory (MiB)
and says where the two disagree (usually by the rounding of MiB: a disagreement of more
than 1 MiB is one).

Exit status: 0 when the facts were read (no GPU is a normal answer), 1 with
``--require-gpu`` and no GPU, or when nvidia-smi disagrees. Not part of the test suite:
the default suite never needs a GPU. Run it with the repository's venv (``make install
proto``) or inside a hoosh image (local-inference's GPU image has nvidia-ml-py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs/common/src"))

from hoosh_common.hardware import HostFacts, probe  # noqa: E402

MIB = 2**20
GIB = 2**30


def human(facts: HostFacts) -> str:
    lines = [
        f"NVML:        {facts.gpu_status}",
        f"driver:      {facts.driver_version or '-'}",
        f"CUDA:        {facts.cuda_version or '-'}",
        f"CPUs:        {facts.cpu_count}",
        f"memory:      {facts.memory_available_bytes / GIB:.1f} GiB available of {facts.memory_total_bytes / GIB:.1f}",
        f"container:   {'yes' if facts.container else 'no'}",
        f"kubernetes:  {'yes' if facts.kubernetes else 'no'}",
        f"GPUs:        {len(facts.gpus)}",
    ]

    def unknown(value: object, unit: str) -> str:
        return "n/a" if value is None else f"{value}{unit}"

    def mib(value: int | None) -> str:
        return "n/a" if value is None else str(value // MIB)  # None: NVML cannot read it (unified memory)

    for gpu in facts.gpus:
        lines.append(
            f"  [{gpu.index}] {gpu.name}: {mib(gpu.memory_used_bytes)} / {mib(gpu.memory_total_bytes)} MiB used, "
            f"{mib(gpu.memory_free_bytes)} MiB free, util {unknown(gpu.utilization_percent, '%')}, "
            f"{unknown(gpu.temperature_celsius, ' C')}, {unknown(gpu.power_watts, ' W')}"
        )
    return "\n".join(lines)


def nvidia_smi() -> list[tuple[int, str, int]] | None:
    """(index, name, memory total MiB) per GPU from nvidia-smi; None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    rows = []
    for line in result.stdout.strip().splitlines():
        index, name, total = (part.strip() for part in line.split(","))
        rows.append((int(index), name, int(total)))
    return rows


def compare(facts: HostFacts) -> list[str]:
    rows = nvidia_smi()
    if rows is None:
        return ["nvidia-smi is not available: nothing to compare"]
    problems = []
    if len(rows) != len(facts.gpus):
        problems.append(f"nvidia-smi lists {len(rows)} GPUs, NVML through pynvml {len(facts.gpus)}")
    for (index, name, total_mib), gpu in zip(rows, facts.gpus, strict=False):
        if (index, name) != (gpu.index, gpu.name):
            problems.append(f"GPU {index}: nvidia-smi says {name!r}, pynvml {gpu.index} {gpu.name!r}")
        if gpu.memory_total_bytes is None:
            problems.append(f"GPU {index}: nvidia-smi {total_mib} MiB, pynvml cannot read its memory")
        elif abs(total_mib - gpu.memory_total_bytes // MIB) > 1:
            problems.append(f"GPU {index}: nvidia-smi {total_mib} MiB, pynvml {gpu.memory_total_bytes // MIB} MiB")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="the facts as JSON")
    parser.add_argument("--require-gpu", action="store_true", help="exit 1 when no GPU is found")
    parser.add_argument("--compare-nvidia-smi", action="store_true", help="check names and memory against nvidia-smi")
    args = parser.parse_args()
    facts = probe()
    print(json.dumps(dataclasses.asdict(facts), indent=2) if args.json else human(facts))
    status = 0
    if args.compare_nvidia_smi:
        problems = compare(facts)
        for problem in problems:
            print(f"mismatch: {problem}" if "not available" not in problem else problem, file=sys.stderr)
        if any("not available" not in problem for problem in problems):
            status = 1
    if args.require_gpu and not facts.gpus:
        print("no GPU found", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
