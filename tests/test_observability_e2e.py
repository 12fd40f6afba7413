"""Observability through every service, as an operator sees it.

- Traces: a stack exporting over OTLP to a real receiver in this process
  (``hoosh_cli.otlp_sink``); one trace id spans edge → router → budget → backend →
  NATS → audit for a chat, a streamed chat and a transcription, with the GenAI
  attributes set, and every span's parent is in the trace.
- Logs: each service's JSON log has a line for the request, joined by request id and
  trace id.
- Metrics: after N requests each service's ``/metrics`` (scraped over HTTP, parsed with
  the Prometheus text parser) moved by exactly N, and histogram counts match.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from hoosh_cli.otlp_sink import OtlpSink, ReceivedSpan
from hoosh_cli.stack import Ports, Stack, StackConfig
from prometheus_client.parser import text_string_to_metric_families

from . import test_stt_e2e
from .conftest import LOCAL_MODEL, STT_MODEL, RunningStack, _cleanup, admin_headers

pytestmark = pytest.mark.slow  # whole stacks with the real models

speech = test_stt_e2e.speech  # the fixture: the sentence as espeak-ng speaks it

# -- helpers ------------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one /metrics page: (name, sorted labels) -> value."""
    text = httpx.get(url, timeout=5).text
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        value for (sample, sample_labels), value in samples.items() if sample == name and wanted <= set(sample_labels)
    )


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def log_lines(path: Path, request_id: str) -> list[dict[str, object]]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        if request_id not in raw:
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if entry.get("request_id") == request_id:
            lines.append(entry)
    return lines


@dataclass
class Traced:
    stack: Stack
    sink: OtlpSink
    client: openai.OpenAI
    config: StackConfig


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """Every service exporting spans to the receiver; the router asks the budget service
    over gRPC (so the budget is a hop of its own in the trace)."""
    sink = OtlpSink()
    endpoint = sink.start()
    state_dir = tmp_path_factory.mktemp("traced")
    run_id = uuid.uuid4().hex[:10]
    config_file = state_dir / "hoosh.yaml"
    config_file.write_text(
        f"providers:\n  - name: local\n    type: local\n    models: [{LOCAL_MODEL}]\n    default_max_tokens: 8\n"
        "pools:\n  - name: default\n    capacity: 100000000\n"
    )
    config = StackConfig(
        state_dir=state_dir,
        ports=Ports.free(),
        config_file=config_file,
        nats_stream=f"HOOSH_TEST_TRACE_{run_id}",
        subject_prefix=f"hoosh_test_trace_{run_id}",
        budget_key_prefix=f"hoosh:test:{run_id}:",
        router_key_prefix=f"hoosh:test:{run_id}:router:",
        tenancy_key_prefix=f"hoosh:test:{run_id}:tenancy:",
        audit_key=secrets.token_hex(32),
        audit_consumer=f"audit_{run_id}",
        auth="open",
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "HOOSH_ROUTER_BUDGET_MODE": "grpc",
            # The budget service logs each operation at DEBUG (it is on the hot path in grpc mode).
            "HOOSH_LOG_LEVEL": "DEBUG",
            "HOOSH_STT_WORKERS": "1",
            "HOOSH_AUDIT_CHECKPOINT_PREFIX": f"hoosh:test:{run_id}:audit:",
        },
    )
    stack = Stack(config)
    asyncio.run(stack.start(timeout=180))
    try:
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="no-key-needed", max_retries=0)
        yield Traced(stack, sink, client, config)
    finally:
        stack.stop()
        sink.stop()
        asyncio.run(_cleanup(config))


def _has(spans: list[ReceivedSpan], service: str, predicate: Callable[[ReceivedSpan], bool] = lambda _: True) -> bool:
    return any(span.service == service and predicate(span) for span in spans)


def _audit_written(spans: list[ReceivedSpan]) -> bool:
    return _has(spans, "hoosh-audit", lambda span: span.name == "hoosh.audit.write")


def _orphans(spans: list[ReceivedSpan], root_parent: str) -> list[tuple[str, str, str]]:
    ids = {span.span_id for span in spans}
    return [
        (span.service, span.name, span.parent_span_id)
        for span in spans
        if span.parent_span_id not in ids and span.parent_span_id != root_parent
    ]


def assert_one_tree(spans: list[ReceivedSpan], root_parent: str) -> None:
    """Every span hangs off another span of the trace, or off the caller's span."""
    orphans = _orphans(spans, root_parent)
    assert not orphans, orphans


def complete(root_parent: str) -> Callable[[list[ReceivedSpan]], bool]:
    """The trace is whole: audit has written the event and every parent has arrived
    (services export in batches, each on its own schedule)."""
    return lambda spans: _audit_written(spans) and not _orphans(spans, root_parent)


def assert_event_reached_audit(spans: list[ReceivedSpan], publisher: str) -> None:
    by_id = {span.span_id: span for span in spans}
    writes = [span for span in spans if span.name == "hoosh.audit.write"]
    assert writes, "no audit write span"
    for write in writes:
        assert write.kind == "consumer"
        producer = by_id[write.parent_span_id]
        assert producer.kind == "producer" and producer.service == publisher, producer
        assert producer.name.startswith("publish ") and producer.attributes["messaging.system"] == "nats"


# -- traces -------------------------------------------------------------------------------


def test_a_chat_is_one_trace_from_the_edge_to_the_audit_write(traced: Traced) -> None:
    trace_id, parent, header = traceparent()
    raw = traced.client.chat.completions.with_raw_response.create(
        model=LOCAL_MODEL,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=4,
        extra_headers={"traceparent": header},
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]

    spans = traced.sink.wait_for(trace_id, complete(parent))
    services = {span.service for span in spans}
    assert {"hoosh-edge", "hoosh-router", "hoosh-budget", "hoosh-local-inference", "hoosh-audit"} <= services
    assert_one_tree(spans, parent)

    edge_root = [span for span in spans if span.parent_span_id == parent]
    assert [(span.service, span.kind) for span in edge_root] == [("hoosh-edge", "server")]
    # The budget service's reserve and commit, each a server span of this trace.
    budget_calls = {span.name for span in spans if span.service == "hoosh-budget" and span.kind == "server"}
    assert any("Reserve" in name for name in budget_calls) and any("Commit" in name for name in budget_calls)

    request_span = next(span for span in spans if span.name == "hoosh.router.v1.RouterService/Chat")
    attributes = request_span.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "hoosh.local"
    assert attributes["gen_ai.request.model"] == LOCAL_MODEL
    assert completion.usage is not None
    assert attributes["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert attributes["hoosh.pool_chain"] == ["default"]
    assert attributes["hoosh.attempts"] == 1 and attributes["hoosh.cache_hit"] is False
    assert "hoosh.cost_usd_micros" in attributes

    upstream = next(span for span in spans if span.name == f"chat {LOCAL_MODEL}" and span.service == "hoosh-router")
    assert upstream.kind == "client" and upstream.attributes["gen_ai.provider.name"] == "hoosh.local"
    engine = [
        span
        for span in spans
        if span.service == "hoosh-local-inference" and "gen_ai.usage.output_tokens" in span.attributes
    ]
    assert engine and engine[0].attributes["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert_event_reached_audit(spans, "hoosh-router")
    assert any(span.attributes.get("hoosh.request_id") == request_id for span in spans if span.service == "hoosh-audit")


def test_a_streamed_chat_is_one_trace_too(traced: Traced) -> None:
    trace_id, parent, header = traceparent()
    stream = traced.client.chat.completions.create(
        model=LOCAL_MODEL,
        messages=[{"role": "user", "content": "Count to three"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"traceparent": header},
    )
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None

    spans = traced.sink.wait_for(trace_id, complete(parent))
    assert {"hoosh-edge", "hoosh-router", "hoosh-budget", "hoosh-local-inference", "hoosh-audit"} <= {
        span.service for span in spans
    }
    assert_one_tree(spans, parent)
    request_span = next(span for span in spans if span.name == "hoosh.router.v1.RouterService/ChatStream")
    assert request_span.attributes["gen_ai.request.stream"] is True
    assert request_span.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert request_span.attributes["gen_ai.response.finish_reasons"]
    assert_event_reached_audit(spans, "hoosh-router")


def test_a_transcription_is_one_trace_to_the_audit_write(traced: Traced, speech: Path) -> None:
    trace_id, parent, header = traceparent()
    with speech.open("rb") as audio:
        transcription = traced.client.audio.transcriptions.create(
            model=STT_MODEL, file=audio, extra_headers={"traceparent": header}
        )
    assert transcription.text

    spans = traced.sink.wait_for(trace_id, complete(parent))
    assert {"hoosh-edge", "hoosh-stt", "hoosh-audit"} <= {span.service for span in spans}
    assert_one_tree(spans, parent)
    stt_span = next(span for span in spans if span.service == "hoosh-stt" and span.name.startswith("transcription"))
    assert stt_span.attributes["gen_ai.operation.name"] == "transcription"
    assert stt_span.attributes["gen_ai.request.model"] == STT_MODEL
    assert stt_span.attributes["hoosh.audio_seconds"] > 0
    # The budget step of the transcription: its Redis calls are spans of this trace.
    assert _has(
        spans, "hoosh-stt", lambda span: span.attributes.get("db.system") == "redis" or span.name.startswith("EVAL")
    )
    assert_event_reached_audit(spans, "hoosh-stt")


# -- logs ---------------------------------------------------------------------------------


def test_every_service_logs_the_request_with_its_request_id_and_trace_id(traced: Traced) -> None:
    trace_id, _, header = traceparent()
    raw = traced.client.chat.completions.with_raw_response.create(
        model=LOCAL_MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=3,
        extra_headers={"traceparent": header},
    )
    request_id = raw.headers["x-request-id"]
    traced.sink.wait_for(trace_id, _audit_written)  # audit has written it by now

    log_dir = traced.stack.log_dir
    found: dict[str, list[dict[str, object]]] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = {
            name: log_lines(log_dir / f"{name}.log", request_id)
            for name in ("edge", "router", "budget", "inference", "audit")
        }
        if all(found.values()):
            break
        time.sleep(0.2)
    assert all(found.values()), {name: len(lines) for name, lines in found.items()}
    for name, lines in found.items():
        assert all(line["trace_id"] == trace_id for line in lines), (name, lines)
        assert all(len(str(line["span_id"])) == 16 for line in lines), (name, lines)
    access = [line for line in found["edge"] if line["msg"] == "access"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["route"] == "/v1/chat/completions"


def test_without_an_exporter_the_log_lines_still_join_by_request_id_and_trace_id(hoosh: RunningStack) -> None:
    """The default: no exporter, no spans; every hop still carries the caller's trace id
    (HTTP traceparent, gRPC metadata, NATS headers) into its log lines."""
    trace_id, _, header = traceparent()
    client = openai.OpenAI(base_url=f"{hoosh.base_url}/v1", api_key="no-key-needed", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=LOCAL_MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=3,
        extra_headers={"traceparent": header},
    )
    request_id = raw.headers["x-request-id"]
    log_dir = hoosh.stack.log_dir
    found: dict[str, list[dict[str, object]]] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = {
            name: log_lines(log_dir / f"{name}.log", request_id) for name in ("edge", "router", "inference", "audit")
        }
        if all(found.values()):
            break
        time.sleep(0.2)
    assert all(found.values()), {name: len(lines) for name, lines in found.items()}
    for name, lines in found.items():
        assert all(line.get("trace_id") == trace_id for line in lines), (name, lines)


# -- metrics ------------------------------------------------------------------------------


def _metrics(hoosh: RunningStack) -> dict[str, str]:
    assert hoosh.stack_config is not None
    ports = hoosh.stack_config.ports
    return {
        "edge": f"http://127.0.0.1:{ports.edge_metrics}/metrics",
        "router": f"http://127.0.0.1:{ports.router_metrics}/metrics",
        "budget": f"http://127.0.0.1:{ports.budget_metrics}/metrics",
        "inference": f"http://127.0.0.1:{ports.inference_metrics}/metrics",
        "audit": f"http://127.0.0.1:{ports.audit_metrics}/metrics",
        "stt": f"http://127.0.0.1:{ports.stt_metrics}/metrics",
    }


def _wait_audit_idle(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Audit has written everything the stream holds and nothing more arrives."""
    previous = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        samples = scrape(url)
        written = total(samples, "hoosh_audit_events_written_total")
        if total(samples, "hoosh_audit_lag_events") == 0 and written == previous:
            return samples
        previous = written
        time.sleep(0.5)
    raise AssertionError("audit did not settle")


def test_each_services_counters_move_by_exactly_the_requests_made(hoosh: RunningStack) -> None:
    urls = _metrics(hoosh)
    client = openai.OpenAI(base_url=f"{hoosh.base_url}/v1", api_key="no-key-needed", max_retries=0)
    upstream_n, local_n = 5, 2
    model = f"mock-metrics-{uuid.uuid4().hex[:6]}"
    label = "mock-*"  # the configured pattern the name matched: client strings never become labels

    audit_before = _wait_audit_idle(urls["audit"])
    before = {name: scrape(url) for name, url in urls.items()}
    tokens = 0
    for _ in range(upstream_n):
        completion = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert completion.usage is not None
        tokens += completion.usage.total_tokens
    local_tokens = {"prompt": 0, "completion": 0}
    for _ in range(local_n):
        completion = client.chat.completions.create(
            model=LOCAL_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert completion.usage is not None
        local_tokens["prompt"] += completion.usage.prompt_tokens
        local_tokens["completion"] += completion.usage.completion_tokens
    audit_after = _wait_audit_idle(urls["audit"])
    after = {name: scrape(url) for name, url in urls.items()}

    def delta(where: str, name: str, **labels: str) -> float:
        return total(after[where], name, **labels) - total(before[where], name, **labels)

    n = upstream_n + local_n
    # edge: requests by route, method and status; the latency histogram counts them all.
    route = {"route": "/v1/chat/completions", "method": "POST"}
    assert delta("edge", "hoosh_http_requests_total", **route, status="200") == n
    assert delta("edge", "hoosh_http_request_duration_seconds_count", **route) == n
    # router: by model, provider, status; tokens; the GenAI histograms.
    assert (
        delta("router", "hoosh_inference_requests_total", model=label, provider="upstream", status="ok") == upstream_n
    )
    assert delta("router", "hoosh_inference_duration_seconds_count", model=label, provider="upstream") == upstream_n
    assert (
        delta("router", "hoosh_inference_tokens_total", model=label, type="input")
        + delta("router", "hoosh_inference_tokens_total", model=label, type="output")
        == tokens
    )
    assert delta("router", "gen_ai_client_operation_duration_seconds_count", gen_ai_request_model=label) == upstream_n
    assert (
        delta("router", "gen_ai_client_token_usage_count", gen_ai_request_model=label, gen_ai_token_type="input")
        == upstream_n
    )
    assert delta("router", "hoosh_upstream_attempts_total", provider="upstream", outcome="ok") == upstream_n
    assert delta("router", "hoosh_cost_usd_micros_total", model=label) > 0
    # the local engine: one generation per local request, its tokens exactly.
    assert (
        delta("inference", "gen_ai_server_request_duration_seconds_count", gen_ai_request_model=LOCAL_MODEL) == local_n
    )
    assert delta("inference", "hoosh_engine_generated_tokens_total", model=LOCAL_MODEL) == local_tokens["completion"]
    assert delta("inference", "hoosh_engine_prompt_tokens_total", model=LOCAL_MODEL) == local_tokens["prompt"]
    assert (
        delta("inference", "grpc_server_handled_total", grpc_method="Generate", grpc_code="OK")
        + delta("inference", "grpc_server_handled_total", grpc_method="GenerateStream", grpc_code="OK")
        == local_n
    )
    # router's gRPC server saw each one once.
    assert delta("router", "grpc_server_handled_total", grpc_method="Chat", grpc_code="OK") == n
    # audit wrote one entry per request.
    written = total(audit_after, "hoosh_audit_events_written_total", kind="inference.completed") - total(
        audit_before, "hoosh_audit_events_written_total", kind="inference.completed"
    )
    assert written == n
    # the router's events: every one acked, none lost.
    assert delta("router", "hoosh_events_published_total", service="router") == n
    assert total(after["router"], "hoosh_events_lost_total") == 0


def test_the_pool_gauges_show_exactly_what_the_requests_used(hoosh: RunningStack) -> None:
    """The budget service's snapshot (refreshed every few seconds) moves by exactly the
    tokens the requests were charged."""
    url = _metrics(hoosh)["budget"]
    client = openai.OpenAI(base_url=f"{hoosh.base_url}/v1", api_key="no-key-needed", max_retries=0)

    def used() -> float:
        return total(scrape(url), "hoosh_pool_used_tokens", pool="default")

    def settled(previous: float | None) -> float:
        """The gauge once two refreshes in a row agree (no request of another test is still ending)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(5.5)
            now = used()
            if now == previous:
                return now
            previous = now
        raise AssertionError("the pool gauge did not settle")

    before = settled(used())
    charged = 0
    for _ in range(3):
        completion = client.chat.completions.create(
            model="mock-pool-gauge", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert completion.usage is not None
        charged += completion.usage.total_tokens
    after = settled(None)
    assert after - before == charged
    samples = scrape(url)
    assert total(samples, "hoosh_pool_reserved_tokens", pool="default") == 0
    assert total(samples, "hoosh_pool_capacity_tokens", pool="default") == 100_000_000


# Families whose series appear only after an event the shared stack does not cause.
MAY_BE_EMPTY = {
    "hoosh_cache_requests_total": "the shared stack configures no response cache",
    "hoosh_provider_ratelimit_remaining": "the stand-ins send no rate-limit headers",
    "hoosh_pool_capacity_usd_micros": "no pool of the shared stack has a USD cap",
    "hoosh_pool_used_usd_micros": "no pool of the shared stack has a USD cap",
    "hoosh_pool_reserved_usd_micros": "no pool of the shared stack has a USD cap",
    "hoosh_audit_checkpoint_failures_total": "checkpoints succeed",
    "hoosh_audit_verify_failures_total": "the chain verifies",
    "hoosh_budget_expired_leases_total": "no lease expires during the test",
}


def test_every_catalogued_metric_is_exposed_with_its_type_and_labels(hoosh: RunningStack, speech: Path) -> None:
    """docs/observability.md (what the dashboards query) against what the running services
    really expose: a renamed or dropped metric fails here, not on an empty panel."""
    from .test_observability_deploy import _catalogue

    client = openai.OpenAI(base_url=f"{hoosh.base_url}/v1", api_key="no-key-needed", max_retries=0)
    # Traffic that moves every family: a chat, a stream, a refused key, a transcription.
    client.chat.completions.create(model="mock-catalogue", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    for _ in client.chat.completions.create(
        model=LOCAL_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    ):
        pass
    created = httpx.post(
        f"{hoosh.base_url}/v1/admin/keys", json={"name": "revoked", "pools": ["default"]}, headers=admin_headers(hoosh)
    ).json()
    keyed = openai.OpenAI(base_url=f"{hoosh.base_url}/v1", api_key=created["key"], max_retries=0)
    keyed.chat.completions.create(model="mock-catalogue", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert httpx.delete(
        f"{hoosh.base_url}/v1/admin/keys/{created['record']['id']}", headers=admin_headers(hoosh)
    ).is_success
    deadline = time.monotonic() + 5
    while True:  # every edge's key cache hears of the revocation within milliseconds
        bad = httpx.post(
            f"{hoosh.base_url}/v1/chat/completions",
            json={"model": "mock-x", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {created['key']}"},
        )
        if bad.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert bad.status_code == 401
    with speech.open("rb") as audio:
        client.audio.transcriptions.create(model=STT_MODEL, file=audio)
    time.sleep(6)  # one refresh of the budget's pool snapshot
    exposed: dict[str, tuple[str, set[str], int]] = {}
    for url in _metrics(hoosh).values():
        for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
            name = f"{family.name}_total" if family.type == "counter" else family.name
            labels = {label for sample in family.samples for label in sample.labels} - {"le"}
            kind, seen, samples = exposed.get(name, (family.type, set(), 0))
            exposed[name] = (kind, seen | labels, samples + len(family.samples))
    missing, wrong, empty = [], [], []
    for name, entry in _catalogue().items():
        if name == "up":  # Prometheus adds it
            continue
        if name not in exposed:
            missing.append(name)
            continue
        kind, labels, samples = exposed[name]
        if not samples:
            if name not in MAY_BE_EMPTY:
                empty.append(name)
            continue
        if kind != entry["type"] or labels != entry["labels"]:
            wrong.append((name, kind, sorted(labels), entry["type"], sorted(entry["labels"])))
    assert not missing, f"catalogued but not exposed: {missing}"
    assert not empty, f"catalogued, exposed, but no series after the traffic: {empty}"
    assert not wrong, wrong
