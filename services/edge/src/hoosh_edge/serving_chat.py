"""Chat completions: the validated OpenAI request -> router gRPC -> OpenAI JSON or SSE.

The mapping both ways is mechanical (chat.proto mirrors the OpenAI shapes). The router
owns budgets, routing and usage; the edge owns the wire format, and makes sure that a
client that goes away cancels the router call (so its reservation is released).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import orjson
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_common.telemetry import request_metadata

from .errors import ClientClosedRequestError, to_api_error
from .protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ImagePart,
    RefusalPart,
    TextPart,
    ToolMessage,
)
from .tunnel import RouterTunnel, TunnelCall, UnaryCall

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

DONE_EVENT = b"data: [DONE]\n\n"
RouterStreamCall = grpc.aio.UnaryStreamCall[router_pb2.ChatRequest, router_pb2.ChatStreamResponse]
# A blocking router call: a frame on the tunnel, or its own unary call.
RouterCall = TunnelCall | UnaryCall


class Cancellable(Protocol):
    def cancel(self) -> bool: ...


CACHE_HEADER = "X-Hoosh-Cache"
COST_HEADER = "X-Hoosh-Cost-Usd-Micros"


def cache_headers(state: str, cost_usd_micros: int | None = None) -> dict[str, str] | None:
    """``X-Hoosh-Cache: hit|miss`` when the router consulted its response cache, and
    ``X-Hoosh-Cost-Usd-Micros`` with what a blocking call cost (a stream's cost is in
    its usage chunk: its headers leave before the cost is known)."""
    headers = {CACHE_HEADER: state} if state else {}
    if cost_usd_micros is not None:
        headers[COST_HEADER] = str(cost_usd_micros)
    return headers or None


_TOOL_CHOICE_MODES = {
    "none": chat_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": chat_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": chat_pb2.TOOL_CHOICE_MODE_REQUIRED,
}


# --------------------------------------------------------------------------- request mapping


def _content_part(part: Any) -> chat_pb2.ContentPart:
    if isinstance(part, TextPart):
        return chat_pb2.ContentPart(text=part.text)
    if isinstance(part, ImagePart):
        return chat_pb2.ContentPart(
            image_url=chat_pb2.ImageUrl(url=part.image_url.url, detail=part.image_url.detail or "")
        )
    if isinstance(part, RefusalPart):
        return chat_pb2.ContentPart(refusal=part.refusal)
    # AudioPart: the only remaining member of the validated unions.
    return chat_pb2.ContentPart(
        input_audio=chat_pb2.InputAudio(data=part.input_audio.data, format=part.input_audio.format)
    )


def _fill_message(target: chat_pb2.ChatMessage, message: Any) -> None:
    target.role = message.role
    content = message.content
    refusal = message.refusal if isinstance(message, AssistantMessage) else None
    if refusal is not None:
        # No refusal field on ChatMessage: an assistant refusal travels as a refusal part.
        parts = [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
        content = [*parts, RefusalPart(type="refusal", refusal=refusal)]
    if isinstance(content, str):
        target.text = content
    elif content is not None:
        target.parts.parts.extend(_content_part(part) for part in content)
    name = getattr(message, "name", None)
    if name is not None:
        target.name = name
    if isinstance(message, AssistantMessage) and message.tool_calls:
        for call in message.tool_calls:
            target.tool_calls.add(
                id=call.id,
                type=call.type,
                function=chat_pb2.FunctionCall(name=call.function.name, arguments=call.function.arguments),
            )
    if isinstance(message, ToolMessage):
        target.tool_call_id = message.tool_call_id


def to_router_request(
    request: ChatCompletionRequest,
    request_id: str,
    *,
    pool: str | None = None,
    caller: tenancy_pb2.Caller | None = None,
) -> router_pb2.ChatRequest:
    """Map a validated OpenAI request onto the router's ChatRequest.

    ``pool`` is the pool the edge authorized (default: the request's, else ``default``);
    ``caller`` the authenticated principal. Optional sampling fields are set only when
    the client gave them, so the router can tell "absent" from zero;
    ``max_completion_tokens`` wins over ``max_tokens``.
    """
    out = router_pb2.ChatRequest(
        request_id=request_id, model=request.model, pool=pool or request.pool or "default", caller=caller
    )
    for message in request.messages:
        _fill_message(out.messages.add(), message)

    sampling = out.sampling
    max_tokens = request.effective_max_tokens
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if request.temperature is not None:
        sampling.temperature = request.temperature
    if request.top_p is not None:
        sampling.top_p = request.top_p
    if isinstance(request.stop, str):
        sampling.stop.append(request.stop)
    elif request.stop:
        sampling.stop.extend(request.stop)
    if request.seed is not None:
        sampling.seed = request.seed
    if request.presence_penalty is not None:
        sampling.presence_penalty = request.presence_penalty
    if request.frequency_penalty is not None:
        sampling.frequency_penalty = request.frequency_penalty

    for tool in request.tools or ():
        function = chat_pb2.FunctionDefinition(
            name=tool.function.name,
            description=tool.function.description or "",
            parameters_json=orjson.dumps(tool.function.parameters).decode()
            if tool.function.parameters is not None
            else "",
        )
        if tool.function.strict is not None:
            function.strict = tool.function.strict
        out.tools.add(type=tool.type, function=function)

    choice = request.tool_choice
    if isinstance(choice, str):
        out.tool_choice.mode = _TOOL_CHOICE_MODES[choice]
    elif choice is not None:
        out.tool_choice.mode = chat_pb2.TOOL_CHOICE_MODE_FUNCTION
        out.tool_choice.function_name = choice.function.name

    if request.parallel_tool_calls is not None:
        out.parallel_tool_calls = request.parallel_tool_calls
    if request.user is not None:
        out.user = request.user
    out.include_usage = request.include_usage
    if request.response_format is not None:
        out.response_format_json = orjson.dumps(request.response_format).decode()
    return out


# --------------------------------------------------------------------------- reply mapping


def _usage(usage: chat_pb2.Usage) -> dict[str, Any]:
    """OpenAI's usage object, plus what the call cost in integer micro-dollars (hoosh's
    extension: exact, so a client can add its costs up to the ledger's figure)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "cost_usd_micros": usage.cost_usd_micros,
    }


def _message_content(message: chat_pb2.ChatMessage) -> tuple[str | None, str | None]:
    """(content, refusal) of a reply message: text parts joined, refusal parts apart."""
    which = message.WhichOneof("content")
    if which == "text":
        return message.text, None
    if which != "parts":
        return None, None
    texts = [part.text for part in message.parts.parts if part.WhichOneof("part") == "text"]
    refusals = [part.refusal for part in message.parts.parts if part.WhichOneof("part") == "refusal"]
    return ("".join(texts) if texts else None), ("".join(refusals) if refusals else None)


def completion_to_dict(reply: router_pb2.ChatResponse, *, completion_id: str, model: str) -> dict[str, Any]:
    """The ``chat.completion`` object for a router reply."""
    choices = []
    for choice in reply.choices:
        content, refusal = _message_content(choice.message)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
        if choice.message.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type or "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in choice.message.tool_calls
            ]
        finish = choice.finish_reason or ("tool_calls" if choice.message.tool_calls else "stop")
        choices.append({"index": choice.index, "message": message, "logprobs": None, "finish_reason": finish})
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": reply.created or int(time.time()),
        "model": reply.model or model,
        "choices": choices,
        "usage": _usage(reply.usage),
    }
    if reply.system_fingerprint:
        body["system_fingerprint"] = reply.system_fingerprint
    return body


def _tool_call_delta(call: chat_pb2.ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": call.index}
    if call.id:
        out["id"] = call.id
    if call.type:
        out["type"] = call.type
    if call.HasField("function"):
        function: dict[str, str] = {}
        if call.function.name:
            function["name"] = call.function.name
        # OpenAI sends arguments (possibly "") on every tool-call delta that has a function.
        function["arguments"] = call.function.arguments
        out["function"] = function
    return out


def chunk_to_dict(
    message: router_pb2.ChatStreamResponse,
    *,
    chunk_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> dict[str, Any] | None:
    """The ``chat.completion.chunk`` for one router message; None when it has nothing to send.

    Unset delta fields are left out. With ``include_usage`` every chunk carries
    ``"usage": null`` except the usage chunk (empty choices); without it a usage-only
    message is dropped.
    """
    is_usage_chunk = message.HasField("usage") and not message.choices
    if is_usage_chunk and not include_usage:
        return None
    choices = []
    for choice in message.choices:
        delta: dict[str, Any] = {}
        if choice.delta.role:
            delta["role"] = choice.delta.role
        if choice.delta.HasField("content"):
            delta["content"] = choice.delta.content
        if choice.delta.tool_calls:
            delta["tool_calls"] = [_tool_call_delta(call) for call in choice.delta.tool_calls]
        choices.append(
            {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": choice.finish_reason or None}
        )
    chunk: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = _usage(message.usage) if message.HasField("usage") else None
    return chunk


# --------------------------------------------------------------------------- calls


class DisconnectWatch:
    """Cancels a gRPC call when the client's connection closes.

    Reads the ASGI ``receive`` channel after the body was consumed: the next message is
    ``http.disconnect``, sent when the client goes away (or once the reply is complete,
    by which time the watch is stopped).
    """

    __slots__ = ("_task", "fired")

    def __init__(self, receive: Receive, call: Cancellable) -> None:
        self.fired = False
        self._task = asyncio.create_task(self._watch(receive, call))

    async def _watch(self, receive: Receive, call: Cancellable) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the server broke the channel: treat it as a disconnect
            log.debug("receive failed while watching for a disconnect", exc_info=True)
        self.fired = True
        call.cancel()

    def stop(self) -> None:
        self._task.cancel()


class ChatStream:
    """A started router stream, rendered as SSE bytes.

    Iterating yields one ``data:`` event per chunk and always ends with ``data: [DONE]``
    (unless the client is gone). A gRPC error after the first chunk becomes one error
    event. :meth:`aclose` cancels the router call; call it whatever happens.
    """

    def __init__(
        self,
        call: RouterStreamCall,
        first: object,  # the call's first read(): a message, or grpc.aio.EOF
        watch: DisconnectWatch,
        *,
        chunk_id: str,
        model: str,
        include_usage: bool,
    ) -> None:
        self._call = call
        self._first = first
        self._watch = watch
        self._chunk_id = chunk_id
        self._include_usage = include_usage
        first_created = first.created if isinstance(first, router_pb2.ChatStreamResponse) else 0
        first_model = first.model if isinstance(first, router_pb2.ChatStreamResponse) else ""
        # "hit" | "miss" when the router looked in its response cache (first message only).
        self.cache = first.cache if isinstance(first, router_pb2.ChatStreamResponse) else ""
        # OpenAI: every chunk of one completion has the same timestamp and model.
        self._created = first_created or int(time.time())
        self._model = first_model or model

    def _encode(self, message: router_pb2.ChatStreamResponse) -> bytes | None:
        chunk = chunk_to_dict(
            message,
            chunk_id=self._chunk_id,
            created=self._created,
            model=self._model,
            include_usage=self._include_usage,
        )
        return None if chunk is None else b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            message = self._first
            # read() gives the stream's messages, then grpc.aio.EOF.
            while isinstance(message, router_pb2.ChatStreamResponse):
                data = self._encode(message)
                if data is not None:
                    yield data
                message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            error = to_api_error(exc)
            log.warning(
                "router stream failed after it started",
                extra={"grpc_status": exc.code().name, "detail": exc.details()},
            )
            yield error.sse_event()
        except asyncio.CancelledError:
            if self._watch.fired:
                return  # the client is gone: nobody to tell
            raise
        except Exception as exc:
            log.exception("chat stream failed")
            yield to_api_error(exc).sse_event()
        finally:
            self._close()
        yield DONE_EVENT

    def _close(self) -> None:
        self._watch.stop()
        self._call.cancel()  # no-op when the call already ended

    async def aclose(self) -> None:
        """Stop watching and cancel the router call (releases its reservation)."""
        self._close()


@dataclass(slots=True)
class ChatCompletion:
    """A blocking completion: the ``chat.completion`` body, the router's cache state and
    the call's cost in micro-dollars."""

    body: dict[str, Any]
    cache: str = ""
    cost_usd_micros: int = 0


class ServingChat:
    """POST /v1/chat/completions against the router."""

    def __init__(
        self, router: router_pb2_grpc.RouterServiceAsyncStub, *, timeout: float, tunnel: RouterTunnel | None = None
    ) -> None:
        self._router = router
        self._timeout = timeout
        self._tunnel = tunnel

    async def create(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        receive: Receive,
        *,
        pool: str | None = None,
        caller: tenancy_pb2.Caller | None = None,
    ) -> ChatCompletion | ChatStream:
        """Run one completion: a :class:`ChatCompletion`, or a started :class:`ChatStream`.

        gRPC errors raised here (for a stream: before its first message) propagate, so
        the client gets a plain HTTP error status. A client disconnect cancels the call.
        """
        router_request = to_router_request(request, request_id, pool=pool, caller=caller)
        metadata = request_metadata(request_id)
        completion_id = f"chatcmpl-{request_id}"
        if request.stream:
            return await self._start_stream(router_request, metadata, receive, completion_id, request)
        reply = await self._blocking(router_request, metadata, receive, respond=False)
        return ChatCompletion(
            completion_to_dict(reply, completion_id=completion_id, model=request.model),
            reply.cache,
            reply.usage.cost_usd_micros,
        )

    async def _start_stream(
        self,
        router_request: router_pb2.ChatRequest,
        metadata: tuple[tuple[str, str], ...],
        receive: Receive,
        completion_id: str,
        request: ChatCompletionRequest,
    ) -> ChatStream:
        call, first, watch = await self.open_stream(router_request, metadata, receive)
        return ChatStream(
            call,
            first,
            watch,
            chunk_id=completion_id,
            model=request.model,
            include_usage=request.include_usage,
        )

    async def respond(
        self, router_request: router_pb2.ChatRequest, metadata: tuple[tuple[str, str], ...], receive: Receive
    ) -> router_pb2.ChatResponse:
        """A blocking router Respond (the Responses API: ``responses_body`` set): the
        reply carries a native provider's ``response_json``, or a chat answer. A client
        disconnect cancels the call."""
        return await self._blocking(router_request, metadata, receive, respond=True)

    async def _blocking(
        self,
        router_request: router_pb2.ChatRequest,
        metadata: tuple[tuple[str, str], ...],
        receive: Receive,
        *,
        respond: bool,
    ) -> router_pb2.ChatResponse:
        """One blocking Chat (``respond``: Respond) call: a frame on the tunnel when there
        is one and it takes the call, else a unary call. A client disconnect cancels it."""
        method = self._router.Respond if respond else self._router.Chat

        def unary() -> UnaryCall:
            return method(router_request, metadata=metadata, timeout=self._timeout)

        call: RouterCall | None = None
        if self._tunnel is not None:
            call = self._tunnel.call(router_request, metadata, self._timeout, respond=respond, fallback=unary)
        if call is None:
            call = unary()
        watch = DisconnectWatch(receive, call)
        try:
            return await call
        except asyncio.CancelledError:
            if watch.fired:
                raise ClientClosedRequestError("The client closed the connection.") from None
            raise
        finally:
            watch.stop()

    async def open_stream(
        self,
        router_request: router_pb2.ChatRequest,
        metadata: tuple[tuple[str, str], ...],
        receive: Receive,
        *,
        respond: bool = False,
    ) -> tuple[RouterStreamCall, object, DisconnectWatch]:
        """Start a router ChatStream (``respond``: a RespondStream) and wait for its first
        message (a message, or ``grpc.aio.EOF``): an error before it propagates (an
        ordinary HTTP error). The caller owns the call and the watch from here (stop the
        watch, cancel the call)."""
        method = self._router.RespondStream if respond else self._router.ChatStream
        call = method(router_request, metadata=metadata, timeout=self._timeout)
        watch = DisconnectWatch(receive, call)
        try:
            first = await call.read()
        except asyncio.CancelledError:
            watch.stop()
            call.cancel()
            if watch.fired:
                raise ClientClosedRequestError("The client closed the connection.") from None
            raise
        except BaseException:
            watch.stop()
            call.cancel()
            raise
        return call, first, watch
