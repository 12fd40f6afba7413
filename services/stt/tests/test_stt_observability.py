"""Metrics, spans and log lines of SttService, on the real stack of conftest (real
model, Redis budget, NATS events, a server from ``new_server()``). Metrics are
process-wide: every check is a before/after delta of the scraped ``/metrics``."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_common.logs import JsonFormatter
from hoosh_stt.config import BUNDLED_MODEL
from opentelemetry.trace import SpanKind, StatusCode

from .conftest import SttStack, requests, scrape, transcribe, value
from .test_stt_server import events

pytestmark = pytest.mark.slow  # loads the real Whisper model

TRACE_ID = "5b8efff798038103d269b633813fc60c"
PARENT_ID = "eee19b7ec3c1b174"
PRICED = {"workers": 1, "max_queue": 4, "max_audio_bytes": 25 * 1024 * 1024, "price_per_minute_micros": 6000}
TRACED = {**PRICED, "trace": True}


def caller(request_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata the edge sends: its request id and its trace context."""
    return (("x-request-id", request_id), ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"))


@pytest.fixture
def json_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Records formatted as the service writes them (request id and trace context read
    when the line is emitted, in the request's task)."""
    caplog.set_level(logging.INFO, logger="hoosh_stt")
    caplog.handler.setFormatter(JsonFormatter("stt"))
    return caplog


def finished_lines(caplog: pytest.LogCaptureFixture) -> dict[str, dict[str, object]]:
    """The "transcription finished" lines by request id."""
    lines = [json.loads(line) for line in caplog.text.splitlines() if line.startswith("{")]
    return {str(line["request_id"]): line for line in lines if line["msg"] == "transcription finished"}


@pytest.mark.parametrize("stack_options", [PRICED])
async def test_n_transcriptions_move_the_scraped_counters_by_n(stt: SttStack, speech: bytes, metrics_port: int) -> None:
    pool = await stt.pool()
    grpc_call = {"grpc_type": "client_stream", "grpc_service": "hoosh.stt.v1.SttService", "grpc_method": "Transcribe"}
    before = await scrape(metrics_port)
    replies = [await transcribe(stt.stub, requests(speech, pool=pool)) for _ in range(2)]
    for options in ({"language": "fr"}, {"model": "whisper-9"}):
        with pytest.raises(grpc.aio.AioRpcError):
            await transcribe(stt.stub, requests(speech, pool=pool, **options))
    after = await scrape(metrics_port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    n = len(replies)
    assert moved("hoosh_stt_requests_total", model=BUNDLED_MODEL, status="ok") == n
    assert moved("hoosh_stt_duration_seconds_count", model=BUNDLED_MODEL) == n
    assert moved("hoosh_stt_audio_seconds_total", model=BUNDLED_MODEL) == pytest.approx(
        sum(reply.duration for reply in replies)
    )
    cost = sum(reply.cost_usd_micros for reply in replies)
    assert cost > 0 and moved("hoosh_stt_cost_usd_micros_total", model=BUNDLED_MODEL) == cost
    assert moved("hoosh_stt_requests_total", model=BUNDLED_MODEL, status="unsupported_language") == 1
    # A model not served is one "_other" series, never a series of its own.
    assert moved("hoosh_stt_requests_total", model="_other", status="model_not_found") == 1
    assert not any(dict(labels).get("model") == "whisper-9" for _, labels in after)
    # The shared gRPC interceptor of new_server().
    assert moved("grpc_server_started_total", **grpc_call) == 4
    assert moved("grpc_server_handled_total", **grpc_call, grpc_code="OK") == n
    # Nothing waits or runs once the calls are answered.
    assert value(after, "hoosh_stt_queue_depth") == value(after, "hoosh_stt_active") == 0


@pytest.mark.parametrize("stack_options", [TRACED])
async def test_a_transcription_is_a_genai_span_in_the_callers_trace_and_its_log_line_joins_it(
    stt: SttStack, speech: bytes, json_logs: pytest.LogCaptureFixture
) -> None:
    assert stt.spans is not None
    pool = await stt.pool()
    key = tenancy_pb2.Caller(key_id="key_obs", key_name="ci")
    reply = await transcribe(stt.stub, requests(speech, pool=pool, caller=key), caller("req-obs-1"))
    with pytest.raises(grpc.aio.AioRpcError):
        await transcribe(stt.stub, requests(speech, pool=pool, caller=key, language="fr"), caller("req-obs-2"))

    spans = stt.spans.get_finished_spans()
    servers = {span.context.span_id: span for span in spans if span.kind == SpanKind.SERVER}
    ok, refused = [span for span in spans if span.name == f"transcription {BUNDLED_MODEL}"]
    for span in (ok, refused):
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert span.kind == SpanKind.INTERNAL
        # A child of the gRPC server span, itself a child of the caller's span.
        assert span.parent is not None and span.parent.span_id in servers
        server_parent = servers[span.parent.span_id].parent
        assert server_parent is not None and f"{server_parent.span_id:016x}" == PARENT_ID
        attributes = dict(span.attributes or {})
        assert attributes["gen_ai.operation.name"] == "transcription"
        assert attributes["gen_ai.provider.name"] == "faster-whisper"
        assert attributes["gen_ai.request.model"] == BUNDLED_MODEL
        assert (attributes["hoosh.pool"], attributes["hoosh.key_id"]) == (pool, "key_obs")

    attributes = dict(ok.attributes or {})
    assert attributes["gen_ai.response.model"] == BUNDLED_MODEL
    assert attributes["hoosh.audio_seconds"] == pytest.approx(reply.duration)
    assert attributes["hoosh.charged_tokens"] == reply.charged_tokens
    assert attributes["hoosh.cost_usd_micros"] == reply.cost_usd_micros > 0
    assert list(attributes["hoosh.pool_chain"]) == [pool]
    assert "error.type" not in attributes
    assert refused.attributes is not None and refused.attributes["error.type"] == "unsupported_language"
    assert refused.status.status_code == StatusCode.ERROR

    # One line per transcription, joined to its span by the request id and the trace id.
    lines = finished_lines(json_logs)
    for request_id, span, status in (("req-obs-1", ok, "ok"), ("req-obs-2", refused, "unsupported_language")):
        line = lines[request_id]
        assert (line["trace_id"], line["span_id"]) == (TRACE_ID, f"{span.context.span_id:016x}")
        assert (line["status"], line["model"], line["key_id"]) == (status, BUNDLED_MODEL, "key_obs")
    assert lines["req-obs-1"]["audio_seconds"] == round(reply.duration, 3)
    # The events (and so the audit) are in the same trace.
    published = await events(stt, 2)
    assert [(event.request_id, event.trace_id) for _, event in published] == [
        ("req-obs-1", TRACE_ID),
        ("req-obs-2", TRACE_ID),
    ]


async def test_without_an_exporter_the_log_line_carries_the_callers_request_id_and_trace(
    stt: SttStack, speech: bytes, json_logs: pytest.LogCaptureFixture
) -> None:
    pool = await stt.pool()
    reply = await transcribe(stt.stub, requests(speech, pool=pool), caller("req-obs-plain"))
    line = finished_lines(json_logs)["req-obs-plain"]
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == PARENT_ID  # the caller's span: this hop records none of its own
    assert (line["status"], line["charged_tokens"]) == ("ok", reply.charged_tokens)
