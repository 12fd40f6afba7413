"""``hoosh models`` (GET /v1/models) and ``hoosh chat`` (POST /v1/chat/completions,
streamed: each token is written to the terminal as it arrives), with the API key."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import output
from .client import Context, error_from
from .errors import ServerError, UsageError
from .parser import command, finite
from .terminal import TerminalFilter

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"  # the local model `hoosh up` serves
CHAT_TIMEOUT = 300.0  # seconds of silence (between tokens, or before the first) before giving up


def models(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge() as edge:
        answer = edge.get("/v1/models")
    if ctx.json:
        output.emit_json(answer)
        return 0
    data: list[dict[str, Any]] = sorted(answer.get("data", []), key=lambda card: str(card.get("id")))
    grid = output.table(f"{len(data)} models", "id", "owned by", "created (UTC)")
    for card in data:
        grid.add_row(output.text(card.get("id")), output.text(card.get("owned_by")), output.when_s(card.get("created")))
    output.console().print(grid)
    return 0


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read {path}: {reason}") from None


def message(args: argparse.Namespace) -> str:
    """The user message: the arguments, ``-f FILE`` (``-`` is stdin), or stdin when it
    is not a terminal."""
    if args.message and args.file:
        raise UsageError("give the message as arguments or with -f FILE, not both")
    if args.file:
        text = _read(args.file)
    elif args.message:
        text = _read("-") if args.message == ["-"] else " ".join(args.message)
    else:
        text = "" if sys.stdin.isatty() else sys.stdin.read()
        if not text.strip():
            raise UsageError("no message: give it as arguments, with -f FILE, or on stdin")
    if not text.strip():
        raise UsageError("the message is empty")
    return text


def chat_body(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": message(args)})
    body: dict[str, Any] = {
        "model": args.model or os.environ.get("HOOSH_MODEL") or ctx.config.model or DEFAULT_CHAT_MODEL,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


class Reply:
    """What the stream carried so far."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def take(self, chunk: dict[str, Any]) -> str:
        """Record one chunk; the text it adds."""
        self.id = chunk.get("id") or self.id
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        added = ""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                added += str(delta["content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        self.parts.append(added)
        return added

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "content": "".join(self.parts),
            "finish_reason": self.finish_reason,
            "usage": self.usage,
        }


def _stream_error(payload: dict[str, Any]) -> ServerError:
    error = payload.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type") or "error"
        return ServerError(f"the stream failed: {code}: {error.get('message')}", code=str(code))
    return ServerError(f"the stream failed: {error}")


def stream(ctx: Context, body: dict[str, Any], write: Any) -> Reply:
    """POST the chat and pass each piece of text to ``write`` as it arrives."""
    reply = Reply()
    with ctx.edge() as edge, edge.errors():
        with edge.http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise error_from(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments
                data = line[5:].strip()
                if data == "[DONE]":
                    return reply
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise ServerError("the stream carried something that is not JSON") from None
                if not isinstance(chunk, dict):
                    raise ServerError("the stream carried something that is not a chunk")
                if "error" in chunk:
                    raise _stream_error(chunk)
                text = reply.take(chunk)
                if text:
                    write(text)
    raise ServerError("the stream ended before its end marker (data: [DONE])")


def chat(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args, timeout=CHAT_TIMEOUT)
    body = chat_body(args, ctx)
    printed: list[str] = []
    # The answer goes to the terminal as it comes, without the model's (or anyone's)
    # escape sequences and control characters; newlines and tabs stay.
    screen = TerminalFilter(multiline=True)

    def write(text: str) -> None:
        if not ctx.json and (shown := screen.feed(text)):
            sys.stdout.write(shown)
            sys.stdout.flush()
            printed.append(shown)

    try:
        reply = stream(ctx, body, write)
    except BaseException:
        if printed and not "".join(printed).endswith("\n"):
            sys.stdout.write("\n")  # the error (or the shell's prompt) on a line of its own
            sys.stdout.flush()
        raise
    if ctx.json:
        output.emit_json(reply.as_json())
        return 0
    if not "".join(printed).endswith("\n"):
        sys.stdout.write("\n")
        sys.stdout.flush()
    if sys.stderr.isatty() and reply.usage:
        usage = reply.usage
        cost = usage.get("cost_usd_micros")
        note = (
            f"{reply.model}: {usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens"
        )
        if isinstance(cost, int | float):
            note += f", ${cost / 1_000_000:.6f}"
        output.err_console().print(output.text(note, style="dim"))
    return 0


def add_commands(commands: Any) -> None:
    """``hoosh models`` and ``hoosh chat``."""
    command(commands, "models", models, "the models this key may use (GET /v1/models)")
    talk = command(
        commands,
        "chat",
        chat,
        "ask a model; its answer streams to the terminal token by token",
        description="Send one message (the arguments, -f FILE, or stdin) and print the answer as it streams. "
        "--json prints the whole answer as JSON at the end instead.",
    )
    talk.add_argument("message", nargs="*", help="the message ('-' or none with a pipe: read stdin)")
    talk.add_argument("-f", "--file", default=None, help="read the message from FILE ('-': stdin)")
    talk.add_argument(
        "-m", "--model", default=None, help=f"default: $HOOSH_MODEL, the config file's model, {DEFAULT_CHAT_MODEL}"
    )
    talk.add_argument("-s", "--system", default=None, help="a system message first")
    talk.add_argument("--max-tokens", type=int, default=None, help="the most tokens to generate")
    talk.add_argument("--temperature", type=finite, default=None)
