"""The budget service over gRPC (``hoosh.budget.v1.BudgetService``) with the same
method names, arguments, results and errors as the in-process
:class:`hoosh_metering.pools.BudgetStore`, so a caller can use either behind one
interface.

Status codes come back as the library's errors: NOT_FOUND -> PoolNotFound,
RESOURCE_EXHAUSTED -> BudgetExhausted (or RateLimited), PERMISSION_DENIED -> NotOwner,
INVALID_ARGUMENT -> InvalidArgument, ALREADY_EXISTS -> PoolExists,
FAILED_PRECONDITION -> PoolInUse, anything else (UNAVAILABLE, a deadline) ->
BudgetUnavailable.
"""

from __future__ import annotations

import math

import grpc
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_common.grpc_errors import ERROR_CODE, RETRY_AFTER, metadata_dict
from hoosh_common.logs import request_id_var
from hoosh_common.telemetry import request_metadata

from .errors import (
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
from .pools import EndResult, EndState, ExpiryPolicy, LedgerLine, PoolView, Reservation

_STATES: dict[str, EndState] = {"committed": "committed", "released": "released", "expired": "expired"}


def pool_view(message: budget_pb2.Pool) -> PoolView:
    """A wire ``Pool`` as the store's PoolView."""
    return PoolView(
        name=message.name,
        capacity=message.capacity,
        used=message.used,
        reserved=message.reserved,
        parent=message.parent or None,
        period=message.period or "none",
        timezone=message.timezone or "UTC",
        cap_usd_micros=message.cap_usd_micros if message.HasField("cap_usd_micros") else None,
        used_usd_micros=message.used_usd_micros,
        reserved_usd_micros=message.reserved_usd_micros,
        period_start_ms=message.period_start_ms,
        period_end_ms=message.period_end_ms,
        chain=tuple(message.chain) or (message.name,),
    )


def _end_result(pool: budget_pb2.Pool, already_ended: bool, state: str, fallback: EndState) -> EndResult:
    view = pool_view(pool) if pool.name else None
    end_state: EndState = _STATES.get(state, "unknown") if state else (fallback if not already_ended else "unknown")
    return EndResult(pool=view, already_ended=already_ended, state=end_state)


def _error(error: grpc.aio.AioRpcError, *, pool: str = "", requested: int = 0, reservation_id: str = "") -> BudgetError:
    """The library's exception for a failed call (UNAVAILABLE and anything unexpected: BudgetUnavailable)."""
    code = error.code()
    details = error.details() or ""
    metadata = metadata_dict(error.trailing_metadata())
    if code == grpc.StatusCode.NOT_FOUND:
        return PoolNotFound(pool)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_raw = metadata.get(RETRY_AFTER, "")
        retry = int(retry_raw) if retry_raw.isdigit() else 60
        if metadata.get(ERROR_CODE) == "rate_limit_exceeded":
            return RateLimited("rpm", retry, details or None)
        return BudgetExhausted(
            pool,
            requested,
            available=-1,
            retry_after_seconds=retry,
            message=details or None,
            reason="usd" if "micro-dollars" in details else "tokens",
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return NotOwner(reservation_id, details or None)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return PoolExists(pool)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return PoolInUse(pool)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details or "invalid budget request")
    return BudgetUnavailable(f"Budget service unavailable: {code.name}{': ' + details if details else ''}")


class BudgetServiceClient:
    """Reserve, commit, release and renew through ``hoosh.budget.v1.BudgetService``.

    ``timeout`` bounds every call; a call that runs past it raises BudgetUnavailable.
    """

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 10.0) -> None:
        self._stub = budget_pb2_grpc.BudgetServiceStub(channel)
        self._timeout = timeout

    async def reserve(
        self,
        pool: str,
        tokens: int,
        reservation_id: str,
        lease_seconds: float | None = None,
        *,
        completion_tokens: int = 0,
        min_completion_tokens: int | None = None,
        input_price_micros: int = 0,
        output_price_micros: int = 0,
        owner: str = "",
        kind: str = "manual",
        on_expiry: ExpiryPolicy | None = None,
    ) -> Reservation:
        """As :meth:`BudgetStore.reserve`. Raises PoolNotFound, BudgetExhausted, NotOwner,
        InvalidArgument or BudgetUnavailable. The wire carries whole seconds of lease
        (rounded up; 0 = the service's default)."""
        request = budget_pb2.ReserveRequest(
            pool=pool,
            tokens=tokens,
            reservation_id=reservation_id,
            lease_seconds=max(0, math.ceil(lease_seconds or 0)),
            owner=owner,
            kind=kind,
            completion_tokens=completion_tokens,
            input_price_micros=input_price_micros,
            output_price_micros=output_price_micros,
            on_expiry=on_expiry or "",
        )
        if min_completion_tokens is not None:
            request.min_completion_tokens = min_completion_tokens
        minimum = completion_tokens if min_completion_tokens is None else min_completion_tokens
        try:
            reply = await self._stub.Reserve(
                request, timeout=self._timeout, metadata=request_metadata(request_id_var.get())
            )
        except grpc.aio.AioRpcError as error:
            raise _error(error, pool=pool, requested=tokens + minimum, reservation_id=reservation_id) from error
        view = pool_view(reply.pool)
        return Reservation(
            reservation_id=reply.reservation_id or reservation_id,
            pool=view,
            chain=tuple(reply.chain) or view.chain,
            tokens=reply.tokens,
            completion_tokens=reply.completion_tokens,
            usd_micros=reply.usd_micros,
            lease_expires_at_ms=reply.lease_expires_at_ms,
            created=reply.created,
        )

    async def commit(
        self,
        reservation_id: str,
        used_tokens: int,
        *,
        pool: str,
        used_usd_micros: int = 0,
        owner: str | None = None,
        kind: str | None = None,
        ledger: LedgerLine | None = None,
    ) -> EndResult:
        """As :meth:`BudgetStore.commit` (``already_ended`` when it had ended before).

        An empty ``owner``/``kind`` cannot be told from "not given" on the wire.
        Raises NotOwner, InvalidArgument or BudgetUnavailable.
        """
        request = budget_pb2.CommitRequest(
            reservation_id=reservation_id,
            used_tokens=used_tokens,
            pool=pool,
            owner=owner or "",
            kind=kind or "",
            used_usd_micros=used_usd_micros,
        )
        if ledger is not None:
            request.ledger.CopyFrom(
                budget_pb2.LedgerLine(
                    provider=ledger.provider,
                    model=ledger.model,
                    prompt_tokens=ledger.prompt_tokens,
                    completion_tokens=ledger.completion_tokens,
                )
            )
        try:
            reply = await self._stub.Commit(
                request, timeout=self._timeout, metadata=request_metadata(request_id_var.get())
            )
        except grpc.aio.AioRpcError as error:
            raise _error(error, pool=pool, reservation_id=reservation_id) from error
        return _end_result(reply.pool, reply.already_ended, reply.state, "committed")

    async def release(
        self, reservation_id: str, *, pool: str, owner: str | None = None, kind: str | None = None
    ) -> EndResult:
        """As :meth:`BudgetStore.release`. Raises NotOwner, InvalidArgument or BudgetUnavailable."""
        request = budget_pb2.ReleaseRequest(
            reservation_id=reservation_id, pool=pool, owner=owner or "", kind=kind or ""
        )
        try:
            reply = await self._stub.Release(
                request, timeout=self._timeout, metadata=request_metadata(request_id_var.get())
            )
        except grpc.aio.AioRpcError as error:
            raise _error(error, pool=pool, reservation_id=reservation_id) from error
        return _end_result(reply.pool, reply.already_ended, reply.state, "released")

    async def renew(self, reservation_id: str, *, pool: str, lease_seconds: float | None = None) -> int | None:
        """As :meth:`BudgetStore.renew`: the new expiry (ms), or None when not active."""
        request = budget_pb2.RenewRequest(
            reservation_id=reservation_id, pool=pool, lease_seconds=max(0, math.ceil(lease_seconds or 0))
        )
        try:
            reply = await self._stub.Renew(
                request, timeout=self._timeout, metadata=request_metadata(request_id_var.get())
            )
        except grpc.aio.AioRpcError as error:
            raise _error(error, pool=pool, reservation_id=reservation_id) from error
        return reply.lease_expires_at_ms if reply.active else None

    async def get_pool(self, pool: str) -> PoolView:
        """As :meth:`BudgetStore.get_pool`. Raises PoolNotFound or BudgetUnavailable."""
        try:
            reply = await self._stub.GetPool(
                budget_pb2.GetPoolRequest(pool=pool),
                timeout=self._timeout,
                metadata=request_metadata(request_id_var.get()),
            )
        except grpc.aio.AioRpcError as error:
            raise _error(error, pool=pool) from error
        return pool_view(reply.pool)
