"""``hoosh pools list|get|create|resize|update|reset|delete``: token pools, over the
edge's admin API (/v1/admin/pools), with the admin key."""

from __future__ import annotations

import argparse
import math
from typing import Any
from urllib.parse import quote

from rich.text import Text

from . import output
from .client import Context
from .errors import UsageError
from .keys import UNSET
from .parser import command, group

PERIODS = ("none", "minute", "hourly", "daily", "weekly", "monthly")
COLUMNS = ("name", "parent", "capacity", "used", "reserved", "available", "period", "timezone", "cap usd", "used usd")


def _dollars(text: str) -> float | None:
    if text.lower() in ("none", "null"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of dollars (or 'none')")
    return value


def _capacity(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a capacity is 0 or more tokens")
    return value


def _usd(micros: Any) -> Text:
    if isinstance(micros, int | float) and not isinstance(micros, bool):
        return Text(f"{micros / 1_000_000:,.6f}")
    return output.text(micros)


def _row(pool: dict[str, Any]) -> list[Text]:
    return [
        output.text(pool.get("name")),
        output.text(pool.get("parent")),
        output.number(pool.get("capacity")),
        output.number(pool.get("used")),
        output.number(pool.get("reserved")),
        output.number(pool.get("available")),
        output.text(pool.get("period")),
        output.text(pool.get("timezone")),
        _usd(pool.get("cap_usd_micros")),
        _usd(pool.get("used_usd_micros")),
    ]


def print_pools(title: str, pools: list[dict[str, Any]]) -> None:
    grid = output.table(title, *COLUMNS, right=("capacity", "used", "reserved", "available", "cap usd", "used usd"))
    for pool in pools:
        grid.add_row(*_row(pool))
    output.console().print(grid)


def _answer(ctx: Context, pool: dict[str, Any], title: str) -> int:
    if ctx.json:
        output.emit_json(pool)
    else:
        print_pools(title, [pool])
        if pool.get("period_end_ms"):
            output.console().print(output.text(f"period ends {output.when_ms(pool['period_end_ms'])} UTC"))
    return 0


def listing(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        answer = edge.get("/v1/admin/pools")
    if ctx.json:
        output.emit_json(answer)
    else:
        print_pools(f"{len(answer['data'])} pools", answer["data"])
    return 0


def get(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        pool = edge.get(f"/v1/admin/pools/{quote(args.name, safe='')}")
    return _answer(ctx, pool, f"pool {args.name}")


def create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "capacity": args.capacity, "period": args.period}
    if args.parent:
        body["parent"] = args.parent
    if args.timezone:
        body["timezone"] = args.timezone
    if args.cap_usd is not UNSET:
        body["cap_usd"] = args.cap_usd
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        pool = edge.post("/v1/admin/pools", body=body)
    return _answer(ctx, pool, f"created pool {args.name}")


def _patch(args: argparse.Namespace, body: dict[str, Any], verb: str) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        pool = edge.call("PATCH", f"/v1/admin/pools/{quote(args.name, safe='')}", body=body)
    return _answer(ctx, pool, f"{verb} pool {args.name}")


def resize(args: argparse.Namespace) -> int:
    return _patch(args, {"capacity": args.capacity}, "resized")


def update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    for name in ("capacity", "period", "timezone"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.cap_usd is not UNSET:
        body["cap_usd"] = args.cap_usd
    if not body:
        raise UsageError("nothing to change: give --capacity, --period, --timezone or --cap-usd")
    return _patch(args, body, "updated")


def reset(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        pool = edge.post(f"/v1/admin/pools/{quote(args.name, safe='')}/reset")
    return _answer(ctx, pool, f"reset pool {args.name}")


def delete(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        answer = edge.call("DELETE", f"/v1/admin/pools/{quote(args.name, safe='')}")
    if ctx.json:
        output.emit_json(answer)
    else:
        output.console().print(output.text(f"deleted pool {answer.get('name', args.name)}"))
    return 0


def add_commands(commands: Any) -> None:
    """``hoosh pools ...``."""
    pools = group(commands, "pools", "token pools: list, get, create, resize, update, reset, delete (admin)")
    command(pools, "list", listing, "every pool: capacity, use, period, money cap")
    command(pools, "get", get, "one pool").add_argument("name")
    created = command(pools, "create", create, "create a pool")
    created.add_argument("name")
    created.add_argument("--capacity", type=_capacity, required=True, help="tokens per period (or in all)")
    created.add_argument("--parent", default=None, help="the parent pool (fixed for life)")
    created.add_argument("--period", choices=PERIODS, default="none")
    created.add_argument("--timezone", default=None, help="IANA zone of the period (default UTC)")
    created.add_argument("--cap-usd", type=_dollars, default=UNSET, help="money cap per period, in dollars")
    resized = command(pools, "resize", resize, "set a pool's token capacity")
    resized.add_argument("name")
    resized.add_argument("capacity", type=_capacity, help="the new capacity in tokens")
    changed = command(pools, "update", update, "change the capacity, period, time zone or money cap")
    changed.add_argument("name")
    changed.add_argument("--capacity", type=_capacity, default=None)
    changed.add_argument("--period", choices=PERIODS, default=None)
    changed.add_argument("--timezone", default=None)
    changed.add_argument("--cap-usd", type=_dollars, default=UNSET, help="dollars; 'none' removes the cap")
    command(pools, "reset", reset, "usage back to 0 now").add_argument("name")
    command(pools, "delete", delete, "delete a pool without children").add_argument("name")
