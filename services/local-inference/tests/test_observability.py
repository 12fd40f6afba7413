"""Metrics, spans and log lines of the worker, through a real in-process grpc.aio
server built by ``new_server()`` (the shared interceptors) around the real SmolLM2
model. Metrics are process-wide: every check is a before/after delta of the scraped
``/metrics``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh_common.grpc_server import new_server
from hoosh_common.logs import JsonFormatter
from hoosh_common.telemetry import capture_spans
from hoosh_inference.config import DEFAULT_MODEL_ID as MODEL_ID
from hoosh_inference.engine import GenerationRequest, Message, SamplingOptions
from hoosh_inference.llama_engine import LlamaEngine
from hoosh_inference.server import InferenceServicer
from opentelemetry.trace import SpanKind, StatusCode

from .conftest import scrape, value

Stub = inference_pb2_grpc.InferenceServiceStub
Wait = Callable[..., Awaitable[None]]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STORY = "Write a long story about a dragon who lives in a castle."
DURATION = "gen_ai_server_request_duration_seconds_count"


def request(
    model: str = MODEL_ID, max_tokens: int = 4, *, temperature: float = 0.0, top_p: float = 0.9
) -> inference_pb2.GenerateRequest:
    sampling = chat_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    return inference_pb2.GenerateRequest(
        model=model, messages=[chat_pb2.ChatMessage(role="user", text=STORY)], sampling=sampling
    )


def caller(request_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata the router sends: its request id and its trace context."""
    return (("x-request-id", request_id), ("traceparent", TRACEPARENT))


@asynccontextmanager
async def served(engine: LlamaEngine) -> AsyncIterator[Stub]:
    """The servicer on a server from ``new_server()`` (built inside ``capture_spans`` it
    gets the tracing interceptor too); a plain channel, so the test's own traceparent is
    the one the server reads."""
    server = new_server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Stub(channel)
    finally:
        await channel.close()
        await server.stop(None)


def json_lines(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in caplog.text.splitlines() if line.startswith("{")]
    return [line for line in lines if line["msg"] == message]


@pytest.fixture
def json_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Records formatted as the service writes them (request id and trace context read
    when the line is emitted, in the request's task)."""
    caplog.set_level(logging.INFO, logger="hoosh_inference")
    caplog.handler.setFormatter(JsonFormatter("local-inference"))
    return caplog


async def test_n_generations_move_the_scraped_counters_by_n(idle: LlamaEngine, metrics_port: int) -> None:
    labels = {"gen_ai_operation_name": "chat", "gen_ai_request_model": MODEL_ID}
    grpc_ok = {"grpc_type": "unary", "grpc_service": "hoosh.inference.v1.InferenceService", "grpc_method": "Generate"}
    async with served(idle) as stub:
        before = await scrape(metrics_port)
        unary = [await stub.Generate(request(max_tokens=3 + i)) for i in range(2)]
        streamed = [reply async for reply in stub.GenerateStream(request(max_tokens=5))]
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(request(model="gpt-9"))
        after = await scrape(metrics_port)
        # abort() sends the status before the handler unwinds through the interceptor
        # that counts it: the refusal's grpc_server_handled_total lands a moment later.
        for _ in range(200):
            if value(after, "grpc_server_handled_total", **grpc_ok, grpc_code="NOT_FOUND") > value(
                before, "grpc_server_handled_total", **grpc_ok, grpc_code="NOT_FOUND"
            ):
                break
            await asyncio.sleep(0.01)
            after = await scrape(metrics_port)

    usages = [reply.usage for reply in unary] + [streamed[-1].usage]
    n = len(usages)

    def moved(name: str, **series: str) -> float:
        return value(after, name, **series) - value(before, name, **series)

    assert moved(DURATION, **labels, error_type="") == n
    assert moved("gen_ai_server_time_to_first_token_seconds_count", **labels) == n
    assert moved("gen_ai_server_time_per_output_token_seconds_count", **labels) == sum(
        1 for usage in usages if usage.completion_tokens > 1
    )
    assert moved("hoosh_engine_prompt_tokens_total", model=MODEL_ID) == sum(u.prompt_tokens for u in usages)
    assert moved("hoosh_engine_generated_tokens_total", model=MODEL_ID) == sum(u.completion_tokens for u in usages)
    # A model this host does not serve: counted as an error, never as its own series.
    assert (
        moved(DURATION, gen_ai_operation_name="chat", gen_ai_request_model="_other", error_type="model_not_found") == 1
    )
    assert not any(dict(labels).get("gen_ai_request_model") == "gpt-9" for _, labels in after)
    # The shared gRPC interceptor of new_server(): three Generate calls, two of them OK.
    assert moved("grpc_server_started_total", **grpc_ok) == 3
    assert moved("grpc_server_handled_total", **grpc_ok, grpc_code="OK") == 2
    assert moved("grpc_server_handled_total", **grpc_ok, grpc_code="NOT_FOUND") == 1


async def test_queue_depth_and_active_requests_are_scraped_from_the_engine(
    idle: LlamaEngine, metrics_port: int, wait_until: Wait
) -> None:
    engine = idle
    assert value(await scrape(metrics_port), "hoosh_engine_active_requests", model=MODEL_ID) == 0
    async with served(engine) as stub:
        # A job that cannot end early keeps the worker busy while two more wait.
        long = GenerationRequest(
            model=MODEL_ID,
            messages=(Message("user", STORY),),
            sampling=SamplingOptions(max_tokens=1500, temperature=0, ignore_eos=True),
        )
        running = engine.stream(long)
        await anext(running)
        waiting = [stub.Generate(request()) for _ in range(2)]
        await wait_until(lambda: engine.queue_depth == 2)
        samples = await scrape(metrics_port)
        for call in waiting:
            call.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await running.aclose()
        await wait_until(lambda: engine.pending == 0)
    assert value(samples, "hoosh_engine_queue_depth", model=MODEL_ID) == 2
    assert value(samples, "hoosh_engine_active_requests", model=MODEL_ID) == 1
    idle_samples = await scrape(metrics_port)
    assert value(idle_samples, "hoosh_engine_queue_depth", model=MODEL_ID) == 0
    assert value(idle_samples, "hoosh_engine_active_requests", model=MODEL_ID) == 0


async def test_a_generation_is_a_genai_span_in_the_callers_trace_and_its_log_line_joins_it(
    idle: LlamaEngine, json_logs: pytest.LogCaptureFixture
) -> None:
    with capture_spans() as exporter:
        async with served(idle) as stub:
            reply = await stub.Generate(request(max_tokens=4), metadata=caller("req-span-1"))
            streamed = [r async for r in stub.GenerateStream(request(max_tokens=3), metadata=caller("req-span-2"))]
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(request(model="gpt-9"), metadata=caller("req-span-3"))
    spans = exporter.get_finished_spans()
    chat = [span for span in spans if span.name == f"chat {MODEL_ID}"]
    assert len(chat) == 2
    servers = {span.context.span_id: span for span in spans if span.kind == SpanKind.SERVER}

    for span, usage, stream in ((chat[0], reply.usage, False), (chat[1], streamed[-1].usage, True)):
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert span.kind == SpanKind.INTERNAL
        # A child of the gRPC server span, itself a child of the caller's span.
        assert span.parent is not None and span.parent.span_id in servers
        assert f"{servers[span.parent.span_id].parent.span_id:016x}" == PARENT_ID
        attributes = dict(span.attributes or {})
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == "llama.cpp"
        assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == MODEL_ID
        assert attributes["gen_ai.request.max_tokens"] == (3 if stream else 4)
        assert attributes["gen_ai.request.temperature"] == 0.0
        assert attributes["gen_ai.request.top_p"] == pytest.approx(0.9)
        assert attributes["gen_ai.request.stream"] is stream
        assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
        assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
        assert list(attributes["gen_ai.response.finish_reasons"]) == ["length"]
        assert "error.type" not in attributes

    [refused] = [span for span in spans if span.name == "chat"]  # no model this host serves in the name
    assert f"{refused.context.trace_id:032x}" == TRACE_ID
    assert refused.attributes is not None and refused.attributes["error.type"] == "model_not_found"
    assert refused.attributes["gen_ai.request.model"] == "gpt-9"
    assert refused.status.status_code == StatusCode.ERROR

    # One line per generation, joined to the span by the request id and the trace id.
    lines = {line["request_id"]: line for line in json_lines(json_logs, "generation finished")}
    assert set(lines) == {"req-span-1", "req-span-2"}
    for span, request_id in ((chat[0], "req-span-1"), (chat[1], "req-span-2")):
        line = lines[request_id]
        assert line["trace_id"] == TRACE_ID and line["span_id"] == f"{span.context.span_id:016x}"
        assert line["model"] == MODEL_ID and line["completion_tokens"] == span.attributes["gen_ai.usage.output_tokens"]
        assert line["prompt_tokens"] == span.attributes["gen_ai.usage.input_tokens"]
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0


async def test_without_an_exporter_the_log_line_still_carries_the_callers_request_id_and_trace(
    idle: LlamaEngine, json_logs: pytest.LogCaptureFixture
) -> None:
    async with served(idle) as stub:
        reply = await stub.Generate(request(max_tokens=2), metadata=caller("req-nospan"))
    [line] = json_lines(json_logs, "generation finished")
    assert (line["request_id"], line["trace_id"]) == ("req-nospan", TRACE_ID)
    assert line["span_id"] == PARENT_ID  # the caller's span: this hop records none of its own
    assert line["completion_tokens"] == reply.usage.completion_tokens
