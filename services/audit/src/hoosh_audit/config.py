"""Audit settings, from HOOSH_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from hoosh_common.events import DEFAULT_STREAM, SUBJECT_PREFIX
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hoosh_audit.errors import ConfigError

AUDIT_FILE_NAME = "audit.jsonl"
MIN_KEY_LENGTH = 16
PLACEHOLDER_KEYS = frozenset(
    {"change-me", "changeme", "change_me", "secret", "password", "test", "dev", "default", "hoosh", "key"}
)


class AuditSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")

    audit_listen: str = Field("127.0.0.1:50054", description="gRPC listen address")
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated")
    nats_stream: str = Field(DEFAULT_STREAM, description="JetStream stream holding the events")
    subject_prefix: str = Field(SUBJECT_PREFIX, description="events live under <prefix>.>")
    audit_dir: Path = Field(Path("./.hoosh/audit"), description="directory of audit.jsonl (a volume)")
    audit_consumer: str = Field("audit", description="durable JetStream consumer name")
    audit_hmac_key: SecretStr = Field(description="HMAC-SHA256 key of the chain (required)")
    env: Literal["production", "development"] = "production"

    @property
    def audit_file(self) -> Path:
        return self.audit_dir / AUDIT_FILE_NAME

    @property
    def key_bytes(self) -> bytes:
        return self.audit_hmac_key.get_secret_value().encode("utf-8")

    @model_validator(mode="after")
    def _refuse_weak_key(self) -> AuditSettings:
        key = self.audit_hmac_key.get_secret_value()
        if not key:
            raise ValueError("HOOSH_AUDIT_HMAC_KEY must not be empty")
        if self.env != "development":
            if key.strip().lower() in PLACEHOLDER_KEYS:
                raise ValueError(
                    "HOOSH_AUDIT_HMAC_KEY is a placeholder; set a random secret "
                    "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`) "
                    "or HOOSH_ENV=development"
                )
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"HOOSH_AUDIT_HMAC_KEY is shorter than {MIN_KEY_LENGTH} characters; "
                    "use a random secret or HOOSH_ENV=development"
                )
        return self


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
            problems.append(f"{name}: {msg}")
        raise ConfigError("invalid audit settings: " + "; ".join(problems)) from None
