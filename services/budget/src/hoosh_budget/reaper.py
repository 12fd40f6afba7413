"""The lease reaper: expired reservations settled by the expiry policy, counted.

The same loop as ``hoosh_metering.pools.reap_forever``, plus the
``hoosh_budget_expired_leases_total`` counter.
"""

from __future__ import annotations

import asyncio
import logging

from hoosh_metering.errors import BudgetUnavailable
from hoosh_metering.pools import BudgetStore

from hoosh_budget.metrics import EXPIRED_LEASES

log = logging.getLogger(__name__)


async def reap(store: BudgetStore) -> int:
    """Settle the expired leases of every tree once (up to a batch per tree); returns how many."""
    ended = await store.reap_expired()
    if ended:
        # The script returns a count only: labelled with the service's policy.
        EXPIRED_LEASES.labels(store.expiry_policy).inc(ended)
        log.info("expired leases settled", extra={"count": ended, "policy": store.expiry_policy})
    return ended


def _raise_if_cancelled() -> None:
    """A cancel that redis-py turned into a connection error still stops the loop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def reap_forever(store: BudgetStore, interval_seconds: float) -> None:
    """``reap`` every ``interval_seconds`` until cancelled; at once again after a full
    batch. A Redis outage is logged and retried on the next tick."""
    while True:
        try:
            ended = await reap(store)
        except BudgetUnavailable as exc:
            _raise_if_cancelled()
            log.warning("lease reaper could not reach Redis", extra={"error": str(exc)})
        else:
            if ended >= store.reclaim_batch:
                await asyncio.sleep(0)  # a full batch: more may be waiting
                continue
        await asyncio.sleep(interval_seconds)
