"""``hoosh costs``: what calls cost, from the ledger (GET /v1/costs), totalled by the
dimensions asked for. A user key sees its own charges; the admin key sees all."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from . import output
from .client import Context
from .parser import command

DIMENSIONS = ("day", "provider", "model", "pool", "key_id")
_RELATIVE = re.compile(r"(\d+)([dw])")


def since(text: str) -> str:
    """A first UTC day: YYYY-MM-DD as it is, or ``7d`` / ``2w`` back from today."""
    value = text.strip()
    match = _RELATIVE.fullmatch(value)
    if match:
        days = int(match.group(1)) * (7 if match.group(2) == "w" else 1)
        try:
            return (datetime.now(UTC).date() - timedelta(days=days)).isoformat()
        except OverflowError:  # before year 1 (or past what timedelta holds)
            raise argparse.ArgumentTypeError(f"{text!r} reaches back before the year 1") from None
    return day(value)


def day(text: str) -> str:
    try:
        return date.fromisoformat(text.strip()).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD) or a span back (7d, 2w)") from None


def group_by(text: str) -> str:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in parts if part not in DIMENSIONS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"group by a comma-separated list of {', '.join(DIMENSIONS)}")
    return ",".join(parts)


def print_costs(report: dict[str, Any]) -> None:
    """One row per group, then the total."""
    dimensions: list[str] = report["group_by"]
    metrics = ("requests", "prompt tokens", "completion tokens", "cost usd")
    grid = output.table(
        f"costs {report['start']} .. {report['end']} (UTC days), by {', '.join(dimensions)}",
        *dimensions,
        *metrics,
        right=metrics,
    )
    grid.show_footer = True
    total = report["total"]
    footers = [output.text(total.get(name)) for name in ("requests", "prompt_tokens", "completion_tokens", "cost_usd")]
    for index, column in enumerate(grid.columns):
        if index == 0 and dimensions:
            column.footer = "total"
        elif index >= len(dimensions):
            column.footer = footers[index - len(dimensions)]
    for line in report["data"]:
        grid.add_row(
            *(output.text(line.get(dimension)) for dimension in dimensions),
            output.number(line.get("requests")),
            output.number(line.get("prompt_tokens")),
            output.number(line.get("completion_tokens")),
            output.text(line.get("cost_usd")),
        )
    output.console().print(grid)


def costs(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    query = {"group_by": args.group_by}
    for name in ("start", "end", "pool", "key_id"):
        if getattr(args, name):
            query[name] = getattr(args, name)
    with ctx.edge(fallback_admin=True) as edge:
        report = edge.get("/v1/costs", params=query)
    if ctx.json:
        output.emit_json(report)
    else:
        print_costs(report)
    return 0


def add_commands(commands: Any) -> None:
    """``hoosh costs``."""
    ledger = command(commands, "costs", costs, "what calls cost, from the ledger (GET /v1/costs), as a table")
    first = ledger.add_mutually_exclusive_group()
    first.add_argument(
        "--since", dest="start", type=since, default=None, help="first UTC day: YYYY-MM-DD, or 7d / 2w back from today"
    )
    first.add_argument("--start", dest="start", type=day, default=None, help="first UTC day, YYYY-MM-DD")
    ledger.add_argument("--end", type=day, default=None, help="last UTC day, YYYY-MM-DD (default: today)")
    ledger.add_argument(
        "--group-by",
        "--by",
        dest="group_by",
        type=group_by,
        default="provider,model",
        help="dimensions to total by: day, provider, model, pool, key_id (default: %(default)s)",
    )
    ledger.add_argument("--pool", default=None, help="only this pool")
    ledger.add_argument("--key-id", dest="key_id", default=None, help="only this key's charges (admin)")
