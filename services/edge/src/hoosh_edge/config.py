"""Edge settings, read once from the environment (prefix ``HOOSH_``)."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the edge reads from the environment.

    ``HOOSH_API_KEYS`` is a comma-separated list of accepted bearer tokens; when it is
    empty, authentication is off (a warning is logged at start).
    """

    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")

    edge_host: str = Field(default="127.0.0.1", description="Interface the HTTP server binds")
    edge_port: int = Field(default=8088, ge=0, le=65535, description="Port the HTTP server binds")
    router_addr: str = Field(default="127.0.0.1:50051", description="Router gRPC address")
    budget_addr: str = Field(default="127.0.0.1:50052", description="Budget gRPC address")
    audit_addr: str = Field(default="127.0.0.1:50054", description="Audit gRPC address")
    stt_addr: str = Field(
        default="127.0.0.1:50055", description="Speech-to-text gRPC address; empty turns /v1/audio/transcriptions off"
    )
    # A str, not list[str]: pydantic-settings would expect JSON for a list.
    api_keys: str = Field(default="", description="Comma-separated bearer tokens; empty turns auth off")
    edge_max_body_bytes: int = Field(default=1024 * 1024, gt=0, description="Largest accepted request body")
    edge_max_audio_bytes: int = Field(
        default=25 * 1024 * 1024, gt=0, description="Largest body of /v1/audio/transcriptions (OpenAI's 25 MB)"
    )
    edge_request_timeout_seconds: float = Field(
        default=600.0, gt=0, description="gRPC deadline of one chat completion (blocking or the whole stream)"
    )
    edge_rpc_timeout_seconds: float = Field(
        default=10.0, gt=0, description="gRPC deadline of the small calls: models, tokens, audit, health"
    )
    edge_workers: int = Field(default=1, ge=1, description="uvicorn worker processes")

    @field_validator("router_addr", "budget_addr", "audit_addr")
    @classmethod
    def _address_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a gRPC address (host:port) is required")
        return value.strip()

    @field_validator("stt_addr")
    @classmethod
    def _optional_address(cls, value: str) -> str:
        return value.strip()

    @property
    def api_key_list(self) -> list[str]:
        """The configured keys, blanks dropped."""
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]
