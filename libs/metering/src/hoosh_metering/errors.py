"""The metering exception hierarchy. Free of gRPC so the store runs in-process
anywhere; the budget service maps each class to a status code."""

from __future__ import annotations

from typing import Literal

ExhaustedReason = Literal["tokens", "usd"]
Limit = Literal["rpm", "tpm", "concurrency"]


class BudgetError(Exception):
    """Base of every error the metering library raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BudgetError):
    """A malformed request: bad pool name or id, bad period or time zone, depth > 8, parent change."""


class InvalidAmount(InvalidArgument):
    """A token count, capacity, price or amount that is negative or above 2**53 - 1."""


class PoolNotFound(BudgetError):
    """The named pool (or the parent named at creation) does not exist."""

    def __init__(self, pool: str) -> None:
        super().__init__(f"Token pool '{pool}' not found")
        self.pool = pool


class PoolExists(BudgetError):
    """A pool with this name exists already (names are unique across every tree)."""

    def __init__(self, pool: str) -> None:
        super().__init__(f"Token pool '{pool}' already exists")
        self.pool = pool


class PoolInUse(BudgetError):
    """The pool cannot be deleted while it has children."""

    def __init__(self, pool: str, children: int = 0) -> None:
        super().__init__(f"Token pool '{pool}' has {children} child pool(s); delete them first")
        self.pool = pool
        self.children = children


class BudgetExhausted(BudgetError):
    """A pool of the chain cannot cover the request right now.

    ``pool`` is the tightest pool of the chain. With ``reason == "tokens"``,
    ``requested`` and ``available`` count tokens; with ``reason == "usd"`` they are
    micro-dollars. ``retry_after_seconds`` is when enough leased tokens are due back
    (or the pool's period ends), else the store's default.
    """

    def __init__(
        self,
        pool: str,
        requested: int,
        available: int,
        retry_after_seconds: int,
        message: str | None = None,
        *,
        reason: ExhaustedReason = "tokens",
    ) -> None:
        if message is None:
            if reason == "usd":
                message = (
                    f"Budget exceeded: pool '{pool}' has {available} micro-dollars available, {requested} requested"
                )
            else:
                message = (
                    f"Token budget exceeded: pool '{pool}' has {available} tokens available, {requested} requested"
                )
        super().__init__(message)
        self.pool = pool
        self.requested = requested
        self.available = available
        self.retry_after_seconds = retry_after_seconds
        self.reason: ExhaustedReason = reason


class BudgetUnavailable(BudgetError):
    """Redis (or the budget service) is unreachable or too slow: nothing is admitted."""


class NotOwner(BudgetError):
    """The owner or kind given does not match the reservation's."""

    def __init__(self, reservation_id: str, message: str | None = None) -> None:
        super().__init__(message or f"Reservation '{reservation_id}' belongs to another holder")
        self.reservation_id = reservation_id


class RateLimited(BudgetError):
    """A key's RPM, TPM or concurrency limit refuses the request for now."""

    def __init__(self, limit: Limit, retry_after_seconds: int, message: str | None = None) -> None:
        super().__init__(message or f"Rate limit reached for this key ({limit}); retry in {retry_after_seconds}s")
        self.limit: Limit = limit
        self.retry_after_seconds = retry_after_seconds
