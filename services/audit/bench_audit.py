"""How long one page of ``ListEntries`` takes on a small and a large audit log.

    .venv/bin/python services/audit/bench_audit.py                 # 10k and 1M entries
    .venv/bin/python services/audit/bench_audit.py --sizes 10000,200000 --repeat 30

Builds synthetic logs (realistic inference events: 50 keys, 3 pools, 3 models, some
failures, budget resets and admin actions) with the service's own writer, serves each
over a real in-process gRPC server and times, as a client sees them:

- the first page (the newest 100 entries, no filter),
- a page deep in (a cursor in the middle of the log),
- a filtered page (one key id: 2% of the entries), cold (a key not asked for before:
  its match count is computed) and warm (the same key again),
- a filtered page deep in (one key, a cursor in the middle),

plus what opening the log costs with a checkpoint (what the service reads on start)
and without one (everything read and verified). Prints a table; a page must cost the
same at every size. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh_audit.chain import NewEntry
from hoosh_audit.index import Filters
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog
from hoosh_audit.query import encode_cursor
from hoosh_audit.server import AuditServicer
from hoosh_common.grpc_server import internal_channel, new_server

KEYS = [f"key_{i:02d}" for i in range(50)]
POOLS = ["org", "team-a", "team-b"]
MODELS = {"smollm2-135m-instruct": "local", "gpt-4o-mini": "openai", "claude-3-5-haiku": "anthropic"}
BATCH = 1000
PAGE = 100


def event(i: int, rng: random.Random) -> NewEntry:
    roll = rng.random()
    if roll < 0.01:
        pool = rng.choice(POOLS)
        return NewEntry(f"reset:{pool}:{i}", "hoosh.budget.reset", i, {"pool": pool, "reason": "period", "used": "9"})
    if roll < 0.015:
        return NewEntry(f"adm-{i}", "hoosh.admin.key.created", i, {"key_id": rng.choice(KEYS), "outcome": "ok"})
    model = rng.choice(list(MODELS))
    request_id = f"{rng.getrandbits(128):032x}"
    payload: dict[str, Any] = {
        "request_id": request_id,
        "trace_id": f"{rng.getrandbits(128):032x}",
        "timestamp_ms": str(1_700_000_000_000 + i),
        "model": model,
        "provider": MODELS[model],
        "pool": rng.choice(POOLS),
        "key_id": rng.choice(KEYS),
        "pool_chain": ["team-a", "org"],
        "kind": "chat",
        "latency_ms": str(rng.randint(50, 900)),
        "usage": {"prompt_tokens": rng.randint(5, 900), "completion_tokens": rng.randint(1, 400), "total_tokens": 0},
    }
    if roll > 0.95:
        payload |= {"error_code": "upstream_error", "http_status": 502}
        return NewEntry(request_id, "hoosh.inference.failed", i, payload)
    payload |= {"cost_usd": round(rng.random() / 100, 6), "finish_reason": "stop", "attempts": 1}
    return NewEntry(request_id, "hoosh.inference.completed", i, payload)


def build(directory: Path, keyring: Keyring, n: int) -> float:
    """Write ``n`` entries in batches (as the consumer does under load); seconds taken."""
    rng = random.Random(n)
    clock = [1_700_000_000_000]

    def now() -> int:
        return clock[0]

    audit_log = AuditLog(directory, keyring, clock_ms=now)
    started = time.perf_counter()
    for first in range(1, n + 1, BATCH):
        audit_log.append_batch_sync([event(i, rng) for i in range(first, min(first + BATCH, n + 1))])
        clock[0] += 1_000
    elapsed = time.perf_counter() - started
    audit_log.close()
    return elapsed


async def timed(call: Callable[[], Awaitable[Any]], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"{statistics.median(ordered):7.2f} ms (p95 {p95:6.2f})"


async def measure(directory: Path, keyring: Keyring, n: int, repeat: int) -> dict[str, str]:
    results: dict[str, str] = {}
    started = time.perf_counter()
    full = await AuditLog.open(directory, keyring)  # no checkpoint: every segment read
    results["open, no checkpoint"] = f"{(time.perf_counter() - started) * 1000:9.0f} ms"
    checkpoint = full.checkpoint()
    full.close()
    started = time.perf_counter()
    audit_log = await AuditLog.open(directory, keyring, checkpoint=checkpoint)
    results["open from checkpoint"] = f"{(time.perf_counter() - started) * 1000:9.0f} ms"

    server = new_server()
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit_log), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = internal_channel(f"127.0.0.1:{port}")
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    try:
        middle = encode_cursor(n // 2, Filters())
        key_middle = encode_cursor(n // 2, Filters(key_id=KEYS[0]))

        async def page(**fields: Any) -> None:
            reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=PAGE, **fields))
            assert reply.chain_valid and len(reply.entries) > 0, reply.verify_error

        await page()  # warm the channel
        results["first page"] = summary(await timed(lambda: page(), repeat))
        results["page deep in (cursor at n/2)"] = summary(await timed(lambda: page(cursor=middle), repeat))
        cold_keys = iter(KEYS[1:] * (repeat // len(KEYS) + 1))
        results["key filter, cold (count computed)"] = summary(
            await timed(lambda: page(key_id=next(cold_keys)), min(repeat, len(KEYS) - 1))
        )
        results["key filter, warm"] = summary(await timed(lambda: page(key_id=KEYS[0]), repeat))
        results["key filter, deep in"] = summary(await timed(lambda: page(key_id=KEYS[0], cursor=key_middle), repeat))
        results["model+outcome filter"] = summary(
            await timed(lambda: page(model="gpt-4o-mini", outcome="failed"), repeat)
        )
        integrity = await timed(audit_log.integrity, repeat)
        results["chain state (integrity())"] = summary(integrity)
    finally:
        await channel.close()
        await server.stop(None)
        audit_log.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,1000000", help="entries per log, comma-separated")
    parser.add_argument("--repeat", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the logs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    args = parser.parse_args()
    keyring = Keyring.single(b"bench-key-0123456789abcdef0123456789")
    root = args.dir or Path(tempfile.mkdtemp(prefix="hoosh-audit-bench-"))
    table: dict[int, dict[str, str]] = {}
    try:
        for n in (int(size) for size in args.sizes.split(",")):
            directory = root / f"log-{n}"
            shutil.rmtree(directory, ignore_errors=True)
            seconds = await asyncio.to_thread(build, directory, keyring, n)
            size = sum(p.stat().st_size for p in directory.glob("seg-*.jsonl"))
            index = sum(p.stat().st_size for p in directory.glob("index.sqlite3*"))
            segments = len(list(directory.glob("seg-*.jsonl")))
            print(
                f"built {n} entries in {seconds:.1f} s ({seconds / n * 1e6:.0f} us/entry): "
                f"{segments} segments, {size / 2**20:.0f} MiB, index {index / 2**20:.0f} MiB",
                flush=True,
            )
            table[n] = await measure(directory, keyring, n, args.repeat)
            if not args.keep:
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    sizes = list(table)
    print()
    print(f"| {'ListEntries, page of 100':<36} | " + " | ".join(f"{n:>27,} entries" for n in sizes) + " |")
    print(f"|{'-' * 38}|" + "|".join("-" * 37 for _ in sizes) + "|")
    for name in table[sizes[0]]:
        print(f"| {name:<36} | " + " | ".join(f"{table[n][name]:>35}" for n in sizes) + " |")


if __name__ == "__main__":
    asyncio.run(main())
