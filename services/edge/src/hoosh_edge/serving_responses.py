"""The Responses API, served by translation onto the router's Chat / ChatStream path.

A ``POST /v1/responses`` body becomes a chat request (``instructions`` a system message
first, then the stored conversation of ``previous_response_id``, then the ``input``
items: messages, ``function_call`` items as assistant tool calls, ``function_call_output``
items as tool messages; function tools, ``tool_choice``, ``text.format`` as
``response_format``, ``max_output_tokens`` as ``max_tokens``), validated by the chat
model and sent through :class:`ServingChat`, so every backend, routing, retries,
fallback, limits, cache, budgets, cost, events and audit apply exactly as for chat. The
reply becomes a ``response`` object (output message with ``output_text``,
``function_call`` items, usage as input/output tokens); a stream becomes the semantic
events (``response.created`` ... ``response.completed``) with sequence numbers. With
``store`` (the default) the response, its input items and the conversation so far are
written to Redis (:mod:`responses_store`) before the client hears it is complete.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from hoosh.router.v1 import router_pb2
from hoosh.tenancy.v1 import tenancy_pb2
from pydantic import ValidationError

from .errors import (
    EdgeError,
    InvalidRequestError,
    MappedError,
    NotFoundError,
    ServiceUnavailableError,
    to_api_error,
    validation_error,
)
from .protocol import ChatCompletionRequest
from .protocol_responses import ResponseCreateRequest
from .responses_background import ACTIVE, BackgroundResponses
from .responses_store import ResponsesStore, StoredResponse
from .serving_chat import DisconnectWatch, Receive, RouterStreamCall, ServingChat

log = logging.getLogger(__name__)

# Tool types OpenAI runs on its own side; a gateway in front of other backends cannot.
HOSTED_TOOL_MESSAGE = (
    "Tool type '{kind}' is not supported: this gateway runs only function tools (hosted tools such as "
    "web_search, file_search, computer_use, code_interpreter, image_generation and mcp are OpenAI's own)."
)
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_TOOL_CHOICE_MODES = ("none", "auto", "required")


def _bad(message: str, param: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- request: items


def _text_part(part: dict[str, Any], param: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise _bad(f"Missing required parameter: '{param}.text'.", f"{param}.text", "missing_required_parameter")
    return text


def _message_parts(role: str, content: Any, param: str) -> list[dict[str, Any]]:
    """A message's content as Responses parts: input_text / input_image for the input
    roles, output_text / refusal for the assistant."""
    if isinstance(content, str):
        return [_output_text(content) if role == "assistant" else {"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"Invalid value for '{param}': expected a string or a list of content parts.", param, "invalid_type")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise _bad(f"Invalid value for '{where}': expected an object.", where, "invalid_type")
        part_type = part.get("type")
        if part_type in ("input_text", "output_text", "text"):
            text = _text_part(part, where)
            parts.append(_output_text(text) if role == "assistant" else {"type": "input_text", "text": text})
        elif part_type == "refusal" and role == "assistant":
            refusal = part.get("refusal")
            if not isinstance(refusal, str):
                raise _bad(f"Missing required parameter: '{where}.refusal'.", f"{where}.refusal")
            parts.append({"type": "refusal", "refusal": refusal})
        elif part_type == "input_image" and role != "assistant":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise _bad(
                    f"Invalid value for '{where}.image_url': an image URL or data URL is required "
                    "(file_id images are not supported).",
                    f"{where}.image_url",
                )
            detail = part.get("detail")
            parts.append({"type": "input_image", "image_url": url, "detail": detail if detail else "auto"})
        else:
            raise _bad(
                f"Invalid value for '{where}.type': content part type {part_type!r} is not supported here "
                "(input_text and input_image; output_text and refusal for assistant messages).",
                f"{where}.type",
            )
    return parts


def _output_text_parts(parts: list[Any], param: str) -> str:
    """A function_call_output's list of parts as its text. Only text parts: nothing else
    can be counted against the budget (or sent on), so any other part is a 400."""
    texts: list[str] = []
    for index, part in enumerate(parts):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise _bad(f"Invalid value for '{where}': expected an object.", where, "invalid_type")
        if part.get("type") not in ("input_text", "output_text", "text"):
            raise _bad(
                f"Invalid value for '{where}.type': content part type {part.get('type')!r} is not supported in a "
                "function_call_output (text parts only: input_text).",
                f"{where}.type",
            )
        texts.append(_text_part(part, where))
    return "".join(texts)


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _item_id(item: dict[str, Any], prefix: str) -> str:
    given = item.get("id")
    return given if isinstance(given, str) and given else new_id(prefix)


def _required_string(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise _bad(f"Missing required parameter: '{param}.{name}'.", f"{param}.{name}", "missing_required_parameter")
    return value


def normalize_input(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's ``input`` as stored items (each with an id and status), or a 400
    naming the first bad item. Reasoning items are dropped (no backend can replay them)."""
    if isinstance(value, str):
        return [
            {
                "id": new_id("msg"),
                "type": "message",
                "role": "user",
                "status": "completed",
                "content": [{"type": "input_text", "text": value}],
            }
        ]
    items: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(
                    f"Invalid value for '{param}.role': expected user, assistant, system or developer.",
                    f"{param}.role",
                )
            if "content" not in item:
                raise _bad(
                    f"Missing required parameter: '{param}.content'.", f"{param}.content", "missing_required_parameter"
                )
            items.append(
                {
                    "id": _item_id(item, "msg"),
                    "type": "message",
                    "role": role,
                    "status": "completed",
                    "content": _message_parts(role, item["content"], f"{param}.content"),
                }
            )
        elif kind == "function_call":
            items.append(
                {
                    "id": _item_id(item, "fc"),
                    "type": "function_call",
                    "call_id": _required_string(item, "call_id", param),
                    "name": _required_string(item, "name", param),
                    "arguments": _required_string(item, "arguments", param),
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = _output_text_parts(output, f"{param}.output")
            if not isinstance(output, str):
                raise _bad(
                    f"Missing required parameter: '{param}.output'.", f"{param}.output", "missing_required_parameter"
                )
            items.append(
                {
                    "id": _item_id(item, "fco"),
                    "type": "function_call_output",
                    "call_id": _required_string(item, "call_id", param),
                    "output": output,
                    "status": "completed",
                }
            )
        elif kind == "reasoning":
            continue
        elif kind is None:
            raise _bad(f"Missing required parameter: '{param}.type'.", f"{param}.type", "missing_required_parameter")
        else:
            raise _bad(
                f"Invalid value for '{param}.type': input item type {kind!r} is not supported "
                "(message, function_call and function_call_output are).",
                f"{param}.type",
            )
    return items


def items_to_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Stored items as chat messages: a function_call joins the assistant message before
    it (or opens one), so parallel calls travel as one assistant turn."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = item["role"]
            parts = item["content"]
            if role == "assistant":
                text = "".join(part["text"] for part in parts if part["type"] == "output_text")
                refusals = [part["refusal"] for part in parts if part["type"] == "refusal"]
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if refusals:
                    message["refusal"] = "".join(refusals)
                messages.append(message)
            elif all(part["type"] == "input_text" for part in parts):
                messages.append({"role": role, "content": "".join(part["text"] for part in parts)})
            else:
                messages.append(
                    {
                        "role": role,
                        "content": [
                            {"type": "text", "text": part["text"]}
                            if part["type"] == "input_text"
                            else {
                                "type": "image_url",
                                "image_url": {"url": part["image_url"], "detail": part["detail"]},
                            }
                            for part in parts
                        ],
                    }
                )
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "refusal" not in last:
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


# --------------------------------------------------------------------------- request: tools, format


def normalize_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Function tools as the response echoes them; a hosted tool type is a 400."""
    out: list[dict[str, Any]] = []
    for index, tool in enumerate(tools or ()):
        kind = tool.get("type")
        if kind != "function":
            raise _bad(HOSTED_TOOL_MESSAGE.format(kind=kind), f"tools[{index}].type", "unsupported_tool_type")
        name = tool.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise _bad(
                f"Invalid value for 'tools[{index}].name': a-z, A-Z, 0-9, _ and -, at most 64 characters.",
                f"tools[{index}].name",
            )
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(
                f"Invalid value for 'tools[{index}].parameters': expected an object.", f"tools[{index}].parameters"
            )
        strict = tool.get("strict")
        description = tool.get("description")
        out.append(
            {
                "type": "function",
                "name": name,
                "description": description if isinstance(description, str) else None,
                "parameters": parameters,
                "strict": strict if isinstance(strict, bool) else None,
            }
        )
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICE_MODES:
            raise _bad("Invalid value for 'tool_choice': expected none, auto, required or a function.", "tool_choice")
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad(
        f"Invalid value for 'tool_choice': {choice.get('type')!r} is not supported (none, auto, required or "
        '{"type": "function", "name": ...}).',
        "tool_choice.type",
    )


def text_format(text: dict[str, Any] | None) -> dict[str, Any]:
    """``text.format`` as the response echoes it (default ``{"type": "text"}``)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return {"type": "text"}
    if not isinstance(fmt, dict):
        raise _bad("Invalid value for 'text.format': expected an object.", "text.format", "invalid_type")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        name = fmt.get("name")
        schema = fmt.get("schema")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise _bad("Invalid value for 'text.format.name': a-z, A-Z, 0-9, _ and -, at most 64.", "text.format.name")
        if not isinstance(schema, dict):
            raise _bad(
                "Missing required parameter: 'text.format.schema'.", "text.format.schema", "missing_required_parameter"
            )
        out: dict[str, Any] = {"type": "json_schema", "name": name, "schema": schema}
        if isinstance(fmt.get("description"), str):
            out["description"] = fmt["description"]
        out["strict"] = fmt.get("strict") if isinstance(fmt.get("strict"), bool) else None
        return out
    raise _bad("Invalid value for 'text.format.type': expected text, json_object or json_schema.", "text.format.type")


def chat_response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    json_schema = {key: fmt[key] for key in ("name", "schema", "description", "strict") if fmt.get(key) is not None}
    return {"type": "json_schema", "json_schema": json_schema}


@dataclass(slots=True)
class PreparedResponse:
    """A validated Responses request and the chat request it becomes."""

    body: ResponseCreateRequest
    response_id: str
    created_at: int
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]  # the previous response's conversation (empty without one)
    tools: list[dict[str, Any]]
    text_format: dict[str, Any]
    chat: ChatCompletionRequest


def prepare(body: ResponseCreateRequest, request_id: str, history: list[dict[str, Any]]) -> PreparedResponse:
    """Check and translate a request; ``history`` is what previous_response_id continues."""
    input_items = normalize_input(body.input)
    tools = normalize_tools(body.tools)
    fmt = text_format(body.text)
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": items_to_messages([*history, *input_items], body.instructions),
    }
    if not chat["messages"]:
        raise _bad("Invalid value for 'input': it holds no message to answer.", "input")
    if tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    key: tool[key] for key in ("name", "description", "parameters", "strict") if tool[key] is not None
                },
            }
            for tool in tools
        ]
    choice = chat_tool_choice(body.tool_choice)
    if choice is not None:
        chat["tool_choice"] = choice
    for name, value in (
        ("parallel_tool_calls", body.parallel_tool_calls),
        ("max_tokens", body.max_output_tokens),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
        ("user", body.user),
        ("response_format", chat_response_format(fmt)),
    ):
        if value is not None:
            chat[name] = value
    if body.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    try:
        chat_request = ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:  # what the checks above let through and chat refuses
        raise MappedError(validation_error(exc.errors(include_url=False), chat)) from None
    return PreparedResponse(
        body=body,
        response_id=f"resp_{request_id}",
        created_at=int(time.time()),
        input_items=input_items,
        history=history,
        tools=tools,
        text_format=fmt,
        chat=chat_request,
    )


# --------------------------------------------------------------------------- the response object


def response_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Chat usage as the Responses API's, with hoosh's cost beside it."""
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "cache_write_tokens": 0,
        },
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
        "cost_usd_micros": usage["cost_usd_micros"],
    }


def proto_usage(usage: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "cost_usd_micros": usage.cost_usd_micros,
    }


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_object(
    prepared: PreparedResponse,
    *,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    finish_reason: str = "",
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``response`` object (OpenAI's schema ``Response``), the request's settings echoed."""
    body = prepared.body
    incomplete = _INCOMPLETE.get(finish_reason)
    if status == "completed" and incomplete:
        status = "incomplete"
    response: dict[str, Any] = {
        "id": prepared.response_id,
        "object": "response",
        "created_at": prepared.created_at,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "background": body.background is True,
        "error": error,
        "incomplete_details": {"reason": incomplete} if status == "incomplete" and incomplete else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": body.previous_response_id,
        "reasoning": {
            "effort": (body.reasoning or {}).get("effort"),
            "summary": (body.reasoning or {}).get("summary"),
        },
        "service_tier": "default",
        "store": body.store is not False,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": prepared.text_format},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": prepared.tools,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "truncation": body.truncation or "disabled",
    }
    if usage is not None:  # left out until known (the schema's usage is not nullable)
        response["usage"] = response_usage(usage)
    if body.user is not None:
        response["user"] = body.user
    return response


def message_item(item_id: str, text: str, refusal: str | None, status: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or refusal is None:
        content.append(_output_text(text))
    if refusal is not None:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_of_completion(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """(output items, finish reason) of a ``chat.completion`` body."""
    choice = body["choices"][0]
    message = choice["message"]
    output: list[dict[str, Any]] = []
    calls = message.get("tool_calls") or []
    text = message.get("content") or ""
    refusal = message.get("refusal")
    if text or refusal is not None or not calls:
        output.append(message_item(new_id("msg"), text, refusal, "completed"))
    for call in calls:
        function = call["function"]
        output.append(
            function_call_item(
                new_id("fc"), call["id"] or new_id("call"), function["name"], function["arguments"], "completed"
            )
        )
    return output, choice["finish_reason"]


# --------------------------------------------------------------------------- streaming


def _sse(kind: str, event: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


_ERROR_CODES = {429: "rate_limit_exceeded", 400: "invalid_prompt"}


class _OpenItem:
    """An output item being streamed: a message (text) or a function call."""

    __slots__ = ("arguments", "call_id", "index", "item_id", "kind", "name", "text")

    def __init__(self, kind: str, index: int, item_id: str, call_id: str = "", name: str = "") -> None:
        self.kind = kind
        self.index = index
        self.item_id = item_id
        self.call_id = call_id
        self.name = name
        self.text = ""
        self.arguments = ""

    def item(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            return message_item(self.item_id, self.text, None, status) | (
                {"content": []} if status == "in_progress" else {}
            )
        return function_call_item(self.item_id, self.call_id, self.name, self.arguments, status)


class ResponseStream:
    """A started router stream, rendered as the Responses API's semantic SSE events.

    ``response.created`` and ``response.in_progress`` first; each output item opens with
    ``response.output_item.added`` (a message also with ``content_part.added``), streams
    its ``output_text.delta`` / ``function_call_arguments.delta`` events, and closes with
    the matching ``.done`` events before the next one opens; then the response is stored
    (``store``) and ``response.completed`` (or ``response.incomplete``) ends the stream.
    A failure after the start is an ``error`` event, then ``response.failed``.
    """

    def __init__(
        self,
        prepared: PreparedResponse,
        call: RouterStreamCall,
        first: object,
        watch: DisconnectWatch,
        save: Callable[[dict[str, Any]], Any],
    ) -> None:
        self._prepared = prepared
        self._call = call
        self._first = first
        self._watch = watch
        self._save = save
        self._sequence = 0
        self._items: list[_OpenItem] = []
        self._open: _OpenItem | None = None
        self._by_call_index: dict[int, _OpenItem] = {}
        self._finish = ""
        self._usage: dict[str, Any] | None = None
        first_message = first if isinstance(first, router_pb2.ChatStreamResponse) else None
        self.cache = first_message.cache if first_message is not None else ""
        self._model = (first_message.model if first_message is not None else "") or prepared.body.model

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return _sse(kind, event)

    def _response(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_object(self._prepared, model=self._model, status=status, **extra)

    def _close_open(self) -> list[bytes]:
        item = self._open
        if item is None:
            return []
        self._open = None
        events: list[bytes] = []
        if item.kind == "message":
            part = _output_text(item.text)
            common = {"item_id": item.item_id, "output_index": item.index, "content_index": 0}
            events.append(self._event("response.output_text.done", **common, text=item.text, logprobs=[]))
            events.append(self._event("response.content_part.done", **common, part=part))
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.item_id,
                    output_index=item.index,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        events.append(self._event("response.output_item.done", output_index=item.index, item=item.item("completed")))
        return events

    def _open_item(self, item: _OpenItem) -> list[bytes]:
        events = self._close_open()
        self._items.append(item)
        self._open = item
        events.append(self._event("response.output_item.added", output_index=item.index, item=item.item("in_progress")))
        if item.kind == "message":
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.item_id,
                    output_index=item.index,
                    content_index=0,
                    part=_output_text(""),
                )
            )
        return events

    def _on_message(self, message: router_pb2.ChatStreamResponse) -> list[bytes]:
        events: list[bytes] = []
        for choice in message.choices[:1]:
            delta = choice.delta
            if delta.HasField("content") and delta.content:
                item = self._open
                if item is None or item.kind != "message":
                    item = _OpenItem("message", len(self._items), new_id("msg"))
                    events += self._open_item(item)
                item.text += delta.content
                events.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=item.item_id,
                        output_index=item.index,
                        content_index=0,
                        delta=delta.content,
                        logprobs=[],
                    )
                )
            for call in delta.tool_calls:
                item = self._by_call_index.get(call.index)
                if item is None:
                    item = _OpenItem(
                        "function_call",
                        len(self._items),
                        new_id("fc"),
                        call_id=call.id or new_id("call"),
                        name=call.function.name,
                    )
                    self._by_call_index[call.index] = item
                    events += self._open_item(item)
                elif call.function.name and not item.name:
                    item.name = call.function.name
                arguments = call.function.arguments
                if arguments:
                    item.arguments += arguments
                    if item is self._open:
                        events.append(
                            self._event(
                                "response.function_call_arguments.delta",
                                item_id=item.item_id,
                                output_index=item.index,
                                delta=arguments,
                            )
                        )
            if choice.finish_reason:
                self._finish = choice.finish_reason
        if message.HasField("usage"):
            self._usage = proto_usage(message.usage)
        return events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._event("response.created", response=self._response("in_progress", output=[]))
        yield self._event("response.in_progress", response=self._response("in_progress", output=[]))
        try:
            message = self._first
            while isinstance(message, router_pb2.ChatStreamResponse):
                for event in self._on_message(message):
                    yield event
                message = await self._call.read()
            for event in self._close_open():
                yield event
            if not self._items:  # nothing generated: still one (empty) message
                item = _OpenItem("message", 0, new_id("msg"))
                for event in [*self._open_item(item), *self._close_open()]:
                    yield event
            final = self._response(
                "completed",
                output=[item.item("completed") for item in self._items],
                usage=self._usage,
                finish_reason=self._finish,
            )
            await self._save(final)
        except asyncio.CancelledError:
            if self._watch.fired:
                return  # the client is gone: nobody to tell
            raise
        except Exception as exc:
            output = [item.item("incomplete") for item in self._items]
            async for event in self._failure(exc, output=output, usage=self._usage):
                yield event
            return
        finally:
            self._close()
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield self._event(kind, response=final)

    async def _failure(self, exc: Exception, **output: Any) -> AsyncIterator[bytes]:
        """A failure after the start: logged (a router error as a warning, anything not
        an EdgeError with its traceback), then an ``error`` event and ``response.failed``
        (``output``: the failed response's output and usage), which is kept."""
        error = to_api_error(exc)
        if isinstance(exc, grpc.aio.AioRpcError):
            log.warning(
                "router stream failed after it started",
                extra={"grpc_status": exc.code().name, "detail": exc.details()},
            )
        elif not isinstance(exc, EdgeError):
            log.exception("response stream failed")
        yield self._event("error", code=error.code, message=error.message, param=error.param)
        failed = self._response(
            "failed",
            **output,
            error={"code": _ERROR_CODES.get(error.status, "server_error"), "message": error.message},
        )
        await self._store_failed(failed)
        yield self._event("response.failed", response=failed)

    async def _store_failed(self, failed: dict[str, Any]) -> None:
        """Keep a failed response (the client saw its id in response.created): GET
        answers it with its error, as OpenAI's does. A store failure is only logged."""
        try:
            await self._save(failed)
        except Exception:
            log.warning("could not store a failed response", extra={"response_id": failed.get("id")})

    def _close(self) -> None:
        self._watch.stop()
        self._call.cancel()

    async def aclose(self) -> None:
        self._close()


# --------------------------------------------------------------------------- the service


@dataclass(slots=True)
class ResponseResult:
    """A blocking response: the ``response`` object, the router's cache state, the cost."""

    body: dict[str, Any]
    cache: str = ""
    cost_usd_micros: int = 0


# include values that hold here: a translated backend makes no reasoning items (nothing
# to include) and input images are echoed as sent; both are forwarded to native providers.
SERVED_INCLUDES = frozenset({"reasoning.encrypted_content", "message.input_image.image_url"})
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
REASONING_SUMMARIES = ("auto", "concise", "detailed")


def check_supported(body: ResponseCreateRequest) -> None:
    """400 for an OpenAI field this gateway does not serve, rather than ignoring it (a
    client relying on it would get a different answer than it asked for)."""
    if body.conversation is not None:
        raise _bad(
            "The Conversations API is not served by this gateway; continue a conversation with previous_response_id.",
            "conversation",
            "unsupported_parameter",
        )
    if body.prompt is not None:
        raise _bad(
            "Stored prompt templates are not served by this gateway; send instructions and input instead.",
            "prompt",
            "unsupported_parameter",
        )
    for index, value in enumerate(body.include or ()):
        if not isinstance(value, str) or value not in SERVED_INCLUDES:
            raise _bad(
                f"Invalid value for 'include[{index}]': {value!r} is not served by this gateway "
                f"(served: {', '.join(sorted(SERVED_INCLUDES))}).",
                f"include[{index}]",
                "unsupported_value",
            )
    for name, allowed in (("effort", REASONING_EFFORTS), ("summary", REASONING_SUMMARIES)):
        value = (body.reasoning or {}).get(name)
        if value is not None and (not isinstance(value, str) or value not in allowed):
            raise _bad(
                f"Invalid value for 'reasoning.{name}': {value!r} (expected one of {', '.join(allowed)}).",
                f"reasoning.{name}",
                "invalid_value",
            )
    unknown = set(body.reasoning or ()) - {"effort", "summary", "generate_summary"}
    if unknown:
        raise _bad(
            f"Unknown parameter: 'reasoning.{sorted(unknown)[0]}'.",
            f"reasoning.{sorted(unknown)[0]}",
            "unknown_parameter",
        )
    if body.service_tier not in (None, "auto", "default"):
        raise _bad(
            f"Invalid value for 'service_tier': {body.service_tier!r} is not served by this gateway (auto or default).",
            "service_tier",
            "unsupported_value",
        )
    if body.top_logprobs:
        raise _bad(
            "Log probabilities (top_logprobs) are not served by this gateway.", "top_logprobs", "unsupported_parameter"
        )
    if body.truncation == "auto":
        raise _bad(
            "Invalid value for 'truncation': only 'disabled' is served (a conversation over the model's context "
            "window is refused, not truncated).",
            "truncation",
            "unsupported_value",
        )


def check_background(body: ResponseCreateRequest) -> None:
    """What a background response needs: to be stored (it is read back by GET), and no
    stream (this gateway runs it server-side only; poll GET /v1/responses/{id})."""
    if body.store is False:
        raise _bad("Invalid value for 'background': a background response must be stored (store: true).", "background")
    if body.stream:
        raise _bad(
            "Invalid value for 'background': background responses cannot be streamed by this gateway; "
            "create it without stream and poll GET /v1/responses/{id}.",
            "background",
        )


# What previous_response_id may continue (as OpenAI: a failed or cancelled response
# cannot be); only these keep a copy of the conversation when stored.
CONTINUABLE = ("completed", "incomplete")
DEFAULT_MAX_CONVERSATION_BYTES = 8 * 1024 * 1024


def previous_not_found(response_id: str) -> NotFoundError:
    return NotFoundError(
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


class ServingResponses:
    """POST /v1/responses (and the stored responses) over :class:`ServingChat`."""

    def __init__(
        self,
        chat: ServingChat,
        store: ResponsesStore,
        background_poll_seconds: float = 0.5,
        max_conversation_bytes: int = DEFAULT_MAX_CONVERSATION_BYTES,
        *,
        background_lease_seconds: float = 30.0,
        max_background: int = 256,
        max_background_per_key: int = 16,
    ) -> None:
        self._chat = chat
        self.store = store
        self.background = BackgroundResponses(
            store,
            background_poll_seconds,
            lease_seconds=background_lease_seconds,
            max_running=max_background,
            max_per_owner=max_background_per_key,
        )
        self.max_conversation_bytes = max_conversation_bytes

    def check_conversation_size(self, prepared: PreparedResponse) -> None:
        """400 (context_length_exceeded) when the conversation continued plus this input,
        serialized, exceeds HOOSH_RESPONSES_MAX_CONVERSATION_BYTES: what a stored response
        would hold (and be sent on), refused before anything is stored or sent."""
        history_bytes = len(orjson.dumps(prepared.history)) if prepared.history else 0
        input_bytes = len(orjson.dumps(prepared.input_items))
        limit = self.max_conversation_bytes
        if history_bytes + input_bytes <= limit:
            return
        param = "input" if not prepared.history or input_bytes > limit else "previous_response_id"
        raise InvalidRequestError(
            f"The conversation with this input is {history_bytes + input_bytes} bytes, over this gateway's "
            f"limit of {limit} bytes for a stored conversation; start a new conversation or send less input.",
            param=param,
            code="context_length_exceeded",
        )

    async def create(
        self,
        body: ResponseCreateRequest,
        request_id: str,
        receive: Receive,
        *,
        owner: str,
        pool: str,
        caller: tenancy_pb2.Caller | None = None,
    ) -> ResponseResult | ResponseStream:
        check_supported(body)
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            previous = await self.store.load(body.previous_response_id, owner)
            if previous is None:
                raise previous_not_found(body.previous_response_id)
            previous = await self.background.settle_orphan(previous)
            if previous.status in ACTIVE:
                raise InvalidRequestError(
                    f"Previous response with id '{body.previous_response_id}' is still {previous.status}; "
                    "wait until it is complete.",
                    param="previous_response_id",
                )
            if previous.status not in CONTINUABLE:
                raise InvalidRequestError(
                    f"Previous response with id '{body.previous_response_id}' has status '{previous.status}'; "
                    "only a completed or incomplete response can be continued.",
                    param="previous_response_id",
                    code="invalid_value",
                )
            history = previous.conversation
        if body.background:
            check_background(body)
            # Run on the streaming path: a cancel stops the upstream call mid-answer.
            body = body.model_copy(update={"stream": True})
        prepared = prepare(body, request_id, history)
        self.check_conversation_size(prepared)

        def record(response: dict[str, Any]) -> StoredResponse:
            # Only a response previous_response_id can continue keeps the conversation: a
            # queued, in-progress, failed or cancelled one holds its own input items only
            # (so failures, which cost no tokens, cannot make storage grow turn by turn).
            if response["status"] not in CONTINUABLE:
                return StoredResponse(owner, response, prepared.input_items)
            conversation = [*history, *prepared.input_items, *response["output"]]
            return StoredResponse(owner, response, prepared.input_items, conversation)

        async def save(response: dict[str, Any]) -> None:
            if body.store is False:
                return
            try:
                await self.store.save(record(response))
            except ServiceUnavailableError:
                # The answer is generated and charged: the client gets it; only its stored
                # copy (GET, previous_response_id) is missing.
                log.warning("a response was served but could not be stored", extra={"response_id": response["id"]})

        # The router's Respond / RespondStream: a provider that speaks the Responses API
        # natively answers as itself, any other through chat (responses_native.py, which
        # builds on this module: imported here).
        from .responses_native import respond

        if body.background:

            def failed(error: dict[str, str]) -> dict[str, Any]:
                return response_object(prepared, model=body.model, status="failed", output=[], error=error)

            async def start(background_receive: Receive, background_save: Callable[[dict[str, Any]], Any]) -> Any:
                return await respond(
                    self._chat, prepared, request_id, background_receive, background_save, pool=pool, caller=caller
                )

            queued = record(response_object(prepared, model=body.model, status="queued", output=[]))
            return ResponseResult(await self.background.start(queued, start, record, failed))
        return await respond(self._chat, prepared, request_id, receive, save, pool=pool, caller=caller)

    async def get(self, response_id: str, owner: str) -> StoredResponse:
        stored = await self.store.load(response_id, owner)
        if stored is None:
            raise NotFoundError(
                f"Response with id '{response_id}' not found.", param="response_id", code="response_not_found"
            )
        return await self.background.settle_orphan(stored)
