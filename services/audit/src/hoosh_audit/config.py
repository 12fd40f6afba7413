"""Audit settings, from HOOSH_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from hoosh_common.eventbus import EventVerifier, placeholder_key
from hoosh_common.eventbus_settings import EventBusSettings
from hoosh_common.events import DEFAULT_STREAM, SUBJECT_PREFIX
from hoosh_common.internal_plane import InternalPlaneSettings
from pydantic import Field, PrivateAttr, SecretStr, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from hoosh_audit.checkpoint import checkpoint_key
from hoosh_audit.errors import ConfigError
from hoosh_audit.keys import Keyring, load_keyring, parse_publisher_keys
from hoosh_audit.log import DEFAULT_SEGMENT_MAX_AGE_S, DEFAULT_SEGMENT_MAX_BYTES
from hoosh_audit.segments import HEAD_LINK

MIN_KEY_LENGTH = 16
PLACEHOLDER_KEYS = frozenset(
    {"change-me", "changeme", "change_me", "secret", "password", "test", "dev", "default", "hoosh", "key"}
)
# Kept for older callers: the link to the head segment.
AUDIT_FILE_NAME = HEAD_LINK


class AuditSettings(EventBusSettings, InternalPlaneSettings):
    """The audit's environment (prefix ``HOOSH_``), the event bus's included."""

    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")
    publishes_events: ClassVar[bool] = False  # it consumes: it verifies, never signs

    audit_listen: str = Field("127.0.0.1:50054", description="gRPC listen address")
    audit_metrics_listen: str = Field(
        "127.0.0.1:9464", description="Prometheus /metrics listen address (host:port); empty: not served"
    )
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated")
    nats_stream: str = Field(DEFAULT_STREAM, description="JetStream stream holding the events")
    subject_prefix: str = Field(SUBJECT_PREFIX, description="events live under <prefix>.>")
    audit_dir: Path = Field(Path("./.hoosh/audit"), description="directory of the segments and the index (a volume)")
    audit_consumer: str = Field("audit", description="durable JetStream consumer name")
    audit_hmac_key: SecretStr | None = Field(
        None, description="the HMAC-SHA256 key that signs new entries (id: HOOSH_AUDIT_HMAC_KEY_ID or its fingerprint)"
    )
    audit_hmac_key_id: str | None = Field(
        None, description="id of HOOSH_AUDIT_HMAC_KEY; without it, picks the signing key among HOOSH_AUDIT_HMAC_KEYS"
    )
    audit_hmac_keys: SecretStr | None = Field(
        None, description='more keys, JSON: {"id": "secret", ...} or ["secret", ...]; old keys keep verifying'
    )
    audit_hmac_keys_file: Path | None = Field(
        None, description="a file with the same JSON (a mounted secret; not inside HOOSH_AUDIT_DIR)"
    )
    audit_segment_max_bytes: int = Field(
        DEFAULT_SEGMENT_MAX_BYTES, ge=4096, description="start a new segment before the head grows past this"
    )
    audit_segment_max_age_seconds: float = Field(
        DEFAULT_SEGMENT_MAX_AGE_S, gt=0, description="start a new segment once the head's first entry is this old"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the checkpoints")
    audit_checkpoint_prefix: str = Field(
        "hoosh:audit:", description="checkpoint key: <prefix><stream>:<consumer>:checkpoint"
    )
    audit_accept_checkpoint_loss: bool = Field(
        False,
        description="start even if the log ends before its checkpoint (moved aside as evidence); "
        "always so with HOOSH_ENV=development",
    )
    audit_integrity_check_seconds: float = Field(
        10.0, gt=0, description="how often the service looks for segments changed behind its back"
    )
    audit_publisher_keys: SecretStr | None = Field(
        None,
        description="the publishers' event-signing keys, kid=hex items: router=<hex>,stt=<hex>,budget=<hex>; "
        "events not signed by one of them are recorded as audit.rejected (required in production)",
    )
    audit_publisher_keys_file: Path | None = Field(
        None, description="the same kid=hex items in a file (one per line; a mounted secret; not inside the log)"
    )
    env: Literal["production", "development"] = "production"
    _keyring: Keyring | None = PrivateAttr(None)
    _publisher_keys: dict[str, bytes] = PrivateAttr(default_factory=dict)

    @property
    def audit_file(self) -> Path:
        """The link to the head segment."""
        return self.audit_dir / AUDIT_FILE_NAME

    @property
    def keyring(self) -> Keyring:
        assert self._keyring is not None
        return self._keyring

    @property
    def key_bytes(self) -> bytes:
        """The current (signing) key."""
        return self.keyring.current

    @property
    def publisher_key_ids(self) -> list[str]:
        return sorted(self._publisher_keys)

    def event_verifier(self) -> EventVerifier | None:
        """Checks each event's publisher signature; None without publisher keys (development
        only: every event is then taken as what it claims to be)."""
        return EventVerifier(self._publisher_keys) if self._publisher_keys else None

    @property
    def checkpoint_key(self) -> str:
        return checkpoint_key(self.audit_checkpoint_prefix, self.nats_stream, self.audit_consumer)

    @property
    def accept_checkpoint_loss(self) -> bool:
        return self.audit_accept_checkpoint_loss or self.env == "development"

    @model_validator(mode="after")
    def _load_keys(self) -> AuditSettings:
        key = self.audit_hmac_key.get_secret_value() if self.audit_hmac_key is not None else None
        if key is not None and not key:
            raise ValueError("HOOSH_AUDIT_HMAC_KEY must not be empty")
        if self.audit_hmac_keys_file is not None:
            keys_file = self.audit_hmac_keys_file.resolve()
            if keys_file.is_relative_to(self.audit_dir.resolve()):
                raise ValueError(
                    "HOOSH_AUDIT_HMAC_KEYS_FILE is inside HOOSH_AUDIT_DIR: keep the keys away from the log "
                    "(whoever can edit the log must not be able to read them)"
                )
        try:
            keyring = load_keyring(
                key=key or None,
                key_id=self.audit_hmac_key_id or None,
                keys_json=self.audit_hmac_keys.get_secret_value() if self.audit_hmac_keys else None,
                keys_file=self.audit_hmac_keys_file,
            )
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.env != "development":
            for kid, secret in keyring.keys.items():
                text = secret.decode("utf-8", "replace")
                if text.strip().lower() in PLACEHOLDER_KEYS:
                    raise ValueError(
                        f"HOOSH_AUDIT_HMAC_KEY (key {kid}) is a placeholder; set a random secret "
                        "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`) "
                        "or HOOSH_ENV=development"
                    )
                if len(secret) < MIN_KEY_LENGTH:
                    raise ValueError(
                        f"HOOSH_AUDIT_HMAC_KEY (key {kid}) is shorter than {MIN_KEY_LENGTH} characters; "
                        "use a random secret or HOOSH_ENV=development"
                    )
        self._keyring = keyring
        self._publisher_keys = self._load_publisher_keys()
        return self

    def _load_publisher_keys(self) -> dict[str, bytes]:
        keys: dict[str, bytes] = {}
        sources: list[tuple[str, str]] = []
        if self.audit_publisher_keys_file is not None:
            path = self.audit_publisher_keys_file
            if path.resolve().is_relative_to(self.audit_dir.resolve()):
                raise ValueError(
                    "HOOSH_AUDIT_PUBLISHER_KEYS_FILE is inside HOOSH_AUDIT_DIR: keep the keys away from the log"
                )
            try:
                sources.append(("HOOSH_AUDIT_PUBLISHER_KEYS_FILE", path.read_text(encoding="utf-8")))
            except OSError as exc:
                raise ValueError(f"HOOSH_AUDIT_PUBLISHER_KEYS_FILE: cannot read {path}: {exc.strerror}") from None
        if self.audit_publisher_keys is not None:
            sources.append(("HOOSH_AUDIT_PUBLISHER_KEYS", self.audit_publisher_keys.get_secret_value()))
        for source, text in sources:
            try:
                found = parse_publisher_keys(text, source)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            for kid, secret in found.items():
                if kid in keys and keys[kid] != secret:
                    raise ValueError(f"{source}: key id {kid!r} is configured twice with different keys")
                keys[kid] = secret
        if self.env != "development":
            weak = sorted(kid for kid, secret in keys.items() if placeholder_key(secret))
            if weak:
                raise ValueError(f"HOOSH_AUDIT_PUBLISHER_KEYS: the key(s) of {weak} are placeholders; use random keys")
        if not keys and self.env != "development":
            raise ValueError(
                "HOOSH_AUDIT_PUBLISHER_KEYS is required outside HOOSH_ENV=development: without the "
                "publishers' keys anyone who can publish on the stream writes genuine-looking entries "
                "(router=<hex>,stt=<hex>,budget=<hex>: each service's HOOSH_EVENTS_SIGNING_KEY)"
            )
        return keys


def load_settings() -> AuditSettings:
    """Read the settings, turning validation errors into one clear ``ConfigError``."""
    try:
        return AuditSettings()  # type: ignore[call-arg]  # values come from the environment
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "HOOSH_" + "_".join(str(p) for p in err["loc"]).upper() if err["loc"] else "settings"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = "is required"
            problems.append(f"{name}: {msg}" if err["loc"] else msg)
        raise ConfigError("invalid audit settings: " + "; ".join(problems)) from None
