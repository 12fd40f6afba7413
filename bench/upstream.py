"""Stand-ins for paid providers: small asyncio HTTP/1.1 servers speaking each
provider's real wire format (JSON and SSE), with a fixed configurable latency.
Written on raw asyncio so that, in benchmarks, the upstream costs as little CPU
as possible. This module holds the shared server and the OpenAI dialect;
``bench.upstream_anthropic`` and ``bench.upstream_gemini`` hold the others.

Behaviour switches, chosen by the requested model name (for failure tests), in
every dialect:
  *fail-503*        answers 503 with the dialect's error body
  *fail-400*        answers 400
  *fail-429*        answers 429 with Retry-After: 1
  *bare-429*        answers 429 without Retry-After
  *fail-twice*      the first two requests for this exact model name answer 503, then it works
  *bad-json*        answers 200 with a body that is not JSON
  *cut-stream*      streams two pieces, then closes without the dialect's end marker
  *odd-finish*      an unknown finish reason ("banana" / "BANANA")
  *no-usage*        a stream without usage
  *tool*            answers with a tool call to the first tool in the request
  *think*           reasons first, in the dialect's own way (Anthropic: a thinking block;
                    Gemini: thought parts; OpenAI-compatible: reasoning_content deltas,
                    as DeepSeek and vLLM send), and counts those tokens in its usage
  *slow-stream*     pauses STREAM_GAP_SECONDS after each streamed piece
  *stall*           streams its pieces, then neither ends nor cuts the stream: it sends
                    keep-alive pings until the client hangs up (or STALL_SECONDS pass)

The OpenAI dialect also serves the Responses API (``POST /v1/responses``, blocking and
streamed with its semantic events), as OpenAI does; it stores nothing, so a request
naming a ``previous_response_id`` is refused (400) as OpenAI refuses an unknown one.

Control (tests): ``POST /control`` with ``{"fail_status": 503}`` makes every request
(models listing included) fail with that status (0 turns it off; ``{"reset": true}`` also
clears the counters); ``GET /control/stats`` returns the request counters and the
last request body.

Run: python -m bench.upstream --port 9000 --latency-ms 50 [--dialect anthropic|gemini]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

REPLY_WORDS = ["Hello", " from", " the", " upstream", " stand", "-in", "."]
# *think*: the reasoning that precedes the reply, one token per piece.
THOUGHT_WORDS = ["The", " user", " says", " hi", ";", " a", " short", " greeting", " will", " do", "."]
STREAM_GAP_SECONDS = 0.05  # *slow-stream*
STALL_SECONDS = 10.0  # *stall*: the longest it hangs before cutting the stream

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class UpstreamStats:
    requests: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    last_body: dict[str, Any] = field(default_factory=dict)


def response_bytes(status: int, body: bytes, content_type: str = "application/json", extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n{extra}\r\n"
    )
    return head.encode() + body


def fake_embedding(text: str, dimensions: int = 8) -> list[float]:
    """A deterministic unit vector derived from the text."""
    digest = hashlib.sha256(text.encode()).digest()
    values = [(byte - 127.5) / 127.5 for byte in (digest * (dimensions // 32 + 1))[:dimensions]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def count_words(value: Any) -> int:
    """A crude token count of any JSON value's strings (the stand-ins' "tokenizer")."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(item) for item in value)
    if isinstance(value, dict):
        return sum(count_words(item) for item in value.values())
    return 0


class ChunkedWriter:
    """An HTTP/1.1 chunked body of server-sent events."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: keep-alive\r\n\r\n"
        )

    def raw(self, data: bytes) -> None:
        self._writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def event(self, payload: bytes, name: str | None = None) -> None:
        self.raw((f"event: {name}\n".encode() if name else b"") + b"data: " + payload + b"\n\n")

    async def cut(self) -> None:
        """Close the connection mid-body (no terminating chunk)."""
        await self._writer.drain()
        self._writer.close()

    async def pace(self, model: str) -> None:
        """Send what is written; for a *slow-stream* model, then pause."""
        await self._writer.drain()
        if "slow-stream" in model:
            await asyncio.sleep(STREAM_GAP_SECONDS)

    async def stall(self, ping: bytes) -> None:
        """Keep the stream open without ending it: ``ping`` (a keep-alive the dialect
        allows) every few tens of milliseconds until the client hangs up or
        STALL_SECONDS pass; then cut it."""
        deadline = time.monotonic() + STALL_SECONDS
        try:
            while time.monotonic() < deadline and not self._writer.is_closing():
                self.raw(ping)
                await self._writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            return
        self._writer.close()

    async def end(self) -> None:
        self._writer.write(b"0\r\n\r\n")
        await self._writer.drain()


class StandIn:
    """The shared server: parsing, counters, control endpoints, failure switches.

    Subclasses implement :meth:`route` for their dialect and :meth:`error` for its
    error body.
    """

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency = latency_ms / 1000
        self.stats = UpstreamStats()
        self.fail_status = 0
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                path, _, query = target.partition("?")
                if path.startswith("/control"):
                    self._control(method, path, body, writer)
                    continue
                if self.fail_status:  # told to be down: every endpoint fails, /models included
                    self.stats.requests += 1
                    writer.write(self.error(self.fail_status, "the stand-in was told to fail"))
                    continue
                keep_open = await self.route(method, path, query, headers, body, writer)
                if not keep_open:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def _control(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if method == "POST":
            settings = orjson.loads(body or b"{}")
            if settings.get("reset"):
                self.stats = UpstreamStats()
            if "fail_status" in settings:
                self.fail_status = int(settings["fail_status"] or 0)
        stats = {
            "requests": self.stats.requests,
            "by_model": self.stats.by_model,
            "last_body": self.stats.last_body,
            "fail_status": self.fail_status,
        }
        writer.write(response_bytes(200, orjson.dumps(stats)))

    def count(self, model: str, body: dict[str, Any]) -> int:
        """Record a request; returns how many this exact model name has had."""
        self.stats.requests += 1
        seen = self.stats.by_model.get(model, 0) + 1
        self.stats.by_model[model] = seen
        self.stats.last_body = body
        return seen

    async def common_failure(self, model: str, seen: int, writer: asyncio.StreamWriter) -> bool:
        """Apply the latency and the shared failure switches; True when an answer was written."""
        if self.latency:
            await asyncio.sleep(self.latency)
        if "fail-503" in model or ("fail-twice" in model and seen <= 2):
            writer.write(self.error(503, "upstream overloaded"))
            return True
        if "fail-429" in model:
            writer.write(self.error(429, "slow down", extra="Retry-After: 1\r\n"))
            return True
        if "bare-429" in model:
            writer.write(self.error(429, "slow down"))
            return True
        if "fail-400" in model:
            writer.write(self.error(400, "upstream says the request is bad"))
            return True
        if "bad-json" in model:
            writer.write(response_bytes(200, b"{not json"))
            return True
        return False

    def error(self, status: int, message: str, extra: str = "") -> bytes:
        raise NotImplementedError

    async def route(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; False closes the connection."""
        raise NotImplementedError


class OpenAIUpstream(StandIn):
    """OpenAI's chat-completions, models and embeddings endpoints."""

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def error(self, status: int, message: str, extra: str = "") -> bytes:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
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
        if method == "GET" and path.endswith("/models"):
            models = [{"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "upstream"}]
            writer.write(response_bytes(200, orjson.dumps({"object": "list", "data": models})))
            return True
        if method != "POST" or not path.endswith(("/chat/completions", "/embeddings", "/responses")):
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
        if path.endswith("/embeddings"):
            self._embeddings(request, model, writer)
            return True
        if path.endswith("/responses"):
            return await self._responses(request, model, writer)
        prompt_tokens = sum(len(str(m.get("content") or "").split()) + 4 for m in request.get("messages", []))
        max_tokens = int(request.get("max_tokens") or 16)
        words = REPLY_WORDS[: max(1, min(len(REPLY_WORDS), max_tokens))]
        finish = "stop" if len(words) == len(REPLY_WORDS) else "length"
        if "odd-finish" in model:
            finish = "banana"
        thoughts = THOUGHT_WORDS if "think" in model else []
        tool_call = None
        if "tool" in model and request.get("tools"):
            tool_call = {
                "id": "call_upstream_1",
                "type": "function",
                "function": {"name": request["tools"][0]["function"]["name"], "arguments": '{"city": "Paris"}'},
            }
            finish = "tool_calls"
        if request.get("stream"):
            await self._stream(writer, model, words, finish, prompt_tokens, tool_call, request, thoughts)
            return "cut-stream" not in model and "stall" not in model
        message: dict[str, object] = {"role": "assistant", "content": None if tool_call else "".join(words)}
        if tool_call:
            message["tool_calls"] = [tool_call]
        if thoughts:
            message["reasoning_content"] = "".join(thoughts)
        completion_tokens = (1 if tool_call else len(words)) + len(thoughts)
        reply = {
            "id": "chatcmpl-upstream",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        writer.write(response_bytes(200, orjson.dumps(reply)))
        return True

    # -- the Responses API ------------------------------------------------------------

    async def _responses(self, request: dict[str, Any], model: str, writer: asyncio.StreamWriter) -> bool:
        """``POST /v1/responses``: the reply words as an output message (or a function call
        to the first tool for a *tool* model), usage as input/output tokens; streamed as
        OpenAI streams it. False when the connection is to close (a cut stream)."""
        previous = request.get("previous_response_id")
        if previous:
            writer.write(self.error(400, f"Previous response with id '{previous}' not found."))
            return True
        if "input" not in request:
            writer.write(self.error(400, "Missing required parameter: 'input'."))
            return True
        input_tokens = count_words([request.get("instructions") or "", request["input"]]) + 4
        limit = request.get("max_output_tokens")
        words = REPLY_WORDS[: max(1, min(len(REPLY_WORDS), int(limit)))] if limit else list(REPLY_WORDS)
        tools = request.get("tools") or []
        call = None
        if "tool" in model and tools:
            call = {"name": str(tools[0].get("name", "")), "arguments": '{"city": "Paris"}'}
        output_tokens = 1 if call else len(words)
        status = "completed" if call or len(words) == len(REPLY_WORDS) else "incomplete"
        serial = self.stats.requests
        response_id, item_id = f"resp_upstream_{serial}", f"{'fc' if call else 'msg'}_upstream_{serial}"
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        if call:
            item: dict[str, Any] = {
                "id": item_id,
                "type": "function_call",
                "status": "completed",
                "call_id": "call_upstream_1",
                **call,
            }
        else:
            item = {
                "id": item_id,
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "".join(words), "annotations": [], "logprobs": []}],
            }
        final = self._response_object(request, model, response_id, status, [item], usage)
        if not request.get("stream"):
            writer.write(response_bytes(200, orjson.dumps(final)))
            return True
        return await self._responses_stream(writer, model, request, final, item, words)

    @staticmethod
    def _response_object(
        request: dict[str, Any],
        model: str,
        response_id: str,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """OpenAI's ``response`` object, the request's settings echoed."""
        created = int(time.time())
        response: dict[str, Any] = {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "completed_at": created if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"),
            "metadata": request.get("metadata") or {},
            "model": model,
            "output": output,
            "parallel_tool_calls": request.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": request.get("store", True),
            "temperature": request.get("temperature", 1.0),
            "text": request.get("text") or {"format": {"type": "text"}},
            "tool_choice": request.get("tool_choice", "auto"),
            "tools": [
                {"description": None, "parameters": None, "strict": True, **tool} for tool in request.get("tools") or []
            ],
            "top_p": request.get("top_p", 1.0),
            "truncation": request.get("truncation", "disabled"),
        }
        if request.get("user") is not None:
            response["user"] = request["user"]
        if usage is not None:
            response["usage"] = usage
        return response

    async def _responses_stream(
        self,
        writer: asyncio.StreamWriter,
        model: str,
        request: dict[str, Any],
        final: dict[str, Any],
        item: dict[str, Any],
        words: list[str],
    ) -> bool:
        """The semantic events in OpenAI's order, each with its sequence number."""
        out = ChunkedWriter(writer)
        sequence = 0

        def send(kind: str, **fields: Any) -> None:
            nonlocal sequence
            out.event(orjson.dumps({"type": kind, "sequence_number": sequence, **fields}), kind)
            sequence += 1

        started = self._response_object(request, model, final["id"], "in_progress", [], None)
        send("response.created", response=started)
        send("response.in_progress", response=started)
        at = {"item_id": item["id"], "output_index": 0}
        if item["type"] == "function_call":
            send("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "arguments": ""})
            send("response.function_call_arguments.delta", **at, delta=item["arguments"])
            send("response.function_call_arguments.done", **at, name=item["name"], arguments=item["arguments"])
        else:
            send("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []})
            empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            send("response.content_part.added", **at, content_index=0, part=empty)
            for position, word in enumerate(words):
                send("response.output_text.delta", **at, content_index=0, delta=word, logprobs=[])
                await out.pace(model)
                if "cut-stream" in model and position == 1:
                    await out.cut()
                    return False
            text = "".join(words)
            send("response.output_text.done", **at, content_index=0, text=text, logprobs=[])
            send("response.content_part.done", **at, content_index=0, part=item["content"][0])
        send("response.output_item.done", output_index=0, item=item)
        send("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
        await out.end()
        return True

    def _embeddings(self, request: dict[str, Any], model: str, writer: asyncio.StreamWriter) -> None:
        inputs = request.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        if not texts or not all(isinstance(text, str) for text in texts):
            writer.write(self.error(400, "input must be a string or a list of strings"))
            return
        dimensions = int(request.get("dimensions") or 8)
        data = []
        for index, text in enumerate(texts):
            vector: Any = fake_embedding(text, dimensions)
            if request.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(len(text.split()) for text in texts)
        reply = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        writer.write(response_bytes(200, orjson.dumps(reply)))

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        model: str,
        words: list[str],
        finish: str,
        prompt_tokens: int,
        tool_call: dict[str, object] | None,
        request: dict[str, object],
        thoughts: list[str],
    ) -> None:
        out = ChunkedWriter(writer)

        def send(payload: bytes) -> None:
            out.raw(b"data: " + payload + b"\n\n")

        base = {
            "id": "chatcmpl-upstream",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        send(
            orjson.dumps(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
            )
        )
        for thought in thoughts:
            delta = {"reasoning_content": thought}
            send(orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
            await out.pace(model)
        if tool_call:
            function = tool_call["function"]
            assert isinstance(function, dict)
            first = {"index": 0, "id": tool_call["id"], "type": "function"}
            first["function"] = {"name": function["name"], "arguments": ""}
            for delta in (first, {"index": 0, "function": {"arguments": function["arguments"]}}):
                send(
                    orjson.dumps(
                        {**base, "choices": [{"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None}]}
                    )
                )
            completion_tokens = 1
        else:
            for position, word in enumerate(words):
                send(
                    orjson.dumps({**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
                )
                await out.pace(model)
                if "cut-stream" in model and position == 1:
                    await out.cut()
                    return
            completion_tokens = len(words)
        if "stall" in model:
            await out.stall(b": ping\n\n")
            return
        send(orjson.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") and "no-usage" not in model:
            completion_tokens += len(thoughts)
            usage: dict[str, Any] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            if thoughts:
                usage["completion_tokens_details"] = {"reasoning_tokens": len(thoughts)}
            send(orjson.dumps({**base, "choices": [], "usage": usage}))
        send(b"[DONE]")
        await out.end()


def make_stand_in(dialect: str, latency_ms: float) -> StandIn:
    if dialect == "anthropic":
        from bench.upstream_anthropic import AnthropicUpstream

        return AnthropicUpstream(latency_ms)
    if dialect == "gemini":
        from bench.upstream_gemini import GeminiUpstream

        return GeminiUpstream(latency_ms)
    return OpenAIUpstream(latency_ms)


async def _main(port: int, latency_ms: float, dialect: str) -> None:
    upstream = make_stand_in(dialect, latency_ms)
    await upstream.start(port=port)
    print(f"{dialect} stand-in on {upstream.root_url} (latency {latency_ms} ms)", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--dialect", choices=["openai", "anthropic", "gemini"], default="openai")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(_main(args.port, args.latency_ms, args.dialect))
    except KeyboardInterrupt:
        pass
