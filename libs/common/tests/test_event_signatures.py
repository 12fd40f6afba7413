"""Publisher signatures on events: what ``EventSigner`` signs, what ``EventVerifier``
refuses, the settings that build the signer, and a signed event through the real
JetStream at 127.0.0.1:4222, directly and by way of the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from hoosh.events.v1 import events_pb2
from hoosh_common import eventbus_settings, events
from hoosh_common.eventbus import (
    MSG_ID_HEADER,
    OUTBOX_HEADER,
    REJECT_MALFORMED,
    REJECT_MISMATCH,
    REJECT_MISSING,
    REJECT_UNKNOWN_KEY,
    SIGNATURE_HEADER,
    EventSigner,
    EventVerifier,
    SignatureProblem,
    ensure_stream,
    signed_bytes,
)
from hoosh_common.eventbus_settings import EventBusSettings
from nats.aio.client import Client as NATS
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

NATS_URL = "nats://127.0.0.1:4222"
ROUTER_KEY = bytes.fromhex("a1" * 32)
ROUTER_KEY_2 = bytes.fromhex("b2" * 32)
STT_KEY = bytes.fromhex("c3" * 32)
SUBJECT = "hoosh.inference.completed"
DATA = events_pb2.InferenceCompleted(request_id="req-1", model="m", cost_usd=0.5).SerializeToString()


def signed(signer: EventSigner, subject: str = SUBJECT, msg_id: str = "req-1", data: bytes = DATA) -> dict[str, str]:
    return {MSG_ID_HEADER: msg_id, SIGNATURE_HEADER: signer.sign(subject, msg_id, data)}


@pytest.fixture
def verifier() -> EventVerifier:
    return EventVerifier({"router": ROUTER_KEY, "stt": STT_KEY})


# -- signing and verifying ---------------------------------------------------------------


def test_the_signature_is_an_hmac_of_subject_id_and_payload_digest(verifier: EventVerifier) -> None:
    signer = EventSigner(ROUTER_KEY, "router")
    value = signer.sign(SUBJECT, "req-1", DATA)
    expected = hmac.new(
        ROUTER_KEY, f"{SUBJECT}\nreq-1\n{hashlib.sha256(DATA).hexdigest()}".encode(), hashlib.sha256
    ).hexdigest()
    assert value == f"v1:router:{expected}"  # the documented form, reproducible by any producer
    assert signed_bytes(SUBJECT, "req-1", DATA).endswith(hashlib.sha256(DATA).hexdigest().encode())
    assert verifier.check(SUBJECT, signed(signer), DATA) is None
    assert "a1a1" not in repr(signer) and "a1a1" not in repr(verifier)


@pytest.mark.parametrize(
    ("subject", "msg_id", "data"),
    [
        (SUBJECT, "req-1", DATA + b"\x00"),  # the payload changed
        (SUBJECT, "req-1", events_pb2.InferenceCompleted(request_id="req-1", model="m").SerializeToString()),
        ("hoosh.inference.failed", "req-1", DATA),  # moved to another subject
        ("hoosh.admin.key.revoked", "req-1", DATA),
        (SUBJECT, "req-2", DATA),  # given another event id
        (SUBJECT, "", DATA),
    ],
)
def test_a_tampered_payload_subject_or_id_does_not_verify(
    verifier: EventVerifier, subject: str, msg_id: str, data: bytes
) -> None:
    genuine = signed(EventSigner(ROUTER_KEY, "router"))
    headers = {**genuine, MSG_ID_HEADER: msg_id} if msg_id else {SIGNATURE_HEADER: genuine[SIGNATURE_HEADER]}
    assert verifier.check(subject, headers, data) == SignatureProblem(REJECT_MISMATCH, "router")


def test_a_signature_made_with_another_key_under_a_known_id_does_not_verify(verifier: EventVerifier) -> None:
    forged = EventSigner(bytes.fromhex("ee" * 32), "router")  # the id is public; the key is not
    assert verifier.check(SUBJECT, signed(forged), DATA) == SignatureProblem(REJECT_MISMATCH, "router")
    # Nor does a publisher's signature under another publisher's id.
    stt_as_router = signed(EventSigner(STT_KEY, "router"))
    assert verifier.check(SUBJECT, stt_as_router, DATA) == SignatureProblem(REJECT_MISMATCH, "router")


def test_missing_malformed_and_unknown_signatures(verifier: EventVerifier) -> None:
    good = signed(EventSigner(ROUTER_KEY, "router"))[SIGNATURE_HEADER]
    mac = good.rsplit(":", 1)[1]
    assert verifier.check(SUBJECT, None, DATA) == SignatureProblem(REJECT_MISSING, "")
    assert verifier.check(SUBJECT, {MSG_ID_HEADER: "req-1"}, DATA) == SignatureProblem(REJECT_MISSING, "")
    empty = {MSG_ID_HEADER: "req-1", SIGNATURE_HEADER: ""}
    assert verifier.check(SUBJECT, empty, DATA) == SignatureProblem(REJECT_MISSING, "")
    for value, claimed in [
        ("garbage", ""),
        (f"v2:router:{mac}", "router"),  # a version this verifier does not know
        (f"v1:router:{mac.upper()}", "router"),
        (f"v1:router:{mac[:-2]}", "router"),
        (f"v1:router:{mac}:extra", "router"),
        (f"v1:rou ter:{mac}", "rou ter"),
        (f"v1::{mac}", ""),
    ]:
        problem = verifier.check(SUBJECT, {MSG_ID_HEADER: "req-1", SIGNATURE_HEADER: value}, DATA)
        assert problem == SignatureProblem(REJECT_MALFORMED, claimed), value
    unknown = signed(EventSigner(ROUTER_KEY, "router-old"))
    assert verifier.check(SUBJECT, unknown, DATA) == SignatureProblem(REJECT_UNKNOWN_KEY, "router-old")
    long_id = f"v1:{'x' * 500}:{mac}"
    problem = verifier.check(SUBJECT, {SIGNATURE_HEADER: long_id}, DATA)
    assert problem is not None and problem.reason == REJECT_MALFORMED and len(problem.key_id) == 64


def test_a_rotated_key_verifies_beside_the_old_one_while_both_are_configured() -> None:
    both = EventVerifier({"router": ROUTER_KEY, "router-2": ROUTER_KEY_2})
    assert both.check(SUBJECT, signed(EventSigner(ROUTER_KEY, "router")), DATA) is None  # left in an outbox
    assert both.check(SUBJECT, signed(EventSigner(ROUTER_KEY_2, "router-2")), DATA) is None  # the new key
    retired = EventVerifier({"router-2": ROUTER_KEY_2})  # the old key removed once drained
    old = signed(EventSigner(ROUTER_KEY, "router"))
    assert retired.check(SUBJECT, old, DATA) == SignatureProblem(REJECT_UNKNOWN_KEY, "router")


def test_weak_keys_and_bad_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        EventSigner(b"k" * 31, "router")
    with pytest.raises(ValueError, match="1-64 of"):
        EventSigner(ROUTER_KEY, "router:1")
    with pytest.raises(ValueError, match="at least one key"):
        EventVerifier({})
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        EventVerifier({"router": b"short"})


# -- settings ----------------------------------------------------------------------------


class PublisherSettings(EventBusSettings):
    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOOSH_ENV", "HOOSH_EVENTS_SIGNING_KEY", "HOOSH_EVENTS_SIGNING_KEY_ID", "HOOSH_EVENTS_OUTBOX_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_production_publishers_refuse_to_start_without_a_signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_ENV", "production")
    with pytest.raises(ValidationError, match="HOOSH_EVENTS_SIGNING_KEY is required with HOOSH_ENV=production"):
        PublisherSettings()
    monkeypatch.setenv("HOOSH_EVENTS_SIGNING_KEY", "")  # compose's ${VAR:-}: the same as unset
    with pytest.raises(ValidationError, match="HOOSH_EVENTS_SIGNING_KEY is required"):
        PublisherSettings()
    monkeypatch.setenv("HOOSH_EVENTS_SIGNING_KEY", ROUTER_KEY.hex())  # "a1" * 32: a placeholder
    with pytest.raises(ValidationError, match="placeholder"):
        PublisherSettings()
    random_key = bytes(range(32)).hex()
    monkeypatch.setenv("HOOSH_EVENTS_SIGNING_KEY", random_key)
    settings = PublisherSettings()
    signer = settings.event_signer("router")
    assert signer is not None and signer.key_id == "router"  # the service's name by default
    assert random_key not in repr(settings)


def test_development_without_a_key_publishes_unsigned(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = PublisherSettings()
    assert settings.env == "development" and settings.event_signer("router") is None


@pytest.mark.parametrize(
    ("key", "problem"),
    [("zz" * 32, "must be hex"), ("ab" * 31, "at least 32 bytes"), ("hunter2-hunter2", "must be hex")],
)
def test_a_weak_signing_key_is_refused_even_in_development(
    monkeypatch: pytest.MonkeyPatch, key: str, problem: str
) -> None:
    monkeypatch.setenv("HOOSH_EVENTS_SIGNING_KEY", key)
    with pytest.raises(ValidationError, match=problem) as raised:
        PublisherSettings()
    assert key not in str(raised.value)


def test_the_key_id_can_be_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_EVENTS_SIGNING_KEY", ROUTER_KEY_2.hex())
    monkeypatch.setenv("HOOSH_EVENTS_SIGNING_KEY_ID", "router-2")
    signer = PublisherSettings().event_signer("router")
    assert signer is not None and signer.key_id == "router-2"
    monkeypatch.setenv("HOOSH_EVENTS_SIGNING_KEY_ID", "router/2")
    with pytest.raises(ValidationError, match="1-64 of"):
        PublisherSettings()


# -- through JetStream -------------------------------------------------------------------


@pytest.fixture
async def nc() -> AsyncIterator[NATS]:
    client = await nats.connect(NATS_URL)
    yield client
    await client.close()


async def test_a_published_event_carries_a_signature_that_verifies_even_from_the_outbox(
    nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    suffix = uuid.uuid4().hex[:12]
    stream, prefix = f"TEST_SIGNED_{suffix}", f"testsigned{suffix}"
    js = nc.jetstream()
    monkeypatch.setenv("HOOSH_EVENTS_SIGNING_KEY", ROUTER_KEY.hex())
    monkeypatch.setenv("HOOSH_EVENTS_OUTBOX_DIR", str(tmp_path / "outbox"))
    # Not under test, and one publisher collector per process registry: keep it off REGISTRY.
    monkeypatch.setattr(eventbus_settings, "register_publisher_metrics", lambda publisher, service: None)
    settings = PublisherSettings()
    publisher = settings.event_publisher(nc, js, stream, prefix, "router", max_attempts=1, ack_timeout=0.5)
    verifier = EventVerifier({"router": ROUTER_KEY})
    subject = events.subject(prefix, events.SUBJECT_COMPLETED)
    message = events_pb2.InferenceCompleted(request_id="kept", model="m")
    try:
        await publisher.start()
        # No stream yet: NATS refuses, the event waits in the outbox with its headers.
        assert await publisher.publish(events.SUBJECT_COMPLETED, message, "kept") is None
        assert publisher.stats.kept == 1
        await ensure_stream(js, stream, prefix)
        for _ in range(200):  # bounded poll: the drainer publishes it
            if publisher.outbox is not None and publisher.outbox.count == 0:
                break
            await asyncio.sleep(0.05)
        drained = await js.get_msg(stream, 1)
        assert drained.data is not None
        headers = drained.headers or {}
        assert headers[OUTBOX_HEADER] == "1" and headers[SIGNATURE_HEADER].startswith("v1:router:")
        assert verifier.check(subject, headers, drained.data) is None  # signed once, at its first try

        direct = events_pb2.InferenceCompleted(request_id="direct", model="m")
        ack = await publisher.publish(events.SUBJECT_COMPLETED, direct, "direct")
        assert ack is not None
        stored = await js.get_msg(stream, ack.seq)
        assert stored.data is not None
        assert OUTBOX_HEADER not in (stored.headers or {})
        assert verifier.check(subject, stored.headers, stored.data) is None
        assert verifier.check(subject, stored.headers, drained.data) == SignatureProblem(REJECT_MISMATCH, "router")
    finally:
        await publisher.close(grace=0)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
    assert not any("published unsigned" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
