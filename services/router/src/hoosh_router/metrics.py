"""The router's Prometheus metrics and the attributes of its inference spans.

Every request ends in exactly one event (``Recorder.completed`` / ``failed``), and the
metrics are counted at that same point, so requests, tokens and cost here agree with
the events, the audit log and the ledger. Label values are bounded: models and pools
through :class:`~hoosh_common.metrics.BoundedLabel`, a model that was never routed is
``_unrouted``, key ids only for ``HOOSH_METRICS_KEY_IDS``.

GenAI metrics use the OpenTelemetry semantic-convention names
(``gen_ai.client.token.usage`` → ``gen_ai_client_token_usage``; durations get the
``_seconds`` suffix the OpenTelemetry Prometheus exporter gives them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from hoosh.chat.v1 import chat_pb2
from hoosh_common.metrics import (
    DURATION_BUCKETS,
    FAST_BUCKETS,
    TOKEN_BUCKETS,
    BoundedLabel,
    KeyLabel,
    SnapshotCollector,
    register_collector,
)
from opentelemetry import trace
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from . import routing

if TYPE_CHECKING:
    from .config import ProviderConfig
    from .health import HealthBoard
    from .recording import RequestInfo

UNROUTED = routing.UNROUTED  # a model no route matched

# gen_ai.provider.name by provider type: the well-known values where there is one.
GENAI_PROVIDER = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gcp.gemini",
    "deepseek": "deepseek",
    "mistral": "mistral_ai",
    "groq": "groq",
    "xai": "x_ai",
    "openrouter": "openrouter",
    "local": "hoosh.local",
}
GENAI_OPERATION = {"chat": "chat", "response": "chat", "embedding": "embeddings"}

REQUESTS = Counter(
    "hoosh_inference_requests_total",
    "Inference requests the router ended, by outcome (status: ok or the error code).",
    ["kind", "model", "provider", "status", "stream"],
)
DURATION = Histogram(
    "hoosh_inference_duration_seconds",
    "Router time per request, from arrival to its ending (a stream: to its last token).",
    ["kind", "model", "provider", "stream"],
    buckets=DURATION_BUCKETS,
)
TOKENS = Counter(
    "hoosh_inference_tokens_total",
    "Tokens charged, by type (input, output; cached: the part of input served from the provider's cache).",
    ["kind", "model", "provider", "type"],
)
COST = Counter(
    "hoosh_cost_usd_micros_total",
    "Cost charged in micro-dollars (the same figure as the ledger).",
    ["provider", "model", "pool"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "hoosh_time_to_first_token_seconds",
    "Streams: from arrival at the router to the first content chunk.",
    ["model", "provider"],
    buckets=DURATION_BUCKETS,
)
UPSTREAM = Histogram(
    "hoosh_upstream_duration_seconds",
    "One upstream call (a stream: until it opened), by outcome.",
    ["provider", "outcome"],
    buckets=DURATION_BUCKETS,
)
ATTEMPTS = Counter(
    "hoosh_upstream_attempts_total",
    "Upstream calls made (retries and fallbacks included), by outcome.",
    ["provider", "outcome"],
)
CACHE = Counter("hoosh_cache_requests_total", "Response cache lookups, by result (hit, miss).", ["result"])
KEY_REQUESTS = Counter(
    "hoosh_key_requests_total", "Requests per key (allowlisted key ids; every other key is _other).", ["key_id"]
)
KEY_COST = Counter(
    "hoosh_key_cost_usd_micros_total", "Cost per key in micro-dollars (allowlisted key ids).", ["key_id"]
)
BUDGET_STEP = Histogram(
    "hoosh_budget_step_seconds",
    "One budget round trip from the router (reserve; commit of a completed request).",
    ["step"],
    buckets=FAST_BUCKETS,
)
BUDGET_RESERVE = BUDGET_STEP.labels("reserve")
BUDGET_COMMIT = BUDGET_STEP.labels("commit")

_GENAI_LABELS = [
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
]
GENAI_TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per upstream operation (gen_ai.client.token.usage).",
    [*_GENAI_LABELS, "gen_ai_token_type"],
    buckets=TOKEN_BUCKETS,
)
GENAI_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of the GenAI operation as the gateway saw it (gen_ai.client.operation.duration).",
    [*_GENAI_LABELS, "error_type"],
    buckets=DURATION_BUCKETS,
)
GENAI_TIME_TO_FIRST_CHUNK = Histogram(
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "Streams: time to the first chunk (gen_ai.client.operation.time_to_first_chunk).",
    _GENAI_LABELS,
    buckets=DURATION_BUCKETS,
)

# Providers' own model names (``gen_ai_response_model`` of exactly named models).
response_models = BoundedLabel(int(os.environ.get("HOOSH_METRICS_MAX_RESPONSE_MODELS", "100")))
pools = BoundedLabel(int(os.environ.get("HOOSH_METRICS_MAX_POOLS", "500")))
keys = KeyLabel(os.environ.get("HOOSH_METRICS_KEY_IDS", "").split(","))

# Rate-limit headroom the providers report on their answers (latest seen per provider).
_RATELIMIT_HEADERS = {
    "x-ratelimit-remaining-requests": "requests",
    "x-ratelimit-remaining-tokens": "tokens",
    "anthropic-ratelimit-requests-remaining": "requests",
    "anthropic-ratelimit-tokens-remaining": "tokens",
}
_ratelimit_remaining: dict[tuple[str, str], float] = {}


def note_ratelimit(provider: str, headers: Mapping[str, str]) -> None:
    """Keep the provider's reported remaining requests / tokens (two lookups per answer)."""
    for header, kind in _RATELIMIT_HEADERS.items():
        value = headers.get(header)
        if value is not None:
            try:
                _ratelimit_remaining[(provider, kind)] = float(value)
            except ValueError:
                pass


def genai_provider(provider: ProviderConfig | None) -> str:
    if provider is None:
        return ""
    return GENAI_PROVIDER.get(provider.type, provider.type)


def observe_attempt(provider: str, outcome: str, seconds: float) -> None:
    ATTEMPTS.labels(provider, outcome).inc()
    UPSTREAM.labels(provider, outcome).observe(seconds)


def observe_cache(hit: bool) -> None:
    CACHE.labels("hit" if hit else "miss").inc()


class _Series:
    """The label children of one (kind, model, provider, stream, response model): resolved
    once, then each request is a handful of increments (``labels()`` costs more than the
    increment it selects)."""

    __slots__ = (
        "duration",
        "genai",
        "genai_duration",
        "genai_first_chunk",
        "genai_input",
        "genai_output",
        "labels",
        "requests_ok",
        "time_to_first_token",
        "tokens_cached",
        "tokens_input",
        "tokens_output",
    )

    def __init__(self, kind: str, model: str, provider: str, stream: str, genai: tuple[str, str, str, str]) -> None:
        self.labels = (kind, model, provider)
        self.genai = genai
        self.requests_ok = REQUESTS.labels(kind, model, provider, "ok", stream)
        self.duration = DURATION.labels(kind, model, provider, stream)
        self.tokens_input = TOKENS.labels(kind, model, provider, "input")
        self.tokens_output = TOKENS.labels(kind, model, provider, "output")
        self.tokens_cached = TOKENS.labels(kind, model, provider, "cached")
        self.genai_input = GENAI_TOKEN_USAGE.labels(*genai, "input")
        self.genai_output = GENAI_TOKEN_USAGE.labels(*genai, "output")
        self.genai_duration = GENAI_DURATION.labels(*genai, "")
        self.time_to_first_token = TIME_TO_FIRST_TOKEN.labels(model, provider)
        self.genai_first_chunk = GENAI_TIME_TO_FIRST_CHUNK.labels(*genai)


_series: dict[tuple[str, str, str, bool, str], _Series] = {}
_costs: dict[tuple[str, str, str], Any] = {}
_keys: dict[str, tuple[Any, Any]] = {}


def _series_of(info: RequestInfo, provider: ProviderConfig | None, provider_name: str | None = None) -> _Series:
    if provider_name is None:
        provider_name = provider.name if provider is not None else ""
    model = info.model_label or UNROUTED
    key = (info.kind, model, provider_name, info.stream, info.response_model)
    series = _series.get(key)
    if series is None:
        # The response model is the provider's word: a label of its own (bounded) only when
        # the request named an exact configured model, else the request's label again.
        exact = model == info.model
        response = response_models(info.response_model) if exact and info.response_model else model
        genai = (GENAI_OPERATION.get(info.kind, info.kind), genai_provider(provider), model, response)
        series = _Series(info.kind, model, provider_name, "true" if info.stream else "false", genai)
        if len(_series) < _MAX_SERIES:  # beyond: resolved each time (every label is bounded)
            _series[key] = series
    return series


_MAX_SERIES = 10_000


def observe_completed(
    info: RequestInfo,
    provider: ProviderConfig | None,
    usage: chat_pb2.Usage,
    usd: int,
    *,
    cached: bool,
    charged_tokens: int = 0,
) -> None:
    """A request that answered: count it, its tokens, its cost; the GenAI histograms for
    the upstream operation (not for cache hits: nothing went upstream)."""
    now = time.monotonic()
    series = _series_of(info, provider)
    series.requests_ok.inc()
    series.duration.observe(now - info.started)
    _count_key(info, usd)
    if cached:
        if charged_tokens:  # the pool paid for the hit (cache.charge_hits): the ledger counts it
            _count_tokens(info, series, usage, 0)
        return
    _count_tokens(info, series, usage, usd)
    series.genai_input.observe(usage.prompt_tokens)
    if info.kind != "embedding":
        series.genai_output.observe(usage.completion_tokens)
    # The operation itself: from the answering call's start (not the router's queueing and budget step).
    series.genai_duration.observe(now - (info.upstream_started or info.started))
    if info.first_token_at is not None:
        first = info.first_token_at - info.started
        series.time_to_first_token.observe(first)
        series.genai_first_chunk.observe(first)


def observe_failed(
    info: RequestInfo,
    provider_name: str,
    provider: ProviderConfig | None,
    error_code: str,
    charge: chat_pb2.Usage | None,
) -> None:
    """A request that failed (``error_code`` is one of the router's own codes: bounded;
    ``provider_name``: the provider last called, "" when none was)."""
    now = time.monotonic()
    series = _series_of(info, provider, provider_name)
    kind, model, provider_name = series.labels
    REQUESTS.labels(kind, model, provider_name, error_code, "true" if info.stream else "false").inc()
    series.duration.observe(now - info.started)
    _count_key(info, charge.cost_usd_micros if charge is not None else 0)
    if charge is not None:
        _count_tokens(info, series, charge, charge.cost_usd_micros)
    if provider_name:
        GENAI_DURATION.labels(*series.genai, error_code).observe(now - (info.upstream_started or info.started))


def _count_tokens(info: RequestInfo, series: _Series, usage: chat_pb2.Usage, usd: int) -> None:
    if usage.prompt_tokens:
        series.tokens_input.inc(usage.prompt_tokens)
    if usage.completion_tokens:
        series.tokens_output.inc(usage.completion_tokens)
    if usage.cached_tokens:
        series.tokens_cached.inc(usage.cached_tokens)
    if usd:
        _, model, provider = series.labels
        cost_key = (provider, model, info.pool)
        cost = _costs.get(cost_key)
        if cost is None:
            cost = COST.labels(provider, model, pools(info.pool))
            if len(_costs) < _MAX_SERIES:
                _costs[cost_key] = cost
        cost.inc(usd)


def _count_key(info: RequestInfo, usd: int) -> None:
    """Per key (allowlisted ids; the rest ``_other``): every request, and its cost."""
    if not info.key_id:
        return
    per_key = _keys.get(info.key_id)
    if per_key is None:
        label = keys(info.key_id)
        per_key = (KEY_REQUESTS.labels(label), KEY_COST.labels(label))
        if len(_keys) < _MAX_SERIES:
            _keys[info.key_id] = per_key
    per_key[0].inc()
    if usd:
        per_key[1].inc(usd)


# -- spans --------------------------------------------------------------------------------


def span_outcome(
    info: RequestInfo,
    provider: ProviderConfig | None,
    usage: chat_pb2.Usage | None,
    *,
    finish_reason: str = "",
    error_type: str = "",
    attempts: int = 0,
    cached: bool = False,
) -> None:
    """The request span's GenAI and hoosh attributes once the request has ended."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": GENAI_OPERATION.get(info.kind, info.kind),
        "gen_ai.provider.name": genai_provider(provider),
        "gen_ai.request.model": info.model,
        "gen_ai.response.model": info.response_model,
        "gen_ai.request.stream": info.stream,
        "hoosh.provider": provider.name if provider is not None else "",
        "hoosh.pool": info.pool,
        "hoosh.pool_chain": list(info.chain),
        "hoosh.key_id": info.key_id,
        "hoosh.attempts": attempts,
        "hoosh.cache_hit": cached,
        "error.type": error_type,
    }
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
        attributes["hoosh.cost_usd_micros"] = usage.cost_usd_micros
    if finish_reason:
        attributes["gen_ai.response.finish_reasons"] = [finish_reason]
    span.set_attributes({key: value for key, value in attributes.items() if value != "" and value is not None})


# -- state read at scrape time ---------------------------------------------------------------

_BREAKER_STATE = {"closed": 0, "half_open": 1, "open": 2}


def register_state(health: HealthBoard, provider_names: list[str], registry: CollectorRegistry = REGISTRY) -> None:
    """Breaker state per provider and the providers' reported rate-limit headroom, read
    from memory at scrape time."""

    def families() -> Iterator[GaugeMetricFamily]:
        now = time.time()
        breaker = GaugeMetricFamily(
            "hoosh_provider_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", labels=["provider"]
        )
        for name in provider_names:
            breaker.add_metric([name], _BREAKER_STATE.get(health.view(name).effective_state(now), 0))
        yield breaker
        headroom = GaugeMetricFamily(
            "hoosh_provider_ratelimit_remaining",
            "What the provider last reported as remaining in its rate-limit window (requests, tokens).",
            labels=["provider", "kind"],
        )
        for (provider, kind), value in list(_ratelimit_remaining.items()):
            headroom.add_metric([provider, kind], value)
        yield headroom

    register_collector(SnapshotCollector(families), registry)
