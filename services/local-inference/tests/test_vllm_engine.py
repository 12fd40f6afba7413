"""The vLLM adapter's own logic, without vLLM: a stand-in ``vllm`` module (the few names
the adapter imports) and stand-in engines shaped as vLLM 0.11 (tokenizer only) and 0.33
(with its renderer). `make test-vllm` checks the same paths against real vLLM."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hoosh_inference.engine import GenerationRequest, Message, SamplingOptions
from hoosh_inference.errors import EngineFailure, EngineUnavailable, InvalidRequest
from hoosh_inference.vllm_engine import VllmEngine, _map_error, _token_ids

MESSAGES = (Message(role="user", content="hi"),)


@dataclass
class Piece:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Output:
    outputs: list[Piece]
    finished: bool = False


@dataclass
class FakeEngine:
    """``generate`` plays back ``script``; records what it was given and what was aborted."""

    script: list[Output]
    prompts: list[Any] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    shut_down: bool = False
    hold: asyncio.Event | None = None  # generate waits on it after the first output

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Output]:
        self.prompts.append(prompt)
        for n, output in enumerate(self.script):
            if n == 1 and self.hold is not None:
                await self.hold.wait()
                if request_id in self.aborted:
                    yield Output([Piece("", [], "abort")], finished=True)
                    return
            yield output

    async def abort(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        if self.hold is not None:
            self.hold.set()

    def shutdown(self) -> None:
        self.shut_down = True


class Tokenizer:
    """vLLM 0.11's path: apply_chat_template must be asked for ids, never text."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.calls: list[dict[str, Any]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if not kwargs.get("tokenize"):
            raise AssertionError("rendered to text")
        return self.result


class Renderer:
    """vLLM 0.33's path: render_chat_async gives the engine input, ids included."""

    def __init__(self, ids: list[int], error: Exception | None = None) -> None:
        self.ids = ids
        self.error = error
        self.calls: list[tuple[Any, Any, Any]] = []

    async def render_chat_async(self, conversations: Any, chat: Any, tokenize: Any) -> Any:
        self.calls.append((conversations, chat, tokenize))
        if self.error is not None:
            raise self.error
        return [conversations[0]], [{"type": "token", "prompt_token_ids": list(self.ids)}]


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    vllm = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")
    renderers = types.ModuleType("vllm.renderers")

    class Params:
        def __init__(self, **kwargs: Any) -> None:
            self.__dict__.update(kwargs)

    vllm.SamplingParams = Params  # type: ignore[attr-defined]
    vllm.TokensPrompt = dict  # type: ignore[attr-defined]
    sampling.RequestOutputKind = types.SimpleNamespace(DELTA="delta")  # type: ignore[attr-defined]
    renderers.ChatParams = Params  # type: ignore[attr-defined]
    renderers.TokenizeParams = Params  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setitem(sys.modules, "vllm.renderers", renderers)
    yield


def adapter(engine: FakeEngine, *, tokenizer: Any = None, renderer: Renderer | None = None) -> VllmEngine:
    if renderer is not None:
        engine.renderer = renderer  # type: ignore[attr-defined]
    return VllmEngine(model_id="m", engine=engine, tokenizer=tokenizer or Tokenizer([1, 2, 3]), context_length=64)


def done(text: str, reason: str) -> Output:
    return Output([Piece(text, [9], reason)], finished=True)


def request(**sampling: Any) -> GenerationRequest:
    return GenerationRequest(model="m", messages=MESSAGES, sampling=SamplingOptions(**sampling), request_id="r")


async def test_the_011_path_tokenizes_with_the_template_and_sends_the_ids() -> None:
    tokenizer = Tokenizer({"input_ids": [5, 6, 7]})  # newer transformers: a dict
    engine = FakeEngine([Output([Piece("a", [1])]), done("b", "stop")])
    vllm_engine = adapter(engine, tokenizer=tokenizer)
    result = await vllm_engine.generate(request())
    assert (result.text, result.finish_reason, result.usage.prompt_tokens, result.usage.completion_tokens) == (
        "ab",
        "stop",
        3,
        2,
    )
    assert tokenizer.calls == [{"tokenize": True, "add_generation_prompt": True}]
    assert engine.prompts == [{"prompt_token_ids": [5, 6, 7]}]
    assert await vllm_engine.count_tokens("m", MESSAGES) == 3
    await vllm_engine.close()


async def test_the_renderer_path_hands_generate_the_rendered_input() -> None:
    renderer = Renderer([4, 4, 4, 4])
    engine = FakeEngine([done("x", "length")])
    vllm_engine = adapter(engine, renderer=renderer)
    result = await vllm_engine.generate(request(max_tokens=1))
    assert (result.finish_reason, result.usage.prompt_tokens) == ("length", 4)
    assert engine.prompts == [{"type": "token", "prompt_token_ids": [4, 4, 4, 4]}]
    conversations, chat, tokenize = renderer.calls[0]
    assert conversations == [[{"role": "user", "content": "hi"}]]
    assert chat.chat_template_kwargs == {"add_generation_prompt": True, "continue_final_message": False}
    assert tokenize.max_total_tokens is None and tokenize.add_special_tokens is False
    assert await vllm_engine.count_tokens("m", MESSAGES) == 4
    await vllm_engine.close()


async def test_a_template_the_renderer_rejects_is_invalid() -> None:
    vllm_engine = adapter(FakeEngine([]), renderer=Renderer([], error=ValueError("roles must alternate")))
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        await vllm_engine.generate(request())


async def test_an_error_finish_raises_instead_of_stopping() -> None:
    engine = FakeEngine([Output([Piece("par", [1])]), done("tial", "error")])
    vllm_engine = adapter(engine)
    chunks: list[str] = []
    with pytest.raises(EngineFailure):
        async for chunk in vllm_engine.stream(request()):
            chunks.append(chunk.text)
    assert chunks == ["par"]
    assert (vllm_engine.queue_depth, vllm_engine.active_requests) == (0, 0)


async def test_an_abort_hoosh_did_not_ask_for_raises() -> None:
    vllm_engine = adapter(FakeEngine([done("", "abort")]))
    with pytest.raises(EngineUnavailable, match="dropped"):
        await vllm_engine.generate(request())


async def test_close_aborts_the_streams_in_flight_and_they_end_unavailable() -> None:
    engine = FakeEngine([Output([Piece("a", [1])]), done("b", "stop")], hold=asyncio.Event())
    vllm_engine = adapter(engine)
    stream = vllm_engine.stream(request())
    assert (await anext(stream)).text == "a"
    pending = asyncio.ensure_future(anext(stream))
    await vllm_engine.close()
    with pytest.raises(EngineUnavailable, match="shutting down"):
        await pending
    assert len(engine.aborted) == 1 and engine.shut_down
    with pytest.raises(EngineUnavailable):
        await vllm_engine.generate(request())


def test_vllm_exceptions_map_by_name() -> None:
    def named(name: str, *bases: type[Exception]) -> Exception:
        return type(name, bases or (Exception,), {})("boom")

    assert isinstance(_map_error(named("EngineDeadError")), EngineUnavailable)
    retry = _map_error(named("RetryableRequestError", type("GenerationError", (Exception,), {})))
    assert isinstance(retry, EngineUnavailable) and retry.retry_after == 1
    assert isinstance(_map_error(named("GenerationError")), EngineFailure)
    assert isinstance(_map_error(named("VLLMValidationError")), InvalidRequest)
    assert isinstance(_map_error(RuntimeError("x")), EngineFailure)


def test_token_ids_from_each_shape_apply_chat_template_returns() -> None:
    assert _token_ids([1, 2]) == [1, 2]
    assert _token_ids({"input_ids": [3, 4]}) == [3, 4]
    assert _token_ids({"input_ids": [[5, 6]]}) == [5, 6]
