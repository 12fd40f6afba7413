"""`make bench` / `python -m bench`: hoosh against LiteLLM's proxy and the bare
upstream, side by side on this machine, written to BENCHMARKS.md.

`python -m bench --quick` runs hoosh alone for a few hundred requests and checks
that budgets and audit add up (the test suite runs it; it asserts no times)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hoosh_cli.otlp_sink import OtlpSink

from . import load
from .stacks import ROOT, HooshUnderTest, LiteLLM, Upstream, cpu_seconds, peak_rss_bytes, start_hoosh


@dataclass
class AccountingCheck:
    requests: int
    usage_seen: int
    pool_used: int
    pool_reserved: int
    audit_entries: int
    chain_valid: bool
    errors: int
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.errors == 0
            and self.pool_used == self.usage_seen
            and self.pool_reserved == 0
            and self.audit_entries == self.requests
            and self.chain_valid
        )


def audit_entries_for_pool(hoosh: HooshUnderTest, pool: str) -> int:
    count = 0
    if not hoosh.audit_file.exists():
        return 0
    text = hoosh.audit_file.read_text()
    # Audit may be appending a batch right now: only whole lines count (the rest is read next time).
    for line in text[: text.rfind("\n") + 1].splitlines():
        entry = json.loads(line)
        if entry["payload"].get("pool") == pool and entry["subject"].endswith("inference.completed"):
            count += 1
    return count


async def accounting_run(
    hoosh: HooshUnderTest, model: str, concurrency: int, requests: int
) -> tuple[load.CapacityResult, AccountingCheck]:
    """A closed-loop run into a fresh pool, then: pool used == usage the clients saw,
    nothing reserved, one audit entry per request, chain valid."""
    from hoosh_audit.chain import verify

    pool, key = await hoosh.new_pool()
    target = load.Target(
        "hoosh", hoosh.base_url, model, headers={"Authorization": f"Bearer {key}"}, extra_body={"pool": pool}
    )
    processes = hoosh.processes()
    cpu_before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    result = await load.closed_loop(target, concurrency, requests)
    entries = 0
    for _ in range(300):  # audit is asynchronous: wait (bounded) for it to catch up
        entries = audit_entries_for_pool(hoosh, pool)
        if entries >= result.requests - result.errors:
            break
        await asyncio.sleep(0.1)
    cpu_ms = {
        name: (cpu_seconds(pid) - cpu_before[name]) * 1000 / max(1, result.requests) for name, pid in processes.items()
    }
    state = await hoosh.pool_state(pool)
    verdict = verify(hoosh.audit_file, hoosh.config.audit_key.encode())
    return result, AccountingCheck(
        requests=result.requests,
        usage_seen=result.usage_total,
        pool_used=state.used,
        pool_reserved=state.reserved,
        audit_entries=entries,
        chain_valid=verdict.valid,
        errors=result.errors,
        cpu_ms_per_request=cpu_ms,
    )


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{memory_kib / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def run_quick(requests: int = 300, concurrency: int = 32) -> dict[str, object]:
    """hoosh alone: a latency sample and one accounting run. Returns the figures and checks."""
    upstream = Upstream(latency_ms=0)
    with tempfile.TemporaryDirectory(prefix="hoosh-bench-") as state:
        hoosh = start_hoosh(Path(state), upstream, None, with_inference=False)
        try:
            targets = [
                load.Target("direct", upstream.base_url, "bench-fast"),
                load.Target("hoosh", hoosh.base_url, "bench-fast", headers=hoosh.headers),
            ]
            latency = load.interleaved_latency(targets, rounds=2, per_round=50, warmup=5)
            capacity, check = asyncio.run(accounting_run(hoosh, "bench-fast", concurrency, requests))
        finally:
            hoosh.stop()
            upstream.stop()
    return {
        "latency_ms": {name: result.median * 1000 for name, result in latency.items()},
        "capacity": asdict(capacity),
        "check": asdict(check),
        "ok": check.ok,
    }


@dataclass
class StackFigures:
    name: str
    added_median_ms: float = 0.0
    median_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    ttft_added_ms: float = 0.0
    capacity: dict[int, load.CapacityResult] = field(default_factory=dict)
    peak_rss_mib: float = 0.0


def ms(value: float) -> str:
    return f"{value * 1000:.2f}" if value == value else "n/a"


def render(
    figures: list[StackFigures],
    check: AccountingCheck | None,
    info: dict[str, str],
    args: argparse.Namespace,
    started: float,
) -> str:
    by_name = {f.name: f for f in figures}
    lines = [
        "# Benchmarks",
        "",
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}: {info['cpu']}, {info['cores']} cores, "
        f"{info['memory']} RAM, Python {info['python']}, Linux {info['kernel']}. Everything (load generator, "
        "upstream stand-in, hoosh with Redis/NATS/audit, LiteLLM) shares this one machine.",
        "",
        "Reproduce: `make bench` (= `.venv/bin/python -m bench`).",
        "",
        f"Latency: {args.rounds} interleaved rounds x {args.per_round} sequential requests per stack against the 0 ms "
        "upstream; median of round medians; p90/p99 over all samples. Added = stack median - direct median. "
        f"Capacity: closed loop with wrk ({args.seconds} s per point) against the 50 ms upstream. TTFT: streaming, "
        "time to the first content chunk, added over direct. Peak RSS: sum of VmHWM of the stack's processes "
        "(hoosh: gateway processes, see below; LiteLLM: its process tree).",
        "",
        "| stack | median ms | added ms | p90 ms | p99 ms | TTFT added ms | c=32 req/s | c=32 p50/p99 ms | c=32 errors "
        "| c=128 req/s | c=128 p50/p99 ms | c=128 errors | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        cells = [
            f.name,
            ms(f.median_ms),
            ms(f.added_median_ms) if f.name != "direct" else "-",
            ms(f.p90_ms),
            ms(f.p99_ms),
            ms(f.ttft_added_ms) if f.name != "direct" else "-",
        ]
        for concurrency in (32, 128):
            result = f.capacity.get(concurrency)
            if result is None:
                cells += ["-", "-", "-"]
            else:
                cells += [f"{result.rps:.0f}", f"{ms(result.p50)}/{ms(result.p99)}", str(result.errors)]
        cells.append(f"{f.peak_rss_mib:.0f}" if f.peak_rss_mib else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if "hoosh" in by_name and "litellm" in by_name:
        lines += ["", "Ratios (same run):", ""] + [
            f"- {line}" for line in ratio_lines(by_name["hoosh"], by_name["litellm"])
        ]
    if check is not None:
        lines += [
            "",
            f"Correctness after a concurrency-128 run through hoosh ({check.requests} requests, 50 ms upstream, own pool): "
            f"usage the clients received {check.usage_seen}, pool used {check.pool_used}, reserved {check.pool_reserved}, "
            f"audit entries {check.audit_entries}, chain valid {check.chain_valid}, errors {check.errors} -> "
            f"{'OK' if check.ok else 'MISMATCH'}.",
            "",
            "CPU per request in that run, by process (ms, user+system from /proc; the Python load client not counted): "
            + ", ".join(f"{name} {value:.3f}" for name, value in check.cpu_ms_per_request.items())
            + f"; total {sum(check.cpu_ms_per_request.values()):.3f}.",
        ]
    return "\n".join(lines) + "\n"


# Issue 15's goals, with governance on, measured in one run beside LiteLLM.
GOAL_CAPACITY_RATIO = 10.0  # at c=128
GOAL_LATENCY_RATIO = 6.0  # LiteLLM's added latency over hoosh's


def ratio_lines(hoosh: StackFigures, litellm: StackFigures) -> list[str]:
    """The two ratios the goals are set in (each against its goal), capacity at c=32,
    and peak RSS against LiteLLM's process tree."""
    lines = []
    if hoosh.added_median_ms > 0:
        ratio = litellm.added_median_ms / hoosh.added_median_ms
        verdict = "met" if ratio >= GOAL_LATENCY_RATIO else "not met"
        lines.append(
            f"added latency: LiteLLM adds {ratio:.1f}x what hoosh adds ({ms(litellm.added_median_ms)} ms vs "
            f"{ms(hoosh.added_median_ms)} ms); goal >= {GOAL_LATENCY_RATIO:.0f}x: {verdict}"
        )
    for concurrency in (128, 32):
        ours, theirs = hoosh.capacity.get(concurrency), litellm.capacity.get(concurrency)
        if ours is None or theirs is None or not theirs.rps:
            continue
        ratio = ours.rps / theirs.rps
        goal = f"; goal >= {GOAL_CAPACITY_RATIO:.0f}x: {'met' if ratio >= GOAL_CAPACITY_RATIO else 'not met'}"
        lines.append(
            f"capacity at c={concurrency}: hoosh {ours.rps:.0f} req/s vs LiteLLM {theirs.rps:.0f} req/s ({ratio:.1f}x)"
            + (goal if concurrency == 128 else "")
        )
    if hoosh.peak_rss_mib and litellm.peak_rss_mib:
        below = "below" if hoosh.peak_rss_mib < litellm.peak_rss_mib else "NOT below"
        lines.append(
            f"peak RSS: hoosh's gateway processes {hoosh.peak_rss_mib:.0f} MiB, {below} LiteLLM's process tree "
            f"{litellm.peak_rss_mib:.0f} MiB"
        )
    return lines


GATEWAY_SERVICES = ("edge", "router", "budget", "audit")


def run_full(args: argparse.Namespace) -> int:
    started = time.time()
    model_workers_mib = 0.0
    info = machine()
    fast, slow = Upstream(0), Upstream(50)
    state = Path(tempfile.mkdtemp(prefix="hoosh-bench-"))
    figures = {name: StackFigures(name) for name in ("direct", "hoosh", "litellm")}
    stacks: list[object] = []
    check: AccountingCheck | None = None
    sink = None
    if args.export_spans:
        # Every service exports every span over OTLP, as with a collector beside it.
        sink = OtlpSink(keep=False)
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.start()
        os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
    try:
        hoosh = start_hoosh(state / "hoosh", fast, slow)
        stacks.append(hoosh)
        litellm = None
        if not args.no_litellm:
            (state / "litellm").mkdir()
            litellm = LiteLLM(state / "litellm", fast, slow, ROOT / ".bench" / "litellm-venv")
            stacks.append(litellm)

        def targets(model: str) -> list[load.Target]:
            found = [
                load.Target("direct", (fast if model == "bench-fast" else slow).base_url, model),
                load.Target("hoosh", hoosh.base_url, model, headers=hoosh.headers),
            ]
            if litellm is not None:
                found.append(load.Target("litellm", litellm.base_url, model, headers=litellm.headers))
            return found

        print("latency ...", flush=True)
        latency = load.interleaved_latency(targets("bench-fast"), args.rounds, args.per_round)
        print("time to first token ...", flush=True)
        ttft = load.interleaved_ttft(targets("bench-fast"), max(1, args.rounds // 2), max(10, args.per_round // 4))
        for name, result in latency.items():
            f = figures[name]
            f.median_ms, f.p90_ms, f.p99_ms = result.median, result.p90, result.p99
            f.added_median_ms = result.median - latency["direct"].median
            f.ttft_added_ms = ttft[name].median - ttft["direct"].median
        for concurrency in (32, 128):
            for target in targets("bench-slow"):
                print(f"capacity c={concurrency} {target.name} ...", flush=True)
                figures[target.name].capacity[concurrency] = load.wrk_capacity(target, concurrency, args.seconds)
        print("accounting check (c=128) ...", flush=True)
        _, check = asyncio.run(accounting_run(hoosh, "bench-slow", 128, args.check_requests))
        gateway = [s.process.pid for s in hoosh.stack.services if s.process and s.name in GATEWAY_SERVICES]
        workers = [s.process.pid for s in hoosh.stack.services if s.process and s.name not in GATEWAY_SERVICES]
        figures["hoosh"].peak_rss_mib = peak_rss_bytes(gateway) / 2**20
        model_workers_mib = peak_rss_bytes(workers) / 2**20
        if litellm is not None:
            figures["litellm"].peak_rss_mib = peak_rss_bytes(litellm.pids()) / 2**20
    finally:
        for stack in reversed(stacks):
            stack.stop()  # type: ignore[attr-defined]
        fast.stop()
        slow.stop()
        if sink is not None:
            sink.stop()
    ordered = [figures["direct"], figures["hoosh"]] + ([figures["litellm"]] if not args.no_litellm else [])
    report = render(ordered, check, info, args, started)
    if sink is not None:
        report += (
            f"\nSpans exported: every hoosh service sent its spans over OTLP/gRPC to a receiver in the "
            f"benchmark's process ({sink.received} spans).\n"
        )
    report += (
        f"\nhoosh's peak RSS above counts the gateway processes (edge, router, budget, audit); its model "
        f"workers (local-inference with SmolLM2 loaded, stt with Whisper tiny.en), idle during the run, "
        f"added {model_workers_mib:.0f} MiB. Redis and NATS are shared infrastructure and not counted.\n"
    )
    print(report)
    if args.out:
        write_report(Path(args.out), report)
        print(f"written to {args.out}")
    return 0 if check is not None and check.ok else 1


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_report(path: Path, report: str) -> None:
    """Replace the generated section of the file, keeping the hand-written analysis around it."""
    block = f"{BEGIN}\n{report}{END}\n"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = block + text
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="hoosh only, a few hundred requests, checks accounting")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each capacity point")
    parser.add_argument("--check-requests", type=int, default=3000)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument(
        "--export-spans", action="store_true", help="hoosh exports every span over OTLP (a receiver in this process)"
    )
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.quick:
        result = run_quick()
        print(json.dumps(result, indent=2))
        sys.exit(0 if result["ok"] else 1)
    if not load.wrk_available():
        print("wrk not found: installing it (apt-get install wrk) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
        if not load.wrk_available():
            sys.exit("wrk is needed for the capacity runs: apt-get install wrk")
    sys.exit(run_full(args))


if __name__ == "__main__":
    main()
