"""The audit service's exceptions."""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every audit error."""


class ConfigError(AuditError):
    """Settings are missing or unsafe; the service refuses to start."""


class AuditLogCorrupt(AuditError):
    """The log cannot be continued (unreadable last entry, a key that does not match)."""


class LogBehindCheckpoint(AuditLogCorrupt):
    """The log ends before the last checkpoint: entries ``missing_from..missing_to`` are gone
    (the tail was cut off, a segment or the whole log was deleted)."""

    def __init__(self, message: str, *, missing_from: int, missing_to: int) -> None:
        super().__init__(message)
        self.missing_from = missing_from
        self.missing_to = missing_to


class AuditWriteError(AuditError):
    """Appending to the log failed; nothing of the batch is committed."""


class UndecodableEvent(AuditError):
    """A message on a subject audit records whose payload can never be decoded: it is terminated."""


class CheckpointError(AuditError):
    """A checkpoint cannot be read, parsed or trusted (bad signature, unknown key id)."""


class CheckpointConflict(CheckpointError):
    """The stored checkpoint is ahead of the log being checkpointed (it was cut back, or
    another log writes the same checkpoint key): it is left in place as evidence."""


class BadCursor(AuditError):
    """A ListEntries cursor that this service did not issue for these filters."""
