"""Announcing pool resets: one ``budget.reset`` event per period roll or admin reset.

The store hands each roll out once (``roll_periods`` marks it announced), so an event
that cannot be published right away is kept here and published again on the next
tick; its ``Nats-Msg-Id`` (the event id) lets JetStream drop a copy that another
replica, or an earlier try whose ack was lost, already stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol

from google.protobuf.message import Message
from hoosh.events.v1 import events_pb2
from hoosh_common.eventbus import EventPublishError
from hoosh_common.events import SUBJECT_BUDGET_RESET
from hoosh_metering.errors import BudgetError
from hoosh_metering.pools import BudgetStore, PeriodRoll
from redis.exceptions import RedisError

from hoosh_budget.metrics import PERIOD_RESETS

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 10_000


class EventSink(Protocol):
    """What announcing needs of ``hoosh_common.eventbus.EventPublisher``."""

    async def publish(self, name: str, message: Message, event_id: str) -> object: ...


def period_event_id(pool: str, period_start_ms: int) -> str:
    """The same on every replica: a roll is stored once however many announce it."""
    return f"reset:{pool}:{period_start_ms}"


def admin_event_id(pool: str) -> str:
    """Unique: two admin resets of one pool are two events."""
    return f"reset:{pool}:admin:{uuid.uuid4().hex}"


def reset_event(
    roll: PeriodRoll, event_id: str, *, key_id: str = "", now_ms: int | None = None
) -> events_pb2.BudgetReset:
    """The ``BudgetReset`` event for one roll."""
    return events_pb2.BudgetReset(
        event_id=event_id,
        timestamp_ms=int(time.time() * 1000) if now_ms is None else now_ms,
        pool=roll.pool,
        pool_chain=list(roll.chain),
        reason=roll.reason,
        period=roll.period,
        period_start_ms=roll.period_start_ms,
        previous_period_start_ms=roll.previous_period_start_ms,
        used=roll.used,
        used_usd_micros=roll.used_usd_micros,
        capacity=roll.capacity,
        key_id=key_id,
    )


class ResetAnnouncer:
    """Publishes ``budget.reset`` events; keeps the ones that failed for a later try."""

    def __init__(self, sink: EventSink, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._sink = sink
        self._max_pending = max_pending
        # event id -> event, oldest first: retried in the order the resets happened.
        self._pending: OrderedDict[str, events_pb2.BudgetReset] = OrderedDict()

    @property
    def sink(self) -> EventSink:
        """Where the events go (the service's publisher)."""
        return self._sink

    @property
    def pending(self) -> int:
        """Events not published yet."""
        return len(self._pending)

    async def announce(self, roll: PeriodRoll, *, key_id: str = "") -> bool:
        """Publish the event for ``roll``; False when it is kept for a later try."""
        event_id = (
            admin_event_id(roll.pool) if roll.reason == "admin" else period_event_id(roll.pool, roll.period_start_ms)
        )
        event = reset_event(roll, event_id, key_id=key_id)
        if self._pending:  # keep the order: older events go first
            self._keep(event)
            await self.flush()
            return event_id not in self._pending
        return await self._publish(event)

    async def announce_all(self, rolls: Iterable[PeriodRoll]) -> None:
        for roll in rolls:
            await self.announce(roll)

    async def flush(self) -> None:
        """Publish the kept events, oldest first; stop at the first that still fails."""
        while self._pending:
            event_id, event = next(iter(self._pending.items()))
            del self._pending[event_id]
            if not await self._publish(event, kept=True):
                return

    async def _publish(self, event: events_pb2.BudgetReset, *, kept: bool = False) -> bool:
        try:
            await self._sink.publish(SUBJECT_BUDGET_RESET, event, event.event_id)
        except EventPublishError as exc:
            log.warning(
                "budget.reset not published yet; kept for the next tick",
                extra={"event_id": event.event_id, "error": str(exc)},
            )
            self._keep(event, first=kept)
            return False
        log.info(
            "pool reset announced",
            extra={"pool": event.pool, "reason": event.reason, "event_id": event.event_id, "used": event.used},
        )
        return True

    def _keep(self, event: events_pb2.BudgetReset, *, first: bool = False) -> None:
        self._pending[event.event_id] = event
        if first:
            self._pending.move_to_end(event.event_id, last=False)
        while len(self._pending) > self._max_pending:
            lost, _ = self._pending.popitem(last=False)
            log.error("budget.reset event dropped: too many unpublished", extra={"event_id": lost})


async def tick(store: BudgetStore, announcer: ResetAnnouncer) -> int:
    """Publish what is pending, roll every pool that is due and announce each roll;
    returns how many pools rolled."""
    await announcer.flush()
    rolls = await store.roll_periods()
    if rolls:
        # Counted as rolled: an event not published yet is kept and retried.
        PERIOD_RESETS.inc(len(rolls))
    await announcer.announce_all(rolls)
    return len(rolls)


async def tick_forever(store: BudgetStore, announcer: ResetAnnouncer, interval_seconds: float) -> None:
    """``tick`` every ``interval_seconds`` until cancelled: pools reset on time even
    when no request touches them. A Redis outage is logged and retried next tick."""
    while True:
        try:
            await tick(store, announcer)
        except (BudgetError, RedisError) as exc:
            log.warning("period ticker could not roll pools", extra={"error": str(exc)})
        await asyncio.sleep(interval_seconds)
