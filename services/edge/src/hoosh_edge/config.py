"""Edge settings, read once from the environment (prefix ``HOOSH_``).

Auth fails fast: ``HOOSH_AUTH=open`` is refused unless the edge binds a loopback
address and always with ``HOOSH_ENV=production``; production also needs a bootstrap
admin key (``HOOSH_ADMIN_KEY`` or ``HOOSH_ADMIN_KEY_FILE``) of at least 32 characters.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import ClassVar, Literal

from hoosh_common.events import SUBJECT_PREFIX
from hoosh_common.internal_plane import InternalPlaneSettings
from hoosh_common.link import check_socket_path
from hoosh_common.reload import GATHER_SECONDS, TIMEOUT_SECONDS
from hoosh_tenancy import DEFAULT_KEY_PREFIX
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from .json_depth import DEFAULT_MAX_JSON_DEPTH

MIN_PRODUCTION_ADMIN_KEY_LENGTH = 32


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(InternalPlaneSettings):
    """Everything the edge reads from the environment."""

    # hide_input_in_errors: a validation error must never print the admin key.
    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore", hide_input_in_errors=True)
    serves_grpc: ClassVar[bool] = False  # HTTP only
    calls_internal: ClassVar[bool] = True  # router, budget, audit, stt

    env: Literal["development", "production"] = Field(
        default="development", description="production refuses open auth and needs an admin key"
    )
    edge_host: str = Field(default="127.0.0.1", description="Interface the HTTP server binds")
    edge_port: int = Field(default=8088, ge=0, le=65535, description="Port the HTTP server binds")
    router_addr: str = Field(default="127.0.0.1:50051", description="Router gRPC address")
    edge_router_tunnel: bool = Field(
        default=True,
        description="Send blocking chat calls to the router as frames on one long-lived gRPC stream per worker "
        "(a fraction of a unary call's CPU); false: one unary call each. Off while spans are exported",
    )
    router_link_socket: str = Field(
        default="",
        description="The router's local link, a Unix socket path (same host or pod): the tunnel's frames go there "
        "instead of a gRPC stream (~0.17 ms less per call); empty: none. Only with the tunnel on",
    )
    budget_addr: str = Field(default="127.0.0.1:50052", description="Budget gRPC address")
    audit_addr: str = Field(default="127.0.0.1:50054", description="Audit gRPC address")
    stt_addr: str = Field(
        default="127.0.0.1:50055", description="Speech-to-text gRPC address; empty turns /v1/audio/transcriptions off"
    )
    auth: Literal["keys", "open"] = Field(
        default="keys",
        description="keys: every request but health and docs needs a valid key; open: a request without a known "
        "key is served as an anonymous user (every pool and model, no admin routes). Open only on loopback",
    )
    admin_key: SecretStr | None = Field(default=None, description="Bootstrap admin key (never logged)")
    admin_key_file: Path | None = Field(default=None, description="A file holding the bootstrap admin key")
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis of the budget (the keys' RPM/TPM/concurrency windows) and, unless "
        "HOOSH_TENANCY_REDIS_URL is set, of the key records; a redis+cluster:// URL is accepted",
    )
    budget_key_prefix: str = Field(
        default="hoosh:budget:",
        min_length=1,
        description="Prefix of the budget's Redis keys: the per-key limit windows the router counts too",
    )
    tenancy_redis_url: str = Field(
        default="", description="Redis of the key records when it differs from HOOSH_REDIS_URL (a cluster there)"
    )
    tenancy_key_prefix: str = Field(default=DEFAULT_KEY_PREFIX, min_length=1, description="Prefix of key records")
    edge_max_body_bytes: int = Field(default=1024 * 1024, gt=0, description="Largest accepted request body")
    edge_max_audio_bytes: int = Field(
        default=25 * 1024 * 1024, gt=0, description="Largest body of /v1/audio/transcriptions (OpenAI's 25 MB)"
    )
    edge_max_json_depth: int = Field(
        default=DEFAULT_MAX_JSON_DEPTH,
        ge=4,
        le=200,  # orjson serializes 254 levels: a tool schema 5 levels down stays inside that
        description="Deepest nesting of arrays and objects accepted in a JSON body (deeper: 400 json_too_deep)",
    )
    edge_request_timeout_seconds: float = Field(
        default=600.0, gt=0, description="gRPC deadline of one chat completion (blocking or the whole stream)"
    )
    edge_rpc_timeout_seconds: float = Field(
        default=10.0, gt=0, description="gRPC deadline of the small calls: models, tokens, audit, health"
    )
    edge_workers: int = Field(default=1, ge=1, description="uvicorn worker processes")
    edge_metrics_listen: str = Field(
        default="127.0.0.1:9460",
        description="Prometheus /metrics on a port of its own, host:port ('' = not served; GET /metrics on the API "
        "port answers admin keys either way)",
    )
    edge_access_log: bool = Field(default=True, description="One JSON access line per request")
    edge_trust_traceparent: bool = Field(
        default=True,
        description="Continue a caller's W3C trace context (traceparent, tracestate); false: every request "
        "starts a trace of its own (the caller's headers are ignored, its sampling flag too)",
    )
    edge_max_connections: int = Field(
        default=1024,
        ge=1,
        description="Open connections per worker process; one more is answered 503 (Retry-After: 1) and closed",
    )
    edge_header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Time to send a request line and headers (from the connection's start, or the request's first "
        "byte on a kept-alive connection); a slower client is disconnected",
    )
    edge_body_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Time to send a request body after its headers; a slower client is disconnected "
        "(25 MB of audio in 120 s needs about 1.7 Mbit/s)",
    )
    edge_max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest request line plus headers; larger: 431"
    )
    edge_keep_alive_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Idle time a kept-alive connection waits for its next request"
    )
    edge_upload_dir: Path | None = Field(
        default=None,
        description="Directory uploads (audio files) spill to past 1 MB in memory; default: the system's "
        "temporary directory. Must exist and be writable",
    )
    edge_upload_max_spool_bytes: int = Field(
        default=128 * 1024 * 1024,
        gt=0,
        description="Upload bytes one worker process holds at once (memory and upload directory); "
        "an upload that would exceed it is answered 503 upload_capacity (Retry-After)",
    )

    responses_ttl_seconds: int = Field(
        default=30 * 24 * 3600,
        ge=1,
        description="How long a stored response (/v1/responses with store=true) and its input items are kept in "
        "Redis (HOOSH_REDIS_URL) for GET, input_items and previous_response_id",
    )
    responses_background_poll_seconds: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often the edge running a background response (/v1/responses with background=true) "
        "looks at its stored copy, to stop it once cancelled on another edge (or deleted)",
    )
    responses_background_lease_seconds: float = Field(
        default=30,
        gt=0,
        le=3600,
        description="The lease of a running background response, renewed at every poll: an edge that dies "
        "without a shutdown stops renewing, and once the lease lapses the next read marks the response failed "
        "(at least three polls)",
    )
    responses_max_background: int = Field(
        default=256, ge=1, description="Background responses one edge replica runs at once (more: 429)"
    )
    responses_max_background_per_key: int = Field(
        default=16, ge=1, description="Background responses one API key runs at once on one edge replica (more: 429)"
    )
    responses_max_conversation_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest conversation a /v1/responses request may build (the previous_response_id's stored "
        "conversation plus the new input, as JSON); larger: 400 context_length_exceeded before anything is "
        "stored or sent",
    )
    responses_key_prefix: str = Field(
        default="hoosh:responses:",
        min_length=1,
        description="Prefix of the stored responses' Redis keys (one key per response)",
    )
    nats_url: str = Field(
        default="nats://127.0.0.1:4222",
        description="NATS on which POST /v1/admin/reload asks every router and budget replica to reload "
        "hoosh.yaml (as the NATS user `edge`); connected on the first reload, not at start",
    )
    subject_prefix: str = Field(
        default=SUBJECT_PREFIX,
        min_length=1,
        description="The services' event subject prefix (HOOSH_SUBJECT_PREFIX): reload requests go to "
        "hoosh-control.<prefix>.reload, to the replicas of this deployment only",
    )
    edge_reload_gather_seconds: float = Field(
        default=GATHER_SECONDS,
        gt=0,
        le=30,
        description="How long a reload gathers the replicas' answers to its check; every replica that answers "
        "in this window is then expected to apply the file (replicas answer in milliseconds)",
    )
    edge_reload_timeout_seconds: float = Field(
        default=TIMEOUT_SECONDS,
        gt=0,
        le=300,
        description="How long a reload waits for every replica that answered its check to apply the file "
        "(or record the refusal); one that does not answer by then makes the reload partial",
    )

    _admin_key_value: str | None = PrivateAttr(default=None)

    @field_validator("admin_key", "admin_key_file", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # An empty variable (a blank secret, a launcher that clears one of the two) is unset.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("router_addr", "budget_addr", "audit_addr")
    @classmethod
    def _address_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a gRPC address (host:port) is required")
        return value.strip()

    @field_validator("router_link_socket")
    @classmethod
    def _a_socket_path(cls, value: str) -> str:
        return check_socket_path(value) if value else value

    @field_validator("budget_key_prefix", "responses_key_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("must not contain braces: each key's hash tag follows it")
        return value

    @field_validator("edge_upload_dir")
    @classmethod
    def _usable_dir(cls, value: Path | None) -> Path | None:
        if value is None or not str(value).strip():
            return None
        if not value.is_dir():
            raise ValueError(f"HOOSH_EDGE_UPLOAD_DIR {str(value)!r} is not a directory")
        if not os.access(value, os.W_OK | os.X_OK):
            raise ValueError(f"HOOSH_EDGE_UPLOAD_DIR {str(value)!r} is not writable")
        return value

    @field_validator("stt_addr")
    @classmethod
    def _optional_address(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _auth_is_safe(self) -> Settings:
        # Messages never include the key: validation errors get logged.
        if self.admin_key is not None and self.admin_key_file is not None:
            raise ValueError("set HOOSH_ADMIN_KEY or HOOSH_ADMIN_KEY_FILE, not both")
        key: str | None = None
        if self.admin_key is not None:
            key = self.admin_key.get_secret_value().strip()
        elif self.admin_key_file is not None:
            try:
                key = self.admin_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"HOOSH_ADMIN_KEY_FILE cannot be read: {exc.strerror}") from None
            if not key:
                raise ValueError("HOOSH_ADMIN_KEY_FILE is empty")
        if self.env == "production":
            if self.auth == "open":
                raise ValueError("HOOSH_AUTH=open is refused in production (HOOSH_ENV=production)")
            if key is None:
                raise ValueError("production needs a bootstrap admin key: HOOSH_ADMIN_KEY or HOOSH_ADMIN_KEY_FILE")
            if len(key) < MIN_PRODUCTION_ADMIN_KEY_LENGTH:
                raise ValueError(
                    f"the admin key is shorter than {MIN_PRODUCTION_ADMIN_KEY_LENGTH} characters (a placeholder?)"
                )
        if self.auth == "open" and not is_loopback(self.edge_host):
            raise ValueError(
                f"HOOSH_AUTH=open is only allowed when the edge binds a loopback address, not {self.edge_host!r}"
            )
        if self.edge_upload_max_spool_bytes < self.edge_max_audio_bytes:
            raise ValueError(
                "HOOSH_EDGE_UPLOAD_MAX_SPOOL_BYTES must be at least HOOSH_EDGE_MAX_AUDIO_BYTES "
                "(one upload of the largest size must fit)"
            )
        if self.key_store_redis_url.split("://", 1)[0].endswith("+cluster"):
            raise ValueError(
                "the key records need a single Redis node: HOOSH_REDIS_URL is a cluster, "
                "so set HOOSH_TENANCY_REDIS_URL to one node"
            )
        self._admin_key_value = key
        return self

    @property
    def admin_keys(self) -> list[str]:
        """The bootstrap admin key, when configured (empty list otherwise)."""
        return [self._admin_key_value] if self._admin_key_value else []

    @property
    def key_store_redis_url(self) -> str:
        return self.tenancy_redis_url or self.redis_url
