"""The `hoosh` operator CLI against the running stack (conftest's session `hoosh`: every
service with mutual TLS, the real Redis and NATS), run as a user runs it: the
installed `hoosh` command in a child process, its environment holding only what the
test gives it (no config file, no state dir, no key unless given).

Each command's `--json` answer is parsed and checked against what the stack holds; its
human form is checked for the columns it promises. Usage errors, an unreachable edge
and refused keys end in one line on stderr and the documented exit status.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hoosh_cli.__main__ import build_parser
from hoosh_cli.stack import free_port
from hoosh_stt.wer import word_error_rate

from .conftest import LOCAL_MODEL, STT_MODEL, RunningStack, admin_headers

pytestmark = pytest.mark.slow  # the whole stack, the local model and Whisper

HOOSH = Path(sys.executable).with_name("hoosh")
REPLY = "Hello from the upstream stand-in."  # what bench.upstream answers
SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI's home and working directory: no ~/.config/hoosh, no .hoosh/admin.key."""
    return tmp_path_factory.mktemp("cli-home")


def environment(hoosh: RunningStack, home: Path, *, admin: bool = True, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "COLUMNS": "250",  # whole table rows in the captured output
        "HOOSH_URL": hoosh.base_url,
        "HOOSH_CLI_CONFIG": str(home / "absent.toml"),
    }
    if admin:
        env["HOOSH_ADMIN_KEY"] = hoosh.admin_key
    env.update(extra)
    return env


def run(
    hoosh: RunningStack,
    home: Path,
    *args: str,
    admin: bool = True,
    stdin: str | None = None,
    timeout: float = 120,
    **extra: str,
) -> subprocess.CompletedProcess[str]:
    assert HOOSH.is_file(), f"{HOOSH} is missing: the venv's console script"
    return subprocess.run(
        [str(HOOSH), *args],
        env=environment(hoosh, home, admin=admin, **extra),
        cwd=home,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def ok_text(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code`` and said why in exactly one line."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), done.stderr
    return lines[0]


def has_columns(text: str, *columns: str) -> bool:
    """A line of ``text`` names every column, in order (a table's header)."""
    for line in text.splitlines():
        at = 0
        for column in columns:
            found = re.search(rf"(?<![\w-]){re.escape(column)}(?![\w-])", line[at:])
            if found is None:
                break
            at += found.end()
        else:
            return True
    return False


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def stand_in_stats(hoosh: RunningStack) -> dict[str, Any]:
    root = hoosh.upstream_url.removesuffix("/v1")
    stats: dict[str, Any] = httpx.get(f"{root}/control/stats", timeout=10).json()
    return stats


def make_key(hoosh: RunningStack, home: Path, *options: str) -> tuple[str, str]:
    """(key, key id) of a new user key, made with the CLI."""
    created = ok_json(run(hoosh, home, "keys", "create", "--name", unique("cli"), *options, "--json"))
    return created["key"], created["record"]["id"]


# --------------------------------------------------------------------------- usage, reachability, auth


def _parsers(parser: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    paths = list(_parsers(build_parser()))
    names = {" ".join(path) for path in paths}
    expected = {
        "up",
        "status",
        "models",
        "chat",
        "transcribe",
        "keys create",
        "keys list",
        "keys revoke",
        "pools list",
        "pools create",
        "pools resize",
        "pools reset",
        "costs",
        "audit tail",
        "audit show",
        "audit verify",
        "providers",
        "hardware",
        "hardware placement",
        "reload",
    }
    assert expected <= names, expected - names
    for path in paths:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([*path, "--help"])
        assert exited.value.code == 0
        shown = capsys.readouterr().out
        assert shown.startswith(f"usage: hoosh {' '.join(path)}".rstrip()), shown[:200]
        if path not in (("up",), ("audit",)) and not any(p[: len(path)] == path and p != path for p in paths):
            assert "--json" in shown, path  # every command but `up` prints JSON on request


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("keys", "create"), "--name"),
        (("pools", "resize", "some-pool", "lots"), "capacity"),
        (("frobnicate",), "invalid choice"),
        (("costs", "--since", "last tuesday"), "--since"),
        (("hardware", "placement", "--params", "seven"), "--params"),
        (("chat",), "no message"),
        (("chat", "-f", "/nonexistent/message.txt"), "cannot read"),
        (("transcribe", "/nonexistent/speech.wav"), "cannot read"),
        (("audit", "tail", "-n", "0"), "1 to 10000"),
        (("models", "--url", "not-a-url"), "bad edge URL"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(hoosh: RunningStack, home: Path, args: tuple[str, ...], says: str) -> None:
    line = one_line_error(run(hoosh, home, *args), 2)
    assert says in line


def test_an_unreachable_edge_is_one_line_and_exit_3(hoosh: RunningStack, home: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (("models",), ("status",), ("keys", "list"), ("chat", "hi"), ("costs", "--json")):
        line = one_line_error(run(hoosh, home, *args, "--url", nowhere), 3)
        assert f"cannot reach the edge at {nowhere}" in line


def revoked_key(hoosh: RunningStack, home: Path) -> str:
    """A key the edge refuses (401) even in open mode, where an unknown key is anonymous."""
    key, key_id = make_key(hoosh, home)
    ok_json(run(hoosh, home, "keys", "revoke", key_id, "--json"))
    return key


def test_a_refused_or_missing_key_is_one_line_and_exit_4(hoosh: RunningStack, home: Path) -> None:
    line = one_line_error(run(hoosh, home, "models", "--api-key", revoked_key(hoosh, home)), 4)
    assert "HTTP 401" in line and "[request " in line
    line = one_line_error(run(hoosh, home, "keys", "list", admin=False), 4)
    assert "no admin key" in line
    key, _ = make_key(hoosh, home)
    line = one_line_error(run(hoosh, home, "pools", "list", "--admin-key", key), 4)
    assert "HTTP 403" in line
    assert key not in line


def test_the_config_file_gives_the_edge_and_the_key(hoosh: RunningStack, home: Path) -> None:
    key, _ = make_key(hoosh, home, "--model", "gpt-4o-mini")
    config = home / "hoosh-config.toml"
    config.write_text(f'url = "{hoosh.base_url}"\napi_key = "{key}"\n')
    config.chmod(0o600)
    # No --url and no HOOSH_URL: the edge and the key both come from the file.
    done = run(hoosh, home, "models", "--json", HOOSH_CLI_CONFIG=str(config), HOOSH_URL="")
    assert [card["id"] for card in ok_json(done)["data"]] == ["gpt-4o-mini"]  # the key's one model
    assert done.stderr == ""
    # $HOOSH_API_KEY comes before the file, and --api-key before both.
    other, _ = make_key(hoosh, home, "--model", LOCAL_MODEL)
    done = run(hoosh, home, "models", "--json", HOOSH_CLI_CONFIG=str(config), HOOSH_URL="", HOOSH_API_KEY=other)
    assert [card["id"] for card in ok_json(done)["data"]] == [LOCAL_MODEL]
    done = run(hoosh, home, "models", "--api-key", key, "--json", HOOSH_CLI_CONFIG=str(config), HOOSH_API_KEY=other)
    assert [card["id"] for card in ok_json(done)["data"]] == ["gpt-4o-mini"]
    config.write_text('url = "http://x"\ncolour = "blue"\n')
    assert "unknown fields colour" in one_line_error(run(hoosh, home, "models", HOOSH_CLI_CONFIG=str(config)), 2)


# --------------------------------------------------------------------------- status, models, providers


def test_status_shows_every_service_redis_nats_audit_and_outboxes(hoosh: RunningStack, home: Path) -> None:
    report = ok_json(run(hoosh, home, "status", "--json"))
    assert report["status"] == "ok", report["problems"]
    assert report["problems"] == []
    services = report["services"]
    for name in ("edge", "router", "budget", "audit", "stt", "inference"):
        assert services[name] == "SERVING", services
    assert report["redis"]["status"] == "ok" and report["redis"]["latency_ms"] >= 0
    nats = report["nats"]
    assert nats["status"] == "ok" and nats["jetstream"] is True and nats["version"]
    assert nats["address"] == "127.0.0.1:4222"
    audit = report["audit"]
    assert audit["status"] == "ok" and audit["chain_valid"] is True
    assert isinstance(audit["head_seq"], int) and isinstance(audit["lag_events"], int) and audit["lag_events"] >= 0
    boxes = {box["service"]: box for box in report["outbox"]}
    assert set(boxes) == {"router", "stt", "budget"}
    for box in boxes.values():
        assert box["status"] == "ok" and box["entries"] == 0 and box["max_entries"] > 0, box
    [worker] = report["workers"]  # the session stack's one local worker, as the router polls it
    assert worker["status"] == "SERVING" and worker["providers"] and worker["address"], worker

    text = ok_text(run(hoosh, home, "status"))
    assert has_columns(text, "worker", "state", "queue", "serves", "reason")
    assert worker["address"] in text
    assert text.startswith("hoosh is ok")
    assert has_columns(text, "service", "health")
    assert has_columns(text, "part", "state", "detail")
    assert has_columns(text, "service", "state", "entries", "bytes", "oldest")
    for name in ("router", "budget", "audit", "stt", "inference", "redis", "nats"):
        assert re.search(rf"^\s*{name}\s", text, re.MULTILINE), name


def test_the_status_page_is_admin_only(hoosh: RunningStack) -> None:
    assert httpx.get(f"{hoosh.base_url}/v1/admin/status", timeout=10).status_code == 403  # open mode: anonymous
    page = httpx.get(f"{hoosh.base_url}/v1/admin/status", headers=admin_headers(hoosh), timeout=10)
    assert page.status_code == 200 and page.json()["redis"]["status"] == "ok"


def test_models_lists_what_the_key_may_use(hoosh: RunningStack, home: Path) -> None:
    ids = {card["id"] for card in ok_json(run(hoosh, home, "models", "--json"))["data"]}
    assert {LOCAL_MODEL, STT_MODEL, "gpt-4o-mini"} <= ids
    text = ok_text(run(hoosh, home, "models"))
    assert has_columns(text, "id", "owned by", "created (UTC)")
    assert LOCAL_MODEL in text and STT_MODEL in text


def test_providers_show_breakers_and_latency(hoosh: RunningStack, home: Path) -> None:
    providers = {item["name"]: item for item in ok_json(run(hoosh, home, "providers", "--json"))["data"]}
    assert {"local", "upstream", "anthropic", "gemini", "flaky", "down"} <= set(providers)
    assert all(item["state"] in ("closed", "open", "half_open") for item in providers.values())
    assert providers["upstream"]["type"] == "openai" and providers["local"]["type"] == "local"
    text = ok_text(run(hoosh, home, "providers"))
    assert has_columns(text, "provider", "type", "state", "failures", "latency ms", "rpm", "tpm", "last error")
    assert re.search(r"^\s*upstream\s+openai\s", text, re.MULTILINE)


# --------------------------------------------------------------------------- chat


def test_chat_answers_from_an_argument_a_file_and_stdin(hoosh: RunningStack, home: Path, tmp_path: Path) -> None:
    model = unique("gpt-cli")
    reply = ok_json(run(hoosh, home, "chat", "-m", model, "--json", "Say", "hello"))
    assert reply["content"] == REPLY and reply["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == 7 and reply["id"].startswith("chatcmpl-")
    sent = stand_in_stats(hoosh)["last_body"]
    assert sent["model"] == model and sent["messages"] == [{"role": "user", "content": "Say hello"}]

    message = tmp_path / "message.txt"
    message.write_text("A question\nover two lines.\n")
    assert ok_text(run(hoosh, home, "chat", "-m", model, "-f", str(message), "--system", "Be brief.")) == REPLY + "\n"
    sent = stand_in_stats(hoosh)["last_body"]
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "A question\nover two lines.\n"},
    ]

    done = run(hoosh, home, "chat", "-m", model, "--max-tokens", "3", stdin="From stdin.")
    assert ok_text(done) == "Hello from the\n"
    sent = stand_in_stats(hoosh)["last_body"]
    assert sent["messages"] == [{"role": "user", "content": "From stdin."}] and sent["max_tokens"] == 3


def test_chat_refusals_and_broken_streams_are_one_line(hoosh: RunningStack, home: Path) -> None:
    line = one_line_error(run(hoosh, home, "chat", "-m", "no-such-model-anywhere", "hi"), 1)
    assert "HTTP 404 model_not_found" in line
    cut = run(hoosh, home, "chat", "-m", "gpt-cut-stream", "hi")
    assert cut.stdout == "Hello from\n"  # what came before the cut, then a clean line
    assert "the stream failed" in one_line_error(cut, 1)


@dataclass
class Reader:
    """A child's stdout read as it comes: (monotonic time, bytes) per read."""

    process: subprocess.Popen[bytes]
    reads: list[tuple[float, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            self.reads.append((time.monotonic(), chunk))

    def text(self) -> str:
        return b"".join(chunk for _, chunk in list(self.reads)).decode()

    def wait_for(self, text: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while text not in self.text():
            assert time.monotonic() < deadline, f"never printed {text!r}: {self.text()!r}"
            assert self.process.poll() is None, f"exited {self.process.returncode} before printing {text!r}"
            time.sleep(0.02)


@contextmanager
def streaming(hoosh: RunningStack, home: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Reader]]:
    """The CLI as a child whose stdout is read as it comes; killed (if still running),
    its pipes closed and waited for on the way out."""
    with subprocess.Popen(
        [str(HOOSH), *args],
        env=environment(hoosh, home),
        cwd=home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        reader = Reader(process)
        try:
            yield process, reader
        finally:
            process.kill()
            reader.thread.join(10)


def test_chat_prints_tokens_while_the_stream_is_still_open(hoosh: RunningStack, home: Path) -> None:
    # *stall*: the stand-in sends every piece, then holds the stream open (pings, no end):
    # the whole answer must be on the terminal while the stream has not ended.
    with streaming(hoosh, home, "chat", "-m", "gpt-stall", "hi") as (process, reader):
        reader.wait_for(REPLY)
        assert process.poll() is None  # still streaming: nothing waited for the end
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
        reader.thread.join(10)
        assert process.stderr is not None
        assert process.stderr.read().decode() == "hoosh: interrupted\n"
    assert reader.text() == REPLY + "\n"


def test_chat_streams_the_local_model_token_by_token(hoosh: RunningStack, home: Path) -> None:
    args = ("chat", "-m", LOCAL_MODEL, "--max-tokens", "40", "Count from one to twenty.")
    with streaming(hoosh, home, *args) as (process, reader):
        code = process.wait(180)
        reader.thread.join(10)
        assert process.stderr is not None
        assert code == 0, process.stderr.read()
    text = reader.text()
    assert text.endswith("\n") and text.strip()
    # The answer came in several writes, the first well before the last (a CLI that
    # waited for the end would write it all at once).
    assert len(reader.reads) >= 2, reader.reads
    (first_at, first), (last_at, _) = reader.reads[0], reader.reads[-1]
    assert first_at < last_at
    assert text.startswith(first.decode()) and len(first) < len(text.encode())


# --------------------------------------------------------------------------- transcribe


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    program = shutil.which("espeak-ng")
    assert program is not None, "espeak-ng is missing: run scripts/install.sh (it installs it with apt-get)"
    path = tmp_path_factory.mktemp("speech") / "sentence.wav"
    subprocess.run([program, "-w", str(path), SENTENCE], check=True, capture_output=True)
    return path


def test_transcribe_prints_the_text_with_progress(hoosh: RunningStack, home: Path, speech: Path) -> None:
    # As on a terminal (rich draws its live progress), stderr captured.
    done = run(hoosh, home, "transcribe", str(speech), TTY_COMPATIBLE="1", TTY_INTERACTIVE="1")
    assert done.returncode == 0, done.stderr
    assert word_error_rate(SENTENCE, done.stdout) <= 0.25, done.stdout
    assert done.stdout.count("\n") == 1
    assert f"uploading {speech.name}" in done.stderr
    assert "transcribing on the server" in done.stderr

    answer = ok_json(run(hoosh, home, "transcribe", str(speech), "--json", "--format", "verbose_json"))
    assert word_error_rate(SENTENCE, answer["text"]) <= 0.25 and answer["duration"] > 2
    srt = ok_text(run(hoosh, home, "transcribe", str(speech), "--format", "srt"))
    assert srt.startswith("1\n00:00:00,")


# --------------------------------------------------------------------------- keys, pools, costs


def test_pools_create_list_resize_reset(hoosh: RunningStack, home: Path) -> None:
    name = unique("clipool")
    text = ok_text(run(hoosh, home, "pools", "create", name, "--capacity", "5000", "--period", "daily"))
    assert has_columns(
        text, "name", "parent", "capacity", "used", "reserved", "available", "period", "timezone", "cap usd"
    )
    assert re.search(rf"^\s*{name}\s+-\s+5,000\s+0\s+0\s+5,000\s+daily\s+UTC\s", text, re.MULTILINE), text
    listed = {pool["name"]: pool for pool in ok_json(run(hoosh, home, "pools", "list", "--json"))["data"]}
    assert listed[name]["capacity"] == 5000 and listed[name]["period"] == "daily"
    assert ok_json(run(hoosh, home, "pools", "resize", name, "7000", "--json"))["capacity"] == 7000
    assert re.search(rf"^\s*{name}\s+-\s+7,000\s", ok_text(run(hoosh, home, "pools", "list")), re.MULTILINE)

    key, _ = make_key(hoosh, home, "--pool", name)
    ok_text(run(hoosh, home, "chat", "-m", "gpt-4o-mini", "hi", "--api-key", key))
    deadline = time.monotonic() + 30
    while ok_json(run(hoosh, home, "pools", "get", name, "--json"))["used"] == 0:  # committed just after the answer
        assert time.monotonic() < deadline, "the chat was never charged"
        time.sleep(0.2)
    reset = ok_json(run(hoosh, home, "pools", "reset", name, "--json"))
    assert reset["used"] == 0 and reset["capacity"] == 7000
    assert "HTTP 404" in one_line_error(run(hoosh, home, "pools", "resize", unique("nopool"), "10"), 1)


def test_keys_create_list_revoke(hoosh: RunningStack, home: Path) -> None:
    name = unique("clikey")
    text = ok_text(run(hoosh, home, "keys", "create", "--name", name, "--model", "gpt-*", "--rpm", "30"))
    key = re.search(r"^(sk-hoosh-\S+)$", text, re.MULTILINE)
    assert key is not None, text  # the key, on a line of its own, shown once
    key_id = re.search(r"created key (key_\S+)", text)
    assert key_id is not None
    assert ok_text(run(hoosh, home, "chat", "-m", "gpt-4o-mini", "hi", "--api-key", key.group(1))) == REPLY + "\n"

    records = {record["id"]: record for record in ok_json(run(hoosh, home, "keys", "list", "--json"))["data"]}
    assert records[key_id.group(1)]["name"] == name and records[key_id.group(1)]["rpm"] == 30
    listing = ok_text(run(hoosh, home, "keys", "list"))
    assert has_columns(listing, "id", "name", "scope", "team", "user", "pools", "models", "rpm", "tpm", "status")
    assert re.search(rf"^\s*{key_id.group(1)}\s+{name}\s+user\s.*\sgpt-\*\s+30\s.*\sactive\s*$", listing, re.MULTILINE)
    assert key.group(1) not in listing  # never the key itself

    revoked = ok_json(run(hoosh, home, "keys", "revoke", key_id.group(1), "--json"))
    assert revoked["revoked_at"] > 0
    assert re.search(r"status\s+revoked", ok_text(run(hoosh, home, "keys", "get", key_id.group(1))))
    refused = run(hoosh, home, "chat", "-m", "gpt-4o-mini", "hi", "--api-key", key.group(1))
    assert "HTTP 401" in one_line_error(refused, 4)


def test_costs_group_what_was_charged(hoosh: RunningStack, home: Path) -> None:
    pool = unique("clicost")
    ok_json(run(hoosh, home, "pools", "create", pool, "--capacity", "100000", "--json"))
    key, key_id = make_key(hoosh, home, "--pool", pool)
    usages = [
        ok_json(run(hoosh, home, "chat", "-m", "gpt-4o-mini", "--json", "hi", "--api-key", key))["usage"]
        for _ in range(2)
    ]
    args = ("costs", "--since", "1d", "--group-by", "pool,model", "--pool", pool)
    deadline = time.monotonic() + 30
    while True:  # the commit lands just after the answer
        report = ok_json(run(hoosh, home, *args, "--json"))
        if report["total"]["requests"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert report["group_by"] == ["model", "pool"]
    assert [(line["pool"], line["model"], line["requests"]) for line in report["data"]] == [(pool, "gpt-4o-mini", 2)]
    line = report["data"][0]
    assert line["prompt_tokens"] == sum(usage["prompt_tokens"] for usage in usages)
    assert line["completion_tokens"] == sum(usage["completion_tokens"] for usage in usages)
    assert line["cost_usd_micros"] == sum(usage["cost_usd_micros"] for usage in usages) > 0
    # The key sees its own charges without the admin key.
    mine = ok_json(run(hoosh, home, "costs", "--json", "--group-by", "key_id", "--api-key", key, admin=False))
    assert [(line["key_id"], line["requests"]) for line in mine["data"]] == [(key_id, 2)]

    text = ok_text(run(hoosh, home, *args))
    assert has_columns(text, "model", "pool", "requests", "prompt tokens", "completion tokens", "cost usd")
    assert re.search(rf"^\s*gpt-4o-mini\s+{pool}\s+2\s", text, re.MULTILINE), text
    assert re.search(rf"^\s*total\s.*\s{line['cost_usd']}\s*$", text, re.MULTILINE), text


# --------------------------------------------------------------------------- audit


def test_audit_tail_show_and_follow(hoosh: RunningStack, home: Path) -> None:
    key, key_id = make_key(hoosh, home)
    first = httpx.post(
        f"{hoosh.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    request_id = first.headers["x-request-id"]
    deadline = time.monotonic() + 30
    while (shown := run(hoosh, home, "audit", "show", request_id, "--json")).returncode != 0:
        assert "no audit entry" in one_line_error(shown, 1)
        assert time.monotonic() < deadline, "the audit never recorded the request"
        time.sleep(0.2)
    page = json.loads(shown.stdout)
    assert [entry["event_id"] for entry in page["entries"]] == [request_id]
    entry = page["entries"][0]
    assert entry["subject"].endswith(".inference.completed") and entry["payload"]["key_id"] == key_id
    assert page["chain_valid"] is True

    text = ok_text(run(hoosh, home, "audit", "show", request_id))
    assert re.search(rf"request\s+{request_id}", text) and '"model": "gpt-4o-mini"' in text

    tail = ok_json(run(hoosh, home, "audit", "tail", "--key-id", key_id, "-n", "5", "--json"))
    assert [entry["event_id"] for entry in tail["entries"]] == [request_id]
    text = ok_text(run(hoosh, home, "audit", "tail", "--key-id", key_id))
    assert has_columns(text, "seq", "time (UTC)", "event", "request", "key", "pool", "model", "provider", "tokens")
    assert re.search(rf"\sinference\.completed\s+{request_id}\s+{key_id}\s+default\s+gpt-4o-mini\s", text), text

    # --follow: one JSON line per new entry, as it is written; Ctrl-C ends it (130).
    args = ("audit", "tail", "--follow", "--json", "--interval", "0.2", "--key-id", key_id)
    with streaming(hoosh, home, *args) as (process, reader):
        reader.wait_for(request_id)  # the existing entry first
        second = httpx.post(
            f"{hoosh.base_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "again"}]},
            timeout=30,
        )
        reader.wait_for(second.headers["x-request-id"])
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
        reader.thread.join(10)
    followed = [json.loads(line) for line in reader.text().splitlines()]
    assert [entry["event_id"] for entry in followed] == [request_id, second.headers["x-request-id"]]


def test_audit_verify_checks_the_live_log_offline(hoosh: RunningStack, home: Path) -> None:
    config = hoosh.stack_config
    assert config is not None
    done = run(
        hoosh,
        home,
        "audit",
        "verify",
        str(hoosh.audit_file.parent),
        HOOSH_AUDIT_HMAC_KEY=hoosh.audit_key,
        HOOSH_REDIS_URL=config.redis_url,
        HOOSH_NATS_STREAM=config.nats_stream,
        HOOSH_AUDIT_CONSUMER=config.audit_consumer,
        HOOSH_AUDIT_CHECKPOINT_PREFIX=config.extra_env["HOOSH_AUDIT_CHECKPOINT_PREFIX"],
    )
    report = ok_json(done)
    assert report["valid"] is True and report["checkpoint_checked"] is True and report["entries"] > 0
    wrong = run(
        hoosh, home, "audit", "verify", str(hoosh.audit_file.parent), "--no-checkpoint", HOOSH_AUDIT_HMAC_KEY="0" * 64
    )
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["valid"] is False


# --------------------------------------------------------------------------- hardware, placement, reload
# GET /v1/hardware, POST /v1/hardware/placement and POST /v1/admin/reload, as their
# contracts say (issue 14, items 2-4).


def test_hardware_lists_each_worker_host(hoosh: RunningStack, home: Path) -> None:
    hosts = ok_json(run(hoosh, home, "hardware", "--json"))["hosts"]
    services = [host["service"] for host in hosts]
    assert services == ["edge", "stt", "local-inference"], services
    for host in hosts:
        assert host["error"] is None, host
        assert host["gpus"] == []  # this machine has no GPU: a clear, normal answer
        assert host["cpu_count"] >= 1 and host["memory_total_bytes"] >= host["memory_available_bytes"] > 0
        assert isinstance(host["container"], bool) and isinstance(host["kubernetes"], bool)
    text = ok_text(run(hoosh, home, "hardware"))
    assert has_columns(text, "service", "instance", "cpus", "memory", "available", "gpus", "driver", "cuda")
    assert "no GPU on any host" in text


def test_placement_answers_the_usual_formulas(hoosh: RunningStack, home: Path) -> None:
    shape = ("--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--context", "8192", "--batch", "1")
    answer = ok_json(run(hoosh, home, "hardware", "placement", "--params", "7e9", "--quant", "fp16", *shape, "--json"))
    assert answer["weights_bytes"] == 7_000_000_000 * 2
    assert answer["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 8192 * 1 * 2
    assert answer["total_bytes"] == answer["weights_bytes"] + answer["kv_cache_bytes"] + answer["overhead_bytes"]
    assert answer["fits"] == []  # no local GPU here
    assert answer["cloud"] and all(offer["hourly_usd"] > 0 and offer["count"] >= 1 for offer in answer["cloud"])
    int4 = ok_json(run(hoosh, home, "hardware", "placement", "--params", "7B", "--quant", "int4", *shape, "--json"))
    assert int4["weights_bytes"] == 7_000_000_000 // 2

    text = ok_text(run(hoosh, home, "hardware", "placement", "--params", "7e9", "--quant", "fp16", *shape))
    assert "7B parameters at fp16, context 8192, batch 1: weights 13.0 GiB + KV cache 1.0 GiB + overhead" in text
    assert "it fits no local GPU" in text
    assert has_columns(text, "provider", "instance", "gpu", "count", "usd per hour")


def test_reload_applies_a_good_file_and_refuses_a_bad_one(hoosh: RunningStack, home: Path) -> None:
    config = hoosh.stack_config
    assert config is not None and config.config_file is not None
    answer = ok_json(run(hoosh, home, "reload", "--json"))
    assert answer["status"] == "ok" and answer["services"]
    assert all(item["status"] in ("reloaded", "unchanged") for item in answer["services"]), answer
    text = ok_text(run(hoosh, home, "reload"))
    assert text.startswith("reload: ok") and has_columns(text, "service", "instance", "status", "config sha256")

    original = config.config_file.read_text()
    try:
        config.config_file.write_text(original + "\nproviders: [this is: not, valid\n")
        refused = run(hoosh, home, "reload", "--json")
        assert refused.returncode == 1, refused.stderr
        answer = json.loads(refused.stdout)
        assert answer["status"] == "refused" and answer["reason"]
        human = run(hoosh, home, "reload")
        assert human.returncode == 1 and human.stdout.startswith("reload: refused")
    finally:
        config.config_file.write_text(original)
    # The running config stayed: the providers still answer.
    assert ok_text(run(hoosh, home, "chat", "-m", "gpt-4o-mini", "hi")) == REPLY + "\n"


# --------------------------------------------------------------------------- hoosh up: a hangup stops everything


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> dict[tuple[int, str], str]:
    """Every process below ``root``: (pid, start time) -> its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: dict[tuple[int, str], str] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            fields = _stat(pid)
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if fields is not None:
                found[(pid, fields[19])] = command.strip()
                todo.append(pid)
    return found


def _alive(pid: int, started: str) -> bool:
    """The same process (not a later one with its pid) still runs (a zombie does not)."""
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


@pytest.mark.parametrize("when", ["starting", "running"])
def test_hoosh_up_stops_every_child_on_a_hangup(tmp_path: Path, when: str) -> None:
    # Its own Redis and NATS (nothing listens at these URLs, so `hoosh up` starts them),
    # free ports for every service: nothing shared with the session's stack.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "HOOSH_CLI_CONFIG": str(tmp_path / "absent.toml"),
        "HOOSH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "HOOSH_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
    }
    command = [str(HOOSH), "up", "--port", str(free_port()), "--free-ports", "--state-dir", str(tmp_path / "state")]
    # Its terminal a pseudo-terminal the test can hang up; its own process group, as a
    # shell's job is (the shell passes a hangup to the whole group).
    terminal, its_end = os.openpty()
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdin=its_end, stdout=its_end, stderr=its_end, start_new_session=True
    )
    os.close(its_end)
    shown = b""
    started: dict[tuple[int, str], str] = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"hoosh up exited {process.returncode}: {shown.decode(errors='replace')}"
            assert time.monotonic() < deadline, f"hoosh up never got there: {shown.decode(errors='replace')}"
            if select.select([terminal], [], [], 0.2)[0]:
                shown += os.read(terminal, 65536)
            started = _descendants(process.pid)
            commands = " ".join(started.values())
            if when == "starting" and "hoosh_budget" in commands:
                break  # hung up while the other services are still starting
            if when == "running" and b"hoosh is up" in shown:
                break
        commands = " ".join(started.values())
        for server in ("valkey", "nats-server", "hoosh_budget"):
            assert server in commands, started
        if when == "running":
            for service in ("hoosh_router", "hoosh_audit", "hoosh_edge"):
                assert service in commands, started

        os.close(terminal)  # the terminal goes away: writing to it fails from now on ...
        terminal = -1
        os.killpg(process.pid, signal.SIGHUP)  # ... and the job is hung up
        code = process.wait(120)
        left = {key: line for key, line in started.items() if _alive(*key)}
        assert left == {}, f"outlived hoosh up: {left}"
        assert code == 0
    finally:
        if terminal >= 0:
            os.close(terminal)
        if process.poll() is None:
            process.kill()
            process.wait(30)
        for pid, start in started:  # what this test started, should any of it be left
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)
