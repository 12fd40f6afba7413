"""Router settings (environment) and the provider catalogue (YAML file).

The catalogue names providers (each a wire dialect with its defaults), optional
explicit routes (a model name or pattern -> several provider targets), and the
routing, health, retry and cache policies. Secrets come from the environment
through ``$VAR`` references in the YAML.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from hoosh_common.eventbus_settings import EventBusSettings
from hoosh_common.events import DEFAULT_STREAM, SUBJECT_PREFIX
from hoosh_common.internal_plane import InternalPlaneSettings
from hoosh_common.link import check_socket_path
from hoosh_common.prices import FREE, TokenPrice, default_table, usd_to_micros
from hoosh_common.reload import ConfigRefused, describe_validation_error, describe_yaml_error, file_sha256
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

try:  # libyaml's parser: several times faster on a large file (same types; errors at the same place)
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader  # type: ignore[assignment]

LOCAL_MODEL_DEFAULT = "smollm2-135m-instruct"

# OpenAI-compatible provider types and the base URL each uses when the entry gives none.
OPENAI_COMPATIBLE_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "mistral": "https://api.mistral.ai/v1",
    "groq": "https://api.groq.com/openai/v1",
    "xai": "https://api.x.ai/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "llamacpp": "http://127.0.0.1:8080/v1",
    "lmstudio": "http://127.0.0.1:1234/v1",
    "localai": "http://127.0.0.1:8080/v1",
    "vllm": "http://127.0.0.1:8000/v1",
}
NATIVE_BASE_URLS: dict[str, str] = {
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com/v1beta",
}
ProviderType = Literal[
    "local",
    "anthropic",
    "gemini",
    "openai",
    "deepseek",
    "mistral",
    "groq",
    "xai",
    "openrouter",
    "ollama",
    "llamacpp",
    "lmstudio",
    "localai",
    "vllm",
]
Strategy = Literal["priority", "round-robin", "lowest-latency", "direct"]

# The deadline of one call to the budget service (HOOSH_ROUTER_BUDGET_MODE=grpc).
BUDGET_RPC_TIMEOUT_SECONDS = 10.0

MIB = 1024 * 1024
# A provider's bounds, when its entry sets none (see ProviderConfig and the README).
# A stream may run this long, from its request to its last byte: a long reasoning
# answer takes minutes; one that trickles on past this is cut.
STREAM_TIMEOUT_SECONDS = 600.0
# One line or event of a streamed answer. Models stream text in small deltas; the
# largest events in practice are a whole tool call's arguments or a Gemini chunk with
# inline data (an image: a few MB of base64). 8 MiB is room for those, and bounds what
# a stream can make hoosh hold (about twice this, per stream).
MAX_EVENT_BYTES = 8 * MIB
# A non-streamed answer. A chat answer is at most max_tokens of text (128k tokens of
# JSON-escaped text is a few MB); embeddings may hold more per input (http.py).
MAX_RESPONSE_BYTES = 32 * MIB


class RouterSettings(EventBusSettings, InternalPlaneSettings):
    """The router's environment (prefix ``HOOSH_``), the event bus's included."""

    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")
    calls_internal: ClassVar[bool] = True  # the budget service and the local workers

    router_listen: str = "127.0.0.1:50051"
    # The local link (hoosh_common.link): a Unix socket path where an edge on this host
    # or in this pod sends its Tunnel frames without gRPC ("" = none).
    router_link_socket: str = Field(default="", description="Unix socket of the router's local link")
    # Prometheus /metrics on a port of its own ("" = not served).
    router_metrics_listen: str = "127.0.0.1:9461"
    config: Path | None = Field(default=None, description="Path of the shared hoosh YAML config")
    budget_addr: str = "127.0.0.1:50052"
    inference_addr: str = "127.0.0.1:50053"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_stream: str = DEFAULT_STREAM
    subject_prefix: str = SUBJECT_PREFIX
    # "redis://…" (one node) or "redis+cluster://host:port" (Redis or Valkey Cluster).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # A Redis slower than this is an outage: budget steps answer 503 budget_unavailable.
    router_redis_timeout_seconds: float = Field(default=2.0, gt=0)
    router_key_prefix: str = Field(
        default="hoosh:router:", description="Prefix of every Redis key the router owns (health, limits, cache)"
    )
    router_lease_seconds: int = Field(
        default=600, ge=3, description="reservation lease; a call or stream renews it every third"
    )
    # How long shutdown waits for commits still being retried (their leases settle the rest).
    router_commit_drain_seconds: float = Field(default=10.0, ge=0)
    # "redis": the budget library in-process against the shared Redis (the hot path);
    # "grpc": through the budget service.
    router_budget_mode: Literal["redis", "grpc"] = "redis"
    budget_key_prefix: str = "hoosh:budget:"
    # How a reservation whose lease ran out (its holder died) is settled: "commit" charges
    # it whole (the provider may have billed it), "release" gives it back. The budget
    # service's setting of the same name; in-process (redis mode) the router applies it.
    budget_expiry_policy: Literal["commit", "release"] = "commit"
    router_upstream_timeout_seconds: float = 300.0

    @field_validator("router_link_socket")
    @classmethod
    def _a_socket_path(cls, value: str) -> str:
        return check_socket_path(value) if value else value

    @model_validator(mode="after")
    def _a_renewal_lands_within_the_lease(self) -> RouterSettings:
        """A call renews its lease a third of the way in; that renewal, even when the
        budget store takes its whole timeout to answer, must land before the lease ends,
        or every long call would see its reservation settled by the expiry policy."""
        timeout = (
            self.router_redis_timeout_seconds if self.router_budget_mode == "redis" else BUDGET_RPC_TIMEOUT_SECONDS
        )
        lease = self.router_lease_seconds
        if lease / 3 + timeout > lease:
            setting = "router_redis_timeout_seconds" if self.router_budget_mode == "redis" else "the budget RPC timeout"
            raise ValueError(
                f"router_lease_seconds ({lease}) is too short: its renewal, sent at a third of it, may take "
                f"{setting} ({timeout:g} s) to land; the lease must be at least {1.5 * timeout:g} s"
            )
        return self


def _first(*values: Decimal | None) -> Decimal | None:
    return next((value for value in values if value is not None), None)


PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ModelPricing(BaseModel):
    """USD per million tokens (as written in the YAML: ``0.15`` or ``"0.15"``); unset
    fields fall through to the next source (see ``Pricing``)."""

    input_per_mtok: Decimal | None = Field(default=None, ge=0)
    cached_input_per_mtok: Decimal | None = Field(
        default=None, ge=0, description="prompt tokens served from the provider's cache (default: the input price)"
    )
    output_per_mtok: Decimal | None = Field(default=None, ge=0)

    @property
    def configured(self) -> bool:
        return self.input_per_mtok is not None or self.output_per_mtok is not None

    def token_price(self) -> TokenPrice:
        """As integer micro-dollars per million tokens (exact)."""
        input_micros = usd_to_micros(self.input_per_mtok or 0)
        cached = self.cached_input_per_mtok
        return TokenPrice(
            input=input_micros,
            cached_input=input_micros if cached is None else usd_to_micros(cached),
            output=usd_to_micros(self.output_per_mtok or 0),
        )


class Pricing(ModelPricing):
    """A provider's prices. For a model, the first that applies: its entry in ``models``,
    then the provider-wide prices set here, then the shipped price table
    (``hoosh_common.prices``, by provider type and model id), else 0 (a local model is
    priced only here)."""

    models: dict[str, ModelPricing] = Field(default_factory=dict, description="per model id (upstream name)")


class BreakerOverrides(BaseModel):
    """Per-provider overrides of the catalogue's health policy."""

    failure_threshold: int | None = Field(default=None, ge=1)
    cooldown_seconds: float | None = Field(default=None, gt=0)


class ProviderConfig(BaseModel):
    name: str
    # "local": the local-inference worker over gRPC; "anthropic"/"gemini": their native
    # APIs; every other type speaks OpenAI's chat-completions API (see OPENAI_COMPATIBLE_BASE_URLS).
    type: ProviderType
    base_url: str = ""
    api_key: str = ""
    models: list[str] = Field(
        default_factory=list,
        description='chat models: exact names or glob patterns (gpt-*); also what `provider/model` may name ("*": any)',
    )
    embedding_models: list[str] = Field(default_factory=list, description="embedding models: names or patterns")
    priority: int = Field(default=10, description="lower is tried first")
    weight: int = Field(default=1, ge=1, description="share under round-robin")
    default_max_tokens: int = 1024
    max_tokens_limit: int | None = None
    timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description="one upstream attempt: a blocking call's whole exchange, a stream's wait for its first token "
        "(default HOOSH_ROUTER_UPSTREAM_TIMEOUT_SECONDS)",
    )
    read_timeout_seconds: float | None = Field(
        default=None, gt=0, description="the longest silence between two reads from the provider (default: timeout)"
    )
    stream_timeout_seconds: float = Field(
        default=STREAM_TIMEOUT_SECONDS, gt=0, description="one stream, from its request to its last byte"
    )
    max_event_bytes: int = Field(
        default=MAX_EVENT_BYTES, ge=1024, description="the largest line or event of a streamed answer (else 502)"
    )
    max_response_bytes: int = Field(
        default=MAX_RESPONSE_BYTES, ge=1024, description="the largest non-streamed answer (else 502)"
    )
    pricing: Pricing = Field(default_factory=Pricing)
    enabled: bool = True
    rpm: int | None = Field(default=None, ge=1, description="requests per minute, shared by all router replicas")
    tpm: int | None = Field(default=None, ge=1, description="tokens per minute, shared by all router replicas")
    breaker: BreakerOverrides = Field(default_factory=BreakerOverrides)
    probe: bool = Field(default=True, description="let the background prober check this provider")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers sent upstream")
    responses_api: Literal["translate", "native"] = Field(
        default="translate",
        description="/v1/responses: 'native' forwards the Responses API request to this provider's own "
        "/responses (OpenAI-compatible types only; OpenAI speaks it); 'translate' serves it through chat",
    )

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("name")
    @classmethod
    def _a_plain_name(cls, value: str) -> str:
        """Provider names appear in URLs (provider/model), events, metrics and the cost
        ledger: letters, digits and . _ - only."""
        if not PROVIDER_NAME.fullmatch(value):
            raise ValueError("a provider name is 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit")
        return value

    @cached_property
    def price_memo(self) -> dict[tuple[str, str], TokenPrice]:
        """Resolved prices by (catalogue, model): a request costs a dictionary hit."""
        return {}

    def chat_price(self, model: str) -> TokenPrice:
        """What a chat call to ``model`` (the upstream name) costs per million tokens."""
        return self._price("chat", model)

    def embedding_price(self, model: str) -> TokenPrice:
        return self._price("embeddings", model)

    def _price(self, catalogue: Literal["chat", "embeddings"], model: str) -> TokenPrice:
        memo = self.price_memo
        found = memo.get((catalogue, model))
        if found is None:
            entry = self.pricing.models.get(model)
            if entry is not None and entry.configured:
                # A field the model's entry leaves unset is the provider-wide one.
                wide = self.pricing
                found = ModelPricing(
                    input_per_mtok=_first(entry.input_per_mtok, wide.input_per_mtok),
                    cached_input_per_mtok=_first(entry.cached_input_per_mtok, wide.cached_input_per_mtok),
                    output_per_mtok=_first(entry.output_per_mtok, wide.output_per_mtok),
                ).token_price()
            elif self.pricing.configured:
                found = self.pricing.token_price()
            else:
                table = default_table()
                listed = table.chat(self.type, model) if catalogue == "chat" else table.embeddings(self.type, model)
                found = listed or FREE
            if len(memo) < 1024:
                memo[(catalogue, model)] = found
        return found

    @model_validator(mode="after")
    def _default_base_url(self) -> ProviderConfig:
        if not self.base_url and self.type != "local":
            self.base_url = (OPENAI_COMPATIBLE_BASE_URLS | NATIVE_BASE_URLS)[self.type].rstrip("/")
        return self

    @model_validator(mode="after")
    def _native_responses_need_openai_wire(self) -> ProviderConfig:
        if self.responses_api == "native" and self.type not in OPENAI_COMPATIBLE_BASE_URLS:
            raise ValueError(
                f"responses_api: native needs an OpenAI-compatible provider type, not '{self.type}' "
                "(that backend is served by translation)"
            )
        return self

    @property
    def openai_compatible(self) -> bool:
        return self.type in OPENAI_COMPATIBLE_BASE_URLS


class RouteTarget(BaseModel):
    provider: str
    model: str | None = Field(default=None, description="upstream model name; the requested name when absent")
    priority: int | None = Field(default=None, description="the provider's priority when absent")
    weight: int | None = Field(default=None, ge=1, description="the provider's weight when absent")


class RouteConfig(BaseModel):
    """An explicit route: a requested model name (or pattern) served by several targets."""

    match: str
    strategy: Strategy | None = None
    targets: list[RouteTarget] = Field(min_length=1)
    kind: Literal["chat", "embedding"] = "chat"


class RetryConfig(BaseModel):
    max_attempts: int = Field(default=3, ge=1, le=10, description="attempts per candidate, the first included")
    backoff_base_ms: float = Field(default=200.0, ge=0)
    backoff_max_ms: float = Field(default=5000.0, ge=0)


class RoutingConfig(BaseModel):
    strategy: Strategy = "priority"
    fallback: bool = Field(default=True, description="try the next candidate when one fails")
    request_timeout_seconds: float | None = Field(default=None, gt=0, description="all attempts of one request")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    latency_alpha: float = Field(default=0.3, gt=0, le=1, description="weight of the newest latency sample")


class HealthConfig(BaseModel):
    failure_threshold: int = Field(default=5, ge=1, description="consecutive failures that open the breaker")
    cooldown_seconds: float = Field(default=30.0, gt=0, description="open time before a trial (half-open)")
    probe_interval_seconds: float = Field(default=15.0, ge=0, description="0 turns the prober off")
    probe_timeout_seconds: float = Field(default=5.0, gt=0)
    sync_interval_seconds: float = Field(default=1.0, gt=0, description="how often the Redis state is re-read")


class CacheConfig(BaseModel):
    enabled: bool = True
    ttl_seconds: int = Field(default=600, ge=1)
    # Requests for these models are cached whatever their temperature (an explicit opt-in).
    always: list[str] = Field(default_factory=list, description="model names or patterns")
    # A hit charges its pool the original usage's tokens (USD 0: nothing went upstream),
    # so a cache never turns a metered pool into a free one; false charges 0.
    charge_hits: bool = True


class PoolConfig(BaseModel):
    name: str
    capacity: int


class Catalogue(BaseModel):
    providers: list[ProviderConfig] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    pools: list[PoolConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_targets(self) -> Catalogue:
        names = [provider.name for provider in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        for route in self.routes:
            for target in route.targets:
                if target.provider not in names:
                    raise ValueError(f"route '{route.match}' names unknown provider '{target.provider}'")
        return self


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


def parse_catalogue(data: bytes, source: str) -> Catalogue:
    """The catalogue in ``data`` (the YAML file's bytes), fully validated, as the router
    would serve it: ``ConfigRefused`` naming the first problems otherwise. The one parser
    of the file, at start and on every reload."""
    try:
        raw = yaml.load(data, Loader=SafeLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigRefused(f"HOOSH_CONFIG {source}: {describe_yaml_error(error)}") from error
    if not isinstance(raw, dict):
        raise ConfigRefused(f"HOOSH_CONFIG {source}: the file is not a mapping (providers:, routes:, pools: ...)")
    try:
        return Catalogue.model_validate(expand_env(raw))
    except ValidationError as error:
        raise ConfigRefused(f"HOOSH_CONFIG {source}: {describe_validation_error(error)}") from error


def read_catalogue(path: Path | None) -> tuple[Catalogue, str | None]:
    """The catalogue at ``path`` and the SHA-256 of the file read (without a file: the
    local model only, and None). ``ConfigRefused`` when it cannot be read or is invalid."""
    if path is None:
        return default_catalogue(), None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigRefused(f"cannot read HOOSH_CONFIG {path}: {error.strerror or error}") from error
    return parse_catalogue(data, str(path)), file_sha256(data)
