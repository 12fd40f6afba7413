"""InferenceService through a real in-process grpc.aio server and the real SmolLM2
model. Generated text is never compared with a fixed string (a 135M model is not
reliable); runs are compared with each other instead."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh_inference import hardware
from hoosh_inference.config import DEFAULT_MODEL_ID as MODEL_ID
from hoosh_inference.engine import GenerationRequest, Message, SamplingOptions
from hoosh_inference.llama_engine import LlamaEngine

Stub = inference_pb2_grpc.InferenceServiceStub
Wait = Callable[..., Awaitable[None]]

STORY = "Write a long story about a dragon who lives in a castle."


def user(text: str) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(role="user", text=text)


def request(
    text: str = "What is the capital of France?",
    *,
    model: str = MODEL_ID,
    max_tokens: int | None = 16,
    temperature: float | None = 0.0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
) -> inference_pb2.GenerateRequest:
    sampling = chat_pb2.SamplingParams(stop=list(stop))
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if seed is not None:
        sampling.seed = seed
    return inference_pb2.GenerateRequest(request_id="req-test", model=model, messages=[user(text)], sampling=sampling)


def error_code(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("hoosh-error-code", "")


async def stream_all(stub: Stub, req: inference_pb2.GenerateRequest) -> list[inference_pb2.GenerateStreamResponse]:
    return [reply async for reply in stub.GenerateStream(req)]


async def test_generate_returns_text_and_consistent_usage(stub: Stub) -> None:
    reply = await stub.Generate(request(max_tokens=24))
    assert reply.text.strip()
    assert reply.model == MODEL_ID
    assert reply.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_stream_pieces_join_to_the_blocking_result(stub: Stub) -> None:
    req = request(STORY, max_tokens=40, seed=7)
    # The first call leaves the prompt in llama.cpp's prefix cache, so the next two
    # start from the same state and greedy decoding must agree token for token.
    await stub.Generate(req)
    blocking = await stub.Generate(req)
    replies = await stream_all(stub, req)

    pieces = [r.text for r in replies if r.text]
    assert len(pieces) > 1
    assert "".join(r.text for r in replies) == blocking.text
    # Only the last message ends the stream and carries usage.
    assert all(not r.finish_reason and not r.HasField("usage") for r in replies[:-1])
    last = replies[-1]
    assert last.finish_reason == blocking.finish_reason
    assert last.usage == blocking.usage
    assert last.usage.completion_tokens >= len(pieces)


async def test_small_max_tokens_finishes_with_length(stub: Stub) -> None:
    reply = await stub.Generate(request(STORY, max_tokens=3))
    assert reply.finish_reason == "length"
    assert reply.usage.completion_tokens == 3

    replies = await stream_all(stub, request(STORY, max_tokens=3))
    assert replies[-1].finish_reason == "length"
    assert replies[-1].usage.completion_tokens == 3


async def test_stop_sequence_cuts_the_text_and_finishes_with_stop(stub: Stub) -> None:
    base = request(STORY, max_tokens=40)
    await stub.Generate(base)  # same cache state for the two compared runs
    full = (await stub.Generate(base)).text
    words = full.split()
    assert len(words) > 6
    stop = f" {words[5]}"
    expected = full[: full.index(stop)]

    reply = await stub.Generate(request(STORY, max_tokens=40, stop=(stop,)))
    assert reply.finish_reason == "stop"
    assert reply.text == expected
    assert stop not in reply.text


async def test_same_seed_samples_the_same_text(stub: Stub) -> None:
    req = request(STORY, max_tokens=24, temperature=1.0, seed=1234)
    await stub.Generate(req)
    first = await stub.Generate(req)
    second = await stub.Generate(req)
    assert first.text == second.text


async def test_count_tokens_matches_the_prompt_tokens_of_a_generation(stub: Stub) -> None:
    messages = [
        chat_pb2.ChatMessage(role="system", text="You are terse."),
        user("Name three colours."),
    ]
    counted = await stub.CountTokens(inference_pb2.CountTokensRequest(model=MODEL_ID, messages=messages))
    reply = await stub.Generate(
        inference_pb2.GenerateRequest(
            model=MODEL_ID, messages=messages, sampling=chat_pb2.SamplingParams(max_tokens=4, temperature=0)
        )
    )
    assert counted.prompt_tokens > 0
    assert counted.prompt_tokens == reply.usage.prompt_tokens


async def test_text_parts_are_joined(stub: Stub, engine: LlamaEngine) -> None:
    parts = chat_pb2.ContentParts(parts=[chat_pb2.ContentPart(text="Hello"), chat_pb2.ContentPart(text="there")])
    as_parts = await stub.CountTokens(
        inference_pb2.CountTokensRequest(model=MODEL_ID, messages=[chat_pb2.ChatMessage(role="user", parts=parts)])
    )
    as_text = await stub.CountTokens(inference_pb2.CountTokensRequest(model=MODEL_ID, messages=[user("Hello\nthere")]))
    assert as_parts.prompt_tokens == as_text.prompt_tokens


async def test_four_concurrent_requests_all_complete(stub: Stub, idle: LlamaEngine) -> None:
    before = idle.stats.completed
    replies = await asyncio.gather(
        *(stub.Generate(request(f"Count from {i} to {i + 5}.", max_tokens=8)) for i in range(4))
    )
    assert all(r.usage.completion_tokens > 0 for r in replies)
    assert idle.stats.completed == before + 4


async def test_full_queue_answers_resource_exhausted(stub: Stub, idle: LlamaEngine, wait_until: Wait) -> None:
    engine = idle
    cancelled_before = engine.stats.cancelled
    # A job that cannot end early (ignore_eos) keeps the worker busy...
    long = GenerationRequest(
        model=MODEL_ID,
        messages=(Message("user", STORY),),
        sampling=SamplingOptions(max_tokens=1500, temperature=0, ignore_eos=True),
    )
    running = engine.stream(long)
    await anext(running)
    # ...while as many requests as the queue holds wait behind it.
    waiting = [stub.Generate(request(max_tokens=4)) for _ in range(engine.max_queue)]
    await wait_until(lambda: engine.queue_depth == engine.max_queue)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Generate(request(max_tokens=4))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_code(refused.value) == "queue_full"
    assert dict(refused.value.trailing_metadata() or ()).get("retry-after") == "1"

    for call in waiting:
        call.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await running.aclose()
    # The running job stops at its next token and the waiting ones are skipped.
    await wait_until(lambda: engine.pending == 0)
    assert engine.stats.cancelled == cancelled_before + 1 + engine.max_queue


async def test_cancelled_stream_frees_the_worker(stub: Stub, idle: LlamaEngine, wait_until: Wait) -> None:
    engine = idle
    cancelled_before = engine.stats.cancelled
    completed_before = engine.stats.completed
    call = stub.GenerateStream(request(STORY, max_tokens=1500))
    first = await call.read()
    assert first.text
    call.cancel()

    await wait_until(lambda: engine.stats.cancelled == cancelled_before + 1)
    reply = await stub.Generate(request(max_tokens=4))
    assert reply.usage.completion_tokens > 0
    assert engine.stats.completed == completed_before + 1


async def test_cancelled_unary_call_frees_the_worker(stub: Stub, idle: LlamaEngine, wait_until: Wait) -> None:
    engine = idle
    cancelled_before = engine.stats.cancelled
    call = stub.Generate(request(STORY, max_tokens=1500))
    await wait_until(lambda: engine.pending == 1 and engine.queue_depth == 0)  # it is running
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    await wait_until(lambda: engine.stats.cancelled == cancelled_before + 1)
    reply = await stub.Generate(request(max_tokens=4))
    assert reply.usage.completion_tokens > 0


async def test_unknown_model_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Generate(request(model="gpt-9"))
    assert unary.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_code(unary.value) == "model_not_found"
    assert "gpt-9" in (unary.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await stream_all(stub, request(model="gpt-9"))
    assert streamed.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_code(streamed.value) == "model_not_found"

    with pytest.raises(grpc.aio.AioRpcError) as counted:
        await stub.CountTokens(inference_pb2.CountTokensRequest(model="gpt-9", messages=[user("hi")]))
    assert counted.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_code(counted.value) == "model_not_found"


async def test_image_content_is_invalid_argument(stub: Stub) -> None:
    parts = chat_pb2.ContentParts(
        parts=[
            chat_pb2.ContentPart(text="What is in this picture?"),
            chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url="data:image/png;base64,AAAA")),
        ]
    )
    req = inference_pb2.GenerateRequest(model=MODEL_ID, messages=[chat_pb2.ChatMessage(role="user", parts=parts)])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Generate(req)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in (refused.value.details() or "")
    assert error_code(refused.value) == "invalid_request"


async def test_prompt_plus_max_tokens_beyond_the_context_is_invalid_argument(stub: Stub, engine: LlamaEngine) -> None:
    n_ctx = engine.context_length
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await stub.Generate(request(max_tokens=n_ctx))
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_code(too_long.value) == "context_length_exceeded"
    assert f"maximum context length is {n_ctx} tokens" in (too_long.value.details() or "")

    huge = " ".join(["word"] * (n_ctx + 100))
    with pytest.raises(grpc.aio.AioRpcError) as prompt_too_long:
        await stream_all(stub, request(huge, max_tokens=None))
    assert prompt_too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_code(prompt_too_long.value) == "context_length_exceeded"


async def test_out_of_range_sampling_is_invalid_argument(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Generate(request(temperature=3.0))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(refused.value.trailing_metadata() or ()).get("hoosh-error-param") == "temperature"


async def test_tools_are_refused_unless_tool_choice_is_none(stub: Stub) -> None:
    tool = chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name="get_weather"))
    req = request(max_tokens=2)
    req.tools.append(tool)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Generate(req)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    req.tool_choice.mode = chat_pb2.TOOL_CHOICE_MODE_NONE
    reply = await stub.Generate(req)
    assert reply.usage.completion_tokens > 0


async def test_list_models_and_hardware(stub: Stub, engine: LlamaEngine) -> None:
    models = await stub.ListModels(inference_pb2.ListModelsRequest())
    assert [(m.id, m.engine, m.context_length) for m in models.models] == [
        (MODEL_ID, "llama.cpp", engine.context_length)
    ]

    reply = await stub.GetHardware(inference_pb2.GetHardwareRequest())
    probed = hardware.probe()
    assert reply.cpu_count == probed.cpu_count >= 1
    assert [a.name for a in reply.accelerators] == [gpu.name for gpu in probed.gpus]
    assert reply.memory_total_bytes == probed.memory_total_bytes > 0
    assert reply.memory_available_bytes > 0
    assert (reply.container, reply.kubernetes) == (probed.container, probed.kubernetes)
    assert reply.HasField("driver_version") == (probed.driver_version is not None)
