"""`python -m bench.ab --before PATH`: this checkout against another one (an older
commit, say), both running at the same time on this machine, measured interleaved.

Machines (and one machine from minute to minute) differ by far more than a hot-path
change, so a before/after figure is only worth something when both sides meet the
same noise: each round sends sequential requests to the direct upstream, then to
``before``, then to ``after``; capacity runs alternate the same way. Each side is
that checkout's own ``bench.stacks.start_hoosh`` (its own governance settings)
started by that checkout's venv, so an old commit is measured as it really ran.

Prepare the other checkout once: ``git worktree add ../before <commit>`` then
``bash ../before/scripts/install.sh``. Asserts nothing about times; prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hoosh_cli.otlp_sink import OtlpSink

from . import load
from .stacks import ROOT, cpu_seconds

# Run inside the other checkout's venv with its root as the working directory: that
# checkout's own bench.stacks starts its stack, then this prints where it listens.
_SERVE = """
import json, os, sys, tempfile
from pathlib import Path
sys.path.insert(0, os.getcwd())
from bench.stacks import Upstream, start_hoosh
upstream = Upstream(latency_ms=0)
hoosh = start_hoosh(Path(tempfile.mkdtemp(prefix="hoosh-ab-")), upstream, None, with_inference=False)
print(json.dumps({"url": hoosh.base_url, "headers": getattr(hoosh, "headers", {}) or {},
                  "upstream": upstream.base_url, "processes": hoosh.processes()}), flush=True)
try:
    sys.stdin.read()
finally:
    hoosh.stop()
    upstream.stop()
"""


@dataclass
class Side:
    name: str
    checkout: Path
    process: subprocess.Popen[str]
    url: str
    headers: dict[str, str]
    upstream: str
    processes: dict[str, int]
    rps: list[float] = field(default_factory=list)
    cpu_ms: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, checkout: Path, env: dict[str, str] | None = None) -> Side:
        python = checkout / ".venv" / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"{checkout} has no .venv: run `bash {checkout}/scripts/install.sh` first")
        process = subprocess.Popen(
            [str(python), "-c", _SERVE],
            cwd=checkout,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"{name} ({checkout}) did not start")
        info = json.loads(line)
        return cls(name, checkout, process, info["url"], info["headers"], info["upstream"], info["processes"])

    def target(self) -> load.Target:
        return load.Target(self.name, self.url, "bench-fast", headers=self.headers)

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(120)


async def capacity(side: Side, concurrency: int, requests: int) -> None:
    before = {name: cpu_seconds(pid) for name, pid in side.processes.items()}
    result = await load.closed_loop(side.target(), concurrency, requests)
    after = {name: cpu_seconds(pid) for name, pid in side.processes.items()}
    if result.errors:
        raise SystemExit(f"{side.name}: {result.errors} errors in the capacity run")
    side.rps.append(result.rps)
    side.cpu_ms.append({name: (after[name] - before[name]) * 1000 / result.requests for name in before})


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--before", required=True, type=Path, help="the other checkout (with its .venv)")
    parser.add_argument("--after", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--rounds", type=int, default=10, help="latency rounds (each side, interleaved)")
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--capacity-runs", type=int, default=3, help="closed-loop runs per side, alternating")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3000, help="per capacity run")
    parser.add_argument(
        "--before-env", action="append", default=[], metavar="KEY=VALUE", help="environment of the before stack"
    )
    parser.add_argument(
        "--after-env", action="append", default=[], metavar="KEY=VALUE", help="environment of the after stack"
    )
    parser.add_argument(
        "--export-spans",
        choices=("none", "after", "both"),
        default="none",
        help="export every span over OTLP to a receiver in this process (hoosh_cli.otlp_sink), "
        "as a deployment with a collector would",
    )
    args = parser.parse_args()

    env = {"before": _pairs(args.before_env), "after": _pairs(args.after_env)}
    sink = None
    if args.export_spans != "none":
        sink = OtlpSink(keep=False)
        exporting = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.start(), "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        for name in ("after", "before") if args.export_spans == "both" else ("after",):
            env[name] = {**exporting, **env[name]}
    before = Side.start("before", args.before.resolve(), env["before"])
    try:
        after = Side.start("after", args.after.resolve(), env["after"])
    except BaseException:
        before.stop()
        raise
    try:
        direct = load.Target("direct", before.upstream, "bench-fast")
        latency = load.interleaved_latency([direct, before.target(), after.target()], args.rounds, args.per_round)
        for _ in range(args.capacity_runs):
            for side in (before, after):
                asyncio.run(capacity(side, args.concurrency, args.requests))
    finally:
        after.stop()
        before.stop()
        if sink is not None:
            sink.stop()

    base = latency["direct"].median
    added = {side.name: (latency[side.name].median - base) * 1000 for side in (before, after)}
    per_round = [
        (a - b) * 1000 for a, b in zip(latency["after"].round_medians, latency["before"].round_medians, strict=True)
    ]
    print(f"before: {args.before} {env['before'] or ''}  after: {args.after} {env['after'] or ''}")
    if sink is not None:
        print(f"spans received by the OTLP receiver: {sink.received}")
    print(
        f"added latency, median of round medians: before {added['before']:.3f} ms, after {added['after']:.3f} ms, "
        f"difference {added['after'] - added['before']:+.3f} ms"
    )
    print(
        f"per-round difference (after - before): median {statistics.median(per_round):+.3f} ms, "
        f"range {min(per_round):+.3f} .. {max(per_round):+.3f} ms over {len(per_round)} rounds"
    )
    for side in (before, after):
        cpu = {name: statistics.median(run[name] for run in side.cpu_ms) for name in side.cpu_ms[0]}
        busy = {name: round(value, 3) for name, value in cpu.items() if value >= 0.001}
        print(
            f"{side.name}: c={args.concurrency} {statistics.median(side.rps):.0f} req/s (median of {len(side.rps)}), "
            f"CPU ms/request {busy}, total {sum(cpu.values()):.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
