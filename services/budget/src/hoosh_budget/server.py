"""gRPC transport for BudgetService: translate messages, map errors to status codes.

The work is ``hoosh_metering.pools.BudgetStore``'s; this module only moves fields
between the wire and the store, and turns each error into a status code with the
``hoosh-error-*`` trailing metadata the edge reads back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from datetime import date
from typing import Any, NoReturn, TypeVar

import grpc
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh.events.v1 import events_pb2
from hoosh_common.eventbus import EventPublishError
from hoosh_common.grpc_errors import error_metadata
from hoosh_common.logs import request_id_var
from hoosh_common.telemetry import exporting, extract_context
from hoosh_metering.errors import (
    BudgetError,
    BudgetExhausted,
    BudgetUnavailable,
    InvalidArgument,
    NotOwner,
    PoolExists,
    PoolInUse,
    PoolNotFound,
    RateLimited,
)
from hoosh_metering.pools import BudgetStore, EndResult, ExpiryPolicy, LedgerLine, PoolSpec, PoolView
from opentelemetry import context as otel_context
from opentelemetry import trace
from redis.exceptions import RedisError

from hoosh_budget.metrics import count_operation, result_of
from hoosh_budget.resets import EventSink, ResetAnnouncer

log = logging.getLogger(__name__)

SERVICE_NAME = budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name
# Who calls the budget service: the router (reservations, when it does not hold them
# in Redis itself) and the edge (token endpoints, pool administration, costs). The
# router may call only what a reservation needs (an allow-list: a method added later
# stays the edge's until listed); with its token nobody can resize, create, reset or
# delete a pool, report usage, read costs or record an admin action.
BUDGET_CALLERS = ("edge", "router")
ROUTER_METHODS = tuple(f"/{SERVICE_NAME}/{name}" for name in ("Reserve", "Commit", "Release", "Renew", "GetPool"))
CALLER_LIMITS = {"router": ROUTER_METHODS}

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


def pool_message(view: PoolView) -> budget_pb2.Pool:
    message = budget_pb2.Pool(
        name=view.name,
        capacity=view.capacity,
        used=view.used,
        reserved=view.reserved,
        available=view.available,
        parent=view.parent or "",
        period=view.period,
        timezone=view.timezone,
        used_usd_micros=view.used_usd_micros,
        reserved_usd_micros=view.reserved_usd_micros,
        period_start_ms=view.period_start_ms,
        period_end_ms=view.period_end_ms,
        chain=list(view.chain),
    )
    if view.cap_usd_micros is not None:
        message.cap_usd_micros = view.cap_usd_micros
    return message


def _expiry_policy(value: str) -> ExpiryPolicy | None:
    """The wire's on_expiry: "" = the store's own policy; anything else must be a policy
    (the store refuses an unknown one with InvalidArgument)."""
    return value or None  # type: ignore[return-value]


def pool_spec(message: budget_pb2.PoolSpec) -> PoolSpec:
    return PoolSpec(
        name=message.name,
        capacity=message.capacity,
        parent=message.parent or None,
        period=message.period or "none",
        timezone=message.timezone or "UTC",
        cap_usd_micros=message.cap_usd_micros if message.HasField("cap_usd_micros") else None,
    )


def _status_of(exc: BudgetError) -> tuple[grpc.StatusCode, str, str]:
    """(status, OpenAI error type, hoosh error code) for a domain error."""
    if isinstance(exc, BudgetExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "insufficient_quota", "budget_exhausted"
    if isinstance(exc, RateLimited):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error", "rate_limit_exceeded"
    if isinstance(exc, PoolNotFound):
        return grpc.StatusCode.NOT_FOUND, "invalid_request_error", "pool_not_found"
    if isinstance(exc, PoolExists):
        return grpc.StatusCode.ALREADY_EXISTS, "invalid_request_error", "pool_exists"
    if isinstance(exc, PoolInUse):
        return grpc.StatusCode.FAILED_PRECONDITION, "invalid_request_error", "pool_in_use"
    if isinstance(exc, NotOwner):
        # OpenAI answers 403 with invalid_request_error; the code says why.
        return grpc.StatusCode.PERMISSION_DENIED, "invalid_request_error", "reservation_not_owned"
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error", "invalid_request"
    if isinstance(exc, BudgetUnavailable):
        return grpc.StatusCode.UNAVAILABLE, "api_error", "budget_unavailable"
    return grpc.StatusCode.INTERNAL, "api_error", "internal_error"


async def _abort(context: Context, exc: Exception) -> NoReturn:
    """End the call with the status (and trailing metadata) that ``exc`` stands for."""
    if isinstance(exc, BudgetError):
        status, error_type, error_code = _status_of(exc)
        message = exc.message
    else:  # RedisError: the store is unreachable; nothing may be admitted free
        status, error_type, error_code = grpc.StatusCode.UNAVAILABLE, "api_error", "budget_unavailable"
        message = "Token budget store is unavailable"
    if status == grpc.StatusCode.UNAVAILABLE:
        log.error("budget store unavailable", extra={"error": str(exc)})
    retry_after: int | None = None
    if isinstance(exc, BudgetExhausted | RateLimited):
        retry_after = exc.retry_after_seconds
    await context.abort(status, message, trailing_metadata=error_metadata(error_type, error_code, None, retry_after))


# Operations that change pools or record an admin's action: one INFO line each.
ADMIN_OPERATIONS = frozenset(
    {"upsert_pool", "create_pool", "update_pool", "delete_pool", "reset_pool", "report", "record_admin_action"}
)
REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 128  # a log field, not a place for a caller's essay


def _bind(context: Context, fallback: str = "") -> None:
    """Let this call's log lines join the request's: its request id (``x-request-id``
    metadata, else the reservation id, which the router makes the request id) and,
    when spans are not exported, the caller's trace context (exporting, the server
    interceptor's span is current already). grpc.aio runs each call in a task of its
    own, so what is set here ends with the call."""
    request_id = ""
    traced = False
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            request_id = value[:_MAX_REQUEST_ID]
        elif key == "traceparent":
            traced = True
    request_id_var.set(request_id or fallback[:_MAX_REQUEST_ID])
    if traced and not exporting():
        otel_context.attach(extract_context(context.invocation_metadata()))


def _recording_span() -> trace.Span | None:
    """This call's server span when spans are exported and it records; None otherwise,
    so attributes cost nothing when nobody collects them."""
    if not exporting():
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None


class _Op:
    """One operation being handled: counted, logged and put on the span once, when its
    result is known."""

    __slots__ = ("fields", "name", "span")

    def __init__(self, name: str, span: trace.Span | None = None, **fields: object) -> None:
        self.name = name
        self.span = span
        self.fields = fields

    def finish(self, result: str, error: BaseException | None = None) -> None:
        count_operation(self.name, result)
        if self.span is not None:
            self.span.set_attribute("hoosh.budget.result", result)
        if self.name in ADMIN_OPERATIONS:
            extra = {"operation": self.name, "result": result, **self.fields}
            if error is not None:
                extra["error"] = str(error)
            log.info("budget admin action", extra=extra)
        elif isinstance(error, BudgetExhausted):
            if self.span is not None:
                self.span.set_attribute("hoosh.budget.exhausted_pool", error.pool)
            log.info(
                "budget exhausted",
                extra={
                    "operation": self.name,
                    **self.fields,
                    "exhausted_pool": error.pool,
                    "requested": error.requested,
                    "available": error.available,
                    "reason": error.reason,
                    "retry_after_seconds": error.retry_after_seconds,
                },
            )
        elif log.isEnabledFor(logging.DEBUG):  # the hot path: build nothing unless asked
            extra = {"operation": self.name, "result": result, **self.fields}
            if error is not None:
                extra["error"] = str(error)
            log.debug("budget operation", extra=extra)


async def _call(context: Context, operation: Awaitable[T], op: _Op | None = None, *, settle: bool = True) -> T:
    """Await a store call; any budget or Redis error ends the RPC with its status.
    ``op`` is counted with the error's result, or "ok" unless ``settle`` is False
    (the caller then finishes it with a result of its own)."""
    try:
        value = await operation
    except (BudgetError, RedisError) as exc:
        if op is not None:
            op.finish(result_of(exc), exc)
        await _abort(context, exc)
    if op is not None and settle:
        op.finish("ok")
    return value


async def _invalid(context: Context, message: str, op: _Op | None = None) -> NoReturn:
    if op is not None:
        op.finish("invalid")
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        message,
        trailing_metadata=error_metadata("invalid_request_error", "invalid_request"),
    )


def _ended(result: EndResult) -> str:
    return "already_ended" if result.already_ended else "ok"


class BudgetServicer(budget_pb2_grpc.BudgetServiceServicer):
    """hoosh.budget.v1.BudgetService over a shared :class:`BudgetStore`.

    ``announcer`` publishes the ``budget.reset`` event of ResetPool. Every call is
    counted in ``hoosh_budget_operations_total`` (see :mod:`hoosh_budget.metrics`).
    """

    def __init__(self, store: BudgetStore, announcer: ResetAnnouncer, events: EventSink | None = None) -> None:
        self._store = store
        self._events = events
        self._announcer = announcer

    async def Check(self, request: budget_pb2.CheckRequest, context: Context) -> budget_pb2.CheckResponse:
        _bind(context)
        op = _Op("check", pool=request.pool, tokens=request.tokens)
        result = await _call(context, self._store.check(request.pool, request.tokens), op)
        return budget_pb2.CheckResponse(
            allowed=result.allowed, pool=pool_message(result.pool), available=result.available
        )

    async def Reserve(self, request: budget_pb2.ReserveRequest, context: Context) -> budget_pb2.ReserveResponse:
        _bind(context, request.reservation_id)
        tokens = request.tokens + request.completion_tokens
        span = _recording_span()
        if span is not None:
            span.set_attributes(
                {
                    "hoosh.pool": request.pool,
                    "hoosh.key_id": request.owner,
                    "hoosh.tokens": tokens,
                    "hoosh.reservation_id": request.reservation_id,
                }
            )
        op = _Op("reserve", span, pool=request.pool, reservation_id=request.reservation_id, tokens=tokens)
        reservation = await _call(
            context,
            self._store.reserve(
                request.pool,
                request.tokens,
                request.reservation_id,
                request.lease_seconds or None,
                completion_tokens=request.completion_tokens,
                min_completion_tokens=(
                    request.min_completion_tokens if request.HasField("min_completion_tokens") else None
                ),
                input_price_micros=request.input_price_micros,
                output_price_micros=request.output_price_micros,
                owner=request.owner,
                kind=request.kind or "manual",
                on_expiry=_expiry_policy(request.on_expiry),
            ),
            op,
        )
        if span is not None:
            span.set_attributes(
                {"hoosh.pool_chain": list(reservation.chain), "hoosh.budget.reserved_tokens": reservation.tokens}
            )
        return budget_pb2.ReserveResponse(
            reservation_id=reservation.reservation_id,
            pool=pool_message(reservation.pool),
            tokens=reservation.tokens,
            lease_expires_at_ms=reservation.lease_expires_at_ms,
            chain=list(reservation.chain),
            completion_tokens=reservation.completion_tokens,
            usd_micros=reservation.usd_micros,
            created=reservation.created,
        )

    def _end_span(self, request: budget_pb2.CommitRequest | budget_pb2.ReleaseRequest) -> trace.Span | None:
        span = _recording_span()
        if span is not None:
            span.set_attributes(
                {
                    "hoosh.pool": request.pool,
                    "hoosh.key_id": request.owner,
                    "hoosh.reservation_id": request.reservation_id,
                }
            )
        return span

    @staticmethod
    def _ended_span(span: trace.Span | None, result: EndResult) -> None:
        if span is not None:
            span.set_attribute("hoosh.budget.state", result.state)
            if result.pool is not None:
                span.set_attribute("hoosh.pool_chain", list(result.pool.chain))

    async def Commit(self, request: budget_pb2.CommitRequest, context: Context) -> budget_pb2.CommitResponse:
        _bind(context, request.reservation_id)
        span = self._end_span(request)
        if span is not None:
            span.set_attribute("hoosh.tokens", request.used_tokens)
        op = _Op("commit", span, pool=request.pool, reservation_id=request.reservation_id, tokens=request.used_tokens)
        result = await _call(
            context,
            self._store.commit(
                request.reservation_id,
                request.used_tokens,
                pool=request.pool,
                used_usd_micros=request.used_usd_micros,
                owner=request.owner or None,
                kind=request.kind or None,
                ledger=ledger_line(request.ledger) if request.HasField("ledger") else None,
            ),
            op,
            settle=False,
        )
        self._ended_span(span, result)
        op.finish(_ended(result))
        response = budget_pb2.CommitResponse(already_ended=result.already_ended, state=result.state)
        if result.pool is not None:
            response.pool.CopyFrom(pool_message(result.pool))
        return response

    async def Release(self, request: budget_pb2.ReleaseRequest, context: Context) -> budget_pb2.ReleaseResponse:
        _bind(context, request.reservation_id)
        span = self._end_span(request)
        op = _Op("release", span, pool=request.pool, reservation_id=request.reservation_id)
        result = await _call(
            context,
            self._store.release(
                request.reservation_id, pool=request.pool, owner=request.owner or None, kind=request.kind or None
            ),
            op,
            settle=False,
        )
        self._ended_span(span, result)
        op.finish(_ended(result))
        response = budget_pb2.ReleaseResponse(already_ended=result.already_ended, state=result.state)
        if result.pool is not None:
            response.pool.CopyFrom(pool_message(result.pool))
        return response

    async def Renew(self, request: budget_pb2.RenewRequest, context: Context) -> budget_pb2.RenewResponse:
        _bind(context, request.reservation_id)
        op = _Op("renew", pool=request.pool, reservation_id=request.reservation_id)
        expires = await _call(
            context,
            self._store.renew(request.reservation_id, pool=request.pool, lease_seconds=request.lease_seconds or None),
            op,
            settle=False,
        )
        op.finish("ok" if expires is not None else "inactive")
        return budget_pb2.RenewResponse(active=expires is not None, lease_expires_at_ms=expires or 0)

    async def Report(self, request: budget_pb2.ReportRequest, context: Context) -> budget_pb2.ReportResponse:
        _bind(context, request.report_id)
        op = _Op("report", pool=request.pool, tokens=request.actual, report_id=request.report_id)
        if request.reserved != 0:
            # A bare count cannot end a reservation: that would let a caller free
            # tokens another request holds. Reservations end by id (Commit/Release).
            await _invalid(context, "reserved must be 0: end a reservation with Commit or Release by its id", op)
        view = await _call(
            context,
            self._store.report(
                request.pool, request.actual, usd_micros=request.usd_micros, report_id=request.report_id or None
            ),
            op,
        )
        return budget_pb2.ReportResponse(pool=pool_message(view))

    async def GetPool(self, request: budget_pb2.GetPoolRequest, context: Context) -> budget_pb2.GetPoolResponse:
        _bind(context)
        view = await _call(context, self._store.get_pool(request.pool), _Op("get_pool", pool=request.pool))
        return budget_pb2.GetPoolResponse(pool=pool_message(view))

    async def ListPools(self, request: budget_pb2.ListPoolsRequest, context: Context) -> budget_pb2.ListPoolsResponse:
        _bind(context)
        views = await _call(context, self._store.list_pools(list(request.names) or None), _Op("list_pools"))
        return budget_pb2.ListPoolsResponse(pools=[pool_message(view) for view in views])

    async def UpsertPool(
        self, request: budget_pb2.UpsertPoolRequest, context: Context
    ) -> budget_pb2.UpsertPoolResponse:
        _bind(context)
        op = _Op("upsert_pool", pool=request.pool, capacity=request.capacity)
        view = await _call(context, self._store.upsert_pool(request.pool, request.capacity), op)
        return budget_pb2.UpsertPoolResponse(pool=pool_message(view))

    async def CreatePool(
        self, request: budget_pb2.CreatePoolRequest, context: Context
    ) -> budget_pb2.CreatePoolResponse:
        _bind(context)
        spec = request.spec
        op = _Op("create_pool", pool=spec.name, parent=spec.parent, capacity=spec.capacity, period=spec.period)
        view = await _call(context, self._store.create_pool(pool_spec(spec)), op)
        return budget_pb2.CreatePoolResponse(pool=pool_message(view))

    async def UpdatePool(
        self, request: budget_pb2.UpdatePoolRequest, context: Context
    ) -> budget_pb2.UpdatePoolResponse:
        _bind(context)
        changes: dict[str, Any] = {}
        if request.HasField("capacity"):
            changes["capacity"] = request.capacity
        if request.HasField("period"):
            changes["period"] = request.period
        if request.HasField("timezone"):
            changes["timezone"] = request.timezone
        op = _Op("update_pool", pool=request.name)
        if request.clear_cap_usd and request.HasField("cap_usd_micros"):
            await _invalid(context, "set cap_usd_micros or clear_cap_usd, not both", op)
        if request.clear_cap_usd:
            changes["cap_usd_micros"] = None
        elif request.HasField("cap_usd_micros"):
            changes["cap_usd_micros"] = request.cap_usd_micros
        op.fields["changes"] = sorted(changes)
        view = await _call(context, self._store.update_pool(request.name, **changes), op)
        return budget_pb2.UpdatePoolResponse(pool=pool_message(view))

    async def DeletePool(
        self, request: budget_pb2.DeletePoolRequest, context: Context
    ) -> budget_pb2.DeletePoolResponse:
        _bind(context)
        await _call(context, self._store.delete_pool(request.name), _Op("delete_pool", pool=request.name))
        return budget_pb2.DeletePoolResponse()

    async def ResetPool(self, request: budget_pb2.ResetPoolRequest, context: Context) -> budget_pb2.ResetPoolResponse:
        _bind(context)
        op = _Op("reset_pool", pool=request.name, key_id=request.key_id)
        roll = await _call(context, self._store.reset_pool(request.name), op, settle=False)
        op.fields["used"] = roll.used
        op.finish("ok")  # the reset has happened, whatever follows
        # The reset has happened whatever NATS says: an event that cannot be published
        # now is kept and published again by the period ticker.
        await self._announcer.announce(roll, key_id=request.key_id)
        view = await _call(context, self._store.get_pool(request.name))
        return budget_pb2.ResetPoolResponse(pool=pool_message(view))

    async def GetCosts(self, request: budget_pb2.GetCostsRequest, context: Context) -> budget_pb2.GetCostsResponse:
        _bind(context)
        op = _Op("get_costs", first_day=request.first_day, last_day=request.last_day)
        try:
            first, last = date.fromisoformat(request.first_day), date.fromisoformat(request.last_day)
        except ValueError:
            invalid = InvalidArgument("first_day and last_day must be dates (YYYY-MM-DD)")
            op.finish("invalid", invalid)
            await _abort(context, invalid)
        lines = await _call(
            context,
            self._store.costs(first, last, pools=list(request.pools) or None, key_id=request.key_id or None),
            op,
        )
        return budget_pb2.GetCostsResponse(
            lines=[
                budget_pb2.CostLine(
                    day=line.day,
                    provider=line.provider,
                    model=line.model,
                    pool=line.pool,
                    key_id=line.key_id,
                    requests=line.requests,
                    prompt_tokens=line.prompt_tokens,
                    completion_tokens=line.completion_tokens,
                    usd_micros=line.usd_micros,
                )
                for line in lines
            ]
        )

    async def RecordAdminAction(
        self, request: events_pb2.AdminAction, context: Context
    ) -> budget_pb2.RecordAdminActionResponse:
        _bind(context)
        op = _Op(
            "record_admin_action",
            action=request.action,
            event_id=request.event_id,
            target=request.target[:256],
            actor_key_id=request.actor_key_id[:128],
        )
        problem = admin_action_problem(request)
        if problem is not None:
            invalid = InvalidArgument(problem)
            op.finish("invalid", invalid)
            await _abort(context, invalid)
        if self._events is None:
            op.finish("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "This budget service publishes no events")
        event = events_pb2.AdminAction()
        event.CopyFrom(request)
        if not event.timestamp_ms:
            event.timestamp_ms = int(time.time() * 1000)
        try:
            # Awaited: NATS acked it, or the outbox holds it (fsynced) when NATS is away.
            await self._events.publish(admin_subject(event.action), event, event.event_id)
        except EventPublishError as exc:
            op.finish("unavailable", exc)
            log.error("admin action not recorded", extra={"event_id": event.event_id, "error": str(exc)})
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "The admin action could not be recorded; try again",
                trailing_metadata=error_metadata("api_error", "events_unavailable", None, 5),
            )
        op.finish("ok")
        return budget_pb2.RecordAdminActionResponse()


ADMIN_ACTIONS = frozenset(
    {"key.created", "key.updated", "key.revoked", "pool.created", "pool.updated", "pool.deleted", "tokens.reported"}
)
MAX_ADMIN_DETAILS = 16 * 1024


def admin_subject(action: str) -> str:
    """The event name of an admin action (``admin.key.created``) under the subject prefix."""
    return f"admin.{action}"


def admin_action_problem(action: events_pb2.AdminAction) -> str | None:
    """Why an admin action cannot be recorded as given, or None."""
    if action.action not in ADMIN_ACTIONS:
        return f"action must be one of {', '.join(sorted(ADMIN_ACTIONS))}"
    if not action.event_id or len(action.event_id) > 128:
        return "event_id must be 1-128 characters"
    if len(action.target) > 256 or len(action.actor_key_id) > 128:
        return "target or actor_key_id too long"
    if len(action.details_json) > MAX_ADMIN_DETAILS:
        return f"details_json must be at most {MAX_ADMIN_DETAILS} bytes"
    return None


def ledger_line(message: budget_pb2.LedgerLine) -> LedgerLine:
    return LedgerLine(message.provider, message.model, message.prompt_tokens, message.completion_tokens)


def add_to_server(servicer: BudgetServicer, server: grpc.aio.Server) -> None:
    budget_pb2_grpc.add_BudgetServiceServicer_to_server(servicer, server)
