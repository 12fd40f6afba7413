"""Settings fail fast on a missing or placeholder key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hoosh_audit.config import load_settings
from hoosh_audit.errors import ConfigError

GOOD_KEY = "3f9a1c0e5b7d2a4c6e8f0a1b3c5d7e9f"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HOOSH_AUDIT_HMAC_KEY",
        "HOOSH_ENV",
        "HOOSH_AUDIT_DIR",
        "HOOSH_AUDIT_LISTEN",
        "HOOSH_NATS_URL",
        "HOOSH_NATS_STREAM",
        "HOOSH_SUBJECT_PREFIX",
        "HOOSH_AUDIT_CONSUMER",
    ):
        monkeypatch.delenv(name, raising=False)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    settings = load_settings()
    assert settings.audit_listen == "127.0.0.1:50054"
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.nats_stream == "HOOSH_EVENTS"
    assert settings.subject_prefix == "hoosh"
    assert settings.audit_consumer == "audit"
    assert settings.audit_file == Path(".hoosh/audit/audit.jsonl")
    assert settings.env == "production"
    assert settings.key_bytes == GOOD_KEY.encode()
    assert GOOD_KEY not in repr(settings)


def test_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    monkeypatch.setenv("HOOSH_AUDIT_DIR", str(tmp_path))
    monkeypatch.setenv("HOOSH_AUDIT_CONSUMER", "audit-0")
    monkeypatch.setenv("HOOSH_NATS_STREAM", "OTHER")
    settings = load_settings()
    assert settings.audit_file == tmp_path / "audit.jsonl"
    assert (settings.audit_consumer, settings.nats_stream) == ("audit-0", "OTHER")


def test_missing_key_fails_fast() -> None:
    with pytest.raises(ConfigError, match="HOOSH_AUDIT_HMAC_KEY: is required"):
        load_settings()


@pytest.mark.parametrize("placeholder", ["change-me", "changeme", "secret", "CHANGE-ME"])
def test_placeholder_key_is_refused_outside_development(monkeypatch: pytest.MonkeyPatch, placeholder: str) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", placeholder)
    with pytest.raises(ConfigError, match="placeholder"):
        load_settings()
    monkeypatch.setenv("HOOSH_ENV", "development")
    assert load_settings().key_bytes == placeholder.encode()


def test_short_key_is_refused_outside_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", "short-key")
    with pytest.raises(ConfigError, match="shorter than 16"):
        load_settings()


def test_empty_key_is_refused_even_in_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", "")
    monkeypatch.setenv("HOOSH_ENV", "development")
    with pytest.raises(ConfigError, match="must not be empty"):
        load_settings()
