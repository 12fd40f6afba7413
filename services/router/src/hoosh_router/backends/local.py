"""The local-inference worker, over one long-lived gRPC channel.

A blocking call's deadline is the attempt's timeout; a stream's is the provider's
``stream_timeout_seconds`` (the gRPC deadline, which also stops the generation), and
each of its messages must come within ``read_timeout_seconds`` (by default the
attempt's timeout) of the one before.

The worker's own word on its load (GetStatus: overloaded, out of memory) is kept here,
polled by the health board (``poll_status``) and noted at once when a call is refused
with ``queue_full``; each word holds for a while only, so a router that stops hearing
from the worker stops refusing it (reachability is the breaker's business). A refusing
worker's GetStatus carries ``retry-after`` trailing metadata (as an error does): how long
it expects to refuse (the rest of an out-of-memory hold). Its reasons (queue depth, GPU
memory) are for logs and admin views: clients are told only that the local model is
overloaded or unavailable."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import grpc
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh.router.v1 import router_pb2
from hoosh_common.grpc_errors import RETRY_AFTER, metadata_dict
from hoosh_common.grpc_server import internal_channel
from hoosh_common.logs import request_id_var
from hoosh_common.telemetry import request_metadata

from ..config import ProviderConfig
from ..errors import (
    ClientCancelled,
    InvalidRequest,
    ModelNotFound,
    RouterError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .base import PROBE_TIMEOUT, BackendModel, CallParams, Completion, EmbeddingResult, StreamPiece, checked_model

log = logging.getLogger(__name__)

# How long a queue_full refusal keeps the worker skipped when no poll says otherwise.
QUEUE_FULL_HOLD_SECONDS = 1.0

Refusal = Literal["overloaded", "out_of_memory"]


@dataclass(frozen=True, slots=True)
class WorkerWord:
    """The worker's last answer to GetStatus, as this router heard it."""

    status: inference_pb2.GetStatusResponse
    heard_at: float  # time.monotonic()
    holds_until: float  # time.monotonic(): the word lapses then
    retry_after_seconds: float  # what the worker said (its retry-after); 0 when taking work


def _retry_after(trailing: dict[str, str]) -> float:
    try:
        return max(0.0, float(trailing.get(RETRY_AFTER, "0")))
    except ValueError:
        return 0.0


def _map_rpc_error(provider: str, error: grpc.aio.AioRpcError) -> RouterError:
    code = error.code()
    detail = error.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(detail)
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFound(detail, param="model")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return UpstreamUnavailable(f"Local model '{provider}' is overloaded: {detail}", retry_after=1)
    if code == grpc.StatusCode.UNAVAILABLE:
        return UpstreamUnavailable(f"Local inference worker is unavailable: {detail}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return InvalidRequest(f"The local worker does not implement this: {detail}")
    if code == grpc.StatusCode.CANCELLED:
        return ClientCancelled("The request was cancelled")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return UpstreamTimeout("Local inference timed out")
    return UpstreamError(f"Local inference failed: {detail}")


class LocalBackend:
    # Cancelling GenerateStream stops the model: nothing is generated (or billed) after
    # the client leaves, and the tokens it read are the exact count.
    bills_abandoned_streams = False

    def __init__(self, config: ProviderConfig, address: str) -> None:
        self.name = config.name
        self.config = config
        self.address = address
        self._channel = internal_channel(address)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._context_lengths: dict[str, int] = {}
        # The worker's last status while it holds; the last poll (wall clock, ms) and
        # why it failed, if it did (for admin views).
        self._word: WorkerWord | None = None
        self.polled_at_ms = 0
        self.poll_error = ""
        self._refusing = False

    async def close(self) -> None:
        await self._channel.close()

    # -- the worker's load ------------------------------------------------------------

    def _current(self) -> WorkerWord | None:
        word = self._word
        return word if word is not None and time.monotonic() < word.holds_until else None

    def status(self) -> inference_pb2.GetStatusResponse | None:
        """The worker's last status while it holds; None when unknown or stale."""
        word = self._current()
        return word.status if word is not None else None

    def refusing(self) -> Refusal | None:
        """What the worker said keeps it from taking work now; None: it takes work (or said nothing)."""
        status = self.status()
        if status is None:
            return None
        if status.out_of_memory:
            return "out_of_memory"
        return "overloaded" if status.overloaded else None

    def refusal(self) -> str | None:
        """Why the worker takes no work now, in its own words (queue depth, GPU memory: for
        logs and admins, not clients); None: it does."""
        status = self.status()
        if status is None or not (status.overloaded or status.out_of_memory):
            return None
        return status.reason or ("overloaded" if status.overloaded else "out of memory")

    def retry_after(self) -> float | None:
        """Seconds until the refusing worker expects to take work again (what it said, less
        the time since; at least 1 s); None when it is not refusing."""
        word = self._current()
        if word is None or self.refusing() is None:
            return None
        return max(1.0, word.retry_after_seconds - (time.monotonic() - word.heard_at))

    def note_status(
        self, status: inference_pb2.GetStatusResponse, hold_seconds: float, retry_after_seconds: float = 0.0
    ) -> None:
        now = time.monotonic()
        self._word = WorkerWord(status, now, now + hold_seconds, retry_after_seconds)
        refusing = status.overloaded or status.out_of_memory
        if refusing != self._refusing:
            self._refusing = refusing
            if refusing:
                log.warning(
                    "local worker refuses work",
                    extra={"provider": self.name, "address": self.address, "reason": status.reason},
                )
            else:
                log.info("local worker takes work again", extra={"provider": self.name, "address": self.address})

    async def poll_status(self, wait_seconds: float, hold_seconds: float) -> None:
        """Ask the worker whether it takes work. No answer (unreachable, or a worker
        older than GetStatus) leaves no word: the worker is not refused for it."""
        call = self._stub.GetStatus(
            inference_pb2.GetStatusRequest(), timeout=wait_seconds, metadata=request_metadata("")
        )
        try:
            reply = await call
            trailing = metadata_dict(await call.trailing_metadata())
        except grpc.aio.AioRpcError as error:
            self._word = None
            self._refusing = False
            self.polled_at_ms = int(time.time() * 1000)
            self.poll_error = f"{error.code().name}: {error.details() or ''}".rstrip(": ")
            return
        self.polled_at_ms = int(time.time() * 1000)
        self.poll_error = ""
        self.note_status(reply, hold_seconds, _retry_after(trailing))

    async def hardware(self, wait_seconds: float) -> inference_pb2.GetHardwareResponse:
        """The worker's hardware facts (raises grpc.aio.AioRpcError when it does not answer)."""
        return await self._stub.GetHardware(
            inference_pb2.GetHardwareRequest(), timeout=wait_seconds, metadata=request_metadata(request_id_var.get())
        )

    def _failed(self, error: grpc.aio.AioRpcError) -> RouterError:
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # A full queue: send nothing more until the next poll says otherwise.
            note = inference_pb2.GetStatusResponse(overloaded=True, reason=f"overloaded: {error.details() or ''}")
            self.note_status(note, QUEUE_FULL_HOLD_SECONDS, QUEUE_FULL_HOLD_SECONDS)
        return _map_rpc_error(self.name, error)

    def _generate_request(self, request: router_pb2.ChatRequest, params: CallParams) -> inference_pb2.GenerateRequest:
        sampling = chat_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        sampling.max_tokens = params.max_tokens
        return inference_pb2.GenerateRequest(
            request_id=params.request_id,
            model=checked_model(params.upstream_model),
            messages=request.messages,
            sampling=sampling,
            tools=request.tools,
            tool_choice=request.tool_choice,
        )

    def context_length(self, model: str) -> int:
        return self._context_lengths.get(model, 0)

    async def count_prompt_tokens(self, request: router_pb2.ChatRequest, upstream_model: str) -> int:
        try:
            reply = await self._stub.CountTokens(
                inference_pb2.CountTokensRequest(model=checked_model(upstream_model), messages=request.messages),
                timeout=30,
                metadata=request_metadata(request_id_var.get()),
            )
        except grpc.aio.AioRpcError as error:
            raise self._failed(error) from error
        return reply.prompt_tokens

    async def probe(self) -> None:
        try:
            await self._stub.ListModels(
                inference_pb2.ListModelsRequest(), timeout=PROBE_TIMEOUT, metadata=request_metadata("")
            )
        except grpc.aio.AioRpcError as error:
            raise self._failed(error) from error

    async def embed(self, texts: list[str], dimensions: int | None, params: CallParams) -> EmbeddingResult:
        # inference.proto has no embedding RPC (yet): say so as the edge expects.
        raise InvalidRequest(f"The model '{params.upstream_model}' does not support embeddings", param="model")

    async def list_models(self) -> list[BackendModel]:
        try:
            reply = await self._stub.ListModels(
                inference_pb2.ListModelsRequest(), timeout=5, metadata=request_metadata(request_id_var.get())
            )
        except grpc.aio.AioRpcError:
            return []
        for model in reply.models:
            self._context_lengths[model.id] = model.context_length
        return [BackendModel(id=m.id, owned_by="hoosh-local", context_length=m.context_length) for m in reply.models]

    async def chat(self, request: router_pb2.ChatRequest, params: CallParams) -> Completion:
        try:
            reply = await self._stub.Generate(
                self._generate_request(request, params),
                timeout=params.timeout,
                metadata=request_metadata(params.request_id),
            )
        except grpc.aio.AioRpcError as error:
            raise self._failed(error) from error
        return Completion(
            message=chat_pb2.ChatMessage(role="assistant", text=reply.text),
            finish_reason=reply.finish_reason or "stop",
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens,
            model=reply.model or params.upstream_model,
        )

    async def stream(self, request: router_pb2.ChatRequest, params: CallParams) -> AsyncIterator[StreamPiece]:
        total = self.config.stream_timeout_seconds
        read = min(self.config.read_timeout_seconds or params.timeout, params.timeout)
        call = self._stub.GenerateStream(
            self._generate_request(request, params), timeout=total, metadata=request_metadata(params.request_id)
        )
        try:
            while True:
                try:
                    async with asyncio.timeout(read):
                        reply = await call.read()
                except TimeoutError:
                    raise UpstreamTimeout(f"Local model '{self.name}' sent nothing for {read:g}s") from None
                if not isinstance(reply, inference_pb2.GenerateStreamResponse):
                    break  # grpc.aio.EOF: the stream has ended
                if reply.HasField("usage"):
                    # The last message. Its usage goes first, so the exact count is known
                    # even if the client leaves while its text goes out; that text was held
                    # back (a possible stop string, a partial character), not a new token.
                    yield StreamPiece(
                        prompt_tokens=reply.usage.prompt_tokens, completion_tokens=reply.usage.completion_tokens
                    )
                    if reply.finish_reason:
                        yield StreamPiece(finish_reason=reply.finish_reason)
                    if reply.text:
                        yield StreamPiece(content=reply.text, tokens=0)
                    continue
                if reply.text:
                    # llama.cpp sends each generated token's text as a message of its own.
                    yield StreamPiece(content=reply.text, tokens=1)
                if reply.finish_reason:
                    yield StreamPiece(finish_reason=reply.finish_reason)
        except grpc.aio.AioRpcError as error:
            raise self._failed(error) from error
        finally:
            call.cancel()
