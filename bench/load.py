"""Load generators: sequential latency with a raw keep-alive client, streaming
time-to-first-token, a closed-loop asyncio client (exact accounting) and wrk
(low-overhead capacity)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Target:
    """One thing to send chat completions to: the upstream itself, hoosh or LiteLLM."""

    name: str
    base_url: str  # .../v1
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, object] = field(default_factory=dict)

    def body(self, *, stream: bool = False, content: str = "Say hello to the benchmark.") -> bytes:
        payload: dict[str, object] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 16,
            **self.extra_body,
        }
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return json.dumps(payload).encode()


class KeepAliveClient:
    """One persistent HTTP/1.1 connection (stdlib): the least client overhead for sequential requests."""

    def __init__(self, target: Target) -> None:
        url = urlparse(target.base_url)
        self.target = target
        self.path = url.path.rstrip("/") + "/chat/completions"
        self.connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=60)
        self.headers = {"Content-Type": "application/json", **target.headers}

    def _send(self, body: bytes) -> tuple[float, http.client.HTTPResponse]:
        """Send, reconnecting once when the server closed the kept-alive connection while
        other stacks were being measured (what any HTTP client does); timed from the
        attempt that was answered."""
        try:
            started = time.perf_counter()
            self.connection.request("POST", self.path, body=body, headers=self.headers)
            return started, self.connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            self.connection.close()
            started = time.perf_counter()
            self.connection.request("POST", self.path, body=body, headers=self.headers)
            return started, self.connection.getresponse()

    def chat(self, body: bytes) -> tuple[float, dict[str, object]]:
        started, response = self._send(body)
        data = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{self.target.name}: HTTP {response.status}: {data[:300]!r}")
        return elapsed, json.loads(data)

    def first_token(self, body: bytes) -> float:
        """Seconds until the first chunk with content arrives; reads the stream to its end."""
        started, response = self._send(body)
        if response.status != 200:
            raise RuntimeError(f"{self.target.name}: HTTP {response.status}: {response.read()[:300]!r}")
        ttft = float("nan")
        while line := response.readline():
            if ttft != ttft and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                ttft = time.perf_counter() - started
        return ttft

    def close(self) -> None:
        self.connection.close()


@dataclass
class LatencyResult:
    round_medians: list[float]
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.round_medians)

    @property
    def p90(self) -> float:
        return percentile(self.samples, 0.90)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 0.99)


def interleaved_latency(
    targets: list[Target], rounds: int, per_round: int, warmup: int = 20
) -> dict[str, LatencyResult]:
    """Rounds of sequential requests, targets interleaved round by round so drift hits all alike."""
    clients = {target.name: KeepAliveClient(target) for target in targets}
    results = {target.name: LatencyResult([], []) for target in targets}
    try:
        for target in targets:
            for _ in range(warmup):
                clients[target.name].chat(target.body())
        for _ in range(rounds):
            for target in targets:
                client = clients[target.name]
                body = target.body()
                samples = [client.chat(body)[0] for _ in range(per_round)]
                results[target.name].round_medians.append(statistics.median(samples))
                results[target.name].samples.extend(samples)
    finally:
        for client in clients.values():
            client.close()
    return results


def interleaved_ttft(targets: list[Target], rounds: int, per_round: int) -> dict[str, LatencyResult]:
    clients = {target.name: KeepAliveClient(target) for target in targets}
    results = {target.name: LatencyResult([], []) for target in targets}
    try:
        for target in targets:
            for _ in range(5):
                clients[target.name].first_token(target.body(stream=True))
        for _ in range(rounds):
            for target in targets:
                body = target.body(stream=True)
                samples = [clients[target.name].first_token(body) for _ in range(per_round)]
                results[target.name].round_medians.append(statistics.median(samples))
                results[target.name].samples.extend(samples)
    finally:
        for client in clients.values():
            client.close()
    return results


@dataclass
class CapacityResult:
    concurrency: int
    requests: int
    seconds: float
    errors: int
    p50: float
    p99: float
    usage_total: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def closed_loop(target: Target, concurrency: int, total_requests: int) -> CapacityResult:
    """`concurrency` workers, each sending its next request when the last one returns, until
    `total_requests` have been sent; every response is read whole, so usage sums are exact."""
    url = urlparse(target.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path.rstrip("/") + "/chat/completions"
    body = target.body()
    extra = "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    remaining = total_requests
    latencies: list[float] = []
    errors = 0
    usage_total = 0

    async def worker() -> None:
        nonlocal remaining, errors, usage_total
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                data = await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if b" 200 " not in status_line:
                    errors += 1
                    continue
                usage_total += int(json.loads(data)["usage"]["total_tokens"])
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return CapacityResult(
        concurrency=concurrency,
        requests=len(latencies),
        seconds=seconds,
        errors=errors,
        p50=percentile(latencies, 0.5),
        p99=percentile(latencies, 0.99),
        usage_total=usage_total,
    )


_WRK_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{headers}
"""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_capacity(target: Target, concurrency: int, seconds: int, threads: int = 1) -> CapacityResult:
    """Closed loop at `concurrency` connections for `seconds` with wrk (C, ~no client overhead)."""
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in target.headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_LUA.format(body=json.dumps(target.body().decode()), headers=headers))
    url = target.base_url.rstrip("/") + "/chat/completions"
    output = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            script.name,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    Path(script.name).unlink()
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    duration = _seconds(re.search(r"requests in ([\d.]+\w+),", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(value) for value in socket_errors.groups())
    p50 = _seconds(re.search(r"50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    return CapacityResult(concurrency, requests, duration, errors, p50, p99)
