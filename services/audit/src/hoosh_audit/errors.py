"""The audit service's exceptions."""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every audit error."""


class ConfigError(AuditError):
    """Settings are missing or unsafe; the service refuses to start."""


class AuditLogCorrupt(AuditError):
    """The log file cannot be continued (unreadable last entry, or a key that does not match)."""


class AuditWriteError(AuditError):
    """Appending to the log failed; nothing of the batch is committed."""


class UndecodableEvent(AuditError):
    """A message on a subject audit records whose payload can never be decoded: it is terminated."""
