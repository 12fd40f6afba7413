"""A key's own RPM, TPM and concurrency limits on the calls the edge answers itself
(``/v1/tokens/reserve``), counted by ``hoosh_metering.limits.KeyLimiter`` in the same
Redis windows the router counts chats in.

A manual reservation outlives its call, so the call is finished right after the
reservation: it counts one request against RPM and the tokens it reserved against TPM
(none when the budget refused), and holds a concurrency slot only while it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from hoosh_metering.errors import BudgetUnavailable
from hoosh_metering.limits import KeyLimiter, KeyLimits
from hoosh_tenancy import KeyRecord

log = logging.getLogger(__name__)

NO_LIMITS = KeyLimits()


def limits_of(principal: KeyRecord) -> KeyLimits:
    """The principal's limits (none for the bootstrap admin and open mode's anonymous user)."""
    if not (principal.rpm or principal.tpm or principal.max_concurrency):
        return NO_LIMITS
    return KeyLimits(rpm=principal.rpm, tpm=principal.tpm, max_concurrency=principal.max_concurrency)


class KeyGate:
    """Admission and finish of one call against its key's limits.

    ``admit`` is one Redis round trip for a key with limits and none otherwise.
    ``finish`` frees the call's slot and corrects TPM to what the call really charged;
    it is best effort and survives the caller's cancellation. An admission whose reply
    never came (Redis too slow) may have taken a slot: it is finished in the
    background all the same, and again after ``unconfirmed_repeats`` seconds, so the
    slot comes back once Redis answers rather than after the in-flight TTL (finishing
    an id that was never admitted changes nothing; the TPM correction applies once).
    """

    def __init__(self, limiter: KeyLimiter, *, unconfirmed_repeats: tuple[float, ...] = (1.0, 4.0, 25.0)) -> None:
        self.limiter = limiter
        self._repeats = unconfirmed_repeats
        self._pending: set[asyncio.Task[None]] = set()

    async def admit(self, key_id: str, request_id: str, limits: KeyLimits, tokens: int) -> None:
        """RateLimited (429) or BudgetUnavailable (503) when the call may not run."""
        try:
            await self.limiter.admit(key_id, request_id, limits, tokens)
        except BudgetUnavailable:
            if limits.tracked:
                self._spawn(self._finish_unconfirmed(key_id, request_id, limits, tokens))
            raise

    async def finish(self, key_id: str, request_id: str, limits: KeyLimits, *, estimated: int, actual: int) -> None:
        """Free the call's slot; TPM keeps ``actual`` of the ``estimated`` tokens admitted."""
        if not limits.tracked:
            return
        # Shielded: a caller cancelled mid-way still frees its slot.
        await asyncio.shield(self._spawn(self._finish_once(key_id, request_id, limits, estimated, actual)))

    async def close(self) -> None:
        """Cancel finishes still waiting (the in-flight TTL frees those slots)."""
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=1.0)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _finish_unconfirmed(self, key_id: str, request_id: str, limits: KeyLimits, tokens: int) -> None:
        await self._finish_once(key_id, request_id, limits, tokens, 0)
        for delay in self._repeats:
            await asyncio.sleep(delay)
            await self._finish_once(key_id, request_id, limits, tokens, 0)

    async def _finish_once(self, key_id: str, request_id: str, limits: KeyLimits, estimated: int, actual: int) -> None:
        try:
            await self.limiter.finish(key_id, request_id, limits, estimated_tokens=estimated, actual_tokens=actual)
        except Exception as error:  # best effort: the in-flight entry has a TTL
            log.warning("key limit finish failed", extra={"key_id": key_id, "error": repr(error)})
