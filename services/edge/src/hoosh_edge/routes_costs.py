"""GET /v1/costs: the cost ledger, totalled (admin: every key; a user key: its own).

The budget service reads the ledger's counters, which every commit updates in the same
Redis script as the charge: exact, not sampled. Lines are totalled here by the
dimensions asked for.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from hoosh.budget.v1 import budget_pb2
from hoosh_common.prices import micros_to_usd
from starlette.responses import Response

from .errors import InvalidRequestError
from .protocol import CostsResponse
from .responses import OrjsonResponse
from .routing import BACKEND, call_budget, edge, errors, grpc_metadata
from .scopes import authorize_pool, principal_of

router = APIRouter()

Dimension = Literal["day", "provider", "model", "pool", "key_id"]
DIMENSIONS: tuple[Dimension, ...] = ("day", "provider", "model", "pool", "key_id")
MAX_DAYS = 400  # the ledger keeps 400 days
DAY_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
_DIMENSION = "(day|provider|model|pool|key_id)"
GROUP_BY_PATTERN = f"^{_DIMENSION}(,{_DIMENSION})*$"
DEFAULT_DAYS = 30
_METRICS = ("requests", "prompt_tokens", "completion_tokens", "usd_micros")


def _day(value: str | None, name: str, default: date) -> date:
    if value is None:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"{name} must be a date (YYYY-MM-DD)", param=name) from None


def _group_by(value: str) -> tuple[Dimension, ...]:
    chosen = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [part for part in chosen if part not in DIMENSIONS]
    if unknown or not chosen:
        raise InvalidRequestError(f"group_by takes a comma-separated list of {', '.join(DIMENSIONS)}", param="group_by")
    return tuple(dimension for dimension in DIMENSIONS if dimension in chosen)


def _line(values: dict[str, Any], totals: dict[str, int]) -> dict[str, Any]:
    return {
        **values,
        "requests": totals["requests"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        "cost_usd_micros": totals["usd_micros"],
        "cost_usd": micros_to_usd(totals["usd_micros"]),
    }


@router.get("/v1/costs", response_model=CostsResponse, responses=errors(400, *BACKEND), tags=["costs"])
async def list_costs(
    request: Request,
    start: str | None = Query(
        None, pattern=DAY_PATTERN, description="First UTC day, YYYY-MM-DD (default: 29 days before end)"
    ),
    end: str | None = Query(None, pattern=DAY_PATTERN, description="Last UTC day, YYYY-MM-DD (default: today)"),
    group_by: str = Query(
        "day,provider,model,pool,key_id",
        pattern=GROUP_BY_PATTERN,
        description="Comma-separated dimensions to total by: " + ", ".join(DIMENSIONS),
    ),
    pool: str | None = Query(None, max_length=64, description="Only this pool"),
    key_id: str | None = Query(None, max_length=64, description="Admin: only this key's charges"),
) -> Response:
    """What committed calls cost, from the ledger every commit updates (exact to the
    micro-dollar): lines totalled by the chosen dimensions over a range of UTC days,
    and the grand total. A user key sees only its own charges; admin sees all."""
    today = datetime.now(UTC).date()
    last = _day(end, "end", today)
    first = _day(start, "start", last - timedelta(days=DEFAULT_DAYS - 1))
    if last < first:
        raise InvalidRequestError("end must not be before start", param="end")
    if (last - first).days >= MAX_DAYS:
        raise InvalidRequestError(f"a range spans at most {MAX_DAYS} days", param="start")
    dimensions = _group_by(group_by)
    principal = principal_of(request)
    pools = [pool] if pool else []
    if not principal.is_admin:
        key_id = principal.id  # a user key sees its own charges only, in its own pools' trees
        if pool:
            authorize_pool(principal, pool)
        elif not principal.all_pools:
            pools = list(principal.pools)
    state = edge(request)
    reply: budget_pb2.GetCostsResponse = await call_budget(
        state.clients.budget.GetCosts(
            budget_pb2.GetCostsRequest(
                first_day=first.isoformat(),
                last_day=last.isoformat(),
                key_id=key_id or "",
                pools=pools,
            ),
            metadata=grpc_metadata(request),
            timeout=state.settings.edge_rpc_timeout_seconds,
        )
    )
    grouped: dict[tuple[str, ...], dict[str, int]] = {}
    total = dict.fromkeys(_METRICS, 0)
    for line in reply.lines:
        group = tuple(getattr(line, dimension) for dimension in dimensions)
        sums = grouped.setdefault(group, dict.fromkeys(_METRICS, 0))
        for metric in _METRICS:
            value = getattr(line, metric)
            sums[metric] += value
            total[metric] += value
    data = [_line(dict(zip(dimensions, group, strict=True)), sums) for group, sums in sorted(grouped.items())]
    return OrjsonResponse(
        {
            "object": "list",
            "start": first.isoformat(),
            "end": last.isoformat(),
            "group_by": list(dimensions),
            "data": data,
            "total": _line({}, total),
        }
    )
