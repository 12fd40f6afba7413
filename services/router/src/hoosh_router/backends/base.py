"""The one interface every backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

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
