"""Wire model of ``POST /v1/responses`` (OpenAI's ``CreateResponse``), as far as hoosh
serves it.

The body's scalar fields are validated here (pydantic, the same rules as chat); the
``input`` items, ``tools``, ``tool_choice`` and ``text.format`` are checked where they are
translated onto a chat request (serving_responses.py), which names the offending
parameter (``input[2].content[0].type``, ``tools[0].type``) in OpenAI's error shape.
Unknown fields are ignored, as for chat.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator

from .protocol import ModelId, OpenAIModel, PoolName, PositiveInt32, schema_patch

RESPONSE_ID_PATTERN = r"^resp_[A-Za-z0-9_-]{1,128}$"
MAX_METADATA_PAIRS = 16


FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"

# What the API document promises for the fields checked by hand (serving_responses.py):
# every body these schemas allow is translated (no 400 for a schema-valid body).
_NULL: dict[str, Any] = {"type": "null"}


def _part(kind: str, **properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", *properties],
        "properties": {"type": {"const": kind}, **properties},
    }


_TEXT = {"type": "string"}
_INPUT_TEXT = _part("input_text", text=_TEXT)
_INPUT_IMAGE = {
    **_part("input_image", image_url={"type": "string", "minLength": 1}),
    "properties": {
        "type": {"const": "input_image"},
        "image_url": {"type": "string", "minLength": 1},
        "detail": {"anyOf": [{"enum": ["auto", "low", "high"]}, _NULL]},
    },
}
_OUTPUT_TEXT = _part("output_text", text=_TEXT)
_REFUSAL = _part("refusal", refusal=_TEXT)


def _message(roles: list[str], parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "type": {"const": "message"},
            "role": {"enum": roles},
            "content": {"anyOf": [_TEXT, {"type": "array", "items": {"anyOf": parts}}]},
        },
    }


INPUT_ITEM_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _message(["user"], [_INPUT_TEXT, _INPUT_IMAGE]),
        _message(["system", "developer"], [_INPUT_TEXT]),
        _message(["assistant"], [_OUTPUT_TEXT, _REFUSAL]),
        _part("function_call", call_id=_TEXT, name=_TEXT, arguments=_TEXT),
        _part(
            "function_call_output",
            call_id=_TEXT,
            output={
                "anyOf": [
                    _TEXT,
                    {"type": "array", "items": {"anyOf": [_INPUT_TEXT, _OUTPUT_TEXT, _part("text", text=_TEXT)]}},
                ]
            },
        ),
    ]
}
_FUNCTION_TOOL: dict[str, Any] = {
    "type": "object",
    "required": ["type", "name"],
    "properties": {
        "type": {"const": "function"},
        "name": {"type": "string", "pattern": FUNCTION_NAME_PATTERN},
        "description": {"anyOf": [_TEXT, _NULL]},
        "parameters": {"anyOf": [{"type": "object"}, _NULL]},
        "strict": {"anyOf": [{"type": "boolean"}, _NULL]},
    },
}
_TEXT_FORMAT: dict[str, Any] = {
    "anyOf": [
        _part("text"),
        _part("json_object"),
        {
            "type": "object",
            "required": ["type", "name", "schema"],
            "properties": {
                "type": {"const": "json_schema"},
                "name": {"type": "string", "pattern": FUNCTION_NAME_PATTERN},
                "schema": {"type": "object"},
                "description": _TEXT,
                "strict": {"anyOf": [{"type": "boolean"}, _NULL]},
            },
        },
        _NULL,
    ]
}
_DOCUMENTED = schema_patch(
    input={
        "anyOf": [_TEXT, {"type": "array", "items": INPUT_ITEM_SCHEMA, "minItems": 1}],
    },
    tools={"anyOf": [{"type": "array", "items": _FUNCTION_TOOL, "maxItems": 128}, _NULL]},
    tool_choice={
        "anyOf": [
            {"enum": ["none", "auto", "required"]},
            {
                "type": "object",
                "required": ["type", "name"],
                "properties": {"type": {"const": "function"}, "name": _TEXT},
            },
            _NULL,
        ]
    },
    text={"anyOf": [{"type": "object", "properties": {"format": _TEXT_FORMAT}}, _NULL]},
    metadata={
        "anyOf": [
            {
                "type": "object",
                "maxProperties": 16,
                "propertyNames": {"maxLength": 64},
                "additionalProperties": {"type": "string", "maxLength": 512},
            },
            _NULL,
        ]
    },
    background={"anyOf": [{"type": "boolean"}, _NULL]},
    # OpenAI's fields this gateway does not serve, documented as what it accepts: absent,
    # null or empty (anything else is a 400 naming the field).
    conversation=_NULL,
    prompt=_NULL,
    include={
        "anyOf": [
            {"type": "array", "items": {"enum": ["reasoning.encrypted_content", "message.input_image.image_url"]}},
            _NULL,
        ]
    },
    reasoning={
        "anyOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "effort": {"anyOf": [{"enum": ["none", "minimal", "low", "medium", "high", "xhigh"]}, _NULL]},
                    "summary": {"anyOf": [{"enum": ["auto", "concise", "detailed"]}, _NULL]},
                    "generate_summary": {"anyOf": [{"enum": ["auto", "concise", "detailed"]}, _NULL]},
                },
            },
            _NULL,
        ]
    },
    service_tier={"anyOf": [{"enum": ["auto", "default"]}, _NULL]},
    top_logprobs={"anyOf": [{"const": 0}, _NULL]},
    truncation={"anyOf": [{"const": "disabled"}, _NULL]},
)


class ResponseCreateRequest(OpenAIModel):
    """POST /v1/responses. OpenAI's fields first, hoosh's extension (``pool``) last."""

    model_config = ConfigDict(json_schema_extra=_DOCUMENTED)

    model: ModelId
    input: str | list[dict[str, Any]] = Field(
        description="Text, or a list of input items: messages (input_text, input_image parts; assistant "
        "messages with output_text parts), function_call and function_call_output items"
    )
    instructions: str | None = Field(
        default=None, description="A system message put first; not carried over by previous_response_id"
    )
    tools: list[dict[str, Any]] | None = Field(
        default=None, max_length=128, description="Function tools only; hosted tool types are refused (400)"
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description='"none", "auto", "required" or {"type": "function", "name": ...}'
    )
    parallel_tool_calls: bool | None = None
    max_output_tokens: PositiveInt32 | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: dict[str, Any] | None = Field(
        default=None, description="{format: {type: text | json_object | json_schema, ...}}"
    )
    metadata: dict[str, str] | None = Field(default=None, description="At most 16 pairs (keys 64, values 512)")
    store: bool | None = Field(default=True, description="Keep the response (and its input items) for later")
    stream: bool | None = False
    previous_response_id: Annotated[str, Field(pattern=RESPONSE_ID_PATTERN)] | None = Field(
        default=None, description="Continue the conversation of a stored response of this key"
    )
    background: bool | None = Field(
        default=None,
        description="Run server-side: answered at once (status queued), then in_progress and completed, "
        "failed or cancelled (POST /v1/responses/{id}/cancel); poll GET /v1/responses/{id}. Needs store; "
        "not with stream",
    )
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = Field(
        default=None, description="Only disabled (a conversation over the context window is a 400)"
    )
    # OpenAI fields this gateway does not serve: accepted when absent or empty, else a 400
    # (serving_responses.check_supported) rather than silently ignored.
    conversation: Any = Field(default=None, description="Not served (400): continue with previous_response_id")
    prompt: Any = Field(default=None, description="Not served (400): stored prompt templates")
    include: list[Any] | None = Field(
        default=None,
        description="reasoning.encrypted_content and message.input_image.image_url (forwarded to providers that "
        "speak the Responses API; translated backends make no reasoning items); any other value is a 400",
    )
    reasoning: dict[str, Any] | None = Field(
        default=None,
        description="{effort, summary}: forwarded to providers that speak the Responses API; backends served "
        "through chat do not reason on request",
    )
    service_tier: str | None = Field(default=None, description="Only auto or default")
    top_logprobs: int | None = Field(default=None, description="Only 0: log probabilities are not served")
    pool: PoolName | None = Field(
        default=None,
        description="hoosh extension: the token pool (budget) this request is charged to; "
        "default: the API key's first pool",
    )

    @field_validator("input")
    @classmethod
    def _input_given(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(value, list) and not value:
            raise ValueError("input must hold at least one item")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return value
