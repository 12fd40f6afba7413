"""`hoosh keys ...` and `hoosh pools ...`: the edge's admin API (/v1/admin/keys,
/v1/admin/pools) over HTTP, printing JSON.

The admin key comes from ``--admin-key``, else ``$HOOSH_ADMIN_KEY``, else the file
``$HOOSH_ADMIN_KEY_FILE``, else ``<state dir>/admin.key`` (written by ``hoosh up``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

DEFAULT_URL = "http://127.0.0.1:8088"
PERIODS = ("none", "minute", "hourly", "daily", "weekly", "monthly")
_DURATION = re.compile(r"(\d+)([smhdw]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class _Unset:
    def __repr__(self) -> str:
        return "unset"


_UNSET: Any = _Unset()  # an option not given (None means "clear")


class CliError(Exception):
    """A failure to report on stderr (exit 1)."""


def admin_key(args: argparse.Namespace) -> str:
    """The admin key: --admin-key, $HOOSH_ADMIN_KEY, $HOOSH_ADMIN_KEY_FILE, <state dir>/admin.key."""
    if args.admin_key:
        return str(args.admin_key)
    if os.environ.get("HOOSH_ADMIN_KEY", "").strip():
        return os.environ["HOOSH_ADMIN_KEY"].strip()
    candidates = [Path(os.environ["HOOSH_ADMIN_KEY_FILE"])] if os.environ.get("HOOSH_ADMIN_KEY_FILE") else []
    candidates.append(Path(args.state_dir) / "admin.key")
    for path in candidates:
        if path.is_file() and (key := path.read_text().strip()):
            return key
    raise CliError(
        "no admin key: pass --admin-key, set HOOSH_ADMIN_KEY or HOOSH_ADMIN_KEY_FILE, "
        f"or run `hoosh up` once (it writes {Path(args.state_dir) / 'admin.key'})"
    )


def _limit(text: str) -> int | None:
    """A positive limit, or ``none`` (no limit of its own)."""
    if text.lower() in ("none", "null", "unlimited"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is at least 1 (or 'none')")
    return value


def _duration(text: str) -> int:
    """Seconds from ``3600``, ``90m``, ``12h``, ``30d`` or ``2w``."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError("a duration like 3600, 90m, 12h, 30d or 2w")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def _expiry(text: str) -> int | None:
    return None if text.lower() in ("none", "never", "null") else int(text)


def _dollars(text: str) -> float | None:
    return None if text.lower() in ("none", "null") else float(text)


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"Authorization": f"Bearer {admin_key(args)}"}
    try:
        with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as client:
            response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the edge at {args.url}: {exc}") from None
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": {"message": response.text, "status": response.status_code}}
    if response.status_code >= 400:
        raise CliError(json.dumps(payload, indent=2))
    return payload


# --------------------------------------------------------------------------- keys


def _key_fields(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in ("name", "team", "user"):
        if getattr(args, name, None) is not None:
            body[name] = getattr(args, name)
    if args.pools:
        body["pools"] = args.pools
    if args.models:
        body["models"] = args.models
    for name in ("rpm", "tpm", "max_concurrency"):
        if getattr(args, name) is not _UNSET:
            body[name] = getattr(args, name)
    if args.expires_in is not None:
        body["expires_at"] = int(time.time()) + args.expires_in
    elif args.expires_at is not _UNSET:
        body["expires_at"] = args.expires_at
    return body


def keys_create(args: argparse.Namespace) -> Any:
    return _request(args, "POST", "/v1/admin/keys", {"scope": args.scope, **_key_fields(args)})


def keys_list(args: argparse.Namespace) -> Any:
    return _request(args, "GET", "/v1/admin/keys")


def keys_get(args: argparse.Namespace) -> Any:
    return _request(args, "GET", f"/v1/admin/keys/{args.id}")


def keys_update(args: argparse.Namespace) -> Any:
    fields = _key_fields(args)
    if not fields:
        raise CliError("nothing to change: give at least one option (see hoosh keys update --help)")
    return _request(args, "PATCH", f"/v1/admin/keys/{args.id}", fields)


def keys_revoke(args: argparse.Namespace) -> Any:
    return _request(args, "DELETE", f"/v1/admin/keys/{args.id}")


# --------------------------------------------------------------------------- pools


def _cap(args: argparse.Namespace, body: dict[str, Any]) -> None:
    if args.cap_usd is not _UNSET:
        body["cap_usd"] = args.cap_usd


def pools_create(args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"name": args.name, "capacity": args.capacity, "period": args.period}
    if args.parent:
        body["parent"] = args.parent
    if args.timezone:
        body["timezone"] = args.timezone
    _cap(args, body)
    return _request(args, "POST", "/v1/admin/pools", body)


def pools_list(args: argparse.Namespace) -> Any:
    return _request(args, "GET", "/v1/admin/pools")


def pools_get(args: argparse.Namespace) -> Any:
    return _request(args, "GET", f"/v1/admin/pools/{args.name}")


def pools_update(args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    for name in ("capacity", "period", "timezone"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    _cap(args, body)
    if not body:
        raise CliError("nothing to change: give --capacity, --period, --timezone or --cap-usd")
    return _request(args, "PATCH", f"/v1/admin/pools/{args.name}", body)


def pools_reset(args: argparse.Namespace) -> Any:
    return _request(args, "POST", f"/v1/admin/pools/{args.name}/reset")


def pools_delete(args: argparse.Namespace) -> Any:
    return _request(args, "DELETE", f"/v1/admin/pools/{args.name}")


# --------------------------------------------------------------------------- costs


def costs(args: argparse.Namespace) -> Any:
    query = {"group_by": args.by}
    for name in ("start", "end", "pool", "key_id"):
        value = getattr(args, name)
        if value:
            query[name] = value
    return _request(args, "GET", "/v1/costs?" + urlencode(query))


def print_costs(report: dict[str, Any]) -> None:
    """The ledger as a table people read: one row per group, then the total."""
    from rich.console import Console
    from rich.table import Table

    dimensions: list[str] = report["group_by"]
    table = Table(title=f"costs {report['start']} .. {report['end']} (UTC days)", show_footer=True)
    total = report["total"]
    for index, dimension in enumerate(dimensions):
        table.add_column(dimension, footer="total" if index == 0 else "")
    for metric, footer in (
        ("requests", str(total["requests"])),
        ("prompt_tokens", str(total["prompt_tokens"])),
        ("completion_tokens", str(total["completion_tokens"])),
        ("cost_usd", total["cost_usd"]),
    ):
        table.add_column(metric.replace("_", " "), footer=footer, justify="right")
    for line in report["data"]:
        table.add_row(
            *(str(line.get(dimension) or "-") for dimension in dimensions),
            str(line["requests"]),
            str(line["prompt_tokens"]),
            str(line["completion_tokens"]),
            line["cost_usd"],
        )
    Console().print(table)


# --------------------------------------------------------------------------- the parsers


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("HOOSH_URL", DEFAULT_URL), help="the edge (%(default)s)")
    parser.add_argument("--admin-key", default=None, help="admin key (else $HOOSH_ADMIN_KEY, <state dir>/admin.key)")
    parser.add_argument("--state-dir", default=os.environ.get("HOOSH_STATE_DIR", ".hoosh"), help="hoosh up's state dir")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")


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
    parser.add_argument("--rpm", type=_limit, default=_UNSET, help="requests per minute ('none': no own limit)")
    parser.add_argument("--tpm", type=_limit, default=_UNSET, help="tokens per minute ('none': no own limit)")
    parser.add_argument("--max-concurrency", type=_limit, default=_UNSET, help="requests in flight ('none')")
    expiry = parser.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", type=_expiry, default=_UNSET, help="Unix seconds ('never' clears)")
    expiry.add_argument("--expires-in", type=_duration, default=None, help="from now: 3600, 90m, 12h, 30d, 2w")


def add_commands(commands: Any) -> None:
    """Add the ``keys``, ``pools`` and ``costs`` commands to the top-level subparsers."""
    keys = commands.add_parser("keys", help="API keys: create, list, get, update, revoke (the admin API)")
    key_commands = keys.add_subparsers(dest="action", required=True)
    create = key_commands.add_parser("create", help="create a key; prints it once, with its record")
    _common(create)
    create.add_argument("--scope", choices=("user", "admin"), default="user")
    _key_options(create, creating=True)
    create.set_defaults(run=keys_create)
    listing = key_commands.add_parser("list", help="every key's record (never the keys)")
    _common(listing)
    listing.set_defaults(run=keys_list)
    for action, run, text in (("get", keys_get, "one key's record"), ("revoke", keys_revoke, "revoke a key now")):
        sub = key_commands.add_parser(action, help=text)
        _common(sub)
        sub.add_argument("id", help="the key id (key_...)")
        sub.set_defaults(run=run)
    update = key_commands.add_parser("update", help="change a key's labels, pools, models, limits or expiry")
    _common(update)
    update.add_argument("id", help="the key id (key_...)")
    _key_options(update, creating=False)
    update.set_defaults(run=keys_update)

    pools = commands.add_parser("pools", help="token pools: create, list, get, update, reset, delete")
    pool_commands = pools.add_subparsers(dest="action", required=True)
    create = pool_commands.add_parser("create", help="create a pool")
    _common(create)
    create.add_argument("name")
    create.add_argument("--capacity", type=int, required=True, help="tokens per period (or in all)")
    create.add_argument("--parent", default=None, help="the parent pool (fixed for life)")
    create.add_argument("--period", choices=PERIODS, default="none")
    create.add_argument("--timezone", default=None, help="IANA zone of the period (default UTC)")
    create.add_argument("--cap-usd", type=_dollars, default=_UNSET, help="money cap per period, in dollars")
    create.set_defaults(run=pools_create)
    listing = pool_commands.add_parser("list", help="every pool")
    _common(listing)
    listing.set_defaults(run=pools_list)
    for action, run, text in (
        ("get", pools_get, "one pool"),
        ("reset", pools_reset, "usage back to 0 now"),
        ("delete", pools_delete, "delete a pool without children"),
    ):
        sub = pool_commands.add_parser(action, help=text)
        _common(sub)
        sub.add_argument("name")
        sub.set_defaults(run=run)
    update = pool_commands.add_parser("update", help="resize, change the period, time zone or money cap")
    _common(update)
    update.add_argument("name")
    update.add_argument("--capacity", type=int, default=None)
    update.add_argument("--period", choices=PERIODS, default=None)
    update.add_argument("--timezone", default=None)
    update.add_argument("--cap-usd", type=_dollars, default=_UNSET, help="dollars; 'none' removes the cap")
    update.set_defaults(run=pools_update)

    ledger = commands.add_parser("costs", help="what calls cost, from the ledger (GET /v1/costs), as a table")
    _common(ledger)
    ledger.add_argument("--start", default=None, help="first UTC day, YYYY-MM-DD (default: 29 days before end)")
    ledger.add_argument("--end", default=None, help="last UTC day, YYYY-MM-DD (default: today)")
    ledger.add_argument(
        "--by",
        default="provider,model",
        help="dimensions to total by: day, provider, model, pool, key_id (%(default)s)",
    )
    ledger.add_argument("--pool", default=None, help="only this pool")
    ledger.add_argument("--key-id", dest="key_id", default=None, help="only this key's charges")
    ledger.add_argument("--json", action="store_true", help="the JSON answer instead of a table")
    ledger.set_defaults(run=costs, show=print_costs)


def run(args: argparse.Namespace) -> int:
    """Run a keys/pools command: JSON on stdout (0), or the error on stderr (1)."""
    try:
        result = args.run(args)
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    show = getattr(args, "show", None)
    if show is not None and not getattr(args, "json", False):
        show(result)
    else:
        print(json.dumps(result, indent=2))
    return 0
