"""A key's own RPM, TPM and concurrency limits on the calls the edge answers itself
(``/v1/tokens/reserve``), counted by ``hoosh_metering.limits.KeyLimiter`` in the same
Redis windows the router counts chats in.

A manual reservation outlives its call, so the call is finished right after the
reservation: it counts one request against RPM and the tokens it reserved against TPM
(none when the budget refused), and holds a concurrency slot only while it runs.
"""

from __future__ import annotations

from hoosh_metering.limits import KeyLimits
from hoosh_tenancy import KeyRecord

NO_LIMITS = KeyLimits()


def limits_of(principal: KeyRecord) -> KeyLimits:
    """The principal's limits (none for the bootstrap admin and open mode's anonymous user)."""
    if not (principal.rpm or principal.tpm or principal.max_concurrency):
        return NO_LIMITS
    return KeyLimits(rpm=principal.rpm, tpm=principal.tpm, max_concurrency=principal.max_concurrency)
