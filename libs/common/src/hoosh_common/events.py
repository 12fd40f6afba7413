"""JetStream names shared by the publisher (router) and the consumer (audit)."""

from __future__ import annotations

SUBJECT_PREFIX = "hoosh"
SUBJECT_COMPLETED = "inference.completed"
SUBJECT_FAILED = "inference.failed"
DEFAULT_STREAM = "HOOSH_EVENTS"


def subject(prefix: str, name: str) -> str:
    """Full subject for an event name, e.g. subject("hoosh", "inference.completed")."""
    return f"{prefix}.{name}"


SUBJECT_BUDGET_RESET = "budget.reset"
# One replica's answer to a reload of hoosh.yaml (events_pb2.ConfigReload; hoosh_common.reload).
SUBJECT_CONFIG_RELOAD = "config.reload"
