"""hoosh's InferenceService (a real in-process grpc.aio server) over VllmEngine over
real vLLM, only the engine core stubbed: what the router receives, answers and
engine-side failures alike (the status and hoosh-error-code it maps to OpenAI errors)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh_inference.server import InferenceServicer
from stub_core import Plan
from vllm.v1.engine import FinishReason

from conftest import MODEL_ID, Served

Stub = inference_pb2_grpc.InferenceServiceStub
Wait = Callable[[Callable[[], bool]], Awaitable[None]]
REPLY = "The capital of France is Paris."


def request(text: str = "What is the capital of France?", **sampling: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id="req-grpc",
        model=MODEL_ID,
        messages=[chat_pb2.ChatMessage(role="user", text=text)],
        sampling=chat_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def reply_ids(served: Served) -> list[int]:
    tokenizer = served.engine._tokenizer
    return [*tokenizer.encode(REPLY, add_special_tokens=False), tokenizer.eos_token_id]


def error_code(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("hoosh-error-code", "")


@pytest.fixture
async def stub(chatml: Served) -> AsyncIterator[Stub]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(chatml.engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Stub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def test_generate_and_stream_answer_with_vllm_s_text(stub: Stub, chatml: Served) -> None:
    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml))
    reply = await stub.Generate(request())
    assert (reply.text, reply.finish_reason, reply.model) == (REPLY, "stop", MODEL_ID)
    assert reply.usage.prompt_tokens == len(chatml.core.requests[-1].prompt_token_ids or ())
    assert reply.usage.completion_tokens == len(reply_ids(chatml))
    pieces = [piece async for piece in stub.GenerateStream(request(stop=["Paris"]))]
    assert "".join(p.text for p in pieces) == "The capital of France is "
    assert pieces[-1].finish_reason == "stop" and len(pieces) > 2


async def test_an_engine_error_is_internal_with_hoosh_s_engine_error_code(stub: Stub, chatml: Served) -> None:
    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml), finish=FinishReason.ERROR, finish_after=3)
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Generate(request())
    assert unary.value.code() == grpc.StatusCode.INTERNAL and error_code(unary.value) == "engine_error"
    call = stub.GenerateStream(request())
    texts: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for piece in call:
            texts.append(piece.text)
            assert not piece.finish_reason  # never a finished answer
    assert streamed.value.code() == grpc.StatusCode.INTERNAL and error_code(streamed.value) == "engine_error"
    assert texts  # the failure came after tokens were sent


async def test_an_abort_vllm_made_is_unavailable_and_retryable(stub: Stub, chatml: Served) -> None:
    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml), finish=FinishReason.ABORT, finish_after=2)
    with pytest.raises(grpc.aio.AioRpcError) as dropped:
        await stub.Generate(request())
    assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_code(dropped.value) == "engine_unavailable"
    assert dict(dropped.value.trailing_metadata() or ()).get("retry-after") == "1"


async def test_a_cancelled_call_aborts_the_request_in_vllm(stub: Stub, chatml: Served, wait_until: Wait) -> None:
    plan = Plan(tokens=reply_ids(chatml), hold_after=2)
    chatml.core.plan = lambda request: plan
    call = stub.GenerateStream(request())
    first = await call.read()
    assert isinstance(first, inference_pb2.GenerateStreamResponse) and first.text
    sent = chatml.core.requests[-1].request_id
    call.cancel()
    await wait_until(lambda: sent in chatml.core.aborted and not chatml.core.running)
    await wait_until(lambda: chatml.engine.queue_depth == 0 and chatml.engine.active_requests == 0)
    assert sent not in chatml.core.finished
