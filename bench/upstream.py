"""A stand-in for a paid OpenAI-compatible provider: a small asyncio HTTP/1.1
server speaking OpenAI's chat-completions wire format (JSON and SSE), with a
fixed configurable latency. Written on raw asyncio so that, in benchmarks, the
upstream costs as little CPU as possible.

Behaviour switches, chosen by the requested model name (for failure tests):
  *fail-503*        answers 503 with an OpenAI error body
  *fail-400*        answers 400
  *bad-json*        answers 200 with a body that is not JSON
  *cut-stream*      streams two chunks, then closes without [DONE]
  *odd-finish*      finish_reason "banana"
  *no-usage*        stream without a usage chunk
  *tool*            answers with a tool call to the first tool in the request

Run: python -m bench.upstream --port 9000 --latency-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

import orjson

REPLY_WORDS = ["Hello", " from", " the", " upstream", " stand", "-in", "."]


@dataclass
class UpstreamStats:
    requests: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    last_body: dict[str, object] = field(default_factory=dict)


def _response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


def _error(status: int, message: str) -> bytes:
    return _response(
        status, orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "code": None}})
    )


class OpenAIUpstream:
    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency = latency_ms / 1000
        self.stats = UpstreamStats()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                keep_open = await self._route(method, path, body, writer)
                if not keep_open:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if method == "GET" and path.endswith("/models"):
            models = [{"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "upstream"}]
            writer.write(_response(200, orjson.dumps({"object": "list", "data": models})))
            return True
        if method != "POST" or not path.endswith("/chat/completions"):
            writer.write(_error(404, f"no route {method} {path}"))
            return True
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            writer.write(_error(400, "body is not JSON"))
            return True
        model = str(request.get("model", ""))
        self.stats.requests += 1
        self.stats.by_model[model] = self.stats.by_model.get(model, 0) + 1
        self.stats.last_body = request
        if self.latency:
            await asyncio.sleep(self.latency)
        if "fail-503" in model:
            writer.write(_error(503, "upstream overloaded"))
            return True
        if "fail-400" in model:
            writer.write(_error(400, "upstream says the request is bad"))
            return True
        if "bad-json" in model:
            writer.write(_response(200, b"{not json"))
            return True
        prompt_tokens = sum(len(str(m.get("content") or "").split()) + 4 for m in request.get("messages", []))
        max_tokens = int(request.get("max_tokens") or 16)
        words = REPLY_WORDS[: max(1, min(len(REPLY_WORDS), max_tokens))]
        finish = "stop" if len(words) == len(REPLY_WORDS) else "length"
        if "odd-finish" in model:
            finish = "banana"
        tool_call = None
        if "tool" in model and request.get("tools"):
            tool_call = {
                "id": "call_upstream_1",
                "type": "function",
                "function": {"name": request["tools"][0]["function"]["name"], "arguments": '{"city": "Paris"}'},
            }
            finish = "tool_calls"
        if request.get("stream"):
            await self._stream(writer, model, words, finish, prompt_tokens, tool_call, request)
            return "cut-stream" not in model
        message: dict[str, object] = {"role": "assistant", "content": None if tool_call else "".join(words)}
        if tool_call:
            message["tool_calls"] = [tool_call]
        completion_tokens = 1 if tool_call else len(words)
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
        writer.write(_response(200, orjson.dumps(reply)))
        return True

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        model: str,
        words: list[str],
        finish: str,
        prompt_tokens: int,
        tool_call: dict[str, object] | None,
        request: dict[str, object],
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: keep-alive\r\n\r\n"
        )

        def send(payload: bytes) -> None:
            data = b"data: " + payload + b"\n\n"
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

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
        if tool_call:
            function = tool_call["function"]
            assert isinstance(function, dict)
            send(
                orjson.dumps(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {
                                    "tool_calls": [
                                        {
                                            "index": 0,
                                            "id": tool_call["id"],
                                            "type": "function",
                                            "function": {"name": function["name"], "arguments": ""},
                                        }
                                    ]
                                },
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            )
            send(
                orjson.dumps(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {
                                    "tool_calls": [{"index": 0, "function": {"arguments": function["arguments"]}}]
                                },
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            )
            completion_tokens = 1
        else:
            for position, word in enumerate(words):
                send(
                    orjson.dumps({**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
                )
                if "cut-stream" in model and position == 1:
                    await writer.drain()
                    writer.close()
                    return
            completion_tokens = len(words)
        send(orjson.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") and "no-usage" not in model:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            send(orjson.dumps({**base, "choices": [], "usage": usage}))
        send(b"[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _main(port: int, latency_ms: float) -> None:
    upstream = OpenAIUpstream(latency_ms)
    await upstream.start(port=port)
    print(f"upstream stand-in on {upstream.base_url} (latency {latency_ms} ms)", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(_main(args.port, args.latency_ms))
    except KeyboardInterrupt:
        pass
