"""A stand-in for Anthropic's Messages API (``POST /v1/messages``, ``GET /v1/models``),
as its public API reference documents it: ``x-api-key`` and ``anthropic-version``
headers, a top-level ``system``, ``max_tokens`` required, content blocks (``text``,
``image``, ``tool_use``, ``tool_result``), stop reasons, usage, and the SSE event
stream (``message_start``, ``content_block_start``, ``ping``,
``content_block_delta`` with ``text_delta``/``input_json_delta``,
``content_block_stop``, ``message_delta``, ``message_stop``).

It rejects with a 400 what the real API rejects (a ``system`` role inside
``messages``, a missing ``max_tokens``, an empty text block, a ``tool_result``
that answers no ``tool_use`` of the turn before) and, stricter than today's API,
consecutive turns of one role (hoosh merges them), so translation bugs surface.
Behaviour switches by model name: see ``bench.upstream``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from bench.upstream import REPLY_WORDS, THOUGHT_WORDS, ChunkedWriter, StandIn, count_words, response_bytes

# What the real API sends after a thinking block's text: its (opaque) signature.
_SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def _validate(request: dict[str, Any]) -> str | None:
    """What the real API would reject, or None."""
    if not isinstance(request.get("max_tokens"), int) or request["max_tokens"] < 1:
        return "max_tokens: Field required"
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    previous_role = None
    previous_tool_ids: set[str] = set()
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            return f"messages.{index}.role: Input should be 'user' or 'assistant'"
        if role == previous_role:
            return f"messages.{index}: roles must alternate between 'user' and 'assistant'"
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not blocks:
            return f"messages.{index}.content: must not be empty"
        tool_ids: set[str] = set()
        for block in blocks:
            kind = block.get("type")
            if kind == "text" and not block.get("text"):
                return f"messages.{index}: text content blocks must be non-empty"
            if kind == "tool_use":
                if role != "assistant" or not isinstance(block.get("input"), dict):
                    return f"messages.{index}: tool_use blocks belong to assistant turns and need an input object"
                tool_ids.add(str(block.get("id")))
            if kind == "tool_result" and (role != "user" or block.get("tool_use_id") not in previous_tool_ids):
                return f"messages.{index}: tool_result block(s) must answer a tool_use of the previous turn"
            if kind not in ("text", "image", "tool_use", "tool_result", "document"):
                return f"messages.{index}: unknown content block type {kind!r}"
        previous_role, previous_tool_ids = role, tool_ids
    for tool in request.get("tools") or []:
        if not tool.get("name") or not isinstance(tool.get("input_schema"), dict):
            return "tools: each tool needs a name and an input_schema"
    return None


class AnthropicUpstream(StandIn):
    @property
    def base_url(self) -> str:
        return self.root_url

    def error(self, status: int, message: str, extra: str = "") -> bytes:
        body = {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}
        return response_bytes(status, orjson.dumps(body), extra=extra)

    async def route(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if not headers.get("x-api-key"):
            writer.write(self.error(401, "x-api-key header is required"))
            return True
        if not headers.get("anthropic-version"):
            writer.write(self.error(400, "anthropic-version header is required"))
            return True
        if method == "GET" and path == "/v1/models":
            models = [
                {
                    "type": "model",
                    "id": "claude-3-5-haiku-20241022",
                    "display_name": "Claude Haiku 3.5",
                    "created_at": "2024-10-22T00:00:00Z",
                }
            ]
            page = {"data": models, "has_more": False, "first_id": models[0]["id"], "last_id": models[0]["id"]}
            writer.write(response_bytes(200, orjson.dumps(page)))
            return True
        if method != "POST" or path != "/v1/messages":
            writer.write(self.error(404, f"no route {method} {path}"))
            return True
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            writer.write(self.error(400, "body is not JSON"))
            return True
        model = str(request.get("model", ""))
        seen = self.count(model, request)
        if await self.common_failure(model, seen, writer):
            return True
        problem = _validate(request)
        if problem:
            writer.write(self.error(400, problem))
            return True
        input_tokens = count_words(request.get("messages")) + count_words(request.get("system")) + 3
        words = REPLY_WORDS[: max(1, min(len(REPLY_WORDS), int(request["max_tokens"])))]
        stop_reason = "end_turn" if len(words) == len(REPLY_WORDS) else "max_tokens"
        tool = None
        if "tool" in model and request.get("tools"):
            tool = {"id": "toolu_01StandIn", "name": request["tools"][0]["name"], "input": {"city": "Paris"}}
            words, stop_reason = ["Let me check."], "tool_use"
        if "odd-finish" in model:
            stop_reason = "banana"
        thoughts = THOUGHT_WORDS if "think" in model else []
        output_tokens = len(thoughts) + len(words) + (3 if tool else 0)
        if request.get("stream"):
            await self._stream(writer, model, words, tool, stop_reason, input_tokens, output_tokens, thoughts)
            return "cut-stream" not in model and "stall" not in model
        content: list[dict[str, Any]] = []
        if thoughts:
            content.append({"type": "thinking", "thinking": "".join(thoughts), "signature": _SIGNATURE})
        content.append({"type": "text", "text": "".join(words)})
        if tool:
            content.append({"type": "tool_use", **tool})
        reply = {
            "id": "msg_01StandIn",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": output_tokens,
            },
        }
        writer.write(response_bytes(200, orjson.dumps(reply)))
        return True

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        model: str,
        words: list[str],
        tool: dict[str, Any] | None,
        stop_reason: str,
        input_tokens: int,
        output_tokens: int,
        thoughts: list[str],
    ) -> None:
        out = ChunkedWriter(writer)

        def send(name: str, payload: dict[str, Any]) -> None:
            out.event(orjson.dumps({"type": name, **payload}), name)

        message = {
            "id": "msg_01StandIn",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        send("message_start", {"message": message})
        index = 0
        if thoughts:
            send("content_block_start", {"index": index, "content_block": {"type": "thinking", "thinking": ""}})
            for thought in thoughts:
                send("content_block_delta", {"index": index, "delta": {"type": "thinking_delta", "thinking": thought}})
                await out.pace(model)
            send("content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": _SIGNATURE}})
            send("content_block_stop", {"index": index})
            index += 1
        send("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
        send("ping", {})
        for position, word in enumerate(words):
            send("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": word}})
            await out.pace(model)
            if "cut-stream" in model and position == 1:
                await out.cut()
                return
        if "stall" in model:
            await out.stall(b"event: ping\ndata: " + orjson.dumps({"type": "ping"}) + b"\n\n")
            return
        send("content_block_stop", {"index": index})
        if tool:
            index += 1
            block = {"type": "tool_use", "id": tool["id"], "name": tool["name"], "input": {}}
            send("content_block_start", {"index": index, "content_block": block})
            arguments = orjson.dumps(tool["input"]).decode()
            for piece in (arguments[:5], arguments[5:]):
                delta = {"type": "input_json_delta", "partial_json": piece}
                send("content_block_delta", {"index": index, "delta": delta})
            send("content_block_stop", {"index": index})
        send(
            "message_delta",
            {"delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": {"output_tokens": output_tokens}},
        )
        send("message_stop", {})
        await out.end()
