"""The Responses API passed through to a provider that speaks it natively.

The edge cannot know which backend the router will pick (routing, retries, fallback),
so every ``POST /v1/responses`` goes to the router's Respond / RespondStream: the chat
translation (what plans, reserves and serves every other backend) with the Responses
body beside it (:func:`native_body`). When the router picks a provider configured with
``responses_api: native``, that provider is sent the body and its own response object
(``response_json``) or events (``response_event``) come back; otherwise the reply is a
chat one and serving_responses.py renders it as before.

What the provider is sent: the request's own settings (hoosh's ``pool`` left out), with
``input``, ``tools``, ``tool_choice`` and ``text`` rebuilt from the checked items the chat
translation counted (the budget's reservation is sized from it: nothing the translation
dropped or could not count reaches the provider; reasoning items are dropped on both
paths, non-text parts of a function_call_output refused), and a
``previous_response_id`` resolved by hoosh: the stored conversation (its items without
hoosh's ids) goes first in ``input``, since the provider stores nothing (the router sends
``store: false``, and the budget's grant as ``max_output_tokens``) and never saw hoosh's
ids. What the client gets: the provider's object and events, with hoosh's response id,
the request's ``previous_response_id``, ``store`` and ``max_output_tokens`` echoed, and
hoosh's ``cost_usd_micros`` in the usage; the final event leaves only once the router has
settled the call and the response is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_common.telemetry import request_metadata

from .errors import API_ERROR, EdgeError
from .serving_chat import Receive, ServingChat, completion_to_dict, to_router_request
from .serving_responses import (
    PreparedResponse,
    ResponseResult,
    ResponseStream,
    output_of_completion,
    response_object,
)

log = logging.getLogger(__name__)

# The request's fields hoosh keeps to itself or decides (the router sets the model,
# max_output_tokens, stream and store for each attempt).
_NOT_FORWARDED = {
    "pool",
    "previous_response_id",
    "store",
    "stream",
    "background",
    "model",
    # Refused unless empty (serving_responses.check_supported): nothing to forward.
    "conversation",
    "prompt",
    "service_tier",
    "top_logprobs",
}
# Stored items a provider can be sent back as input (reasoning items cannot be replayed
# with store: false).
_REPLAYABLE = ("message", "function_call", "function_call_output")
# Rebuilt from the checked, counted forms rather than forwarded as the client sent them.
_REBUILT = {"input", "tools", "tool_choice", "text"}
_TERMINAL = ("response.completed", "response.incomplete")
_ERROR_CODES = {429: "rate_limit_exceeded", 400: "invalid_prompt"}


class UpstreamError(EdgeError):
    """A native provider's answer the edge cannot pass on (502)."""

    status_code = 502
    error_type = API_ERROR
    code = "upstream_error"


async def respond(
    chat: ServingChat,
    prepared: PreparedResponse,
    request_id: str,
    receive: Receive,
    save: Callable[[dict[str, Any]], Awaitable[None]],
    *,
    pool: str,
    caller: tenancy_pb2.Caller | None,
) -> ResponseResult | ResponseStream:
    """Run a prepared response through the router's Respond / RespondStream: a native
    provider's answer passed on, any other rendered from chat as before. ``save``
    stores the final response object (when the request asks for it)."""
    router_request = to_router_request(prepared.chat, request_id, pool=pool, caller=caller)
    router_request.responses_body = native_body(prepared)
    metadata = request_metadata(request_id)
    if prepared.body.stream:
        call, first, watch = await chat.open_stream(router_request, metadata, receive, respond=True)
        if isinstance(first, router_pb2.ChatStreamResponse) and first.response_event:
            return NativeResponseStream(prepared, call, first, watch, save)
        return ResponseStream(prepared, call, first, watch, save)
    reply = await chat.respond(router_request, metadata, receive)
    if reply.response_json:
        response = native_response(prepared, reply)
    else:
        completion = completion_to_dict(reply, completion_id=f"chatcmpl-{request_id}", model=prepared.chat.model)
        output, finish = output_of_completion(completion)
        response = response_object(
            prepared,
            model=completion["model"],
            status="completed",
            output=output,
            usage=completion["usage"],
            finish_reason=finish,
        )
    await save(response)
    return ResponseResult(response, reply.cache, reply.usage.cost_usd_micros)


def native_body(prepared: PreparedResponse) -> bytes:
    """The Responses body a native provider is sent (the router completes it): built from
    what the chat translation counted (the reservation is sized from it), never from the
    client's raw items, so nothing reaches the provider uncounted."""
    body = prepared.body
    out: dict[str, Any] = body.model_dump(exclude_unset=True, exclude=_NOT_FORWARDED | _REBUILT)
    if isinstance(body.input, str) and not prepared.history:
        out["input"] = body.input  # one user message: exactly what was counted
    else:
        items = [*prepared.history, *prepared.input_items]
        out["input"] = [_native_item(item) for item in items if item.get("type") in _REPLAYABLE]
    if prepared.tools:
        out["tools"] = [{key: value for key, value in tool.items() if value is not None} for tool in prepared.tools]
    choice = body.tool_choice
    if isinstance(choice, dict):
        out["tool_choice"] = {"type": "function", "name": choice["name"]}
    elif choice is not None:
        out["tool_choice"] = choice
    if body.text is not None:
        fmt = {key: value for key, value in prepared.text_format.items() if value is not None}
        out["text"] = {"format": fmt}
        verbosity = body.text.get("verbosity")
        if verbosity in ("low", "medium", "high"):
            out["text"]["verbosity"] = verbosity
    return orjson.dumps(out)


def _native_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part["type"]
    if kind == "input_text":
        return {"type": "input_text", "text": part["text"]}
    if kind == "input_image":
        return {"type": "input_image", "image_url": part["image_url"], "detail": part["detail"]}
    if kind == "output_text":
        return {"type": "output_text", "text": part["text"], "annotations": [], "logprobs": []}
    return {"type": "refusal", "refusal": part["refusal"]}


def _native_item(item: dict[str, Any]) -> dict[str, Any]:
    """A stored or normalized item as a provider is sent it: the fields the translation
    counted, without hoosh's id (a native provider's own output items replayed keep only
    their text, refusal, call and output). Reasoning items never get here: normalizing
    drops them and the translation skips them in a replay (``_REPLAYABLE``)."""
    kind = item["type"]
    status = item.get("status", "completed")
    if kind == "message":
        role = item["role"]
        counted = ("output_text", "refusal") if role == "assistant" else ("input_text", "input_image")
        parts = [_native_part(part) for part in item["content"] if part.get("type") in counted]
        return {"type": "message", "role": role, "status": status, "content": parts}
    if kind == "function_call":
        return {
            "type": "function_call",
            "call_id": item["call_id"],
            "name": item["name"],
            "arguments": item["arguments"],
            "status": status,
        }
    return {"type": "function_call_output", "call_id": item["call_id"], "output": item["output"], "status": status}


def as_hoosh(prepared: PreparedResponse, response: dict[str, Any], usage: chat_pb2.Usage | None = None) -> None:
    """Make a provider's response object hoosh's (in place): hoosh's id and the
    request's own settings, and what the call cost when known."""
    body = prepared.body
    response["id"] = prepared.response_id
    response["previous_response_id"] = body.previous_response_id
    response["store"] = body.store is not False
    response["max_output_tokens"] = body.max_output_tokens
    response["background"] = body.background is True
    if usage is not None and isinstance(response.get("usage"), dict):
        response["usage"]["cost_usd_micros"] = usage.cost_usd_micros


def native_response(prepared: PreparedResponse, reply: router_pb2.ChatResponse) -> dict[str, Any]:
    """A blocking Respond answered by a native provider, as hoosh's response object."""
    response = orjson.loads(reply.response_json)
    if not isinstance(response, dict):
        raise UpstreamError(f"Provider '{reply.provider}' sent a malformed response")
    as_hoosh(prepared, response, reply.usage)
    return response


def _sse(event: dict[str, Any]) -> bytes:
    kind = str(event.get("type", ""))
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class NativeResponseStream(ResponseStream):
    """A RespondStream a native provider answers: its events passed on as it sent them
    (sequence numbers included), the response objects in them made hoosh's. The terminal
    event (``response.completed`` / ``.incomplete``) waits for the router's usage message
    (the call is settled then; its cost goes into the usage) and for the store. A failure
    after the start is an ``error`` event, then ``response.failed``, numbered on."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        held: dict[str, Any] | None = None
        usage: chat_pb2.Usage | None = None
        try:
            message = self._first
            while isinstance(message, router_pb2.ChatStreamResponse):
                if message.response_event:
                    event = orjson.loads(message.response_event)
                    response = event.get("response")
                    if isinstance(response, dict):
                        as_hoosh(self._prepared, response)
                    sequence = event.get("sequence_number")
                    self._sequence = sequence + 1 if isinstance(sequence, int) else self._sequence + 1
                    if event.get("type") in _TERMINAL:
                        held = event
                    else:
                        yield _sse(event)
                elif message.HasField("usage"):
                    usage = message.usage
                message = await self._call.read()
            if held is None:
                raise UpstreamError("The provider's stream ended before its response was complete")
            final = held["response"]
            as_hoosh(self._prepared, final, usage)
            await self._save(final)
        except asyncio.CancelledError:
            if self._watch.fired:
                return  # the client is gone: nobody to tell
            raise
        except Exception as exc:
            async for event in self._failure(exc, output=[]):
                yield event
            return
        finally:
            self._close()
        yield _sse(held)
