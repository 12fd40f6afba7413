"""The router's Tunnel stream (``RouterService/Tunnel``): many blocking Chat / Respond
calls as frames on one bidi stream, each answered exactly as its unary call would be.

A real grpc.aio server (``new_server`` with a caller policy: the internal token is
checked, as on the plane) serves a RouterServicer assembled by test_metering's
``make_rig``: the metering library against the real Redis, events on the real NATS,
the OpenAI-wire stand-ins as providers (one of them answering after a second, to
cancel, time out and half-close calls mid-way)."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import hoosh_router.tunnel
import orjson
import pytest
from google.protobuf.message import Message
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh_common.grpc_errors import metadata_dict
from hoosh_common.grpc_server import new_server
from hoosh_common.internal_auth import CallerPolicy, token_digest
from hoosh_common.telemetry import capture_spans
from hoosh_common.tunnel import status_of
from hoosh_router.errors import ClientCancelled, UpstreamTimeout
from hoosh_router.estimate import prompt_token_bound
from hoosh_router.routing import ModelRouter
from hoosh_router.server import RouterServicer
from opentelemetry.trace import SpanKind

from bench.upstream import REPLY_WORDS, OpenAIUpstream

from . import test_metering
from .test_metering import Rig, RigFactory, ask, events_of, new_pool, wait_for

make_rig = test_metering.make_rig  # the fixture: the router's parts on real Redis and NATS
slow_up = test_metering.slow_up  # the fixture: the OpenAI stand-in answering after a second

TUNNEL = "/hoosh.router.v1.RouterService/Tunnel"
TOKEN = secrets.token_urlsafe(32)
AUTH = (("authorization", f"Bearer {TOKEN}"),)
REPLY = "".join(REPLY_WORDS)
WAIT = 30.0  # the bound on any one wait: generous, never a timing assertion
# What a unary call's error carries beside its status (hoosh_common.grpc_errors).
ERROR_KEYS = ("hoosh-error-type", "hoosh-error-code", "hoosh-error-param", "retry-after")
DEADLINE_METADATA = dict(UpstreamTimeout("").trailing_metadata())


# --------------------------------------------------------------------------- the router, served


@dataclass
class Served:
    rig: Rig
    servicer: RouterServicer
    channel: grpc.aio.Channel
    stub: router_pb2_grpc.RouterServiceAsyncStub
    pool: str

    def open(self, metadata: tuple[tuple[str, str], ...] = AUTH) -> Tunnel:
        multi = self.channel.stream_stream(
            TUNNEL,
            request_serializer=router_pb2.TunnelBatch.SerializeToString,
            response_deserializer=router_pb2.TunnelBatch.FromString,
        )
        return Tunnel(multi(metadata=metadata))

    def ask(self, model: str, text: str = "hi") -> router_pb2.ChatRequest:
        return ask(model, self.pool, text=text)

    async def chat(self, request: router_pb2.ChatRequest, request_id: str) -> router_pb2.ChatResponse:
        reply: router_pb2.ChatResponse = await self.stub.Chat(
            request, metadata=(*AUTH, ("x-request-id", request_id)), timeout=WAIT
        )
        return reply

    async def unary_error(self, request: router_pb2.ChatRequest, *, respond: bool = False) -> grpc.aio.AioRpcError:
        method = self.stub.Respond if respond else self.stub.Chat
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await method(request, metadata=(*AUTH, ("x-request-id", rid())), timeout=WAIT)
        return raised.value

    async def events(self, request_id: str) -> list[tuple[str, Any]]:
        return events_of(await self.rig.bus.events(), request_id)


@dataclass
class Tunnel:
    """The client end of one Tunnel stream."""

    call: grpc.aio.StreamStreamCall[Message, router_pb2.TunnelBatch]
    draining: int = 0  # draining frames read so far
    pending: list[router_pb2.TunnelFrame] = field(default_factory=list)

    async def send(self, *frames: router_pb2.TunnelFrame) -> None:
        await asyncio.wait_for(self.call.write(router_pb2.TunnelBatch(frames=frames)), WAIT)

    async def close(self) -> None:
        await asyncio.wait_for(self.call.done_writing(), WAIT)

    async def _read(self) -> list[router_pb2.TunnelFrame] | None:
        """The next batch's frames (draining frames counted, not returned); None at the end."""
        batch = await asyncio.wait_for(self.call.read(), WAIT)
        if batch is grpc.aio.EOF:
            return None
        assert isinstance(batch, router_pb2.TunnelBatch)
        frames = []
        for frame in batch.frames:
            if frame.WhichOneof("kind") == "draining":
                assert frame.call_id == 0
                self.draining += 1
            else:
                frames.append(frame)
        return frames

    async def answers(self, count: int) -> list[router_pb2.TunnelFrame]:
        """The next ``count`` answers (reply or error frames), in the order they came."""
        found = self.pending
        while len(found) < count:
            frames = await self._read()
            assert frames is not None, f"the stream ended after {len(found)} of {count} answers"
            found.extend(frames)
        self.pending = found[count:]
        return found[:count]

    async def next_is_draining(self) -> None:
        """The next frame to come is a draining frame (call_id 0)."""
        before = self.draining
        while self.draining == before:
            frames = await self._read()
            assert frames == [], f"an answer came before the draining frame: {frames}"

    async def rest(self) -> list[router_pb2.TunnelFrame]:
        """Every answer until the stream ends."""
        found, self.pending = self.pending, []
        while (frames := await self._read()) is not None:
            found.extend(frames)
        return found

    async def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await asyncio.wait_for(self.call.code(), WAIT)
        return code


@pytest.fixture
async def served(make_rig: RigFactory, openai_up: OpenAIUpstream, slow_up: OpenAIUpstream) -> AsyncIterator[Served]:
    rig = await make_rig(
        [
            {"name": "primary", "type": "openai", "base_url": openai_up.base_url, "models": ["mock-*"]},
            {
                "name": "native",
                "type": "openai",
                "base_url": openai_up.base_url,
                "models": ["native-*"],
                "responses_api": "native",
            },
            {"name": "slow", "type": "openai", "base_url": slow_up.base_url, "models": ["slow-*"]},
        ]
    )
    servicer = RouterServicer(rig.chat, ModelRouter(rig.entries))
    server = new_server(policy=CallerPolicy({token_digest(TOKEN): "edge"}))
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        pool = await new_pool(rig.store, 1_000_000)
        yield Served(rig, servicer, channel, router_pb2_grpc.RouterServiceStub(channel), pool)
    finally:
        await channel.close()
        await server.stop(None)


def rid() -> str:
    return uuid.uuid4().hex


async def recorded_events(served: Served, request_id: str) -> list[tuple[str, Any]]:
    """The request's events, once there are any (a call the router ends on its own
    after its caller has gone is recorded after the caller has seen its outcome)."""
    deadline = time.monotonic() + WAIT
    while not (events := await served.events(request_id)):
        assert time.monotonic() < deadline, f"request {request_id} was never recorded"
        await asyncio.sleep(0.05)
    return events


async def cancelled_paying_its_prompt(served: Served, request_id: str, request: router_pb2.ChatRequest) -> Any:
    """Check the call was recorded as cancelled, charged its prompt (as a unary call
    cancelled mid-way, test_metering); the pool's state once every ending has settled."""
    [(name, event)] = await recorded_events(served, request_id)
    assert (name, event.error_code, event.charged_tokens) == (
        "inference.failed",
        ClientCancelled.error_code,
        prompt_token_bound(request),
    )
    await served.rig.settled()
    return await served.rig.pool(served.pool)


def call(
    call_id: int,
    request: router_pb2.ChatRequest,
    *,
    request_id: str | None = None,
    respond: bool = False,
    timeout: float = 0.0,
    metadata: Iterable[tuple[str, str]] = (),
) -> router_pb2.TunnelFrame:
    entries = [router_pb2.MetadataEntry(key=key, value=value) for key, value in metadata]
    if request_id is not None:
        entries.append(router_pb2.MetadataEntry(key="x-request-id", value=request_id))
    frame = router_pb2.TunnelFrame(call_id=call_id)
    frame.call.request.CopyFrom(request)
    frame.call.respond = respond
    frame.call.timeout_seconds = timeout
    frame.call.metadata.extend(entries)
    return frame


def cancel(call_id: int) -> router_pb2.TunnelFrame:
    frame = router_pb2.TunnelFrame(call_id=call_id)
    frame.cancel.SetInParent()
    return frame


def by_id(frames: Iterable[router_pb2.TunnelFrame]) -> dict[int, router_pb2.TunnelFrame]:
    found: dict[int, router_pb2.TunnelFrame] = {}
    for frame in frames:
        assert frame.call_id not in found, f"call {frame.call_id} was answered twice"
        found[frame.call_id] = frame
    return found


def answered(frame: router_pb2.TunnelFrame) -> router_pb2.ChatResponse:
    assert frame.WhichOneof("kind") == "reply", f"call {frame.call_id} failed: {frame.error}"
    return frame.reply


def error_of(frame: router_pb2.TunnelFrame) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    assert frame.WhichOneof("kind") == "error", f"call {frame.call_id} was answered: {frame.reply}"
    code = status_of(frame.error.code)
    return code, frame.error.message, {entry.key: entry.value for entry in frame.error.trailing_metadata}


def unary_error_of(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    trailing = metadata_dict(error.trailing_metadata())
    return error.code(), error.details() or "", {key: trailing[key] for key in ERROR_KEYS if key in trailing}


def same_answer(tunnelled: router_pb2.ChatResponse, unary: router_pb2.ChatResponse) -> None:
    """What the caller reads is the same (ids and timestamps are the call's own)."""
    assert tunnelled.choices == unary.choices
    assert tunnelled.usage == unary.usage
    assert (tunnelled.model, tunnelled.provider, tunnelled.cache) == (unary.model, unary.provider, unary.cache)


# --------------------------------------------------------------------------- calls and replies


async def test_calls_in_one_batch_and_in_separate_batches_answer_as_unary_chat(
    served: Served, openai_up: OpenAIUpstream
) -> None:
    texts = ["hi", "hello there", "one two three", "four five six seven", "eight"]
    requests = [served.ask("mock-x", text) for text in texts]
    ids = [rid() for _ in texts]
    tunnel = served.open()
    await tunnel.send(*(call(index, requests[index], request_id=ids[index]) for index in range(3)))
    await tunnel.send(call(3, requests[3], request_id=ids[3]))
    await tunnel.send(call(4, requests[4], request_id=ids[4]))
    replies = {call_id: answered(frame) for call_id, frame in by_id(await tunnel.answers(5)).items()}
    await tunnel.close()
    assert await tunnel.rest() == [] and await tunnel.code() == grpc.StatusCode.OK
    assert sorted(replies) == [0, 1, 2, 3, 4]
    for index, reply in replies.items():
        assert reply.id == f"chatcmpl-{ids[index]}"
        assert reply.choices[0].message.text == REPLY and reply.provider == "primary"
        # The stand-in counts each message's words, plus 4.
        assert reply.usage.prompt_tokens == len(texts[index].split()) + 4
    assert openai_up.stats.requests == 5

    # The pool pays each call's usage, exactly, and each call is one event.
    await served.rig.settled()
    tunnelled = sum(reply.usage.total_tokens for reply in replies.values())
    state = await served.rig.pool(served.pool)
    assert (state.used, state.reserved) == (tunnelled, 0)
    for index, reply in replies.items():
        events = await served.events(ids[index])
        assert [(name, event.usage == reply.usage) for name, event in events] == [("inference.completed", True)]

    # The same requests as unary calls: the same answers, the same charge.
    for index, request in enumerate(requests):
        same_answer(replies[index], await served.chat(request, rid()))
    await served.rig.settled()
    state = await served.rig.pool(served.pool)
    assert (state.used, state.reserved) == (2 * tunnelled, 0)


async def test_an_error_frame_carries_what_a_unary_call_gets(served: Served, openai_up: OpenAIUpstream) -> None:
    no_messages = served.ask("mock-x")
    del no_messages.messages[:]
    bad_body = served.ask("native-up")
    bad_body.responses_body = b"not json"
    cases = [
        (served.ask("nope-unknown"), False, grpc.StatusCode.NOT_FOUND, "model_not_found", "model"),
        (no_messages, False, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", "messages"),
        (served.ask("mock-fail-400"), False, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", None),
        (bad_body, True, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", "responses_body"),
    ]
    tunnel = served.open()
    await tunnel.send(*(call(index, case[0], request_id=rid(), respond=case[1]) for index, case in enumerate(cases)))
    errors = by_id(await tunnel.answers(len(cases)))
    await tunnel.close()
    assert await tunnel.rest() == [] and await tunnel.code() == grpc.StatusCode.OK
    for index, (request, respond, status, code, param) in enumerate(cases):
        tunnelled = error_of(errors[index])
        assert tunnelled == unary_error_of(await served.unary_error(request, respond=respond))
        assert tunnelled[0] == status and tunnelled[1]
        assert (tunnelled[2]["hoosh-error-code"], tunnelled[2].get("hoosh-error-param")) == (code, param)
    assert openai_up.stats.by_model["mock-fail-400"] == 2  # once per path; an answered error pays nothing
    await served.rig.settled()
    state = await served.rig.pool(served.pool)
    assert (state.used, state.reserved) == (0, 0)


async def test_respond_over_the_tunnel_answers_as_unary_respond(served: Served, openai_up: OpenAIUpstream) -> None:
    request = served.ask("native-up", "hello there")
    request.responses_body = orjson.dumps({"input": "hello there", "instructions": "Be brief."})
    respond_id, chat_id = rid(), rid()
    tunnel = served.open()
    await tunnel.send(call(1, request, request_id=respond_id, respond=True), call(2, request, request_id=chat_id))
    replies = {call_id: answered(frame) for call_id, frame in by_id(await tunnel.answers(2)).items()}
    await tunnel.close()
    assert await tunnel.code() == grpc.StatusCode.OK

    # respond=true: the provider's own response object (its Responses API was called).
    native = replies[1]
    assert not native.choices and native.response_json
    unary = await served.stub.Respond(request, metadata=(*AUTH, ("x-request-id", rid())), timeout=WAIT)
    assert unary.response_json and native.usage == unary.usage and native.provider == unary.provider == "native"

    def shape(response_json: bytes) -> dict[str, Any]:
        body = orjson.loads(response_json)
        for key in ("id", "created_at", "completed_at"):
            body.pop(key)
        for item in body["output"]:
            item.pop("id")
        return dict(body)

    assert shape(native.response_json) == shape(unary.response_json)
    assert shape(native.response_json)["output"][0]["content"][0]["text"] == REPLY
    # respond=false on the same request: Chat (the body is not Chat's business).
    assert replies[2].choices[0].message.text == REPLY and not replies[2].response_json
    assert openai_up.stats.by_model["native-up"] == 3
    [(_, responded)] = await served.events(respond_id)
    [(_, chatted)] = await served.events(chat_id)
    assert (responded.kind, chatted.kind) == ("response", "chat")


# --------------------------------------------------------------------------- cancels and deadlines


async def test_a_cancel_frame_ends_the_call_without_an_answer_and_settles_it(
    served: Served, slow_up: OpenAIUpstream
) -> None:
    slow, fast = served.ask("slow-x"), served.ask("mock-x")
    slow_id, fast_id = rid(), rid()
    tunnel = served.open()
    await tunnel.send(call(1, slow, request_id=slow_id))
    await wait_for(lambda: slow_up.stats.requests > 0)  # sent upstream: mid-way
    await tunnel.send(cancel(1), call(2, fast, request_id=fast_id))
    await tunnel.close()
    frames = await tunnel.rest()
    assert [frame.call_id for frame in frames] == [2]  # nothing for the cancelled call
    reply = answered(frames[0])
    assert await tunnel.code() == grpc.StatusCode.OK
    # Settled as a unary call cancelled mid-way (test_metering): the prompt is paid.
    state = await cancelled_paying_its_prompt(served, slow_id, slow)
    assert (state.used, state.reserved) == (prompt_token_bound(slow) + reply.usage.total_tokens, 0)


async def test_a_call_the_router_cancels_itself_is_an_unavailable_error_frame(
    served: Served, slow_up: OpenAIUpstream
) -> None:
    """A call cancelled by the router (not by its caller's cancel frame: say this process
    is stopping) is answered at once with UNAVAILABLE, so the caller does not wait out
    its deadline; it is settled as a cancelled call, and the stream goes on."""
    request, request_id = served.ask("slow-x"), rid()
    tunnel = served.open()
    await tunnel.send(call(1, request, request_id=request_id, timeout=WAIT))
    await wait_for(lambda: slow_up.stats.requests > 0)  # mid-way, at the provider
    [session] = served.servicer._tunnels
    session._calls[1].cancel()
    [frame] = await tunnel.answers(1)
    assert frame.call_id == 1
    assert error_of(frame) == (grpc.StatusCode.UNAVAILABLE, "The router cancelled the call", {})
    await wait_for(lambda: not session._calls and not session._left)

    await tunnel.send(call(2, served.ask("mock-x"), request_id=rid()))
    [frame] = await tunnel.answers(1)
    assert frame.call_id == 2 and answered(frame).choices[0].message.text == REPLY
    await tunnel.close()
    assert await tunnel.rest() == [] and await tunnel.code() == grpc.StatusCode.OK
    state = await cancelled_paying_its_prompt(served, request_id, request)
    assert (state.used - frame.reply.usage.total_tokens, state.reserved) == (prompt_token_bound(request), 0)


async def test_a_cancel_for_a_call_not_open_is_ignored(served: Served) -> None:
    tunnel = served.open()
    await tunnel.send(cancel(41), call(42, served.ask("mock-x"), request_id=rid()))
    await tunnel.close()
    frames = await tunnel.rest()
    assert [frame.call_id for frame in frames] == [42]
    assert answered(frames[0]).choices[0].message.text == REPLY
    assert await tunnel.code() == grpc.StatusCode.OK


async def test_a_call_past_its_deadline_is_a_deadline_exceeded_error_frame(
    served: Served, slow_up: OpenAIUpstream
) -> None:
    request, request_id, unary_id = served.ask("slow-x"), rid(), rid()
    tunnel = served.open()
    await tunnel.send(call(1, request, request_id=request_id, timeout=0.3))
    [frame] = await tunnel.answers(1)
    assert frame.call_id == 1
    # Whichever ends it first: the call's deadline (the tunnel's own, as gRPC's would for
    # a unary call), or the router's, set to the same instant (its upstream timeout).
    tunnelled = error_of(frame)
    assert tunnelled in (
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", {}),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Provider 'slow' timed out after 0.3s", DEADLINE_METADATA),
    )
    # The stream goes on serving.
    await tunnel.send(call(2, served.ask("mock-x"), request_id=rid()))
    [frame] = await tunnel.answers(1)
    assert frame.call_id == 2 and answered(frame).choices[0].message.text == REPLY
    await tunnel.close()
    assert await tunnel.code() == grpc.StatusCode.OK

    # A unary call with the same deadline: the same status, settled the same way (its
    # handler is cancelled at the deadline: the prompt sent upstream is paid).
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.Chat(request, metadata=(*AUTH, ("x-request-id", unary_id)), timeout=0.3)
    assert raised.value.code() == tunnelled[0]
    assert slow_up.stats.requests == 2
    for key in (request_id, unary_id):
        [(name, event)] = await recorded_events(served, key)
        assert name == "inference.failed" and event.charged_tokens == prompt_token_bound(request)
        assert event.error_code in (ClientCancelled.error_code, UpstreamTimeout.error_code)
    await served.rig.settled()
    state = await served.rig.pool(served.pool)
    assert (state.used - frame.reply.usage.total_tokens, state.reserved) == (2 * prompt_token_bound(request), 0)


# --------------------------------------------------------------------------- the stream's own rules


async def test_a_duplicate_call_id_is_refused_and_the_first_call_still_answered(
    served: Served, openai_up: OpenAIUpstream, slow_up: OpenAIUpstream
) -> None:
    first_id = rid()
    tunnel = served.open()
    # In the same batch, then in a later one while the first is at the provider.
    await tunnel.send(call(7, served.ask("slow-x"), request_id=first_id), call(7, served.ask("mock-x")))
    await wait_for(lambda: slow_up.stats.requests > 0)
    await tunnel.send(call(7, served.ask("mock-x")))
    frames = await tunnel.answers(3)
    assert [frame.call_id for frame in frames] == [7, 7, 7]
    for frame in frames[:2]:
        code, message, trailing = error_of(frame)
        assert (code, message, trailing) == (grpc.StatusCode.INVALID_ARGUMENT, "call_id is already open", {})
    reply = answered(frames[2])
    assert reply.provider == "slow" and reply.choices[0].message.text == REPLY
    assert reply.id == f"chatcmpl-{first_id}"
    assert openai_up.stats.requests == 0 and slow_up.stats.requests == 1  # the duplicates never ran
    await tunnel.close()
    assert await tunnel.rest() == [] and await tunnel.code() == grpc.StatusCode.OK
    await served.rig.settled()
    state = await served.rig.pool(served.pool)
    assert (state.used, state.reserved) == (reply.usage.total_tokens, 0)


async def test_a_half_closed_stream_answers_its_open_call_then_ends_ok(served: Served, slow_up: OpenAIUpstream) -> None:
    request_id = rid()
    tunnel = served.open()
    await tunnel.send(call(1, served.ask("slow-x"), request_id=request_id))
    await tunnel.close()  # at once: the call has not even reached the provider
    frames = await tunnel.rest()
    assert [frame.call_id for frame in frames] == [1]
    assert answered(frames[0]).choices[0].message.text == REPLY
    assert await tunnel.code() == grpc.StatusCode.OK
    assert slow_up.stats.requests == 1
    [(name, _)] = await served.events(request_id)
    assert name == "inference.completed"


async def test_a_cancelled_stream_cancels_its_open_calls(served: Served, slow_up: OpenAIUpstream) -> None:
    request, request_id = served.ask("slow-x"), rid()
    tunnel = served.open()
    await tunnel.send(call(1, request, request_id=request_id))
    await wait_for(lambda: slow_up.stats.requests > 0)
    tunnel.call.cancel()
    assert await tunnel.code() == grpc.StatusCode.CANCELLED
    await wait_for(lambda: not served.servicer._tunnels)  # the session ended on the router
    # The call was cancelled (not left to finish): it failed as a cancelled unary call
    # does, paying its prompt, and nothing stays reserved.

    state = await cancelled_paying_its_prompt(served, request_id, request)
    assert (state.used, state.reserved) == (prompt_token_bound(request), 0)


async def test_limits_refuse_a_call_alone(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """More open calls than MAX_OPEN_CALLS: that call fails with UNAVAILABLE (the edge
    keeps under the cap; a call refused anyway is one to try again elsewhere); a reply
    over MAX_REPLY_BYTES: RESOURCE_EXHAUSTED, as a unary call's would. The stream and
    its other calls go on."""
    monkeypatch.setattr(hoosh_router.tunnel, "MAX_OPEN_CALLS", 1)
    tunnel = served.open()
    await tunnel.send(call(1, served.ask("slow-x"), request_id=rid()), call(2, served.ask("mock-x")))
    frames = await tunnel.answers(2)
    assert [frame.call_id for frame in frames] == [2, 1]
    assert error_of(frames[0]) == (grpc.StatusCode.UNAVAILABLE, "too many calls open on this tunnel", {})
    reply = answered(frames[1])
    monkeypatch.setattr(hoosh_router.tunnel, "MAX_REPLY_BYTES", reply.ByteSize() - 1)
    await tunnel.send(call(3, served.ask("mock-x"), request_id=rid()))
    [frame] = await tunnel.answers(1)
    code, message, _ = error_of(frame)
    assert (frame.call_id, code) == (3, grpc.StatusCode.RESOURCE_EXHAUSTED) and "larger than max" in message
    await tunnel.close()
    assert await tunnel.code() == grpc.StatusCode.OK


# --------------------------------------------------------------------------- drain


async def test_drain_asks_every_stream_to_move_on_and_still_serves(served: Served) -> None:
    open_before = served.open()
    await open_before.send(call(1, served.ask("mock-x"), request_id=rid()))
    [frame] = await open_before.answers(1)
    assert answered(frame).choices[0].message.text == REPLY and open_before.draining == 0

    served.servicer.drain_tunnels()
    await open_before.next_is_draining()
    served.servicer.drain_tunnels()  # again: no second frame (it would come before the reply below)
    await open_before.send(call(2, served.ask("mock-x"), request_id=rid()))
    [frame] = await open_before.answers(1)
    assert frame.call_id == 2 and answered(frame).choices[0].message.text == REPLY
    assert open_before.draining == 1

    opened_after = served.open()
    await opened_after.next_is_draining()  # at once, before it sends anything
    await opened_after.send(call(1, served.ask("mock-x"), request_id=rid()))
    [frame] = await opened_after.answers(1)
    assert answered(frame).choices[0].message.text == REPLY
    for tunnel in (open_before, opened_after):
        await tunnel.close()
        assert await tunnel.rest() == [] and await tunnel.code() == grpc.StatusCode.OK
        assert tunnel.draining == 1


# --------------------------------------------------------------------------- request id, trace, token

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


async def test_the_request_id_and_trace_context_of_each_call_reach_the_router(served: Served) -> None:
    tunnelled_id, unary_id = rid(), rid()
    request = served.ask("mock-x")
    tunnel = served.open()
    await tunnel.send(call(1, request, request_id=tunnelled_id, metadata=[("traceparent", TRACEPARENT)]))
    [frame] = await tunnel.answers(1)
    assert answered(frame).id == f"chatcmpl-{tunnelled_id}"
    await tunnel.close()
    assert await tunnel.code() == grpc.StatusCode.OK
    unary = await served.stub.Chat(
        request, metadata=(*AUTH, ("x-request-id", unary_id), ("traceparent", TRACEPARENT)), timeout=WAIT
    )
    assert unary.id == f"chatcmpl-{unary_id}"
    [(_, tunnelled_event)] = await served.events(tunnelled_id)
    [(_, unary_event)] = await served.events(unary_id)
    assert (tunnelled_event.request_id, tunnelled_event.trace_id) == (tunnelled_id, TRACE_ID)
    assert (unary_event.request_id, unary_event.trace_id) == (unary_id, TRACE_ID)


async def test_while_spans_are_exported_each_call_is_a_server_span_in_its_callers_trace(served: Served) -> None:
    """The stream's own SERVER span is the edge worker's, not any request's: each call
    continues the trace its frame carries, in a SERVER span of its own, as a unary call
    does."""
    other_trace = "1" * 32
    request_id = rid()
    with capture_spans() as exporter:
        tunnel = served.open(metadata=(*AUTH, ("traceparent", f"00-{other_trace}-{'2' * 16}-01")))
        await tunnel.send(call(1, served.ask("mock-x"), request_id=request_id, metadata=[("traceparent", TRACEPARENT)]))
        [frame] = await tunnel.answers(1)
        answered(frame)
        await tunnel.close()
        assert await tunnel.code() == grpc.StatusCode.OK
        [(_, event)] = await served.events(request_id)
        assert event.trace_id == TRACE_ID
        await wait_for(lambda: any(span.name.endswith("/Tunnel") for span in exporter.get_finished_spans()))
        spans = exporter.get_finished_spans()
    calls = [span for span in spans if span.kind == SpanKind.SERVER and span.name.endswith("/Chat")]
    assert len(calls) == 1 and calls[0].context is not None and calls[0].parent is not None
    assert f"{calls[0].context.trace_id:032x}" == TRACE_ID
    assert f"{calls[0].parent.span_id:016x}" == PARENT_SPAN_ID
    [stream] = [span for span in spans if span.name.endswith("/Tunnel")]
    assert stream.context is not None and f"{stream.context.trace_id:032x}" == other_trace


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer not-the-token-at-all-1234"),)], ids=["none", "wrong"]
)
async def test_a_tunnel_without_the_internal_token_is_refused(
    served: Served, openai_up: OpenAIUpstream, metadata: tuple[tuple[str, str], ...]
) -> None:
    tunnel = served.open(metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tunnel.send(call(1, served.ask("mock-x"), request_id=rid()))
        await tunnel.rest()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await tunnel.code() == grpc.StatusCode.UNAUTHENTICATED
    assert openai_up.stats.requests == 0
    assert (await served.rig.pool(served.pool)).reserved == 0
