"""Wire models of the edge's HTTP API: the OpenAI chat-completions shapes, then hoosh's own.

Request models validate what a client sends, following OpenAI's published OpenAPI spec
(``CreateChatCompletionRequest`` and the message, part and tool schemas it references).
Unknown fields are ignored, as OpenAI-compatible servers do. Response models document
what the edge sends; the hot path builds plain dicts (orjson) and the tests check those
dicts against these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from hoosh_common.model_ids import MAX_MODEL_ID_LENGTH
from hoosh_tenancy import POOL_NAME, valid_model_id
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

INT32_MAX = 2**31 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

MODEL_ID_MESSAGE = (
    "a model id uses only letters, digits and . _ : / @ + - (1-256 characters), "
    "with no empty, '.' or '..' part between slashes"
)


# hoosh_common.model_ids' rule as one regular expression, for the API document (the check
# itself is model_id_problem): slash-separated parts that are neither empty, '.' nor '..'.
_ID_CHAR = r"[A-Za-z0-9._:@+-]"
_ID_SEGMENT = rf"(?:[A-Za-z0-9_:@+-]{_ID_CHAR}*|\.[A-Za-z0-9_:@+-]{_ID_CHAR}*|\.\.{_ID_CHAR}+)"
MODEL_ID_PATTERN = rf"^{_ID_SEGMENT}(?:/{_ID_SEGMENT})*$"


def _model_id(value: str) -> str:
    # Checked before anything else sees the id: it may end up in an upstream URL.
    if not valid_model_id(value):
        raise ValueError(MODEL_ID_MESSAGE)
    return value


MODEL_ID_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_MODEL_ID_LENGTH,
    "pattern": MODEL_ID_PATTERN,
}

# A model id as requests carry it: ``[A-Za-z0-9._:/@+-]{1,256}`` (``provider/model`` included).
ModelId = Annotated[str, AfterValidator(_model_id), WithJsonSchema(MODEL_ID_SCHEMA)]
# A pool name as hoosh_metering accepts it (it appears inside Redis hash tags).
PoolName = Annotated[str, Field(pattern=f"^{POOL_NAME.pattern}$", min_length=1, max_length=64)]


def _json_integer(value: Any) -> Any:
    # JSON has no integer type apart from numbers: 3.0 is an integer (JSON Schema says
    # so too); true and "3" are not.
    if isinstance(value, bool | str):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


# Integer fields of JSON bodies: strict (no booleans or strings) but 3.0 counts as 3. The
# bounds sit inside the type so that the document shows them as minimum / maximum.
JsonInt = BeforeValidator(_json_integer)
PositiveInt32 = Annotated[int, Field(strict=False, ge=1, le=INT32_MAX), JsonInt]
Int64 = Annotated[int, Field(strict=False, ge=INT64_MIN, le=INT64_MAX), JsonInt]
Count64 = Annotated[int, Field(strict=False, ge=0, le=INT64_MAX), JsonInt]
# What the budget stores exactly (Lua numbers are doubles): token amounts of the token routes.
MAX_TOKENS = 2**53 - 1
Tokens = Annotated[int, Field(strict=False, ge=0, le=MAX_TOKENS), JsonInt]
ChoiceCount = Annotated[int, Field(strict=False, ge=1, le=128), JsonInt]


class OpenAIModel(BaseModel):
    """Base of every wire model: unknown fields are ignored, not rejected; values are
    taken as their JSON types say (no "1" for 1, no 1 for true), as documented."""

    model_config = ConfigDict(extra="ignore", strict=True)


def schema_patch(**properties: dict[str, Any]) -> Any:
    """A ``json_schema_extra`` that replaces the named properties' schemas (their title and
    description kept): for rules a validator enforces that pydantic cannot describe."""

    def patch(schema: dict[str, Any]) -> None:
        for name, replacement in properties.items():
            kept = {key: schema["properties"][name][key] for key in ("title", "description")}
            schema["properties"][name] = {**replacement, **{k: v for k, v in kept.items() if v}}

    return patch


def not_null(*names: str) -> Any:
    """A ``json_schema_extra`` dropping ``null`` (and the null default) from optional
    fields that may be left out but never sent as null."""

    def patch(schema: dict[str, Any]) -> None:
        for name in names:
            prop = schema["properties"][name]
            prop.pop("default", None)
            options = [option for option in prop.pop("anyOf", []) if option.get("type") != "null"]
            if len(options) == 1:
                prop.update(options[0])
            elif options:
                prop["anyOf"] = options

    return patch


# --------------------------------------------------------------------------- content parts


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ImageUrl(OpenAIModel):
    url: str = Field(description="A URL of the image or a base64 data URL")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(OpenAIModel):
    data: str = Field(description="Base64 encoded audio")
    format: Literal["wav", "mp3"]


class AudioPart(OpenAIModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class RefusalPart(OpenAIModel):
    type: Literal["refusal"]
    refusal: str


UserContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]
AssistantContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


# --------------------------------------------------------------------------- messages


class FunctionCall(OpenAIModel):
    name: str
    arguments: str = Field(description="JSON text, exactly as the model produced it")


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(OpenAIModel):
    role: Literal["system"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None


class DeveloperMessage(OpenAIModel):
    role: Literal["developer"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None


class UserMessage(OpenAIModel):
    role: Literal["user"]
    content: str | Annotated[list[UserContentPart], Field(min_length=1)]
    name: str | None = None


class AssistantMessage(OpenAIModel):
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
                {"required": ["refusal"], "properties": {"refusal": {"type": "string"}}},
            ]
        }
    )

    role: Literal["assistant"]
    content: str | Annotated[list[AssistantContentPart], Field(min_length=1)] | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls and self.refusal is None:
            # ctx["field"] lets errors.py name the parameter (messages[i].content).
            raise PydanticCustomError(
                "missing",
                "Assistant messages need content unless tool_calls is given",
                {"field": "content"},
            )
        return self


class ToolMessage(OpenAIModel):
    role: Literal["tool"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    tool_call_id: str


ChatMessage = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


# --------------------------------------------------------------------------- tools


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="a-z, A-Z, 0-9, _ and -; at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="JSON Schema of the arguments")
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(OpenAIModel):
    include_usage: bool | None = None
    include_obfuscation: bool | None = Field(default=None, description="Accepted and ignored")


# --------------------------------------------------------------------------- the request


_RESPONSE_FORMAT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {
            "type": "object",
            "required": ["type", "json_schema"],
            "properties": {"type": {"const": "json_schema"}, "json_schema": {"type": "object"}},
        },
        {"type": "null"},
    ]
}


def _chat_schema(schema: dict[str, Any]) -> None:
    """What the validators add to the fields' own schemas: n is 1, response_format's shape,
    stream_options only with stream: true."""
    schema_patch(
        n={"anyOf": [{"type": "integer", "minimum": 1, "maximum": 1}, {"type": "null"}]},
        response_format=_RESPONSE_FORMAT_SCHEMA,
    )(schema)
    schema["anyOf"] = [
        {"not": {"required": ["stream_options"]}},
        {"properties": {"stream_options": {"type": "null"}}},
        {"required": ["stream"], "properties": {"stream": {"const": True}}},
    ]


class ChatCompletionRequest(OpenAIModel):
    """POST /v1/chat/completions. OpenAI's fields first, hoosh's extension (``pool``) last."""

    model_config = ConfigDict(
        json_schema_extra=lambda schema: _chat_schema(schema),
    )

    messages: list[ChatMessage] = Field(min_length=1)
    model: ModelId
    tools: list[Tool] | None = Field(default=None, max_length=128, description="At most 128 (OpenAI's limit)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: PositiveInt32 | None = Field(default=None, description="Deprecated by OpenAI")
    max_completion_tokens: PositiveInt32 | None = Field(
        default=None, description="Wins over max_tokens when both are set"
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    # OpenAI's spec asks for 1-4 items; an empty list is accepted here as "no stop".
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: ChoiceCount | None = Field(default=None, description="Only 1 is supported")
    seed: Int64 | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: dict[str, Any] | None = Field(
        default=None, description="Passed to the backend as JSON: {type: text | json_object | json_schema}"
    )
    pool: PoolName | None = Field(
        default=None,
        description="hoosh extension: the token pool (budget) this request is charged to; "
        "default: the API key's first pool",
    )

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format.type must be 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema" and not isinstance(value.get("json_schema"), dict):
            raise ValueError("response_format.json_schema must be an object when type is 'json_schema'")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "value_error",
                "stream_options is only allowed when stream is true",
                {"field": "stream_options"},
            )
        return self

    @property
    def effective_max_tokens(self) -> int | None:
        """max_completion_tokens when given, else max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Whether a streamed reply ends with a usage chunk."""
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = Field(description="Prompt tokens the provider served from its prompt cache")


class Usage(OpenAIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    cost_usd_micros: int = Field(
        description="hoosh: what the call cost, in integer micro-dollars (the price table's figure; 0 for a "
        "cache hit); the same figure the cost ledger (/v1/costs) adds up"
    )


class ResponseMessage(OpenAIModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(OpenAIModel):
    index: int
    message: ResponseMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = Field(default=None, description="Left out when the backend sets none")


class FunctionCallDelta(OpenAIModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(OpenAIModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(OpenAIModel):
    role: Literal["assistant"] | None = Field(default=None, description="On the first delta only")
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(OpenAIModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"] | None


class ChatCompletionChunk(OpenAIModel):
    """One ``data:`` event of a streamed reply; unset fields are left out."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(
        default=None,
        description="Present only with stream_options.include_usage: null except on the last chunk",
    )


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(OpenAIModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(OpenAIModel):
    """The one error envelope every failure is answered with."""

    error: ErrorDetail


# --------------------------------------------------------------------------- audio transcriptions


class TranscriptionRequest(OpenAIModel):
    """The fields of OpenAI's ``CreateTranscriptionRequest`` hoosh honours (a multipart form;
    the ``file`` part is checked on its own). Others (``stream``, ``include[]``,
    ``chunking_strategy``) are accepted and ignored, as OpenAI does for whisper-1."""

    model_config = ConfigDict(strict=False)  # form fields are text: "0.5" is a temperature

    model: ModelId = Field(description="A speech-to-text model, e.g. whisper-tiny.en")
    language: str | None = Field(default=None, description="ISO-639-1 language of the audio, e.g. en")
    prompt: str | None = Field(default=None, description="Text to guide the style or continue a previous segment")
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    temperature: float = Field(default=0.0, ge=0.0, le=1.0, description="0: the engine raises it when decoding fails")
    timestamp_granularities: list[Literal["word", "segment"]] = Field(
        default_factory=lambda: list[Literal["word", "segment"]](["segment"]),
        description="verbose_json only: word and/or segment timings (form field timestamp_granularities[])",
    )
    # hoosh's extension
    pool: PoolName | None = Field(
        default=None, description="Token pool charged for the audio seconds; default: the API key's first pool"
    )


class TranscriptionUsage(OpenAIModel):
    type: Literal["duration"] = "duration"
    seconds: float = Field(description="Duration of the input audio in seconds")
    cost_usd_micros: int = Field(description="hoosh: what the transcription cost, in integer micro-dollars")


class TranscriptionResponse(OpenAIModel):
    """response_format=json."""

    text: str
    usage: TranscriptionUsage | None = None


class TranscriptionWord(OpenAIModel):
    word: str
    start: float
    end: float


class TranscriptionSegment(OpenAIModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionVerboseResponse(OpenAIModel):
    """response_format=verbose_json."""

    task: Literal["transcribe"] = "transcribe"
    language: str = Field(description="The language's English name, e.g. english")
    duration: float
    text: str
    words: list[TranscriptionWord] | None = Field(default=None, description="Present when word timings were asked for")
    segments: list[TranscriptionSegment] | None = Field(
        default=None, description="Present unless only word timings were asked for"
    )
    usage: TranscriptionUsage | None = None


# --------------------------------------------------------------------------- hoosh's own endpoints


class HealthResponse(OpenAIModel):
    status: Literal["ok"] = Field(description="The edge process answers; it checks no backend")
    service: str = Field(description="Always 'edge'")
    version: str = Field(description="The edge package version")


class ReadinessResponse(OpenAIModel):
    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="ok: every backend serves; degraded: the router serves, budget or audit does not "
        "(answered 200); unavailable: the router does not serve (answered 503)"
    )
    checks: dict[str, str] = Field(
        description="Per backend: SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN or UNREACHABLE"
    )


class PoolInfo(OpenAIModel):
    name: str = Field(description="Pool name")
    capacity: int = Field(description="Tokens the pool holds in all")
    used: int = Field(description="Tokens committed")
    reserved: int = Field(description="Tokens held by open reservations")
    available: int = Field(description="max(0, capacity - used - reserved)")


class TokenCheckRequest(OpenAIModel):
    pool: PoolName = Field(description="Pool name")
    tokens: Tokens = Field(description="Tokens the caller wants to use")


class TokenCheckResponse(OpenAIModel):
    allowed: bool = Field(description="Whether the pool can cover the tokens now")
    available: int = Field(description="Tokens available now: the least along the pool and its ancestors")


class TokenReserveRequest(OpenAIModel):
    pool: PoolName = Field(description="Pool name")
    tokens: Annotated[int, Field(strict=False, ge=1, le=MAX_TOKENS), JsonInt] = Field(
        description="Tokens to reserve (at least 1: a reservation holds something)"
    )


class TokenReserveResponse(OpenAIModel):
    reserved: bool = Field(description="False (still 200) when the pool cannot cover the tokens")
    available: int = Field(description="Tokens available in the pool after the call")
    reservation_id: str | None = Field(description="Id of the reservation (the request id); null when not reserved")


class TokenReportRequest(OpenAIModel):
    # reserved > 0 needs reservation_id (a reservation ends only by its id).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["reservation_id"], "properties": {"reservation_id": {"type": "string"}}},
                {"properties": {"reserved": {"maximum": 0}}},
            ]
        }
    )

    pool: PoolName = Field(description="Pool name")
    reserved: Tokens = Field(
        default=0,
        description="Tokens reserved earlier. Reservations are tracked and leased, so a report that ends one "
        "must name it with `reservation_id`; without it `reserved` must be 0 (untracked usage only).",
    )
    actual: Tokens = Field(description="Tokens actually used")
    reservation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="hoosh extension: the id /v1/tokens/reserve returned; commits that reservation with `actual`, "
        "exactly once",
    )


class TokenReportResponse(OpenAIModel):
    used: int = Field(description="Tokens committed in the pool")
    available: int = Field(description="Tokens available in the pool")


class AuditEntry(OpenAIModel):
    seq: int = Field(description="1-based position in the chain")
    timestamp_ms: int = Field(description="When the entry was appended (Unix ms)")
    event_id: str = Field(description="The request id")
    subject: str = Field(description="NATS subject the event came on")
    stream_seq: int = Field(description="JetStream sequence")
    payload: Any = Field(description="The event, decoded")
    prev_mac: str = Field(description="Hex HMAC of the previous entry")
    mac: str = Field(description="Hex HMAC-SHA256 of this entry")
    signing_key_id: str = Field(description="The id of the HMAC key that signed it")
    segment: str = Field(description="The segment file holding it")


class AuditListResponse(OpenAIModel):
    entries: list[AuditEntry]
    total: int = Field(description="Entries matching the filters in the whole log")
    chain_valid: bool = Field(
        description="The chain verifies, as far as the audit service knows, and so does this page"
    )
    head_seq: int = Field(description="The last entry of the log")
    checkpoint_seq: int = Field(description="The last checkpoint stored outside the log (0: none yet)")
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the page of older entries")
    first_bad_seq: int | None = Field(default=None, description="With verify_error: the first entry that fails")
    verify_error: str | None = Field(default=None, description="Why verification failed; left out when valid")


class CostLine(OpenAIModel):
    day: str | None = Field(default=None, description="UTC day (YYYY-MM-DD), when grouped by day")
    provider: str | None = Field(
        default=None, description="'' for charges no provider answered (expired leases, reports)"
    )
    model: str | None = Field(default=None, description="The upstream model")
    pool: str | None = None
    key_id: str | None = None
    requests: int = Field(description="Charges counted (commits)")
    prompt_tokens: int
    completion_tokens: int
    cost_usd_micros: int = Field(description="Exact, in integer micro-dollars")
    cost_usd: str = Field(description="The same as a decimal string of USD")


class CostsResponse(OpenAIModel):
    object: Literal["list"] = "list"
    start: str
    end: str
    group_by: list[str]
    data: list[CostLine]
    total: CostLine


# --------------------------------------------------------------------------- embeddings


class EmbeddingRequest(OpenAIModel):
    """POST /v1/embeddings (OpenAI's ``CreateEmbeddingRequest``). Text input only: token
    arrays are refused (the providers behind hoosh tokenize differently)."""

    model_config = ConfigDict(
        json_schema_extra=schema_patch(
            input={
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 2048},
                ]
            }
        )
    )

    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)] = Field(
        description="Text to embed, or an array of texts (at most 2048); none may be empty"
    )
    model: ModelId
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: little-endian float32 values, base64-encoded"
    )
    dimensions: PositiveInt32 | None = Field(default=None, description="Output size, if the model can cut")
    user: str | None = None
    pool: PoolName | None = Field(
        default=None,
        description="hoosh extension: the token pool (budget) this request is charged to; "
        "default: the API key's first pool",
    )

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(item, int | list) for item in value):
            raise ValueError("token-array input is not supported; send text")
        return value

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if any(not text for text in ([value] if isinstance(value, str) else value)):
            raise ValueError("input must not contain an empty string")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(OpenAIModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str = Field(description="The vector; a base64 string with encoding_format=base64")
    index: int


class EmbeddingUsage(OpenAIModel):
    prompt_tokens: int
    total_tokens: int
    cost_usd_micros: int = Field(description="hoosh: what the call cost, in integer micro-dollars")


class EmbeddingResponse(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# --------------------------------------------------------------------------- providers and cache


class ProviderHealth(OpenAIModel):
    name: str = Field(description="Provider name in the catalogue")
    type: str = Field(description="Its wire dialect: openai, anthropic, gemini, local, ...")
    base_url: str = Field(description="Where it is called ('' for the local worker)")
    state: Literal["closed", "open", "half_open"] = Field(
        description="Circuit breaker: closed (healthy), open (skipped), half_open (one trial allowed)"
    )
    consecutive_failures: int
    last_error: str | None = Field(description="The latest failure, null when it never failed")
    last_error_at: int | None = Field(description="When it happened (Unix ms)")
    open_until: int | None = Field(description="When an open circuit lets a trial through (Unix ms)")
    latency_ms: float | None = Field(description="Moving average of observed latency, null when not measured")
    rpm_limit: int | None = Field(description="Requests per minute allowed, null when unlimited")
    tpm_limit: int | None = Field(description="Tokens per minute allowed, null when unlimited")


class ProviderHealthList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ProviderHealth]


class CacheStats(OpenAIModel):
    enabled: bool
    hits: int
    misses: int
    stores: int = Field(description="Responses written to the cache")
    entries: int = Field(description="Responses cached now")
    hit_rate: float = Field(description="hits / (hits + misses); 0 before any lookup")
    ttl_seconds: int
