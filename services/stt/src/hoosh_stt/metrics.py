"""The STT service's Prometheus instruments (the process-wide registry, served on
``HOOSH_STT_METRICS_LISTEN`` by ``python -m hoosh_stt``; the event publisher's
``hoosh_events_*`` come with the shared publisher builder).

Every transcription is counted once, by model and outcome (``ok`` or its error
code); the audio seconds, duration and cost of the successful ones. The model label
is a configured model id, or ``_other`` for anything a client asked for that is not
served (bounded all the same); error codes are the service's own fixed set.
"""

from __future__ import annotations

from typing import Final

from hoosh_common.metrics import DURATION_BUCKETS, OTHER, BoundedLabel
from prometheus_client import Counter, Gauge, Histogram

MODEL_LIMIT: Final = 32
STATUS_LIMIT: Final = 32
OK: Final = "ok"
model_label = BoundedLabel(MODEL_LIMIT)
status_label = BoundedLabel(STATUS_LIMIT)

REQUESTS = Counter(
    "hoosh_stt_requests", "Transcriptions by model and outcome (ok, or the error code).", ["model", "status"]
)
AUDIO_SECONDS = Counter("hoosh_stt_audio_seconds", "Seconds of audio transcribed (successful ones).", ["model"])
DURATION = Histogram(
    "hoosh_stt_duration_seconds",
    "Time from a transcription's first message to its answer (upload, queue, decode and engine), successful ones.",
    ["model"],
    buckets=DURATION_BUCKETS,
)
COST = Counter(
    "hoosh_stt_cost_usd_micros", "What successful transcriptions cost, in micro-dollars (the audio's price).", ["model"]
)
# Changed by the work queue itself (a few per transcription), so they sum over queues.
QUEUE_DEPTH = Gauge("hoosh_stt_queue_depth", "Transcriptions waiting for an engine thread.")
ACTIVE = Gauge("hoosh_stt_active", "Transcriptions running on an engine thread.")


def label_for(model: str, served: frozenset[str]) -> str:
    """A served model id, or ``_other`` (a client's free text never becomes a series)."""
    return model_label(model) if model in served else OTHER


def succeeded(model: str, audio_seconds: float, seconds: float, cost_usd_micros: int) -> None:
    REQUESTS.labels(model, OK).inc()
    AUDIO_SECONDS.labels(model).inc(audio_seconds)
    DURATION.labels(model).observe(seconds)
    COST.labels(model).inc(cost_usd_micros)


def failed(model: str, code: str) -> None:
    REQUESTS.labels(model, status_label(code)).inc()
