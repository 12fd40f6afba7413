"""Router settings (environment) and the provider catalogue (YAML file)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOCAL_MODEL_DEFAULT = "smollm2-135m-instruct"


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")

    router_listen: str = "127.0.0.1:50051"
    config: Path | None = Field(default=None, description="Path of the shared hoosh YAML config")
    budget_addr: str = "127.0.0.1:50052"
    inference_addr: str = "127.0.0.1:50053"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_stream: str = "HOOSH_EVENTS"
    subject_prefix: str = "hoosh"
    router_lease_seconds: int = 600
    # "redis": the budget library in-process against the shared Redis (the hot path);
    # "grpc": through the budget service.
    router_budget_mode: Literal["redis", "grpc"] = "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"
    budget_key_prefix: str = "hoosh:budget:"
    router_upstream_timeout_seconds: float = 300.0


class Pricing(BaseModel):
    """USD per million tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


class ProviderConfig(BaseModel):
    name: str
    # "local": the local-inference worker over gRPC; "openai": any OpenAI-compatible HTTP API.
    type: Literal["local", "openai"]
    base_url: str = ""
    api_key: str = ""
    models: list[str] = Field(default_factory=list, description="exact names or glob patterns (gpt-*)")
    priority: int = 10
    default_max_tokens: int = 1024
    max_tokens_limit: int | None = None
    timeout_seconds: float | None = None
    pricing: Pricing = Field(default_factory=Pricing)
    enabled: bool = True

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")


class PoolConfig(BaseModel):
    name: str
    capacity: int


class Catalogue(BaseModel):
    providers: list[ProviderConfig] = Field(default_factory=list)
    pools: list[PoolConfig] = Field(default_factory=list)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_env(value: Any) -> Any:
    """Replace $VAR, ${VAR} and ${VAR:-default} in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(3)
            default = match.group(2)
            return os.environ.get(name, default if default is not None else "")

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, list):
        return [expand_env(item) for item in value]
    if isinstance(value, dict):
        return {key: expand_env(item) for key, item in value.items()}
    return value


def default_catalogue() -> Catalogue:
    return Catalogue(
        providers=[ProviderConfig(name="local", type="local", models=[LOCAL_MODEL_DEFAULT], default_max_tokens=512)]
    )


def load_catalogue(path: Path | None) -> Catalogue:
    """Read the YAML config; without one, serve only the local model."""
    if path is None:
        return default_catalogue()
    raw = yaml.safe_load(path.read_text()) or {}
    return Catalogue.model_validate(expand_env(raw))
