"""A stand-in for Google's Gemini API (v1beta), as its public API reference documents
it: ``x-goog-api-key`` (or ``?key=``), ``models/{model}:generateContent``,
``:streamGenerateContent`` (``alt=sse`` gives server-sent events, each a whole
``GenerateContentResponse``; without it a JSON array), ``:batchEmbedContents``,
``GET /models``; ``contents`` with ``user``/``model`` roles and ``parts`` (``text``,
``inlineData``, ``functionCall``, ``functionResponse``), ``systemInstruction``,
``tools[].functionDeclarations``, ``generationConfig``, ``finishReason`` and
``usageMetadata``.

It rejects with a 400 what the real API rejects (a role other than user/model, an
empty ``contents``, a ``functionResponse`` without a name, a function call that is
not answered by the next turn's responses). Behaviour switches by model name: see
``bench.upstream``.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

import orjson

from bench.upstream import (
    REPLY_WORDS,
    THOUGHT_WORDS,
    ChunkedWriter,
    StandIn,
    count_words,
    fake_embedding,
    response_bytes,
)

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def _validate(request: dict[str, Any]) -> str | None:
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    pending_calls: list[str] = []
    for index, content in enumerate(contents):
        role = content.get("role")
        if role not in ("user", "model"):
            return f"* GenerateContentRequest.contents[{index}].role: must be 'user' or 'model'"
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return f"* GenerateContentRequest.contents[{index}].parts: contents.parts must not be empty"
        responses = [part["functionResponse"] for part in parts if "functionResponse" in part]
        for response in responses:
            if not response.get("name") or not isinstance(response.get("response"), dict):
                return f"* contents[{index}]: functionResponse needs a name and a response object"
        if pending_calls and sorted(r["name"] for r in responses) != sorted(pending_calls):
            return (
                "Please ensure that the number of function response parts is equal to the number of "
                "function call parts of the function call turn."
            )
        pending_calls = [part["functionCall"]["name"] for part in parts if "functionCall" in part]
        if pending_calls and role != "model":
            return f"* contents[{index}]: functionCall parts belong to model turns"
    system = request.get("systemInstruction")
    if system is not None and not (isinstance(system, dict) and system.get("parts")):
        return "* GenerateContentRequest.system_instruction: parts must not be empty"
    return None


class GeminiUpstream(StandIn):
    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1beta"

    def error(self, status: int, message: str, extra: str = "") -> bytes:
        body = {"error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}}
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
        params = parse_qs(query)
        if not headers.get("x-goog-api-key") and not params.get("key"):
            writer.write(self.error(403, "Method doesn't allow unregistered callers. Please use an API key."))
            return True
        if method == "GET" and path == "/v1beta/models":
            models = [
                {
                    "name": "models/gemini-2.0-flash",
                    "displayName": "Gemini 2.0 Flash",
                    "supportedGenerationMethods": ["generateContent", "countTokens"],
                },
                {"name": "models/text-embedding-004", "supportedGenerationMethods": ["embedContent"]},
            ]
            writer.write(response_bytes(200, orjson.dumps({"models": models})))
            return True
        prefix = "/v1beta/models/"
        model, _, action = path.removeprefix(prefix).partition(":")
        if method != "POST" or not path.startswith(prefix) or not action:
            writer.write(self.error(404, f"no route {method} {path}"))
            return True
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            writer.write(self.error(400, "Invalid JSON payload received."))
            return True
        seen = self.count(model, request)
        if await self.common_failure(model, seen, writer):
            return True
        if action == "batchEmbedContents":
            self._embed(request, model, writer)
            return True
        if action not in ("generateContent", "streamGenerateContent"):
            writer.write(self.error(404, f"unknown method {action}"))
            return True
        problem = _validate(request)
        if problem:
            writer.write(self.error(400, problem))
            return True
        prompt_tokens = count_words(request.get("contents")) + count_words(request.get("systemInstruction")) + 2
        max_tokens = int((request.get("generationConfig") or {}).get("maxOutputTokens") or 8192)
        words = REPLY_WORDS[: max(1, min(len(REPLY_WORDS), max_tokens))]
        finish = "STOP" if len(words) == len(REPLY_WORDS) else "MAX_TOKENS"
        call = None
        declarations = [d for tool in request.get("tools") or [] for d in tool.get("functionDeclarations") or []]
        if "tool" in model and declarations:
            call = {"name": declarations[0]["name"], "args": {"city": "Paris"}}
            finish = "STOP"
        if "odd-finish" in model:
            finish = "BANANA"
        thoughts = THOUGHT_WORDS if "think" in model else []
        if action == "streamGenerateContent":
            sse = params.get("alt") == ["sse"]
            await self._stream(writer, model, words, call, finish, prompt_tokens, thoughts, sse=sse)
            return "cut-stream" not in model and "stall" not in model
        parts: list[dict[str, Any]] = [{"text": "".join(thoughts), "thought": True}] if thoughts else []
        parts += [{"functionCall": call}] if call else [{"text": "".join(words)}]
        completion_tokens = 3 if call else len(words)
        usage = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": completion_tokens,
            "totalTokenCount": prompt_tokens + completion_tokens + len(thoughts),
        }
        if thoughts:
            usage["thoughtsTokenCount"] = len(thoughts)
        reply = {
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": "standin-response",
        }
        writer.write(response_bytes(200, orjson.dumps(reply)))
        return True

    def _embed(self, request: dict[str, Any], model: str, writer: asyncio.StreamWriter) -> None:
        embeddings = []
        for item in request.get("requests") or []:
            if item.get("model") != f"models/{model}":
                writer.write(self.error(400, "model of each request must match the batch's model"))
                return
            text = "".join(part.get("text", "") for part in (item.get("content") or {}).get("parts") or [])
            dimensions = int(item.get("outputDimensionality") or 8)
            embeddings.append({"values": fake_embedding(text, dimensions)})
        if not embeddings:
            writer.write(self.error(400, "* BatchEmbedContentsRequest.requests: requests is not specified"))
            return
        writer.write(response_bytes(200, orjson.dumps({"embeddings": embeddings})))

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        model: str,
        words: list[str],
        call: dict[str, Any] | None,
        finish: str,
        prompt_tokens: int,
        thoughts: list[str],
        *,
        sse: bool,
    ) -> None:
        chunks: list[dict[str, Any]] = []
        answer: list[dict[str, Any]] = [{"functionCall": call}] if call else [{"text": word} for word in words]
        pieces = [{"text": thought, "thought": True} for thought in thoughts] + answer
        for position, part in enumerate(pieces):
            last = position == len(pieces) - 1
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": [part]}, "index": 0}
            if last and "stall" not in model:
                candidate["finishReason"] = finish
            thought = min(position + 1, len(thoughts))
            used = 3 if call and last else max(0, position + 1 - len(thoughts))
            usage = {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": used,
                "totalTokenCount": prompt_tokens + used + thought,
            }
            if thought:
                usage["thoughtsTokenCount"] = thought
            chunks.append({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model})
        if not sse:  # without alt=sse the API streams one JSON array
            writer.write(response_bytes(200, orjson.dumps(chunks)))
            return
        out = ChunkedWriter(writer)
        for position, chunk in enumerate(chunks):
            out.raw(b"data: " + orjson.dumps(chunk) + b"\r\n\r\n")
            await out.pace(model)
            if "cut-stream" in model and position == 1 + len(thoughts):
                await out.cut()
                return
        if "stall" in model:
            await out.stall(b": ping\r\n\r\n")
            return
        await out.end()
