"""Translation between hoosh's chat protos and OpenAI's JSON wire format."""

from __future__ import annotations

from typing import Any

import orjson
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2

_TOOL_CHOICE_MODES = {
    chat_pb2.TOOL_CHOICE_MODE_NONE: "none",
    chat_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    chat_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
}


def _part_to_json(part: chat_pb2.ContentPart) -> dict[str, Any]:
    kind = part.WhichOneof("part")
    if kind == "text":
        return {"type": "text", "text": part.text}
    if kind == "image_url":
        image: dict[str, Any] = {"url": part.image_url.url}
        if part.image_url.detail:
            image["detail"] = part.image_url.detail
        return {"type": "image_url", "image_url": image}
    if kind == "input_audio":
        return {
            "type": "input_audio",
            "input_audio": {"data": part.input_audio.data, "format": part.input_audio.format},
        }
    return {"type": "refusal", "refusal": part.refusal}


def message_to_json(message: chat_pb2.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    which = message.WhichOneof("content")
    if which == "text":
        out["content"] = message.text
    elif which == "parts":
        out["content"] = [_part_to_json(part) for part in message.parts.parts]
    else:
        out["content"] = None
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type or "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def request_to_json(
    request: router_pb2.ChatRequest,
    upstream_model: str,
    max_tokens: int,
    *,
    stream: bool,
    stream_options: bool = True,
) -> dict[str, Any]:
    """The body to POST to {base_url}/chat/completions."""
    body: dict[str, Any] = {
        "model": upstream_model,
        "messages": [message_to_json(message) for message in request.messages],
        "max_tokens": max_tokens,
    }
    sampling = request.sampling
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        if sampling.HasField(name):
            body[name] = getattr(sampling, name)
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if request.tools:
        tools = []
        for tool in request.tools:
            function: dict[str, Any] = {"name": tool.function.name}
            if tool.function.description:
                function["description"] = tool.function.description
            if tool.function.parameters_json:
                function["parameters"] = orjson.loads(tool.function.parameters_json)
            if tool.function.HasField("strict"):
                function["strict"] = tool.function.strict
            tools.append({"type": tool.type or "function", "function": function})
        body["tools"] = tools
    mode = request.tool_choice.mode
    if mode == chat_pb2.TOOL_CHOICE_MODE_FUNCTION:
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.function_name}}
    elif mode in _TOOL_CHOICE_MODES:
        body["tool_choice"] = _TOOL_CHOICE_MODES[mode]
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.user:
        body["user"] = request.user
    if request.response_format_json:
        body["response_format"] = orjson.loads(request.response_format_json)
    if stream:
        body["stream"] = True
        if stream_options:
            body["stream_options"] = {"include_usage": True}
    return body


def message_from_json(data: dict[str, Any]) -> chat_pb2.ChatMessage:
    message = chat_pb2.ChatMessage(role=data.get("role") or "assistant")
    content = data.get("content")
    if isinstance(content, str):
        message.text = content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                message.parts.parts.add(text=str(part.get("text", "")))
    for call in data.get("tool_calls") or []:
        function = call.get("function") or {}
        message.tool_calls.add(
            id=str(call.get("id", "")),
            type=str(call.get("type") or "function"),
            function=chat_pb2.FunctionCall(
                name=str(function.get("name", "")), arguments=str(function.get("arguments") or "")
            ),
        )
    return message


def tool_call_deltas_from_json(items: list[dict[str, Any]]) -> list[chat_pb2.ToolCallDelta]:
    deltas = []
    for item in items:
        function = item.get("function") or {}
        delta = chat_pb2.ToolCallDelta(index=int(item.get("index", 0)))
        if item.get("id"):
            delta.id = str(item["id"])
        if item.get("type"):
            delta.type = str(item["type"])
        if function:
            delta.function.name = str(function.get("name") or "")
            delta.function.arguments = str(function.get("arguments") or "")
        deltas.append(delta)
    return deltas
