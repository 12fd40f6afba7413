"""``hoosh reload``: every service that uses hoosh.yaml re-reads it (POST
/v1/admin/reload, admin). A bad file is refused with the reason and the running config
stays. Exit 0 only when the answer is ``ok``; ``partial`` and ``refused`` print the
report and exit 1, as does an edge that cannot reach the replicas (503)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.text import Text

from . import output
from .client import Context
from .errors import EXIT_FAILED, EXIT_OK, ServerError
from .parser import command

COLUMNS = ("service", "instance", "status", "config sha256", "reason")


def print_reload(answer: dict[str, Any]) -> None:
    out = output.console()
    headline = Text("reload: ")
    headline.append_text(output.state(answer.get("status")))
    if answer.get("reason"):
        headline.append_text(output.text(f": {answer['reason']}"))
    out.print(headline)
    services: list[dict[str, Any]] = answer.get("services") or []
    if services:
        grid = output.table(None, *COLUMNS)
        for item in services:
            digest = item.get("config_sha256")
            grid.add_row(
                output.text(item.get("service")),
                output.text(item.get("instance")),
                output.state(item.get("status")),
                output.text(digest[:12] if isinstance(digest, str) else None),
                output.text(item.get("reason")),
            )
        out.print(grid)


def reload(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        try:
            # refused (400, 409) and partial (502) carry the report beside the error: show it.
            answer = edge.post("/v1/admin/reload", accept=(400, 409, 502))
        except ServerError as exc:
            if exc.status in (404, 405):
                raise ServerError(
                    f"this edge does not serve POST /v1/admin/reload ({exc})", status=exc.status
                ) from None
            raise
    if not isinstance(answer, dict) or "status" not in answer:
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise ServerError(f"the reload was not applied: {message or answer}")
    if ctx.json:
        output.emit_json(answer)
    else:
        print_reload(answer)
    return EXIT_OK if answer.get("status") == "ok" else EXIT_FAILED


def add_commands(commands: Any) -> None:
    """``hoosh reload``."""
    command(
        commands,
        "reload",
        reload,
        "every service re-reads hoosh.yaml (admin); exit 0 only when all took it",
        description="POST /v1/admin/reload: every service that uses hoosh.yaml re-reads it; a bad file is "
        "refused with the reason and the running config stays. Exit 0: ok; 1: partial or refused.",
    )
