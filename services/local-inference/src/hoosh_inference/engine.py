"""The engine interface every local model runner implements, and the plain
request/result types it speaks (no gRPC types: ``server.py`` converts).

An engine serves one model id. ``generate`` and ``stream`` run the same
generation; ``stream`` yields text pieces as they are produced and ends with one
chunk carrying ``finish_reason`` and ``usage``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .errors import ContextLengthExceeded, InvalidRequest, ModelNotFound

EngineName = Literal["llama.cpp", "vllm"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    url: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AudioPart:
    data: str
    format: str


ContentPart = TextPart | ImagePart | AudioPart


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn. ``content`` is None on assistant turns that only carry tool calls."""

    role: str
    content: str | tuple[ContentPart, ...] | None
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str = ""
    parameters_json: str = ""


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """OpenAI sampling parameters; None means the OpenAI default."""

    max_tokens: int | None = None  # None: whatever the context window leaves
    temperature: float | None = None  # None: 1.0; 0: greedy
    top_p: float | None = None  # None: 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Keep generating past the end-of-sequence token (vLLM's ignore_eos):
    # benchmarks use it for fixed output lengths. Not part of the OpenAI API.
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    messages: tuple[Message, ...]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    request_id: str = ""
    tools: tuple[Tool, ...] = ()
    # "none" | "auto" | "required" | the name of a function to force.
    tool_choice: str = "none"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    finish_reason: FinishReason
    usage: Usage
    model: str


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """A piece of text; the last chunk of a stream also has finish_reason and usage."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    engine: EngineName
    context_length: int


class Engine(Protocol):
    """A loaded model behind one interface (llama.cpp on CPU, vLLM on GPU)."""

    name: EngineName

    @property
    def queue_depth(self) -> int:
        """Requests admitted and waiting for the engine (not generating yet)."""
        ...

    @property
    def active_requests(self) -> int:
        """Requests the engine is generating for now."""
        ...

    async def generate(self, request: GenerationRequest) -> Generation:
        """Run the request to completion. Raises an ``InferenceError`` subclass."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        """Yield text pieces as they are produced, then one final chunk with
        finish_reason and usage. Validation errors raise before the first chunk.
        Closing the iterator early (client gone) stops the generation."""
        ...

    async def count_tokens(self, model: str, messages: tuple[Message, ...]) -> int:
        """Prompt tokens these messages take once the chat template is applied."""
        ...

    def models(self) -> list[ModelInfo]:
        """The models this engine serves."""
        ...

    async def close(self) -> None:
        """Stop accepting work and release the model."""
        ...


async def collect(chunks: AsyncGenerator[StreamChunk, None], model: str) -> Generation:
    """Join a stream into one ``Generation`` (engines use it for ``generate``).
    The stream is closed on the way out, so a cancelled caller stops the work."""
    pieces: list[str] = []
    async with aclosing(chunks):
        async for chunk in chunks:
            pieces.append(chunk.text)
            if chunk.finish_reason is not None and chunk.usage is not None:
                return Generation(
                    text="".join(pieces), finish_reason=chunk.finish_reason, usage=chunk.usage, model=model
                )
    raise RuntimeError("engine stream ended without a final chunk")


# ---------------------------------------------------------------------------
# Validation and prompt preparation shared by the engines.


def check_model(requested: str, served: str) -> None:
    """An empty model means the one this engine serves; any other id is unknown."""
    if requested and requested != served:
        raise ModelNotFound(
            f"The model '{requested}' does not exist on this host; it serves '{served}'.", param="model"
        )


def validate_sampling(options: SamplingOptions) -> None:
    """Reject parameters outside the OpenAI ranges before any work is queued."""

    def bad(param: str, rule: str) -> InvalidRequest:
        return InvalidRequest(f"'{param}' must be {rule}.", param=param)

    if options.max_tokens is not None and options.max_tokens < 1:
        raise bad("max_tokens", "at least 1")
    if options.temperature is not None and not (0.0 <= options.temperature <= 2.0):
        raise bad("temperature", "between 0 and 2")
    if options.top_p is not None and not (0.0 < options.top_p <= 1.0):
        raise bad("top_p", "greater than 0 and at most 1")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(options, name)
        if not math.isfinite(value) or not (-2.0 <= value <= 2.0):
            raise bad(name, "between -2 and 2")
    if len(options.stop) > 4:
        raise bad("stop", "at most 4 sequences")
    if any(not s for s in options.stop):
        raise bad("stop", "non-empty strings")


def reject_tools(request: GenerationRequest, model: str) -> None:
    """Local models here have no tool-call parser: refuse rather than silently ignore tools."""
    if request.tools and request.tool_choice != "none":
        raise InvalidRequest(
            f"The model '{model}' does not support tool calling; send tool_choice 'none' or no tools.",
            param="tools",
        )


def message_text(message: Message, model: str) -> str:
    """The text of a turn: text parts joined by newlines (as vLLM does). Images and
    audio are refused because the local models are text-only."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        else:
            kind = "image" if isinstance(part, ImagePart) else "audio"
            raise InvalidRequest(
                f"The model '{model}' accepts text only; {kind} content is not supported.",
                param="messages",
            )
    return "\n".join(texts)


def template_messages(messages: tuple[Message, ...], model: str) -> list[dict[str, Any]]:
    """Messages as the dicts a Hugging Face chat template expects (OpenAI shape)."""
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    out: list[dict[str, Any]] = []
    for message in messages:
        # "developer" is OpenAI's newer name for "system"; model templates only know "system".
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"Unknown message role '{message.role}'.", param="messages")
        entry: dict[str, Any] = {"role": role, "content": message_text(message, model)}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in message.tool_calls
            ]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def resolve_max_tokens(prompt_tokens: int, max_tokens: int | None, context_length: int) -> int:
    """The completion budget, or ContextLengthExceeded worded as vLLM/OpenAI do."""
    if max_tokens is None:
        if prompt_tokens >= context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context_length} tokens. However, your "
                f"messages resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        return context_length - prompt_tokens
    if prompt_tokens + max_tokens > context_length:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="messages",
        )
    return max_tokens


class StopMatcher:
    """Holds back text that could be the start of a stop sequence, so a stop
    string is never streamed, even when it spans several tokens."""

    __slots__ = ("_held", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to emit, whether a stop was hit)."""
        if not self._stops:
            return text, False
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return held[:cut], True
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(held)), keep, -1):
                if held.endswith(stop[:n]):
                    keep = n
                    break
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        """Text still held when generation ends without a stop."""
        held, self._held = self._held, ""
        return held
