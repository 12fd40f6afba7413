"""``hoosh providers``: every backend's circuit breaker as the routers share it — state,
failures, latency, limits, last error (GET /v1/health/providers, admin)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from . import output
from .client import Context
from .parser import command

COLUMNS = ("provider", "type", "state", "failures", "latency ms", "rpm", "tpm", "last error", "open until")


def _ago(ms: Any) -> str:
    if not ms or not isinstance(ms, int | float):
        return ""
    seconds = max(0, int(time.time() - ms / 1000))
    return f" ({seconds} s ago)"


def print_providers(providers: list[dict[str, Any]]) -> None:
    grid = output.table(f"{len(providers)} providers", *COLUMNS, right=("failures", "latency ms", "rpm", "tpm"))
    for item in providers:
        error = item.get("last_error")
        grid.add_row(
            output.text(item.get("name")),
            output.text(item.get("type")),
            output.state(item.get("state")),
            output.text(item.get("consecutive_failures", 0)),
            output.number(item.get("latency_ms"), 1),
            output.text(item.get("rpm_limit")),
            output.text(item.get("tpm_limit")),
            output.text(f"{error}{_ago(item.get('last_error_at'))}" if error else None),
            output.when_ms(item.get("open_until")),
        )
    output.console().print(grid)


def providers(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        answer = edge.get("/v1/health/providers")
    if ctx.json:
        output.emit_json(answer)
    else:
        print_providers(answer.get("data", []))
    return 0


def add_commands(commands: Any) -> None:
    """``hoosh providers``."""
    command(commands, "providers", providers, "every provider's breaker state, failures and latency (admin)")
