"""The tenancy library's errors: free of HTTP and gRPC, mapped by the services."""

from __future__ import annotations


class TenancyError(Exception):
    """Base of every tenancy error; ``message`` is safe to show a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidKeyRecord(TenancyError):
    """A key record (or a change to one) failed validation."""


class KeyNotFound(TenancyError):
    """No key has this id."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"No API key has the id '{key_id}'.")
        self.key_id = key_id


class TenancyUnavailable(TenancyError):
    """Redis is unreachable or too slow: nothing may be decided from stale state."""
