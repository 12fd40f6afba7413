"""Prompt-size bound for reservations when the backend cannot count tokens.

BPE tokenizers emit at most one token per UTF-8 byte of text, plus a few framing tokens
per message, so bytes + overhead never undercounts. Every text the request sends
upstream counts, in every dialect: message roles, texts, names and refusals; tool calls
(ids, types, names, arguments) and tool call ids; tool definitions (types, names,
descriptions, JSON schemas: the providers put them into the prompt); the forced tool's
name; the response format with its JSON schema (OpenAI and Gemini constrain decoding
with it, and bill it as prompt); stop sequences and the user label. Images and audio
count at what providers bill them, not at their base64 bytes.
"""

from __future__ import annotations

import math

from hoosh.router.v1 import router_pb2

PER_MESSAGE_OVERHEAD = 8
PER_REQUEST_OVERHEAD = 16
IMAGE_PART_TOKENS = 1536
# With tools, providers add a tool-use system prompt of their own, billed as prompt
# (Anthropic documents about 350 tokens).
TOOLS_OVERHEAD = 512
# Audio is billed by duration: at most 32 tokens a second (Gemini's documented rate;
# OpenAI's audio input costs fewer), and no file holds a second in fewer bytes than
# these (8 kHz 8-bit mono PCM; 8 kbit/s MP3).
AUDIO_TOKENS_PER_SECOND = 32
AUDIO_MIN_BYTES_PER_SECOND = {"wav": 8000, "mp3": 1000}


def _size(text: str) -> int:
    return len(text.encode())


def audio_token_bound(data_base64: str, audio_format: str) -> int:
    """Tokens an audio part can cost: its longest possible duration at the highest rate."""
    decoded = len(data_base64) * 3 // 4
    bytes_per_second = AUDIO_MIN_BYTES_PER_SECOND.get(audio_format, min(AUDIO_MIN_BYTES_PER_SECOND.values()))
    return math.ceil(decoded / bytes_per_second * AUDIO_TOKENS_PER_SECOND)


def prompt_token_bound(request: router_pb2.ChatRequest) -> int:
    total = PER_REQUEST_OVERHEAD
    for message in request.messages:
        total += PER_MESSAGE_OVERHEAD + _size(message.role) + _size(message.name) + _size(message.tool_call_id)
        which = message.WhichOneof("content")
        if which == "text":
            total += _size(message.text)
        elif which == "parts":
            for part in message.parts.parts:
                kind = part.WhichOneof("part")
                if kind == "text":
                    total += _size(part.text)
                elif kind == "refusal":
                    total += _size(part.refusal)
                elif kind == "input_audio":
                    total += max(IMAGE_PART_TOKENS, audio_token_bound(part.input_audio.data, part.input_audio.format))
                else:
                    total += IMAGE_PART_TOKENS + _size(part.image_url.detail)
        for call in message.tool_calls:
            total += PER_MESSAGE_OVERHEAD + _size(call.id) + _size(call.type)
            total += _size(call.function.name) + _size(call.function.arguments)
    if request.tools:
        total += TOOLS_OVERHEAD
    for tool in request.tools:
        function = tool.function
        total += PER_MESSAGE_OVERHEAD + _size(tool.type) + _size(function.name) + _size(function.description)
        total += _size(function.parameters_json)
    total += _size(request.tool_choice.function_name)
    total += _size(request.response_format_json)
    total += sum(_size(stop) for stop in request.sampling.stop)
    total += _size(request.user)
    return total
