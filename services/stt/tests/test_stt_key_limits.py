"""The caller's key's own RPM / TPM / concurrency limits on transcriptions, over gRPC
with the real key limiter on the real Redis: a key over a limit gets
RESOURCE_EXHAUSTED with the router's rate-limit type and a retry-after (the edge's
429), a finished transcription frees its slot and leaves TPM at what it was charged,
and a key without limits costs the limiter nothing."""

from __future__ import annotations

import grpc
import pytest
from hoosh.stt.v1 import stt_pb2
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_metering.limits import KeyLimits

from .conftest import SttStack, requests, transcribe

pytestmark = pytest.mark.slow  # loads the real Whisper model


def metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: str(value) for key, value in error.trailing_metadata() or ()}


async def refused(stack: SttStack, messages: list[stt_pb2.TranscribeRequest]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await transcribe(stack.stub, messages)
    return raised.value


async def in_flight(stack: SttStack, key_id: str) -> int:
    return int(await stack.redis.zcard(f"{stack.limiter.key_base(key_id)}inflight"))


async def tpm_counted(stack: SttStack, key_id: str) -> int:
    """The tokens counted against the key's TPM in every window it has."""
    total = 0
    async for key in stack.redis.scan_iter(match=f"{stack.limiter.key_base(key_id)}w:*"):
        total += int(await stack.redis.hget(key, "t") or 0)
    return total


async def test_a_key_over_its_rpm_is_refused_with_a_retry_after(stt: SttStack, speech: bytes) -> None:
    pool = await stt.pool()
    caller = tenancy_pb2.Caller(key_id="key_rpm", rpm=1)
    first = await transcribe(stt.stub, requests(speech, pool=pool, request_id="rpm-1", caller=caller))
    assert first.text and first.charged_tokens > 0

    error = await refused(stt, requests(speech, pool=pool, request_id="rpm-2", caller=caller))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    meta = metadata(error)
    assert (meta["hoosh-error-type"], meta["hoosh-error-code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert int(meta["retry-after"]) >= 1
    assert "rpm" in (error.details() or "")
    # The refused one reserved nothing and charged nothing.
    state = await stt.pool_state(pool)
    assert (state.used, state.reserved) == (first.charged_tokens, 0)


async def test_a_finished_transcription_frees_its_concurrency_slot(stt: SttStack, speech: bytes) -> None:
    pool = await stt.pool()
    caller = tenancy_pb2.Caller(key_id="key_conc", max_concurrency=1)
    limits = KeyLimits(max_concurrency=1)

    # Another request of the key holds its one slot: the transcription is refused.
    await stt.limiter.admit("key_conc", "elsewhere", limits, 0)
    error = await refused(stt, requests(speech, pool=pool, request_id="conc-0", caller=caller))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert metadata(error)["hoosh-error-code"] == "rate_limit_exceeded" and "retry-after" in metadata(error)
    await stt.limiter.finish("key_conc", "elsewhere", limits, estimated_tokens=0, actual_tokens=0)

    # One after another, each is admitted: the one before gave its slot back.
    for n in range(1, 3):
        reply = await transcribe(stt.stub, requests(speech, pool=pool, request_id=f"conc-{n}", caller=caller))
        assert reply.text
        assert await in_flight(stt, "key_conc") == 0


async def test_tpm_counts_what_was_charged_and_a_failure_counts_nothing(stt: SttStack, speech: bytes) -> None:
    pool = await stt.pool()
    caller = tenancy_pb2.Caller(key_id="key_tpm", tpm=1_000_000, max_concurrency=1)

    # Admitted (the audio's charge is known), then refused by the budget: finished with 0.
    error = await refused(stt, requests(speech, pool="no-such-pool", request_id="tpm-0", caller=caller))
    assert metadata(error)["hoosh-error-code"] == "pool_not_found"
    assert await in_flight(stt, "key_tpm") == 0
    assert await tpm_counted(stt, "key_tpm") == 0

    reply = await transcribe(stt.stub, requests(speech, pool=pool, request_id="tpm-1", caller=caller))
    assert await in_flight(stt, "key_tpm") == 0
    assert await tpm_counted(stt, "key_tpm") == reply.charged_tokens


async def test_a_key_without_limits_is_served_without_touching_the_limiter(stt: SttStack, speech: bytes) -> None:
    pool = await stt.pool()
    caller = tenancy_pb2.Caller(key_id="key_free", key_name="free")
    for n in range(3):
        reply = await transcribe(stt.stub, requests(speech, pool=pool, request_id=f"free-{n}", caller=caller))
        assert reply.text and reply.charged_tokens > 0
    assert [key async for key in stt.redis.scan_iter(match=f"{stt.limiter.key_base('key_free')}*")] == []
