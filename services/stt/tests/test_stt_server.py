"""SttService over gRPC with the real metering store (Redis, in-process) and the real
event bus (NATS JetStream): charging, events, errors and the queue bound."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import nats.errors
import numpy as np
import pytest
from hoosh.events.v1 import events_pb2
from hoosh.stt.v1 import stt_pb2
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_metering.pools import PoolSpec
from hoosh_stt import transcription
from hoosh_stt.audio import decode, probe
from hoosh_stt.server import ADMITTED_METADATA
from hoosh_stt.wer import word_error_rate
from nats.js.api import ConsumerConfig, DeliverPolicy

from .conftest import SENTENCE, TOKENS_PER_SECOND, SttStack, requests, silent_mp3, transcribe

pytestmark = pytest.mark.slow  # loads the real Whisper model

WORD = stt_pb2.TIMESTAMP_GRANULARITY_WORD


async def events(stack: SttStack, expected: int) -> list[tuple[str, events_pb2.InferenceCompleted]]:
    """The events on the test's stream, decoded (waits for ``expected`` of them)."""
    subscription = await stack.js.pull_subscribe(
        f"{stack.prefix}.inference.>", config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    found: list[tuple[str, events_pb2.InferenceCompleted]] = []
    # Events are published in the background: under a loaded machine one may take more
    # than a fetch's wait; a lost one still fails the test (after 30 s).
    deadline = asyncio.get_running_loop().time() + 30
    try:
        while len(found) < expected:
            try:
                fetched = await subscription.fetch(expected - len(found), timeout=5)
            except nats.errors.TimeoutError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                continue
            for message in fetched:
                cls = (
                    events_pb2.InferenceCompleted
                    if message.subject.endswith("completed")
                    else events_pb2.InferenceFailed
                )
                found.append((message.subject, cls.FromString(message.data)))
                await message.ack()
    finally:
        await subscription.unsubscribe()
    return found


def metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: str(value) for key, value in error.trailing_metadata() or ()}


async def test_transcription_charges_audio_seconds_and_publishes_an_event(stt: SttStack, speech: bytes) -> None:
    pool = await stt.pool()
    reply = await transcribe(
        stt.stub, requests(speech, pool=pool, request_id="req-ok-1", timestamp_granularities=[WORD], user="u1")
    )
    duration = decode(speech, max_seconds=60).duration
    expected_tokens = math.ceil(duration * TOKENS_PER_SECOND)
    assert word_error_rate(SENTENCE, reply.text) <= 0.25, reply.text
    assert reply.request_id == "req-ok-1" and reply.model == "whisper-tiny.en"
    assert reply.language == "en" and reply.language_name == "english"
    assert reply.duration == pytest.approx(duration)
    assert reply.segments and reply.words and reply.charged_tokens == expected_tokens
    state = await stt.pool_state(pool)
    assert (state.used, state.reserved) == (expected_tokens, 0)

    [(subject, event)] = await events(stt, 1)
    assert subject == f"{stt.prefix}.inference.completed"
    assert event.request_id == "req-ok-1" and event.kind == "transcription"
    assert event.usage.prompt_tokens == expected_tokens == event.usage.total_tokens
    assert (event.pool, event.model, event.provider, event.user) == (pool, "whisper-tiny.en", "faster-whisper", "u1")
    assert (event.key_id, list(event.pool_chain)) == ("", [pool])  # no caller: the edge ran open


async def test_the_callers_key_is_charged_in_every_pool_of_the_chain_and_named_in_events(
    stt: SttStack, speech: bytes
) -> None:
    org = await stt.pool(capacity=1_000_000)
    team = await stt.pool(capacity=10_000, parent=org)
    caller = tenancy_pb2.Caller(key_id="key_0123", key_name="ci", team="t")
    reply = await transcribe(stt.stub, requests(speech, pool=team, request_id="req-key-1", caller=caller))
    for name in (team, org):
        state = await stt.pool_state(name)
        assert (state.used, state.reserved) == (reply.charged_tokens, 0)
    with pytest.raises(grpc.aio.AioRpcError):
        await transcribe(stt.stub, requests(speech, pool=team, request_id="req-key-2", caller=caller, language="fr"))

    (_, completed), (failed_subject, failed) = await events(stt, 2)
    assert (completed.request_id, completed.key_id, list(completed.pool_chain)) == (
        "req-key-1",
        "key_0123",
        [team, org],
    )
    assert failed_subject.endswith("inference.failed")
    assert (failed.request_id, failed.key_id, list(failed.pool_chain)) == ("req-key-2", "key_0123", [team, org])
    assert failed.charged_tokens == 0


async def test_list_models(stt: SttStack) -> None:
    reply = await stt.stub.ListModels(stt_pb2.ListModelsRequest())
    assert [(model.id, model.engine) for model in reply.models] == [("whisper-tiny.en", "faster-whisper")]
    assert reply.models[0].created > 0


@pytest.mark.parametrize(
    ("make", "options", "status", "code", "param"),
    [
        (lambda wav: b"not audio at all " * 50, {}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_value", "file"),
        (lambda wav: wav[: len(wav) // 2], {}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_value", "file"),
        (lambda wav: b"", {}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_value", "file"),
        (lambda wav: wav, {"model": "whisper-9"}, grpc.StatusCode.NOT_FOUND, "model_not_found", "model"),
        (lambda wav: wav, {"pool": "no-such-pool"}, grpc.StatusCode.INVALID_ARGUMENT, "pool_not_found", "pool"),
        (lambda wav: wav, {"language": "fr"}, grpc.StatusCode.INVALID_ARGUMENT, "unsupported_language", "language"),
        (lambda wav: wav, {"language": "klingon"}, grpc.StatusCode.INVALID_ARGUMENT, "unsupported_language", None),
        (lambda wav: wav, {"temperature": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", "temperature"),
    ],
    ids=["text", "truncated", "empty", "unknown-model", "unknown-pool", "non-english", "bad-language", "temp-1.5"],
)
async def test_bad_requests_are_refused_and_charge_nothing(
    stt: SttStack, speech: bytes, make, options: dict, status: grpc.StatusCode, code: str, param: str | None
) -> None:
    pool = await stt.pool()
    options = {"pool": pool, "request_id": "req-bad", **options}
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await transcribe(stt.stub, requests(make(speech), **options))
    assert raised.value.code() == status
    trailing = metadata(raised.value)
    assert trailing["hoosh-error-code"] == code
    if param:
        assert trailing["hoosh-error-param"] == param
    state = await stt.pool_state(pool)
    assert (state.used, state.reserved) == (0, 0)
    [(subject, event)] = await events(stt, 1)
    assert subject.endswith("inference.failed")
    assert event.error_code == code and event.kind == "transcription" and event.usage.total_tokens == 0
    # The service is still up and serves the next one.
    assert (await transcribe(stt.stub, requests(speech, pool=pool))).text


async def test_exhausted_pool_is_refused_after_decoding(stt: SttStack, speech: bytes) -> None:
    pool = await stt.pool(capacity=5)  # 2.8 s of audio costs 28 tokens
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await transcribe(stt.stub, requests(speech, pool=pool))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert metadata(raised.value)["hoosh-error-code"] == "budget_exhausted"
    state = await stt.pool_state(pool)
    assert (state.used, state.reserved) == (0, 0)


PRICED = {"workers": 1, "max_queue": 4, "max_audio_bytes": 25 * 1024 * 1024, "price_per_minute_micros": 6000}


@pytest.mark.parametrize("stack_options", [PRICED])
async def test_a_priced_transcription_returns_its_cost_and_money_caps_bound_it(stt: SttStack, speech: bytes) -> None:
    pool = await stt.pool()
    reply = await transcribe(stt.stub, requests(speech, pool=pool))
    # $0.006 a minute: a tenth of a micro-dollar per millisecond, rounded up.
    assert reply.cost_usd_micros == -(-round(reply.duration * 1000) // 10) > 0
    state = await stt.pool_state(pool)
    assert state.used_usd_micros == reply.cost_usd_micros
    # A pool whose money cap is spent refuses before anything is decoded or charged.
    capped = f"capped-{uuid.uuid4().hex[:6]}"
    await stt.store.create_pool(PoolSpec(capped, 1_000_000, cap_usd_micros=10))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await transcribe(stt.stub, requests(speech, pool=capped))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    state = await stt.pool_state(capped)
    assert (state.used_usd_micros, state.reserved_usd_micros, state.used) == (0, 0, 0)


async def test_the_first_message_must_carry_options(stt: SttStack, speech: bytes) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await transcribe(stt.stub, [stt_pb2.TranscribeRequest(audio=speech)])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await transcribe(stt.stub, [])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_second_options_message_is_an_error(stt: SttStack, speech: bytes) -> None:
    messages = requests(speech)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await transcribe(stt.stub, [*messages, messages[0]])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("stack_options", [{"workers": 1, "max_queue": 1, "max_audio_bytes": 100_000}])
async def test_upload_over_the_byte_limit_is_too_large(stt: SttStack, speech: bytes) -> None:
    pool = await stt.pool()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await transcribe(stt.stub, requests(speech, chunk_size=4096, pool=pool))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert metadata(raised.value)["hoosh-error-code"] == "request_too_large"
    assert (await stt.pool_state(pool)).reserved == 0


@pytest.mark.parametrize("stack_options", [{"workers": 1, "max_queue": 2, "max_audio_bytes": 25 * 1024 * 1024}])
async def test_a_full_queue_answers_resource_exhausted_and_the_admitted_ones_finish(
    stt: SttStack, speech: bytes
) -> None:
    pool = await stt.pool()
    held = []
    for index in range(3):  # workers + max_queue: every place taken by an upload in progress
        call = stt.stub.Transcribe()
        await call.write(requests(b"", pool=pool, request_id=f"held-{index}")[0])
        assert tuple(await call.initial_metadata()) == ADMITTED_METADATA  # admitted before its audio arrives
        held.append(call)
    assert stt.service._queue.admitted == 3

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await transcribe(stt.stub, requests(speech, pool=pool, request_id="one-too-many"))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = metadata(raised.value)
    assert trailing["hoosh-error-code"] == "stt_overloaded" and trailing["retry-after"] == "1"

    async def finish(call: grpc.aio.StreamUnaryCall) -> stt_pb2.TranscribeResponse:
        for message in requests(speech)[1:]:
            await call.write(message)
        await call.done_writing()
        return await call

    replies = await asyncio.gather(*(finish(call) for call in held))
    assert all(word_error_rate(SENTENCE, reply.text) <= 0.25 for reply in replies)
    assert stt.service._queue.admitted == 0
    charged = sum(reply.charged_tokens for reply in replies)
    assert (await stt.pool_state(pool)).used == charged
    published = await events(stt, 4)
    failed = [event for subject, event in published if subject.endswith("failed")]
    assert [(event.request_id, event.error_code, event.http_status) for event in failed] == [
        ("one-too-many", "stt_overloaded", 503)
    ]


async def test_a_client_that_hangs_up_mid_upload_frees_its_place(stt: SttStack, speech: bytes) -> None:
    pool = await stt.pool()
    call = stt.stub.Transcribe()
    await call.write(requests(b"", pool=pool, request_id="gone")[0])
    await call.initial_metadata()
    assert stt.service._queue.admitted == 1
    call.cancel()
    for _ in range(100):  # the server notices the cancellation asynchronously
        if stt.service._queue.admitted == 0:
            break
        await asyncio.sleep(0.05)
    assert stt.service._queue.admitted == 0
    [(subject, event)] = await events(stt, 1)
    assert subject.endswith("failed") and event.error_code == "client_disconnected"
    assert (await stt.pool_state(pool)).reserved == 0


def spy_on_reserve_and_decode(stt: SttStack, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record, in order, each reservation (with its tokens) and each start of decoding."""
    seen: list[tuple[str, int]] = []
    reserve, windows = stt.budget.reserve, transcription.windows

    async def reserving(pool: str, tokens: int, reservation_id: str, **options: Any) -> tuple[str, ...]:
        seen.append(("reserve", tokens))
        return await reserve(pool, tokens, reservation_id, **options)

    def decoding(data: bytes, window_seconds: float, max_seconds: float) -> Iterator[np.ndarray]:
        seen.append(("decode", 0))  # called when the windows are set up, before the first is decoded
        return windows(data, window_seconds, max_seconds)

    monkeypatch.setattr(stt.budget, "reserve", reserving)
    monkeypatch.setattr(transcription, "windows", decoding)
    return seen


@pytest.mark.parametrize(
    "stack_options", [{"workers": 1, "max_queue": 1, "max_audio_bytes": 25 * 1024 * 1024, "max_audio_seconds": 600}]
)
async def test_audio_over_the_duration_limit_is_refused_before_reserving_or_decoding(
    stt: SttStack, speech: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = await stt.pool()
    seen = spy_on_reserve_and_decode(stt, monkeypatch)
    with pytest.raises(grpc.aio.AioRpcError) as raised:  # 11 minutes of silence, 660 KB
        await transcribe(stt.stub, requests(silent_mp3(11), pool=pool, request_id="req-too-long"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum of 600 seconds" in (raised.value.details() or "")
    trailing = metadata(raised.value)
    assert (trailing["hoosh-error-code"], trailing["hoosh-error-param"]) == ("audio_too_long", "file")
    assert trailing["hoosh-error-type"] == "invalid_request_error"
    assert seen == []  # no reservation to release, nothing decoded
    state = await stt.pool_state(pool)
    assert (state.used, state.reserved) == (0, 0)
    assert stt.service._queue.admitted == 0
    [(subject, event)] = await events(stt, 1)
    assert subject.endswith("inference.failed")
    assert (event.error_code, event.http_status, event.charged_tokens) == ("audio_too_long", 400, 0)
    # The next one, within the limit, is served.
    assert (await transcribe(stt.stub, requests(speech, pool=pool))).text


async def test_the_pool_is_reserved_for_the_probed_duration_before_decoding(
    stt: SttStack, speech: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = await stt.pool()
    seen = spy_on_reserve_and_decode(stt, monkeypatch)
    reply = await transcribe(stt.stub, requests(speech, pool=pool))
    probed = probe(speech, max_seconds=60).duration
    assert seen == [("reserve", math.ceil(probed * TOKENS_PER_SECOND)), ("decode", 0)]
    # Charged for what was decoded (the probe's count within a few ms of it).
    assert reply.charged_tokens == math.ceil(reply.duration * TOKENS_PER_SECOND)
    assert abs(reply.duration - probed) < 0.05
    state = await stt.pool_state(pool)
    assert (state.used, state.reserved) == (reply.charged_tokens, 0)
