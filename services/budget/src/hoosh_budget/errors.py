"""The budget's exception hierarchy. Free of gRPC so the store can run in-process
anywhere; server.py maps each class to a status code."""

from __future__ import annotations


class BudgetError(Exception):
    """Base of every error the budget store raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BudgetError):
    """A malformed request: empty pool name or reservation id, name too long."""


class InvalidAmount(InvalidArgument):
    """A token count or capacity that is negative or too large."""


class PoolNotFound(BudgetError):
    """The named pool does not exist."""

    def __init__(self, pool: str) -> None:
        super().__init__(f"Token pool '{pool}' not found")
        self.pool = pool


class BudgetExhausted(BudgetError):
    """The pool cannot cover the request right now.

    ``retry_after_seconds`` is when enough leased tokens are due back (if the
    outstanding reservations could cover the request at all), else a default.
    """

    def __init__(
        self, pool: str, requested: int, available: int, retry_after_seconds: int, message: str | None = None
    ) -> None:
        super().__init__(
            message or f"Token budget exceeded: pool '{pool}' has {available} tokens available, {requested} requested"
        )
        self.pool = pool
        self.requested = requested
        self.available = available
        self.retry_after_seconds = retry_after_seconds


class BudgetUnavailable(BudgetError):
    """The budget could not be reached (the budget service over gRPC, or Redis)."""
