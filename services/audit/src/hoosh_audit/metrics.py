"""The audit's Prometheus instruments (the process-wide registry, served on
``HOOSH_AUDIT_METRICS_LISTEN`` by ``python -m hoosh_audit``).

Lag. ``hoosh_audit_lag_events`` is the stream's last sequence (read from JetStream's
stream info in the event loop every few seconds, never from the scrape thread) minus
the consumer's position: the highest stream sequence it has written, or deliberately
passed over (a subject audit does not record, an undecodable payload, a duplicate).
Measuring from the position rather than from ``hoosh_audit_written_stream_seq`` keeps
events audit never records from showing as a lag that never drains. The same formula
holds for a workqueue stream: acked messages leave it, but its sequence numbers keep
counting, so the difference is still the number of events not yet dealt with (the
consumer's ``num_pending`` would miss the ones delivered and not yet acked).
"""

from __future__ import annotations

from typing import Final

from hoosh_common.eventbus import REJECT_REASONS
from hoosh_common.metrics import FAST_BUCKETS, BoundedLabel
from prometheus_client import Counter, Gauge, Histogram

# One series per event kind (the subject without the prefix); new kinds past this
# many share the ``_other`` series.
KIND_LIMIT: Final = 64
# Subjects whose counter child is remembered; past this, the label is resolved per
# event (admin.> takes any suffix, so the cache must not grow with them).
_KIND_CACHE_LIMIT: Final = 256

EVENTS_WRITTEN = Counter(
    "hoosh_audit_events_written",
    "Events written to the audit log (fsynced), by kind (the subject without the prefix).",
    ["kind"],
)
BATCHES = Counter("hoosh_audit_batches", "Batches written to the audit log (each one fsync).")
BATCH_WRITE_SECONDS = Histogram(
    "hoosh_audit_batch_write_seconds",
    "Time to append and fsync one batch (a segment rotation included).",
    buckets=FAST_BUCKETS,
)
WRITE_FAILURES = Counter(
    "hoosh_audit_write_failures", "Batch writes that failed (retried in place until the disk recovers)."
)
WRITTEN_STREAM_SEQ = Gauge("hoosh_audit_written_stream_seq", "Stream sequence of the last event written to the log.")
STREAM_LAST_SEQ = Gauge(
    "hoosh_audit_stream_last_seq", "The stream's last sequence (JetStream stream info, read every few seconds)."
)
LAG_EVENTS = Gauge(
    "hoosh_audit_lag_events",
    "Stream last sequence minus the highest sequence written or deliberately passed over (0 floor).",
)
LOG_SEQ = Gauge("hoosh_audit_log_seq", "Entries in the audit log (seq of the last one).")
REDELIVERIES_SKIPPED = Counter(
    "hoosh_audit_redeliveries_skipped",
    "Redelivered messages already written (stream sequence at or below the last written): acked, not written.",
)
DUPLICATES_SKIPPED = Counter(
    "hoosh_audit_duplicates_skipped",
    "Outbox copies of events already in the log (republished after the duplicate window): acked, not written.",
)
UNDECODABLE = Counter(
    "hoosh_audit_undecodable", "Events on a recorded subject whose payload cannot be decoded (terminated)."
)
IGNORED = Counter(
    "hoosh_audit_events_ignored", "Events on subjects audit does not record (another consumer's): acked, not written."
)
EVENTS_REJECTED = Counter(
    "hoosh_audit_events_rejected",
    "Events whose publisher signature is missing, malformed, from an unknown key or wrong: "
    "recorded as audit.rejected entries, never as the event they claim to be.",
    ["reason"],
)
for _reason in REJECT_REASONS:  # every series from the start: an alert sees 0 before the first forgery
    EVENTS_REJECTED.labels(_reason)
CHECKPOINTS = Counter("hoosh_audit_checkpoints", "Checkpoints of the log's head stored in Redis.")
CHECKPOINT_FAILURES = Counter(
    "hoosh_audit_checkpoint_failures",
    "Checkpoint writes that failed: Redis away (retried) or refused (the stored one is ahead of the log).",
    ["reason"],
)
CHECKPOINT_FAILED_ERROR = CHECKPOINT_FAILURES.labels("error")
CHECKPOINT_FAILED_REFUSED = CHECKPOINT_FAILURES.labels("refused")
CHECKPOINT_SEQ = Gauge("hoosh_audit_checkpoint_seq", "Log seq of the last checkpoint stored.")
CHAIN_VALID = Gauge("hoosh_audit_chain_valid", "1 while the chain verifies (the periodic integrity check), else 0.")
VERIFY_FAILURES = Counter(
    "hoosh_audit_verify_failures",
    "Verifications that found the chain broken: each new problem the periodic check finds, "
    "and each full verification (Verify with full) that fails.",
    ["check"],
)
VERIFY_FAILED_PERIODIC = VERIFY_FAILURES.labels("periodic")
VERIFY_FAILED_FULL = VERIFY_FAILURES.labels("full")


class KindCounters:
    """The written-events counter child of each subject, resolved once per subject."""

    __slots__ = ("_bound", "_children", "_prefix")

    def __init__(self, subject_prefix: str, limit: int = KIND_LIMIT) -> None:
        self._prefix = f"{subject_prefix}."
        self._bound = BoundedLabel(limit)
        self._children: dict[str, Counter] = {}

    def kind(self, subject: str) -> str:
        return subject.removeprefix(self._prefix)

    def __call__(self, subject: str) -> Counter:
        child = self._children.get(subject)
        if child is None:
            child = EVENTS_WRITTEN.labels(self._bound(self.kind(subject)))
            if len(self._children) < _KIND_CACHE_LIMIT:
                self._children[subject] = child
        return child
