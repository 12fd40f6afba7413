"""The one interface every backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2
from hoosh_common.model_ids import model_id_problem

from ..errors import InvalidRequest

PROBE_TIMEOUT = 10.0  # seconds; the health board bounds a probe more tightly


def checked_model(model: str) -> str:
    """``model`` if it is a safe model id (``hoosh_common.model_ids``, the edge's rule),
    else InvalidRequest. Every backend checks the upstream model of each call before it
    goes into a URL, a body or an RPC: routing checks the *requested* name, but the
    upstream one may come from a route target, and any internal caller can reach the
    router."""
    problem = model_id_problem(model)
    if problem is not None:
        raise InvalidRequest(f"Upstream model id {model[:80]!r} refused: {problem}", param="model")
    return model


@dataclass(slots=True)
class Completion:
    message: chat_pb2.ChatMessage
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    system_fingerprint: str = ""
    cached_tokens: int = 0  # of the prompt tokens, those served from the provider's prompt cache
    # A native Responses API call (``ResponsesBackend.respond``): the provider's response
    # object as it sent it; ``message`` is then empty.
    native: bytes = b""


@dataclass(slots=True)
class StreamPiece:
    """One step of a stream: a content piece, tool-call deltas, hidden reasoning, the
    finish reason, or usage."""

    content: str | None = None
    tool_calls: list[chat_pb2.ToolCallDelta] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0  # with the usage: prompt tokens served from the provider's prompt cache
    # Completion tokens this piece carries, when the backend knows (the local worker sends
    # one message per generated token); None: unknown, bounded by the piece's UTF-8 bytes.
    # What a stream cut before the provider's usage arrived is charged for.
    tokens: int | None = None
    # Completion tokens of hidden reasoning (Anthropic's thinking, Gemini's thought parts,
    # reasoning_content) this piece stands for: never sent to the client, but generated
    # and billed. A bound: the UTF-8 bytes of the reasoning text.
    hidden_tokens: int = 0
    # A native Responses API stream (``ResponsesBackend.respond_stream``): the provider's
    # event (JSON) as it sent it, passed on to the client whatever else the piece says
    # (its text or call deltas only count toward the estimate and the first token).
    native: bytes | None = None


@dataclass(slots=True)
class BackendModel:
    id: str
    owned_by: str
    created: int = 0
    context_length: int = 0


@dataclass(slots=True)
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int | None  # None when the provider does not say
    model: str


@dataclass(slots=True)
class CallParams:
    """What the router decided for this call."""

    upstream_model: str
    max_tokens: int
    request_id: str
    timeout: float


class Backend(Protocol):
    name: str
    # The provider keeps generating, and billing, a stream its client left: such a
    # stream is drained for the provider's usage rather than cut (HTTP providers). The
    # local worker stops when its call is cancelled and bills nothing more (False).
    bills_abandoned_streams: bool

    async def chat(self, request: router_pb2.ChatRequest, params: CallParams) -> Completion: ...

    def stream(self, request: router_pb2.ChatRequest, params: CallParams) -> AsyncIterator[StreamPiece]: ...

    async def list_models(self) -> list[BackendModel]: ...

    def context_length(self, model: str) -> int:
        """The model's context window in tokens, 0 when unknown."""
        ...

    async def count_prompt_tokens(self, request: router_pb2.ChatRequest, upstream_model: str) -> int:
        """An upper bound (or exact count) of the prompt's tokens, for the budget reservation."""
        ...

    async def embed(self, texts: list[str], dimensions: int | None, params: CallParams) -> EmbeddingResult:
        """Embeddings of ``texts``, in order; InvalidRequest when the backend has none."""
        ...

    async def probe(self) -> None:
        """A cheap liveness call for the background prober (which bounds its time); raises RouterError when sick."""
        ...

    async def close(self) -> None: ...


class ResponsesBackend(Protocol):
    """A backend whose provider speaks the Responses API natively (``responses_api:
    native``): the request body is forwarded, the answer comes back as the provider sent
    it, with the usage read from it (input_tokens / output_tokens)."""

    async def respond(self, body: dict[str, Any], params: CallParams) -> Completion: ...

    def respond_stream(self, body: dict[str, Any], params: CallParams) -> AsyncIterator[StreamPiece]: ...


def native_responses(backend: Backend) -> ResponsesBackend | None:
    """``backend`` when its provider is configured to take Responses API calls natively."""
    if getattr(backend, "responses_native", False):
        return cast(ResponsesBackend, backend)
    return None
