"""Prompt-size bound for reservations when the backend cannot count tokens.

BPE tokenizers emit at most one token per UTF-8 byte of text, plus a few
framing tokens per message, so bytes + overhead never undercounts."""

from __future__ import annotations

from hoosh.router.v1 import router_pb2

PER_MESSAGE_OVERHEAD = 8
PER_REQUEST_OVERHEAD = 16
IMAGE_PART_TOKENS = 1536


def prompt_token_bound(request: router_pb2.ChatRequest) -> int:
    total = PER_REQUEST_OVERHEAD
    for message in request.messages:
        total += PER_MESSAGE_OVERHEAD + len(message.name)
        which = message.WhichOneof("content")
        if which == "text":
            total += len(message.text.encode())
        elif which == "parts":
            for part in message.parts.parts:
                kind = part.WhichOneof("part")
                if kind == "text":
                    total += len(part.text.encode())
                elif kind == "refusal":
                    total += len(part.refusal.encode())
                else:
                    total += IMAGE_PART_TOKENS
        for call in message.tool_calls:
            total += PER_MESSAGE_OVERHEAD + len(call.function.name) + len(call.function.arguments.encode())
    for tool in request.tools:
        function = tool.function
        total += PER_MESSAGE_OVERHEAD + len(function.name) + len(function.description.encode())
        total += len(function.parameters_json.encode())
    return total
