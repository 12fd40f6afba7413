"""``hoosh keys create|list|get|update|revoke``: API keys, over the edge's admin API
(/v1/admin/keys), with the admin key."""

from __future__ import annotations

import argparse
import re
import time
from typing import Any
from urllib.parse import quote

from . import output
from .client import Context
from .errors import UsageError
from .parser import command, group

_DURATION = re.compile(r"(\d+)([smhdw]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
COLUMNS = ("id", "name", "scope", "team", "user", "pools", "models", "rpm", "tpm", "concurrency", "expires", "status")


class _Unset:
    def __repr__(self) -> str:
        return "unset"


UNSET: Any = _Unset()  # an option not given (None means "clear")


def limit(text: str) -> int | None:
    """A positive limit, or ``none`` (no limit of its own)."""
    if text.lower() in ("none", "null", "unlimited"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (or 'none')") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is at least 1 (or 'none')")
    return value


def duration(text: str) -> int:
    """Seconds from ``3600``, ``90m``, ``12h``, ``30d`` or ``2w``."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 3600, 90m, 12h, 30d or 2w")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def _expiry(text: str) -> int | None:
    if text.lower() in ("none", "never", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not Unix seconds (or 'never')") from None


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in ("name", "team", "user"):
        if getattr(args, name, None) is not None:
            body[name] = getattr(args, name)
    if args.pools:
        body["pools"] = args.pools
    if args.models:
        body["models"] = args.models
    for name in ("rpm", "tpm", "max_concurrency"):
        if getattr(args, name) is not UNSET:
            body[name] = getattr(args, name)
    if args.expires_in is not None:
        body["expires_at"] = int(time.time()) + args.expires_in
    elif args.expires_at is not UNSET:
        body["expires_at"] = args.expires_at
    return body


def key_status(record: dict[str, Any]) -> str:
    if record.get("revoked_at"):
        return "revoked"
    expires = record.get("expires_at")
    if isinstance(expires, int | float) and expires <= time.time():
        return "expired"
    return "active"


def _row(record: dict[str, Any]) -> list[Any]:
    return [
        output.text(record.get("id")),
        output.text(record.get("name")),
        output.text(record.get("scope")),
        output.text(record.get("team")),
        output.text(record.get("user")),
        output.text(record.get("pools")),
        output.text(record.get("models")),
        output.text(record.get("rpm")),
        output.text(record.get("tpm")),
        output.text(record.get("max_concurrency")),
        output.when_s(record.get("expires_at")),
        output.state(key_status(record)),
    ]


def print_records(title: str, records: list[dict[str, Any]]) -> None:
    grid = output.table(title, *COLUMNS, right=("rpm", "tpm", "concurrency"))
    for record in records:
        grid.add_row(*_row(record))
    output.console().print(grid)


def print_record(record: dict[str, Any], title: str | None = None) -> None:
    rows = [(name, record.get(name)) for name in ("id", "name", "scope", "team", "user", "pools", "models")]
    rows += [(name, record.get(name)) for name in ("rpm", "tpm", "max_concurrency")]
    rows += [
        ("created", output.when_s(record.get("created_at"))),
        ("expires", output.when_s(record.get("expires_at"))),
        ("revoked", output.when_s(record.get("revoked_at"))),
        ("status", output.state(key_status(record))),
    ]
    output.console().print(output.fields_table(title or f"key {record.get('id')}", rows))


def create(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        created = edge.post("/v1/admin/keys", body={"scope": args.scope, **_fields(args)})
    if ctx.json:
        output.emit_json(created)
        return 0
    print_record(created["record"], f"created key {created['record'].get('id')}")
    out = output.console()
    out.print("The key, shown this once (the edge keeps only its hash):")
    out.print(output.text(created.get("key")), soft_wrap=True)
    return 0


def listing(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        answer = edge.get("/v1/admin/keys")
    if ctx.json:
        output.emit_json(answer)
    else:
        print_records(f"{len(answer['data'])} keys", answer["data"])
    return 0


def get(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        record = edge.get(f"/v1/admin/keys/{quote(args.id, safe='')}")
    if ctx.json:
        output.emit_json(record)
    else:
        print_record(record)
    return 0


def update(args: argparse.Namespace) -> int:
    fields = _fields(args)
    if not fields:
        raise UsageError("nothing to change: give at least one option (see hoosh keys update --help)")
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        record = edge.call("PATCH", f"/v1/admin/keys/{quote(args.id, safe='')}", body=fields)
    if ctx.json:
        output.emit_json(record)
    else:
        print_record(record, f"updated key {record.get('id')}")
    return 0


def revoke(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        record = edge.call("DELETE", f"/v1/admin/keys/{quote(args.id, safe='')}")
    if ctx.json:
        output.emit_json(record)
    else:
        print_record(record, f"revoked key {record.get('id')}")
    return 0


def _key_options(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    parser.add_argument("--name", required=creating, default=None, help="a label for people")
    parser.add_argument("--team", default=None, help="owner label: the team")
    parser.add_argument("--user", default=None, help="owner label: the person or service")
    parser.add_argument(
        "--pool", dest="pools", action="append", default=[], help="a pool it may charge (repeat; the first is default)"
    )
    parser.add_argument(
        "--model", dest="models", action="append", default=[], help="a model id or glob it may use (repeat)"
    )
    parser.add_argument("--rpm", type=limit, default=UNSET, help="requests per minute ('none': no own limit)")
    parser.add_argument("--tpm", type=limit, default=UNSET, help="tokens per minute ('none': no own limit)")
    parser.add_argument("--max-concurrency", type=limit, default=UNSET, help="requests in flight ('none')")
    expiry = parser.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", type=_expiry, default=UNSET, help="Unix seconds ('never' clears)")
    expiry.add_argument("--expires-in", type=duration, default=None, help="from now: 3600, 90m, 12h, 30d, 2w")


def add_commands(commands: Any) -> None:
    """``hoosh keys ...``."""
    keys = group(commands, "keys", "API keys: create, list, get, update, revoke (admin)")
    created = command(keys, "create", create, "create a key; prints it once, with its record")
    created.add_argument("--scope", choices=("user", "admin"), default="user")
    _key_options(created, creating=True)
    command(keys, "list", listing, "every key's record (never the keys themselves)")
    for name, run, text in (("get", get, "one key's record"), ("revoke", revoke, "revoke a key now")):
        command(keys, name, run, text).add_argument("id", help="the key id (key_...)")
    changed = command(keys, "update", update, "change a key's labels, pools, models, limits or expiry")
    changed.add_argument("id", help="the key id (key_...)")
    _key_options(changed, creating=False)
