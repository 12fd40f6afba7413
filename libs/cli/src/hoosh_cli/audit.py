"""`hoosh audit ...`: the audit log, through the edge and offline.

``hoosh audit tail`` prints the newest entries (GET /v1/audit, filtered; ``--follow``
keeps printing new ones) and ``hoosh audit show REQUEST_ID`` every entry of one request
with its payload. A user key sees its own entries; the admin key sees all.

``hoosh audit verify [DIR]`` checks a log from its segment files, its key(s) and its
last checkpoint alone (no running service needed) and names the first bad entry or
the missing range (its report is JSON; exit 0 valid, 1 not, 2 cannot run);
``hoosh audit checkpoint`` prints the stored checkpoint, to keep a copy somewhere the
log's host cannot write. Both come from the ``hoosh-audit`` package (installed beside
this one by ``make install``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TypeGuard

from rich.text import Text

from . import output
from .client import Context, Edge
from .errors import ServerError
from .parser import command, seconds
from .terminal import clean

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir)


def _missing_package() -> int:
    print("hoosh audit needs the hoosh-audit package: pip install -e services/audit", file=sys.stderr)
    return 2


def verify(args: argparse.Namespace) -> int:
    try:
        from hoosh_audit.cli import run_verify
    except ImportError:
        return _missing_package()
    state_dir = _state_dir(args)
    return run_verify(args, default_dir=state_dir / "audit", fallback_key_file=state_dir / "audit.key")


def checkpoint(args: argparse.Namespace) -> int:
    try:
        from hoosh_audit.checkpoint import read_checkpoint_sync
        from hoosh_audit.cli import checkpoint_location
        from hoosh_audit.errors import CheckpointError
        from redis.exceptions import RedisError
    except ImportError:
        return _missing_package()
    url, key = checkpoint_location(args.redis_url, args.checkpoint_key)
    try:
        found = read_checkpoint_sync(url, key)
    except (RedisError, OSError, CheckpointError) as exc:
        print(clean(f"hoosh audit checkpoint: cannot read {key} from {url}: {exc}"), file=sys.stderr)
        return 2
    if found is None:
        print(f"hoosh audit checkpoint: no checkpoint at {key} in {url}", file=sys.stderr)
        return 1
    out: dict[str, Any] = found.to_dict()
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


# --------------------------------------------------------------------------- through the edge

TAIL_COLUMNS = ("seq", "time (UTC)", "event", "request", "key", "pool", "model", "provider", "tokens", "cost usd")
FILTERS = ("kind", "model", "pool", "provider", "outcome", "key_id")
PAGE = 100
MAX_LINES = 10_000


def _event(subject: str) -> str:
    """The subject without its deployment prefix: inference.completed, admin.key.created."""
    _, _, rest = subject.partition(".")
    return rest or subject


def _count(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tokens(payload: dict[str, Any]) -> Text:
    usage = payload.get("usage")
    if isinstance(usage, dict) and usage:
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        if _count(prompt) and _count(completion):
            return Text(f"{int(prompt)}+{int(completion)}")
        return output.text(f"{prompt}+{completion}")
    return Text("-")


def _cost(payload: dict[str, Any]) -> Text:
    micros = payload.get("cost_usd_micros")
    return Text(f"{int(micros) / 1_000_000:.6f}") if _count(micros) else output.text(micros)


def entry_row(entry: dict[str, Any]) -> list[Text]:
    found = entry.get("payload")
    payload: dict[str, Any] = found if isinstance(found, dict) else {}
    event = _event(str(entry.get("subject", "")))
    return [
        output.text(entry.get("seq")),
        output.when_ms(entry.get("timestamp_ms")),
        output.state("failed") if event.endswith(".failed") else output.text(event),
        output.text(entry.get("event_id")),
        output.text(payload.get("key_id") or payload.get("actor_key_id")),
        output.text(payload.get("pool")),
        output.text(payload.get("model")),
        output.text(payload.get("provider")),
        _tokens(payload),
        _cost(payload),
    ]


def _lines(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LINES:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 to {MAX_LINES} entries")
    return value


def _query(args: argparse.Namespace, limit: int) -> dict[str, Any]:
    query: dict[str, Any] = {"limit": limit}
    for name in FILTERS:
        if getattr(args, name, None):
            query[name] = getattr(args, name)
    return query


def _newer(edge: Edge, args: argparse.Namespace, last_seq: int, since_ms: int) -> list[dict[str, Any]]:
    """Entries after ``last_seq`` (appended at or after ``since_ms``), oldest first: page
    back until a seen entry or the end, so a burst between polls is printed whole."""
    found: list[dict[str, Any]] = []
    query = _query(args, PAGE)
    if since_ms:
        query["since_ms"] = since_ms
    while True:
        page = edge.get("/v1/audit", params=query)
        entries = page.get("entries", [])
        fresh = [entry for entry in entries if int(entry["seq"]) > last_seq]
        found = fresh + found
        if len(fresh) < len(entries) or not page.get("next_cursor"):
            return found
        query["cursor"] = page["next_cursor"]


def _line(entry: dict[str, Any]) -> Text:
    """One entry on one line (--follow): the fixed fields aligned, the rest as name=value."""
    seq, moment, kind, request, key, pool, model, provider, tokens, cost = entry_row(entry)
    line = Text(f"{seq.plain:>7}  {moment.plain}  ")
    kind.pad_right(max(0, 22 - len(kind)))
    line.append_text(kind)
    line.append(f"  {request.plain}")
    for name, value in (("key", key), ("pool", pool), ("model", model), ("provider", provider)):
        if value.plain != "-":
            line.append(f"  {name}={value.plain}")
    if tokens.plain != "-":
        line.append(f"  tokens={tokens.plain}  usd={cost.plain}")
    return line


def tail(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(fallback_admin=True) as edge:
        page = edge.get("/v1/audit", params=_query(args, args.lines))
        entries: list[dict[str, Any]] = page.get("entries", [])
        if ctx.json and not args.follow:
            output.emit_json(page)
        elif ctx.json:
            for entry in entries:
                output.emit_json_line(entry)
        else:
            grid = output.table(
                f"audit log: the newest {len(entries)} of {page.get('total', 0)} matching entries; "
                f"head {page.get('head_seq')}, chain {'verifies' if page.get('chain_valid') else 'DOES NOT verify'}",
                *TAIL_COLUMNS,
                right=("seq", "tokens", "cost usd"),
                whole=("seq", "time (UTC)", "event", "request"),
            )
            for entry in entries:
                grid.add_row(*entry_row(entry))
            output.console().print(grid)
            if not page.get("chain_valid") and page.get("verify_error"):
                output.err_console().print(output.text(f"chain: {page['verify_error']}", style="red"))
        if not args.follow:
            return 0
        last_seq = max((int(entry["seq"]) for entry in entries), default=int(page.get("head_seq") or 0))
        since_ms = max((int(entry["timestamp_ms"]) for entry in entries), default=0)
        out = output.console()
        while True:
            time.sleep(args.interval)
            for entry in _newer(edge, args, last_seq, since_ms):
                last_seq = max(last_seq, int(entry["seq"]))
                since_ms = max(since_ms, int(entry["timestamp_ms"]))
                if ctx.json:
                    output.emit_json_line(entry)
                else:
                    out.print(_line(entry), soft_wrap=True)


def show(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(fallback_admin=True) as edge:
        page = edge.get("/v1/audit", params={"request_id": args.request_id, "limit": PAGE})
    entries: list[dict[str, Any]] = page.get("entries", [])
    if not entries:
        raise ServerError(f"no audit entry for request {args.request_id} (not yet written, or not this key's)")
    if ctx.json:
        output.emit_json(page)
        return 0
    out = output.console()
    for entry in entries:
        rows = [
            ("seq", entry.get("seq")),
            ("time (UTC)", output.when_ms(entry.get("timestamp_ms"))),
            ("event", _event(str(entry.get("subject", "")))),
            ("subject", entry.get("subject")),
            ("request", entry.get("event_id")),
            ("stream seq", entry.get("stream_seq")),
            ("segment", entry.get("segment")),
            ("signing key", entry.get("signing_key_id")),
            ("mac", entry.get("mac")),
            ("prev mac", entry.get("prev_mac")),
        ]
        out.print(output.fields_table(f"audit entry {entry.get('seq')}", rows))
        out.print(output.lines(output.dumps(entry.get("payload"), indent=2)))
    chain = "verifies" if page.get("chain_valid") else f"DOES NOT verify: {page.get('verify_error') or '?'}"
    out.print(output.state("valid" if page.get("chain_valid") else "invalid"), output.text(f"chain {chain}"))
    return 0


def add_commands(commands: Any) -> None:
    """Add the ``audit`` command group to the top-level subparsers."""
    audit = commands.add_parser(
        "audit",
        help="the audit log: tail and show entries, verify it offline, print its checkpoint",
        description="the audit log: tail and show entries (GET /v1/audit), verify it offline, print its checkpoint",
    )
    audit_commands = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    state = os.environ.get("HOOSH_STATE_DIR", ".hoosh")

    tailing = command(audit_commands, "tail", tail, "the newest entries as a table (--follow: keep printing)")
    tailing.add_argument("-n", "--lines", type=_lines, default=20, metavar="N", help="entries (1-10000; default 20)")
    tailing.add_argument("-f", "--follow", action="store_true", help="keep printing new entries (Ctrl-C stops)")
    tailing.add_argument("--interval", type=seconds, default=1.0, help="seconds between polls with --follow")
    tailing.add_argument("--kind", default=None, help="chat, embedding, transcription, response, or a subject")
    tailing.add_argument("--model", default=None)
    tailing.add_argument("--pool", default=None)
    tailing.add_argument("--provider", default=None)
    tailing.add_argument("--outcome", choices=("completed", "failed"), default=None)
    tailing.add_argument("--key-id", dest="key_id", default=None, help="one key's entries (admin)")

    shown = command(audit_commands, "show", show, "every entry of one request, with its payload")
    shown.add_argument("request_id", help="the request id (X-Request-Id of the answer)")

    check = audit_commands.add_parser(
        "verify",
        help="verify a log from its files, key(s) and last checkpoint; name the first bad entry or missing range",
        description="Exit 0: the log verifies; 1: it does not (the JSON report names where); 2: cannot run. "
        "The report is always JSON (--json is accepted for uniformity).",
    )
    try:
        # The verifier (hoosh_audit: NATS, Redis, metrics) takes ~0.8 s to import: only
        # when an audit command is being parsed, so every other command starts quickly.
        if "audit" not in sys.argv[1:]:
            raise ImportError("not needed for this command")
        from hoosh_audit.cli import add_verify_arguments
    except ImportError:
        check.add_argument("rest", nargs=argparse.REMAINDER)
    else:
        add_verify_arguments(check, default_dir=f"{state}/audit")
    check.add_argument("--state-dir", default=state, help="hoosh up's state dir (its audit.key is the default key)")
    check.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="the report (always JSON)")
    check.set_defaults(run=verify)

    stored = audit_commands.add_parser(
        "checkpoint", help="print the last checkpoint stored in Redis (JSON)", description="the stored checkpoint"
    )
    stored.add_argument("--redis-url", default=None, help=f"default: $HOOSH_REDIS_URL or {DEFAULT_REDIS_URL}")
    stored.add_argument(
        "--checkpoint-key",
        default=None,
        help="default: $HOOSH_AUDIT_CHECKPOINT_PREFIX + $HOOSH_NATS_STREAM:$HOOSH_AUDIT_CONSUMER:checkpoint",
    )
    stored.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="(always JSON)")
    stored.set_defaults(run=checkpoint)
