"""Settings fail fast on a missing or placeholder key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hoosh_audit.config import load_settings
from hoosh_audit.errors import ConfigError
from hoosh_audit.keys import key_fingerprint

GOOD_KEY = "3f9a1c0e5b7d2a4c6e8f0a1b3c5d7e9f"
ROUTER_KEY, STT_KEY = bytes(range(32)).hex(), bytes(range(32, 64)).hex()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HOOSH_AUDIT_HMAC_KEY",
        "HOOSH_ENV",
        "HOOSH_AUDIT_DIR",
        "HOOSH_AUDIT_LISTEN",
        "HOOSH_AUDIT_METRICS_LISTEN",
        "HOOSH_NATS_URL",
        "HOOSH_NATS_STREAM",
        "HOOSH_SUBJECT_PREFIX",
        "HOOSH_AUDIT_CONSUMER",
        "HOOSH_AUDIT_HMAC_KEY_ID",
        "HOOSH_AUDIT_HMAC_KEYS",
        "HOOSH_AUDIT_HMAC_KEYS_FILE",
        "HOOSH_AUDIT_SEGMENT_MAX_BYTES",
        "HOOSH_AUDIT_SEGMENT_MAX_AGE_SECONDS",
        "HOOSH_AUDIT_CHECKPOINT_PREFIX",
        "HOOSH_AUDIT_ACCEPT_CHECKPOINT_LOSS",
        "HOOSH_REDIS_URL",
        "HOOSH_AUDIT_PUBLISHER_KEYS_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    # Production needs the publishers' keys and its callers: given here, taken away where tested.
    monkeypatch.setenv("HOOSH_AUDIT_PUBLISHER_KEYS", f"router={ROUTER_KEY}")
    monkeypatch.setenv("HOOSH_INTERNAL_CALLERS", "edge=edge-internal-token-0123456789")
    monkeypatch.setenv("HOOSH_INTERNAL_PLAINTEXT", "allow")  # no certificates in these tests


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    settings = load_settings()
    assert settings.audit_listen == "127.0.0.1:50054"
    assert settings.audit_metrics_listen == "127.0.0.1:9464"
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.nats_stream == "HOOSH_EVENTS"
    assert settings.subject_prefix == "hoosh"
    assert settings.audit_consumer == "audit"
    assert settings.audit_file == Path(".hoosh/audit/audit.jsonl")
    assert settings.env == "production"
    assert settings.key_bytes == GOOD_KEY.encode()
    assert settings.keyring.current_id == key_fingerprint(GOOD_KEY.encode())
    assert (settings.audit_segment_max_bytes, settings.audit_segment_max_age_seconds) == (64 << 20, 86_400)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.checkpoint_key == "hoosh:audit:HOOSH_EVENTS:audit:checkpoint"
    assert settings.accept_checkpoint_loss is False
    assert GOOD_KEY not in repr(settings)
    assert GOOD_KEY not in repr(settings.keyring)


def test_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    monkeypatch.setenv("HOOSH_AUDIT_DIR", str(tmp_path))
    monkeypatch.setenv("HOOSH_AUDIT_CONSUMER", "audit-0")
    monkeypatch.setenv("HOOSH_NATS_STREAM", "OTHER")
    monkeypatch.setenv("HOOSH_AUDIT_METRICS_LISTEN", "")
    settings = load_settings()
    assert settings.audit_file == tmp_path / "audit.jsonl"
    assert (settings.audit_consumer, settings.nats_stream) == ("audit-0", "OTHER")
    assert settings.audit_metrics_listen == ""  # not served


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


def test_several_keys_one_signing(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = "0" * 8 + GOOD_KEY, "1" * 8 + GOOD_KEY
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEYS", f'{{"2024": "{old}", "2025": "{new}"}}')
    with pytest.raises(ConfigError, match="HOOSH_AUDIT_HMAC_KEY_ID"):
        load_settings()  # which one signs?
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY_ID", "2025")
    settings = load_settings()
    assert (settings.keyring.current_id, settings.key_bytes) == ("2025", new.encode())
    assert set(settings.keyring.keys) == {"2024", "2025"}
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY_ID", "2026")
    with pytest.raises(ConfigError, match="no configured key has the id '2026'"):
        load_settings()


def test_a_new_key_beside_old_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    old = "0" * 8 + GOOD_KEY
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY_ID", "2025")
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEYS", f'["{old}"]')  # ids: fingerprints
    settings = load_settings()
    assert settings.keyring.current_id == "2025"
    assert settings.keyring.keys == {"2025": GOOD_KEY.encode(), key_fingerprint(old.encode()): old.encode()}
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEYS", f'{{"2025": "{old}"}}')
    with pytest.raises(ConfigError, match="twice with different secrets"):
        load_settings()


def test_keys_from_a_file_outside_the_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys = tmp_path / "secrets" / "audit-keys.json"
    keys.parent.mkdir()
    keys.write_text(f'{{"k1": "{GOOD_KEY}"}}')
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEYS_FILE", str(keys))
    monkeypatch.setenv("HOOSH_AUDIT_DIR", str(tmp_path / "audit"))
    assert load_settings().keyring.current_id == "k1"
    inside = tmp_path / "audit" / "keys.json"
    inside.parent.mkdir()
    inside.write_text(keys.read_text())
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEYS_FILE", str(inside))
    with pytest.raises(ConfigError, match="keep the keys away from the log"):
        load_settings()


def test_every_key_must_be_strong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEYS", '{"old": "secret"}')
    with pytest.raises(ConfigError, match="placeholder"):
        load_settings()


def test_segments_and_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    monkeypatch.setenv("HOOSH_AUDIT_SEGMENT_MAX_BYTES", "1048576")
    monkeypatch.setenv("HOOSH_AUDIT_SEGMENT_MAX_AGE_SECONDS", "3600")
    monkeypatch.setenv("HOOSH_AUDIT_CHECKPOINT_PREFIX", "org:audit:")
    monkeypatch.setenv("HOOSH_NATS_STREAM", "EV")
    monkeypatch.setenv("HOOSH_ENV", "development")
    settings = load_settings()
    assert (settings.audit_segment_max_bytes, settings.audit_segment_max_age_seconds) == (1 << 20, 3600)
    assert settings.checkpoint_key == "org:audit:EV:audit:checkpoint"
    assert settings.accept_checkpoint_loss is True  # development
    monkeypatch.setenv("HOOSH_AUDIT_SEGMENT_MAX_BYTES", "10")
    with pytest.raises(ConfigError, match="HOOSH_AUDIT_SEGMENT_MAX_BYTES"):
        load_settings()


def test_publisher_keys_are_required_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    monkeypatch.delenv("HOOSH_AUDIT_PUBLISHER_KEYS")
    with pytest.raises(ConfigError, match="HOOSH_AUDIT_PUBLISHER_KEYS is required outside HOOSH_ENV=development"):
        load_settings()
    monkeypatch.setenv("HOOSH_AUDIT_PUBLISHER_KEYS", "")  # compose's ${VAR:-}: the same as unset
    with pytest.raises(ConfigError, match="HOOSH_AUDIT_PUBLISHER_KEYS is required"):
        load_settings()
    monkeypatch.setenv("HOOSH_ENV", "development")
    settings = load_settings()
    assert settings.event_verifier() is None  # development without keys: events taken as they come
    assert not settings.publishes_events  # and no signing key of its own is asked for


def test_publisher_keys_several_per_publisher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    rotated = bytes(range(64, 96)).hex()
    monkeypatch.setenv("HOOSH_AUDIT_PUBLISHER_KEYS", f"router={ROUTER_KEY}, router-2={rotated}\nstt={STT_KEY}")
    settings = load_settings()
    assert settings.publisher_key_ids == ["router", "router-2", "stt"]
    verifier = settings.event_verifier()
    assert verifier is not None and verifier.key_ids == ["router", "router-2", "stt"]
    assert ROUTER_KEY not in repr(settings) and ROUTER_KEY not in repr(verifier)
    # The same items from a file (a mounted secret), merged with the variable.
    keys_file = tmp_path / "secrets" / "publisher-keys"
    keys_file.parent.mkdir()
    keys_file.write_text(f"# hoosh publishers\nbudget={bytes(range(96, 128)).hex()}\n")
    monkeypatch.setenv("HOOSH_AUDIT_PUBLISHER_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("HOOSH_AUDIT_DIR", str(tmp_path / "audit"))
    assert load_settings().publisher_key_ids == ["budget", "router", "router-2", "stt"]
    monkeypatch.setenv("HOOSH_AUDIT_PUBLISHER_KEYS_FILE", str(tmp_path / "audit" / "keys"))
    with pytest.raises(ConfigError, match="keep the keys away from the log"):
        load_settings()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("router", "expected key-id=hex items"),
        ("router=not-hex", "must be hex"),
        (f"router={'ab' * 16}", "at least 32 bytes"),
        (f"rou:ter={ROUTER_KEY}", "must be 1-64 of"),
        (f"router={ROUTER_KEY},router={STT_KEY}", "configured twice"),
    ],
)
def test_bad_publisher_keys_are_refused_even_in_development(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    monkeypatch.setenv("HOOSH_ENV", "development")
    monkeypatch.setenv("HOOSH_AUDIT_PUBLISHER_KEYS", value)
    with pytest.raises(ConfigError, match=problem) as raised:
        load_settings()
    assert STT_KEY not in str(raised.value)  # the error never shows a key


def test_placeholder_publisher_keys_are_refused_outside_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_AUDIT_HMAC_KEY", GOOD_KEY)
    monkeypatch.setenv("HOOSH_AUDIT_PUBLISHER_KEYS", f"router={ROUTER_KEY},stt={'02' * 32}")  # .env.example's
    with pytest.raises(ConfigError, match=r"the key\(s\) of \['stt'\] are placeholders"):
        load_settings()
    monkeypatch.setenv("HOOSH_ENV", "development")
    assert load_settings().publisher_key_ids == ["router", "stt"]
