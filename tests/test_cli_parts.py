"""The `hoosh` CLI's and the status page's pieces that need no stack: the config file,
error mapping, argument types, and how the status page reads metrics and judges what
it found (the running stack's healthy page is in test_cli_operator.py)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hoosh_cli import audit, costs, hardware, keys, output, pools, providers, reload, status
from hoosh_cli.__main__ import build_parser
from hoosh_cli.client import error_from, transport_error
from hoosh_cli.config import load_config
from hoosh_cli.costs import since
from hoosh_cli.errors import EXIT_AUTH, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, UsageError
from hoosh_cli.hardware import QUANTIZATIONS, count, parameters, placement_body
from hoosh_cli.parser import finite, seconds
from hoosh_cli.stack import free_port
from hoosh_cli.terminal import TerminalFilter, clean
from hoosh_edge import admin_status
from hoosh_edge.admin_status import AdminStatus, StatusSettings, parse_samples
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from rich.console import Console

HOOSH = Path(sys.executable).with_name("hoosh")


def test_the_config_file_is_read_checked_and_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    assert load_config(path).api_key is None  # absent: empty
    path.write_text('url = "http://edge:8088"\napi_key = " sk-hoosh-a "\nmodel = "m"\n')
    path.chmod(0o644)
    config = load_config(path)
    assert (config.url, config.api_key, config.model, config.admin_key) == ("http://edge:8088", "sk-hoosh-a", "m", None)
    assert "others can read it (chmod 600" in capsys.readouterr().err
    path.chmod(0o600)
    load_config(path)
    assert capsys.readouterr().err == ""
    for text, says in (
        ("url = ", "not valid TOML"),
        ("api_key = 3", "api_key must be a non-empty string"),
        ('apikey = "x"', "unknown fields apikey"),
    ):
        path.write_text(text)
        with pytest.raises(UsageError, match=says):
            load_config(path)


def _answer(status: int, body: object, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers, request=httpx.Request("GET", "http://edge/v1/x"))


def test_error_answers_map_to_exit_statuses_in_one_line() -> None:
    envelope = {"error": {"message": "Bad\nkey", "type": "invalid_request_error", "param": None, "code": "bad_key"}}
    refused = error_from(_answer(401, envelope, **{"x-request-id": "abc"}))
    assert refused.exit_code == EXIT_AUTH and str(refused) == "HTTP 401 bad_key: Bad key [request abc]"
    assert error_from(_answer(403, envelope)).exit_code == EXIT_AUTH
    failed = error_from(_answer(404, {"error": {"message": "no", "type": "t", "param": "model", "code": None}}))
    assert failed.exit_code == EXIT_FAILED and str(failed) == "HTTP 404 t: no (param: model)"
    plain = error_from(httpx.Response(502, text="<html>\nbad gateway</html>", request=httpx.Request("GET", "http://e")))
    assert str(plain) == "HTTP 502: <html> bad gateway</html>"
    request = httpx.Request("GET", "http://edge")
    assert transport_error(httpx.ConnectError("refused", request=request), "http://edge").exit_code == EXIT_UNREACHABLE
    assert transport_error(httpx.ReadTimeout("slow", request=request), "http://edge").exit_code == EXIT_FAILED
    assert transport_error(httpx.UnsupportedProtocol("x", request=request), "edge").exit_code == EXIT_USAGE


def test_argument_types() -> None:
    assert parameters("7e9") == parameters("7B") == parameters("7000000000") == 7e9
    assert parameters("135M") == 135e6 and parameters("1.5b") == 1.5e9
    assert (count(7e9), count(1.35e8), count(70e9)) == ("7B", "135M", "70B")
    for bad in ("seven", "0", "-1B", "7X"):
        with pytest.raises(argparse.ArgumentTypeError):
            parameters(bad)
    assert since("2026-01-02") == "2026-01-02"
    assert len(since("7d")) == 10 and since("1w") == since("7d")
    with pytest.raises(argparse.ArgumentTypeError):
        since("yesterday")


def test_the_status_page_reads_the_gauges_it_needs_from_an_exposition() -> None:
    registry = CollectorRegistry()
    Gauge("hoosh_events_outbox_entries", "x", ["service"], registry=registry).labels("router").set(12)
    Gauge("hoosh_events_outbox_oldest_age_seconds", "x", ["service"], registry=registry).labels("router").set(3.5)
    Gauge("hoosh_audit_lag_events", "x", registry=registry).set(4)
    Gauge("hoosh_other", "x", registry=registry).set(9)
    text = generate_latest(registry).decode()
    found = parse_samples(text, frozenset({"hoosh_events_outbox_entries", "hoosh_audit_lag_events", "hoosh_absent"}))
    assert found == {"hoosh_events_outbox_entries": 12.0, "hoosh_audit_lag_events": 4.0}


def test_the_status_page_finds_metrics_where_hoosh_up_serves_them() -> None:
    settings = StatusSettings(
        router_metrics_listen="0.0.0.0:9461",
        audit_metrics_listen="10.0.0.5:9464",
        stt_metrics_listen="",
        status_metrics_urls="stt=http://stt:9465/metrics, budget=http://budget:9462/metrics",
    )
    assert settings.metrics_urls() == {
        "router": "http://127.0.0.1:9461/metrics",
        "audit": "http://10.0.0.5:9464/metrics",
        "stt": "http://stt:9465/metrics",
        "budget": "http://budget:9462/metrics",
    }


def test_the_status_page_names_each_problem() -> None:
    boxes = [
        admin_status._outbox("router", {"hoosh_events_outbox_entries": 3.0, "hoosh_events_healthy": 1.0}),
        admin_status._outbox("stt", {"hoosh_events_outbox_entries": 95.0, "hoosh_events_healthy": 0.0}),
        admin_status._outbox("budget", "connection refused"),
    ]
    assert [box.status for box in boxes] == ["backlog", "unhealthy", "unreachable"]
    assert admin_status._outbox("router", None).status == "not_configured"
    assert admin_status._outbox("router", {"hoosh_events_in_flight": 0.0}).status == "not_configured"  # no outbox
    assert admin_status._outbox("router", {"hoosh_events_outbox_entries": 0.0}).status == "ok"
    page = AdminStatus(
        status="ok",
        problems=[],
        redis=admin_status.RedisStatus(status="unreachable", latency_ms=None, error="timed out"),
        nats=admin_status.NatsStatus(status="unreachable", address="127.0.0.1:4222", error="refused"),
        audit=admin_status._audit("UNAVAILABLE: down", None),
        outbox=boxes,
        services=[admin_status.ServiceHealth(service="inference", status="NOT_SERVING")],
        checked_at_ms=0,
    )
    problems = admin_status._problems(page, {"audit": "http://127.0.0.1:9464/metrics"})
    assert problems == [
        "Redis does not answer: timed out",
        "NATS at 127.0.0.1:4222 does not answer: refused",
        "the audit service does not answer: UNAVAILABLE: down",
        "the audit's metrics could not be read (its lag is unknown)",
        "3 events wait in router's outbox for NATS",
        "stt's outbox is nearly full (95 events): it refuses new work",
        "budget's metrics could not be read (its outbox is unknown): connection refused",
        "inference is NOT_SERVING",
    ]


def test_the_nats_probe_reads_the_info_line_or_says_why_not() -> None:
    async def probe() -> list[admin_status.NatsStatus]:
        async def not_nats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(not_nats, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return [
                await admin_status._nats(StatusSettings(nats_url="nats://user:secret@127.0.0.1:4222")),
                await admin_status._nats(StatusSettings(nats_url=f"nats://127.0.0.1:{free_port()}")),
                await admin_status._nats(StatusSettings(nats_url=f"127.0.0.1:{port}")),
                await admin_status._nats(StatusSettings(nats_url="")),
            ]

    real, closed, other, unset = asyncio.run(probe())
    assert real.status == "ok" and real.jetstream is True and real.address == "127.0.0.1:4222"  # the real NATS
    assert "secret" not in real.model_dump_json()
    assert closed.status == "unreachable" and closed.error
    assert other.status == "unreachable" and "not NATS" in (other.error or "")
    assert unset.status == "not_configured"


# --------------------------------------------------------------------------- usage errors, before any edge


def cli(*args: str, cwd: Path | None = None, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
    """The installed `hoosh` in a child process: no config file, no key, no HOOSH_* but
    what the test gives."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HOOSH_")}
    env.update({"HOOSH_CLI_CONFIG": "/nonexistent/hoosh-cli.toml", "COLUMNS": "250", "LANG": "C.UTF-8", **extra})
    return subprocess.run(
        [str(HOOSH), *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def usage_error(done: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 and one line on stderr (never a traceback, never 'internal error')."""
    assert done.returncode == EXIT_USAGE, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("costs", "--since", "9999999d"), "--since"),  # before the year 1
        (("costs", "--since", "99999999999d"), "--since"),  # past what a timedelta holds
        (("--timeout", "nan", "models"), "--timeout"),
        (("models", "--timeout", "inf"), "--timeout"),
        (("models", "--timeout", "0"), "--timeout"),
        (("models", "--url", "http://[::1"), "bad edge URL"),
        (("models", "--url", "http://127.0.0.1:99999"), "bad edge URL"),
        (("models", "--url", "http://"), "bad edge URL"),
        (("hardware", "placement", "--params", "1e400"), "--params"),  # Infinity is not JSON
        (("hardware", "placement", "--params", "1e300T"), "--params"),
        (("chat", "--temperature", "nan", "hi"), "--temperature"),
        (("audit", "tail", "--interval", "-1"), "--interval"),
        (("pools", "create", "p", "--capacity", "1", "--cap-usd", "inf"), "--cap-usd"),
        (("up", "--state-dir", "/proc/nope"), "cannot use the state dir /proc/nope"),
        (("up", "--config", "/nonexistent/hoosh.yaml"), "--config"),
        (("up", "--port", "70000"), "--port"),
    ],
)
def test_bad_values_are_usage_errors_not_crashes(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    # Nothing listens at the URL: each is refused before a request is made (or `up`
    # starts anything).
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert says in usage_error(cli(*args, cwd=tmp_path, HOOSH_URL=nowhere, HOOSH_STATE_DIR=str(tmp_path / "state")))


def test_placement_takes_every_precision_the_edge_does() -> None:
    for quant in ("fp32", "fp16", "bf16", "fp8", "int8", "int4"):
        args = build_parser().parse_args(["hardware", "placement", "--params", "7B", "--quant", quant])
        assert placement_body(args)["quantization"] == quant
    assert QUANTIZATIONS == ("fp32", "fp16", "bf16", "fp8", "int8", "int4")


def test_argument_types_refuse_what_json_cannot_carry() -> None:
    for bad in ("1e400", "inf", "nan", "1e309"):
        with pytest.raises(argparse.ArgumentTypeError):
            parameters(bad)
    for bad in ("nan", "inf", "-inf", "0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            seconds(bad)
    assert seconds("2.5") == 2.5 and finite("-0.5") == -0.5
    for bad in ("9999999d", "99999999999d", "999999999999w"):
        with pytest.raises(argparse.ArgumentTypeError, match="before the year 1"):
            since(bad)


# --------------------------------------------------------------------------- what the edge sends is not trusted

# Markup rich would read, an OSC 8 hyperlink, a window title, colour, C1 CSI, BEL, DEL.
HOSTILE = (
    "[/x] [link=http://evil.example]click[/link] \x1b]8;;http://evil.example\x1b\\osc\x1b]8;;\x1b\\ "
    "\x1b]0;title\x07\x1b[31mred\x1b[0m \x9b2J c1 \x07bell\x7f \x9d52;c;cGFzdGU=\x07end"
)
SHOWN = "[/x] [link=http://evil.example]click[/link] osc red  c1 bell end"  # the same, made printable
CHAT_PIECES = ["Hi \x1b]0;pw", "ned\x07there\n", "\x1b", "[2J line 2\ttab\r\n", HOSTILE]  # a sequence split in two


def _controls(text: str) -> list[str]:
    """The control characters in ``text`` other than newline and tab."""
    return sorted({char for char in text if (ord(char) < 0x20 and char not in "\n\t") or 0x7F <= ord(char) <= 0x9F})


class HostileEdge(BaseHTTPRequestHandler):
    """An edge whose every answer carries HOSTILE where a name, an error or text goes."""

    GET: dict[str, Any] = {
        "/v1/models": {"data": [{"id": HOSTILE, "owned_by": HOSTILE, "created": 1}]},
        "/v1/admin/keys": {"data": [{"id": HOSTILE, "name": HOSTILE, "scope": "user", "pools": [HOSTILE]}]},
        "/v1/admin/keys/k": {"id": HOSTILE, "name": HOSTILE, "scope": "user", "expires_at": HOSTILE},
        "/v1/admin/pools": {"data": [{"name": HOSTILE, "parent": HOSTILE, "capacity": HOSTILE, "period": "none"}]},
        "/v1/admin/pools/p": {"name": HOSTILE, "capacity": 1, "cap_usd_micros": HOSTILE, "period_end_ms": HOSTILE},
        "/v1/health/providers": {
            "data": [{"name": HOSTILE, "type": HOSTILE, "state": HOSTILE, "last_error": HOSTILE, "last_error_at": 1}]
        },
        "/v1/costs": {
            "group_by": ["provider"],
            "start": HOSTILE,
            "end": HOSTILE,
            "data": [
                {"provider": HOSTILE, "requests": 1, "prompt_tokens": 2, "completion_tokens": 3, "cost_usd": HOSTILE}
            ],
            "total": {"requests": 1, "prompt_tokens": 2, "completion_tokens": 3, "cost_usd": HOSTILE},
        },
        "/v1/health/ready": {"status": "ok", "checks": {HOSTILE: HOSTILE}},
        "/v1/admin/status": {
            "services": [{"service": HOSTILE, "status": HOSTILE}],
            "problems": [HOSTILE],
            "redis": {"status": HOSTILE, "error": HOSTILE},
            "nats": {"status": HOSTILE, "error": HOSTILE},
            "audit": {"status": HOSTILE, "error": HOSTILE},
            "outbox": [{"service": HOSTILE, "status": HOSTILE, "oldest_age_seconds": HOSTILE}],
        },
        "/v1/hardware": {
            "hosts": [{"service": HOSTILE, "error": HOSTILE, "driver_version": HOSTILE, "gpus": [{"name": HOSTILE}]}]
        },
        "/v1/audit": {
            "entries": [
                {
                    "seq": 1,
                    "timestamp_ms": 1,
                    "subject": "hoosh." + HOSTILE,
                    "event_id": HOSTILE,
                    "mac": HOSTILE,
                    "payload": {"model": HOSTILE, "usage": {"prompt_tokens": HOSTILE}, "cost_usd_micros": HOSTILE},
                }
            ],
            "total": 1,
            "head_seq": HOSTILE,
            "chain_valid": False,
            "verify_error": HOSTILE,
        },
    }
    POST: dict[str, Any] = {
        "/v1/hardware/placement": {
            "weights_bytes": 1,
            "kv_cache_bytes": HOSTILE,
            "total_bytes": 2,
            "layers": HOSTILE,
            "shape_model": HOSTILE,
            "fits": [{"service": HOSTILE, "name": HOSTILE}],
            "unanswered": [{"service": HOSTILE, "instance": HOSTILE, "error": HOSTILE}],
            "cloud": [{"provider": HOSTILE, "instance": HOSTILE, "gpu": HOSTILE, "count": 1, "hourly_usd": HOSTILE}],
            "prices_as_of": HOSTILE,
        },
        "/v1/admin/reload": {
            "status": HOSTILE,
            "reason": HOSTILE,
            "services": [{"service": HOSTILE, "status": HOSTILE, "config_sha256": HOSTILE, "reason": HOSTILE}],
        },
        "/v1/admin/keys": {"key": HOSTILE, "record": {"id": HOSTILE, "name": HOSTILE}},
        "/v1/admin/pools/p/reset": {"name": HOSTILE, "capacity": 1},
    }

    def _answer(self, body: Any, status: int = 200, kind: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path in self.GET:
            self._answer(self.GET[path])
        else:
            self._answer({"error": {"message": HOSTILE, "type": "invalid_request_error", "code": HOSTILE}}, 404)

    def do_DELETE(self) -> None:
        self._answer({"name": HOSTILE})

    def do_PATCH(self) -> None:
        self._answer({"error": {"message": HOSTILE, "type": "invalid_request_error", "code": None}}, 400)

    def do_POST(self) -> None:
        form = self.rfile.read(int(self.headers.get("content-length") or 0))
        path = self.path.split("?")[0]
        if path == "/v1/chat/completions":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for piece in CHAT_PIECES:
                chunk = {"id": "c", "model": HOSTILE, "choices": [{"index": 0, "delta": {"content": piece}}]}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
        elif path == "/v1/audio/transcriptions" and b'name="response_format"\r\n\r\ntext' in form:
            self._answer(f"line one {HOSTILE}\nline two\n".encode(), kind="text/plain")
        elif path == "/v1/audio/transcriptions":
            self._answer({"text": f"line one {HOSTILE}\nline two"})
        elif path in self.POST:
            self._answer(self.POST[path])
        else:
            self._answer({"error": {"message": HOSTILE, "type": "invalid_request_error", "code": None}}, 400)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hostile_edge() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), HostileEdge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("models",), 0),
        (("keys", "list"), 0),
        (("keys", "get", "k"), 0),
        (("keys", "create", "--name", "n"), 0),
        (("pools", "list"), 0),
        (("pools", "get", "p"), 0),
        (("pools", "reset", "p"), 0),
        (("pools", "delete", "p"), 0),
        (("providers",), 0),
        (("costs",), 0),
        (("status",), 1),
        (("hardware",), 0),
        (("hardware", "placement", "--params", "7B"), 0),
        (("audit", "tail"), 0),
        (("audit", "show", "r"), 0),
        (("reload",), 1),
        (("chat", "hi"), 0),
        (("chat", "hi", "--json"), 0),
        (("audit", "tail", "--json"), 0),
        (("keys", "get", "nope"), 1),  # the error envelope's message
        (("pools", "resize", "p", "1"), 1),
    ],
)
def test_nothing_the_edge_sends_reaches_the_terminal_as_control(
    hostile_edge: str, args: tuple[str, ...], code: int
) -> None:
    done = cli(*args, HOOSH_URL=hostile_edge, HOOSH_ADMIN_KEY="sk-admin", COLUMNS="3000")  # no cell folded
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert _controls(done.stdout) == [] and _controls(done.stderr) == [], (done.stdout, done.stderr)
    if "--json" in args:
        json.loads(done.stdout)  # escaped, not dropped: the JSON is whole
        assert "\\u001b]0;title\\u0007" in done.stdout and "\\u009b2J" in done.stdout
    elif code == 0:
        assert "[link=http://evil.example]click[/link]" in done.stdout  # as sent: never read as markup
        if args[:2] == ("audit", "show"):  # the payload as JSON: its control characters escaped, visible
            assert "\\u001b]0;title\\u0007" in done.stdout
        else:
            assert "title" not in done.stdout and "cGFzdGU" not in done.stdout  # OSC strings dropped whole
    else:
        assert " ".join(SHOWN.split()) in " ".join((done.stdout + done.stderr).split())


def test_chat_streams_the_answer_without_its_escape_sequences(hostile_edge: str) -> None:
    done = cli("chat", "hi", HOOSH_URL=hostile_edge)
    assert done.returncode == 0, done.stderr
    # Newlines and tabs kept; the window title, the clear-screen split over two chunks
    # and the carriage return gone, not half-printed.
    assert done.stdout == f"Hi there\n line 2\ttab\n{SHOWN}\n"


def test_transcripts_keep_their_lines_but_lose_control(hostile_edge: str, tmp_path: Path) -> None:
    audio = tmp_path / "speech.wav"
    audio.write_bytes(b"RIFF....WAVE")
    for form in ("json", "text"):
        done = cli("transcribe", str(audio), "--format", form, HOOSH_URL=hostile_edge)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"line one {SHOWN}\nline two\n", form


def test_the_terminal_filter_drops_whole_sequences_and_holds_nothing_back() -> None:
    screen = TerminalFilter(multiline=True)
    assert screen.feed("plain text") == "plain text"  # written at once, not buffered
    assert screen.feed("a\x1b") == "a"
    assert screen.feed("[1;31") == ""  # still inside the CSI begun in the last piece
    assert screen.feed("mred\x1b]8;;http://x") == "red"
    assert screen.feed("\x1b\\link\x1b]8;;\x1b\\\x9b2Jz\x90dcs\x9c!") == "linkz!"
    assert screen.feed("\x1b]0;never ends\nnext line") == "\nnext line"  # an unterminated OSC stops at a newline
    assert screen.feed("\x1bcreset \x1b(Bcharset \x07\x08\x7f\x85ok\ttab\n") == "reset charset ok\ttab\n"
    assert clean("a\nb\tc\rd\x1b[2Je") == "a b c de"  # one line
    assert clean("a\nb\tc\r\n", multiline=True) == "a\nb\tc\n"
    assert clean("é 中文 🙂 [bold]") == "é 中文 🙂 [bold]"


def test_printers_never_read_markup_from_the_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    # A console that would read markup: what the printers hand it must be Text already.
    screen = io.StringIO()
    monkeypatch.setattr(output, "_console", lambda file: Console(file=screen, markup=True, width=3000))
    get, post = HostileEdge.GET, HostileEdge.POST
    keys.print_records("keys", get["/v1/admin/keys"]["data"])
    keys.print_record(get["/v1/admin/keys/k"])
    pools.print_pools("pools", get["/v1/admin/pools"]["data"])
    providers.print_providers(get["/v1/health/providers"]["data"])
    costs.print_costs(get["/v1/costs"])
    status.render({"status": HOSTILE, "problems": [HOSTILE], **get["/v1/admin/status"], "services": {HOSTILE: HOSTILE}})
    hardware.print_hardware(get["/v1/hardware"])
    shape = {"parameters": 7e9, "quantization": "fp16", "context_length": 1, "batch": 1}
    hardware.print_placement(post["/v1/hardware/placement"], shape)
    reload.print_reload(post["/v1/admin/reload"])
    output.console().print(audit._line(get["/v1/audit"]["entries"][0]))
    shown = screen.getvalue()
    assert _controls(shown) == []
    assert shown.count("[link=http://evil.example]click[/link]") >= 10
