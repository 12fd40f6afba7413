"""``hoosh status``: the whole gateway on one screen — each service's health (GET
/v1/health/ready), Redis, NATS, the audit log's head and lag, each publisher's outbox
and the local inference worker (GET /v1/admin/status, admin).

Exit 0 when everything is well, 1 when anything is not (so a script can wait on it).
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Group
from rich.text import Text

from . import output
from .client import Context
from .errors import EXIT_FAILED, EXIT_OK, ServerError
from .parser import command


def gather(ctx: Context) -> dict[str, Any]:
    """The readiness checks and the admin status page, as one JSON object."""
    with ctx.edge(admin=True) as edge:
        ready = edge.get("/v1/health/ready", accept=(503,))
        try:
            page = edge.get("/v1/admin/status")
        except ServerError as exc:
            if exc.status != 404:
                raise
            page = None  # an edge without the status page: its readiness alone
    services: dict[str, str] = {"edge": "SERVING", **ready.get("checks", {})}
    problems = [f"{name} is {value}" for name, value in ready.get("checks", {}).items() if value != "SERVING"]
    result: dict[str, Any] = {"services": services}
    if page is None:
        problems.append("this edge has no /v1/admin/status: Redis, NATS, audit and outboxes not shown")
    else:
        for item in page.get("services", []):
            services[item["service"]] = item["status"]
        problems += page.get("problems", [])
        result.update({name: page.get(name) for name in ("redis", "nats", "audit", "outbox", "workers")})
    status = ready.get("status", "unavailable")
    if status == "ok" and problems:
        status = "degraded"
    return {"status": status, "problems": problems, **result}


def render(report: dict[str, Any]) -> None:
    out = output.console()
    headline = Text("hoosh is ")
    headline.append_text(output.state(report["status"]))
    out.print(headline)

    services = output.table("services", "service", "health")
    for name, value in report["services"].items():
        services.add_row(output.text(name), output.state(value))

    parts = output.table("infrastructure", "part", "state", "detail")
    redis = report.get("redis")
    if redis:
        detail = f"{redis['latency_ms']} ms" if redis.get("latency_ms") is not None else redis.get("error")
        parts.add_row("redis", output.state(redis.get("status")), output.text(detail))
    nats = report.get("nats")
    if nats:
        if nats.get("status") == "ok":
            detail = f"{nats.get('address')} v{nats.get('version')}, jetstream {output.text(nats.get('jetstream'))}"
        else:
            detail = nats.get("error")
        parts.add_row("nats", output.state(nats.get("status")), output.text(detail))
    audit = report.get("audit")
    if audit:
        lag = audit.get("lag_events")
        detail = (
            f"head {output.text(audit.get('head_seq'))}, checkpoint {output.text(audit.get('checkpoint_seq'))}, "
            f"lag {output.text(lag)} events"
        )
        if audit.get("error") or audit.get("verify_error"):
            detail += f": {audit.get('error') or audit.get('verify_error')}"
        parts.add_row("audit", output.state(audit.get("status")), output.text(detail))

    outboxes = output.table("event outboxes", "service", "state", "entries", "bytes", "oldest", right=("entries",))
    for box in report.get("outbox") or []:
        age = box.get("oldest_age_seconds")
        outboxes.add_row(
            output.text(box.get("service")),
            output.state(box.get("status")),
            output.text(box.get("entries")),
            output.size(box.get("bytes")),
            Text(f"{age:.0f} s") if isinstance(age, int | float) and age else output.text(age or None),
        )
    workers = output.table("local inference workers", "worker", "state", "queue", "serves", "reason")
    for worker in report.get("workers") or []:
        depth, bound = worker.get("queue_depth"), worker.get("overload_queue")
        queue = f"{depth}/{bound}" if isinstance(depth, int) and isinstance(bound, int) else depth
        workers.add_row(
            output.text(worker.get("address")),
            output.state(worker.get("status")),
            output.text(queue),
            output.text(", ".join(str(name) for name in worker.get("providers") or [])),
            output.text(worker.get("reason")),
        )
    shown: list[Any] = [services]
    if report.get("redis"):
        shown += [parts, outboxes]
    if report.get("workers"):
        shown.append(workers)
    out.print(Group(*shown))
    for problem in report["problems"]:
        out.print(output.text(f"! {problem}", style="yellow"))


def status(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    report = gather(ctx)
    if ctx.json:
        output.emit_json(report)
    else:
        render(report)
    return EXIT_OK if report["status"] == "ok" else EXIT_FAILED


def add_commands(commands: Any) -> None:
    """``hoosh status``."""
    command(
        commands,
        "status",
        status,
        "every service's health, Redis, NATS, audit lag, outboxes, on one screen (admin)",
        description="Every service's health (GET /v1/health/ready), Redis, NATS, the audit log's head and lag, "
        "each publisher's outbox (GET /v1/admin/status). Exit 0 when all is well, 1 when not.",
    )
