"""The local-inference worker, over one long-lived gRPC channel.

A blocking call's deadline is the attempt's timeout; a stream's is the provider's
``stream_timeout_seconds`` (the gRPC deadline, which also stops the generation), and
each of its messages must come within ``read_timeout_seconds`` (by default the
attempt's timeout) of the one before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh.router.v1 import router_pb2
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
        self._channel = internal_channel(address)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._context_lengths: dict[str, int] = {}

    async def close(self) -> None:
        await self._channel.close()

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
            raise _map_rpc_error(self.name, error) from error
        return reply.prompt_tokens

    async def probe(self) -> None:
        try:
            await self._stub.ListModels(
                inference_pb2.ListModelsRequest(), timeout=PROBE_TIMEOUT, metadata=request_metadata("")
            )
        except grpc.aio.AioRpcError as error:
            raise _map_rpc_error(self.name, error) from error

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
            raise _map_rpc_error(self.name, error) from error
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
            raise _map_rpc_error(self.name, error) from error
        finally:
            call.cancel()
