"""The edge with several uvicorn workers: each worker counts in its own files
(prometheus-client's multiprocess mode) and the supervisor's metrics port adds them up,
so a scrape sees every request whichever worker served it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import REDIS_URL, free_port

pytestmark = pytest.mark.slow  # starts the edge as processes


def health_requests(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "hoosh_http_requests_total" and sample.labels.get("route") == "/v1/health"
    )


def test_two_workers_are_counted_together_on_one_port(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOOSH_EDGE_HOST": "127.0.0.1",
        "HOOSH_EDGE_PORT": str(port),
        "HOOSH_EDGE_WORKERS": "2",
        "HOOSH_EDGE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "HOOSH_AUTH": "open",
        "HOOSH_ENV": "development",
        "HOOSH_REDIS_URL": REDIS_URL,
        "HOOSH_TENANCY_KEY_PREFIX": f"hoosh:test:edge-workers:{uuid.uuid4().hex[:8]}:",
        "HOOSH_ROUTER_ADDR": f"127.0.0.1:{free_port()}",
        "HOOSH_BUDGET_ADDR": f"127.0.0.1:{free_port()}",
        "HOOSH_AUDIT_ADDR": f"127.0.0.1:{free_port()}",
        "HOOSH_STT_ADDR": "",
    }
    files = tmp_path / "metrics"
    files.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(files)  # where the workers write (else a temporary one)
    log = (tmp_path / "edge.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "hoosh_edge"], env=env, stdout=log, stderr=subprocess.STDOUT)
    sent = 0
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "edge.log").read_text()[-3000:]
            try:
                sent += 1
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                sent -= 1  # refused before any worker took it: never counted
            assert time.monotonic() < deadline, "the edge did not start"
            time.sleep(0.2)
        # New connections each time: the kernel spreads them over both workers.
        for _ in range(80):
            response = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5, headers={"connection": "close"})
            assert response.status_code == 200
            sent += 1
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert health_requests(metrics_url) == sent
        # Both workers served and counted in their own file (the supervisor only reads them).
        pids = {path.stem.rsplit("_", 1)[-1] for path in files.glob("counter_*.db")}
        assert len(pids) >= 2
        # The workers (spawned, they never run the edge's __main__) keep aiohttp out as
        # the edge's first process does (hoosh_common.lean_imports): nats-py would load it.
        for pid in pids:
            assert "/aiohttp/" not in Path(f"/proc/{pid}/maps").read_text(), pid
    finally:
        process.terminate()
        process.wait(30)
        log.close()
