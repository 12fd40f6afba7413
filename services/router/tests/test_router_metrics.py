"""The router's metrics and spans, counted at its one ending per request: against the
real Redis and NATS with the bench stand-ins as providers (the ``router`` fixture of
test_chat_service). Metrics are process-wide, so each test reads deltas."""

from __future__ import annotations

import uuid

import pytest
from hoosh_common.metrics import KeyLabel
from hoosh_common.telemetry import capture_spans
from hoosh_router import metrics
from hoosh_router.errors import RouterError
from hoosh_router.health import HealthBoard
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from . import test_chat_service
from .test_chat_service import Router, request_for, rid

router = test_chat_service.router  # the fixture: the router's parts on real Redis and NATS

tracer = trace.get_tracer("test")


def value(name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    found = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and wanted <= set(sample.labels.items()):
                found += sample.value
    return found


class Deltas:
    def __init__(self, *queries: tuple[str, dict[str, str]]) -> None:
        self.queries = queries
        self.before = [value(name, **labels) for name, labels in queries]

    def now(self) -> list[float]:
        return [value(name, **labels) - start for (name, labels), start in zip(self.queries, self.before, strict=True)]


async def test_completed_requests_are_counted_once_with_their_tokens_and_histograms(router: Router) -> None:
    # mock-ok matches the provider's pattern mock-*: the label is the pattern, never the client's string.
    ok = {"kind": "chat", "model": "mock-*", "provider": "primary", "status": "ok", "stream": "false"}
    genai = {"gen_ai_request_model": "mock-*", "gen_ai_provider_name": "openai", "gen_ai_operation_name": "chat"}
    deltas = Deltas(
        ("hoosh_inference_requests_total", ok),
        ("hoosh_inference_duration_seconds_count", {"model": "mock-*", "provider": "primary"}),
        ("hoosh_inference_tokens_total", {"model": "mock-*", "type": "input"}),
        ("hoosh_inference_tokens_total", {"model": "mock-*", "type": "output"}),
        ("gen_ai_client_token_usage_count", {**genai, "gen_ai_token_type": "input"}),
        ("gen_ai_client_token_usage_sum", {**genai, "gen_ai_token_type": "output"}),
        ("gen_ai_client_operation_duration_seconds_count", {**genai, "error_type": ""}),
        ("hoosh_upstream_attempts_total", {"provider": "primary", "outcome": "ok"}),
        ("hoosh_upstream_duration_seconds_count", {"provider": "primary", "outcome": "ok"}),
        ("hoosh_budget_step_seconds_count", {"step": "reserve"}),
    )
    prompt = completion = 0
    for _ in range(3):
        reply = await router.chat.chat(request_for("mock-ok"), rid())
        prompt += reply.usage.prompt_tokens
        completion += reply.usage.completion_tokens
    await router.recorder.drain(5)
    assert deltas.now() == [3, 3, prompt, completion, 3, completion, 3, 3, 3, 3]


async def test_a_failover_stream_counts_each_attempt_and_the_time_to_first_token(router: Router) -> None:
    deltas = Deltas(
        (
            "hoosh_inference_requests_total",
            {"model": "flaky-first", "provider": "secondary", "status": "ok", "stream": "true"},
        ),
        ("hoosh_upstream_attempts_total", {"provider": "primary"}),
        ("hoosh_upstream_attempts_total", {"provider": "primary", "outcome": "ok"}),
        ("hoosh_upstream_attempts_total", {"provider": "secondary", "outcome": "ok"}),
        ("hoosh_time_to_first_token_seconds_count", {"model": "flaky-first", "provider": "secondary"}),
        ("gen_ai_client_operation_time_to_first_chunk_seconds_count", {"gen_ai_request_model": "flaky-first"}),
    )
    _ = [chunk async for chunk in router.chat.stream(request_for("flaky-first"), rid())]
    await router.recorder.drain(5)
    # Three failed tries on primary (503), then secondary answered.
    assert deltas.now() == [1, 3, 0, 1, 1, 1]


async def test_an_unknown_model_is_counted_without_its_name_as_a_label(router: Router) -> None:
    model = f"no-such-{uuid.uuid4().hex}"
    before = value("hoosh_inference_requests_total", model=metrics.UNROUTED)
    with pytest.raises(RouterError):
        await router.chat.chat(request_for(model), rid())
    await router.recorder.drain(5)
    assert value("hoosh_inference_requests_total", model=metrics.UNROUTED) == before + 1
    assert model.encode() not in generate_latest(REGISTRY)


async def test_client_chosen_model_names_never_become_labels(router: Router) -> None:
    """A user key can send any name a pattern route accepts: it is counted under the
    pattern, and none of those names appears in the exposition."""
    names = [f"mock-{uuid.uuid4().hex}" for _ in range(20)]
    before = value("hoosh_inference_requests_total", model="mock-*", status="ok")
    for name in names:
        await router.chat.chat(request_for(name), rid())
    await router.recorder.drain(5)
    assert value("hoosh_inference_requests_total", model="mock-*", status="ok") == before + 20
    exposition = generate_latest(REGISTRY)
    assert not [name for name in names if name.encode() in exposition]


async def test_failures_are_counted_by_error_code_and_per_key(router: Router) -> None:
    failed = {"model": "mock-*", "provider": "primary", "status": "invalid_request"}
    before = (value("hoosh_inference_requests_total", **failed), value("hoosh_key_requests_total", key_id="_other"))
    request = request_for("mock-fail-400")
    request.caller.key_id = "key-not-allowlisted"
    with pytest.raises(RouterError):
        await router.chat.chat(request, rid())
    await router.recorder.drain(5)
    after = (value("hoosh_inference_requests_total", **failed), value("hoosh_key_requests_total", key_id="_other"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1]
    assert b"key-not-allowlisted" not in generate_latest(REGISTRY)


async def test_cache_lookups_and_hits_are_counted(router: Router) -> None:
    before = (value("hoosh_cache_requests_total", result="miss"), value("hoosh_cache_requests_total", result="hit"))
    tokens_before = value("hoosh_inference_tokens_total", model="mock-*", type="output")
    first = await router.chat.chat(request_for("mock-cached-metrics", temperature=0), rid())
    await router.cache.drain()
    second = await router.chat.chat(request_for("mock-cached-metrics", temperature=0), rid())
    await router.recorder.drain(5)
    assert (first.cache, second.cache) == ("miss", "hit")
    after = (value("hoosh_cache_requests_total", result="miss"), value("hoosh_cache_requests_total", result="hit"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1]
    # The pool paid for the hit too (charge_hits, the default): the tokens count it, as the ledger does.
    assert value("hoosh_inference_tokens_total", model="mock-*", type="output") - tokens_before == (
        2 * first.usage.completion_tokens
    )


async def test_attempt_spans_follow_the_genai_conventions(router: Router) -> None:
    with capture_spans() as exporter:
        with tracer.start_as_current_span("request") as request_span:
            reply = await router.chat.chat(request_for("flaky-first"), rid())
        await router.recorder.drain(5)
        finished = exporter.get_finished_spans()
    trace_id = request_span.get_span_context().trace_id
    attempts = [
        span
        for span in finished
        if span.kind == trace.SpanKind.CLIENT
        and span.context.trace_id == trace_id
        and "db.system" not in (span.attributes or {})  # the budget's Redis calls are CLIENT spans too
    ]
    assert [span.name for span in attempts] == ["chat mock-fail-503"] * 3 + ["chat claude-ok"]
    assert all(span.attributes["error.type"] for span in attempts[:3])
    last = attempts[-1].attributes
    assert last["gen_ai.operation.name"] == "chat" and last["gen_ai.provider.name"] == "anthropic"
    assert last["gen_ai.request.model"] == "claude-ok" and last["hoosh.provider"] == "secondary"
    assert last["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert "error.type" not in last
    # The request's own span got the outcome: usage, cost, pool chain, attempts.
    request = next(span for span in finished if span.name == "request")
    attributes = request.attributes
    assert attributes["gen_ai.request.model"] == "flaky-first"
    assert attributes["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert attributes["hoosh.attempts"] == 4 and attributes["hoosh.provider"] == "secondary"
    assert list(attributes["hoosh.pool_chain"]) == ["team"]
    assert attributes["hoosh.cost_usd_micros"] == reply.usage.cost_usd_micros


async def test_without_an_exporter_no_span_is_started(router: Router) -> None:
    """Not exporting, the hot path starts no span at all: a processor on the SDK provider
    (the one configure_tracing installs) sees nothing, while the request still runs in
    the caller's trace context (a non-recording span, as the servicer attaches it)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    caller = trace.NonRecordingSpan(
        trace.SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    )
    try:
        with trace.use_span(caller):
            await router.chat.chat(request_for("flaky-first"), rid())
            _ = [chunk async for chunk in router.chat.stream(request_for("mock-ok"), rid())]
        await router.recorder.drain(5)
        assert exporter.get_finished_spans() == ()
    finally:
        exporter.shutdown()


def test_breaker_state_and_reported_rate_limits_are_read_at_scrape_time(router: Router) -> None:
    registry = CollectorRegistry()
    health: HealthBoard = router.chat._dispatch.health
    metrics.register_state(health, ["primary", "secondary"], registry)
    metrics.note_ratelimit("primary", {"x-ratelimit-remaining-requests": "41", "x-ratelimit-remaining-tokens": "9000"})
    metrics.note_ratelimit("primary", {"x-ratelimit-remaining-tokens": "not a number"})
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert samples[("hoosh_provider_breaker_state", (("provider", "primary"),))] == 0
    assert samples[("hoosh_provider_ratelimit_remaining", (("kind", "requests"), ("provider", "primary")))] == 41
    assert samples[("hoosh_provider_ratelimit_remaining", (("kind", "tokens"), ("provider", "primary")))] == 9000


def test_key_ids_are_labels_only_when_allowlisted() -> None:
    label = KeyLabel(["key-a", " key-b ", ""])
    assert [label("key-a"), label("key-b"), label("key-c"), label("")] == ["key-a", "key-b", "_other", "_other"]
