"""VllmEngine against real vLLM 0.33 (AsyncLLM, renderer, tokenizers, detokenizer, stop
strings, abort, shutdown), only the engine core stubbed (stub_core.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hoosh_inference.engine import GenerationRequest, Message, SamplingOptions
from hoosh_inference.errors import ContextLengthExceeded, EngineFailure, EngineUnavailable, InvalidRequest
from stub_core import Plan
from vllm.outputs import RequestError
from vllm.v1.engine import FinishReason

from conftest import CONTEXT, MODEL_ID, Served

Wait = Callable[[Callable[[], bool]], Awaitable[None]]
REPLY = "Paris is a city in France. The river there is the Seine."


def chat(*messages: tuple[str, str], **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        model=MODEL_ID,
        messages=tuple(Message(role=role, content=text) for role, text in messages),
        sampling=SamplingOptions(**sampling),  # type: ignore[arg-type]
        request_id="req-test",
    )


def hi(**sampling: object) -> GenerationRequest:
    return chat(("user", "What is the capital of France?"), **sampling)


def reply_ids(served: Served, text: str = REPLY, *, eos: bool = True) -> list[int]:
    tokenizer = served.engine._tokenizer
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return [*ids, tokenizer.eos_token_id] if eos else ids


def idle(served: Served) -> bool:
    engine = served.engine
    return engine.queue_depth == 0 and engine.active_requests == 0 and not served.core.running


# ----------------------------------------------------------------------------- answers
async def test_a_chat_streams_the_core_tokens_as_vllm_detokenizes_them(chatml: Served) -> None:
    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml))
    request = chat(("system", "Be brief."), ("user", "hi there"))
    pieces = [chunk async for chunk in chatml.engine.stream(request)]

    # The prompt: the chat template applied and tokenized, ids for the special tokens.
    expected = chatml.engine._tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    sent = chatml.core.requests[-1]
    assert sent.prompt_token_ids == expected
    assert expected.count(1) == 3 and expected.count(2) == 2  # <|im_start|> x3, <|im_end|> x2
    # Streamed as vLLM's incremental detokenizer cut it; the EOS id ends it with "stop".
    assert len(pieces) > 5 and all(p.finish_reason is None for p in pieces[:-1])
    assert "".join(p.text for p in pieces) == REPLY
    final = pieces[-1]
    assert final.finish_reason == "stop" and final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(expected), len(reply_ids(chatml)))
    assert chatml.core.finished[sent.request_id] == FinishReason.STOP
    assert await chatml.engine.count_tokens(MODEL_ID, request.messages) == len(expected)


async def test_the_sampling_parameters_reach_the_core(chatml: Served) -> None:
    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml))
    await chatml.engine.generate(hi(max_tokens=7, temperature=0.3, top_p=0.9, seed=11, stop=("zzz",)))
    params = chatml.core.requests[-1].sampling_params
    assert params is not None
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 0.3, 0.9, 11)
    assert params.stop == ["zzz"] and params.eos_token_id == chatml.engine._tokenizer.eos_token_id


async def test_a_stop_string_cuts_the_text_and_vllm_aborts_the_rest(chatml: Served, wait_until: Wait) -> None:
    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml))
    result = await chatml.engine.generate(hi(stop=("France",)))
    assert result.text == "Paris is a city in "
    assert result.finish_reason == "stop"
    # The core kept going; vLLM's output processor saw the stop string and aborted it there.
    sent = chatml.core.requests[-1].request_id
    await wait_until(lambda: sent in chatml.core.aborted)
    assert sent not in chatml.core.finished


async def test_max_tokens_finishes_with_length(chatml: Served) -> None:
    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml))
    result = await chatml.engine.generate(hi(max_tokens=3))
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 3
    assert result.text == chatml.engine._tokenizer.decode(reply_ids(chatml)[:3])


async def test_the_context_check_is_hoosh_s_before_vllm_sees_the_request(chatml: Served) -> None:
    sent = len(chatml.core.requests)
    with pytest.raises(ContextLengthExceeded, match=f"maximum context length is {CONTEXT} tokens"):
        await chatml.engine.generate(hi(max_tokens=CONTEXT))
    assert len(chatml.core.requests) == sent


async def test_the_prompt_goes_through_the_renderer_not_the_deprecated_raw_prompt(
    chatml: Served, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vllm.logger

    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml))
    llm = chatml.engine._engine
    assert chatml.engine._renderer is llm.renderer
    given: list[object] = []
    generate = llm.generate

    def spy(prompt: object, *args: object, **kwargs: object) -> object:
        given.append(prompt)
        return generate(prompt, *args, **kwargs)

    monkeypatch.setattr(llm, "generate", spy)
    vllm.logger._print_warning_once.cache_clear()  # vLLM warns once per process
    with caplog.at_level(logging.DEBUG, logger="vllm"):
        await chatml.engine.generate(hi())
    # The renderer's EngineInput (it has a "type"), not a raw TokensPrompt.
    (prompt,) = given
    assert isinstance(prompt, dict) and prompt["type"] == "token"
    assert prompt["prompt_token_ids"] == chatml.core.requests[-1].prompt_token_ids
    deprecated = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage().lower()]
    assert deprecated == []


# ------------------------------------------------------------ a Mistral-format tokenizer
async def test_mistral_control_tokens_are_single_ids(mistral: Served, models: dict[str, Path]) -> None:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Reference

    tokenizer = mistral.engine._tokenizer
    assert type(tokenizer).__name__ == "MistralTokenizer"  # vLLM's own, picked by vLLM
    assert type(mistral.engine._renderer).__name__ == "MistralRenderer"
    mistral.core.plan = lambda request: Plan(tokens=reply_ids(mistral, "Paris."))
    request = chat(("system", "Be brief."), ("user", "hi"), ("assistant", "Hello."), ("user", "Capital of France?"))
    result = await mistral.engine.generate(request)
    assert result.text == "Paris."

    prompt = mistral.core.requests[-1].prompt_token_ids
    assert prompt is not None
    reference = Reference.from_file(str(models["mistral"] / "tekken.json"))
    messages = [
        SystemMessage(content="Be brief."),
        UserMessage(content="hi"),
        AssistantMessage(content="Hello."),
        UserMessage(content="Capital of France?"),
    ]
    assert prompt == reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    control = {name: tokenizer.tokenizer.get_special_token(name) for name in ("<s>", "[INST]", "[/INST]", "</s>")}
    assert prompt[0] == control["<s>"]
    assert prompt.count(control["[INST]"]) == 2 and prompt.count(control["[/INST]"]) == 2
    assert result.usage.prompt_tokens == len(prompt)


async def test_mistral_rendering_to_text_and_encoding_again_was_the_bug(mistral: Served) -> None:
    """Why the adapter never encodes rendered text: a Mistral tokenizer reads its control
    tokens back as plain text, one id per byte here (in a real vocabulary, 16 ids where 8
    are right)."""
    tokenizer = mistral.engine._tokenizer
    messages = [{"role": "user", "content": "hi"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s>[INST]hi[/INST]"
    assert len(ids) == 5  # <s> [INST] h i [/INST]
    assert len(tokenizer.encode(text, add_special_tokens=False)) == len(text)  # 18, every control token spelled out
    assert await mistral.engine.count_tokens(MODEL_ID, (Message(role="user", content="hi"),)) == 5


async def test_messages_the_mistral_renderer_refuses_are_invalid(mistral: Served) -> None:
    sent = len(mistral.core.requests)
    with pytest.raises(InvalidRequest, match="chat template rejected"):
        await mistral.engine.generate(chat(("user", "hi"), ("assistant", "Hello.")))
    assert len(mistral.core.requests) == sent


# ------------------------------------------------------------------ engine-side errors
async def test_an_error_finish_raises_engine_failure_not_a_short_answer(chatml: Served, wait_until: Wait) -> None:
    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml), finish=FinishReason.ERROR, finish_after=3)
    texts: list[str] = []
    with pytest.raises(EngineFailure):
        async for chunk in chatml.engine.stream(hi()):
            texts.append(chunk.text)
    assert "".join(texts) == chatml.engine._tokenizer.decode(reply_ids(chatml)[:2])
    await wait_until(lambda: idle(chatml))


async def test_an_abort_vllm_made_raises_engine_unavailable(chatml: Served, wait_until: Wait) -> None:
    chatml.core.plan = lambda request: Plan(tokens=reply_ids(chatml), finish=FinishReason.ABORT, finish_after=2)
    with pytest.raises(EngineUnavailable, match="dropped") as dropped:
        await chatml.engine.generate(hi())
    assert dropped.value.retry_after == 1
    await wait_until(lambda: idle(chatml))


async def test_an_abort_by_request_id_from_outside_hoosh_raises(chatml: Served, wait_until: Wait) -> None:
    plan = Plan(tokens=reply_ids(chatml), hold_after=2)
    chatml.core.plan = lambda request: plan
    stream = chatml.engine.stream(hi())
    first = await anext(stream)
    assert first.text
    (external,) = chatml.engine._live
    await chatml.engine._engine.abort(external)  # e.g. vLLM's own API, an operator
    with pytest.raises(EngineUnavailable, match="dropped"):
        async for _ in stream:
            pass
    await wait_until(lambda: idle(chatml))


async def test_a_request_the_engine_turns_away_is_retryable(chatml: Served, wait_until: Wait) -> None:
    rejected = RequestError(code="engine_paused", message="The engine is paused.", retryable=True)
    chatml.core.plan = lambda request: Plan(tokens=[], reject=rejected)
    with pytest.raises(EngineUnavailable) as refused:
        await chatml.engine.generate(hi())
    assert refused.value.retry_after == 1
    await wait_until(lambda: idle(chatml))


async def test_a_dead_engine_core_makes_the_engine_unavailable(fresh: Served) -> None:
    plan = Plan(tokens=reply_ids(fresh), hold_after=1)
    fresh.core.plan = lambda request: plan
    stream = fresh.engine.stream(hi())
    await anext(stream)
    fresh.core.die()
    with pytest.raises(EngineUnavailable, match="not running"):
        async for _ in stream:
            pass
    with pytest.raises(EngineUnavailable, match="not running"):
        await fresh.engine.generate(hi())
    assert (fresh.engine.queue_depth, fresh.engine.active_requests) == (0, 0)


# ------------------------------------------------------------------- hoosh's own aborts
async def test_a_closed_stream_aborts_the_request_and_is_no_error(
    chatml: Served, wait_until: Wait, caplog: pytest.LogCaptureFixture
) -> None:
    plan = Plan(tokens=reply_ids(chatml), hold_after=2)
    chatml.core.plan = lambda request: plan
    with caplog.at_level(logging.WARNING):
        stream = chatml.engine.stream(hi())
        await anext(stream)
        await stream.aclose()  # the client went away
        sent = chatml.core.requests[-1].request_id
        await wait_until(lambda: sent in chatml.core.aborted and idle(chatml))
    assert sent not in chatml.core.finished
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_cancelled_task_aborts_the_request(chatml: Served, wait_until: Wait) -> None:
    plan = Plan(tokens=reply_ids(chatml), hold_after=2)
    chatml.core.plan = lambda request: plan
    task = asyncio.create_task(chatml.engine.generate(hi()))
    await wait_until(lambda: bool(chatml.core.running))
    sent = chatml.core.requests[-1].request_id
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: sent in chatml.core.aborted and idle(chatml))


async def test_concurrent_requests_each_get_their_own_answer(chatml: Served) -> None:
    words = ["one", "two", "three", "four", "five", "six"]

    def plan(request: object) -> Plan:
        prompt = chatml.engine._tokenizer.decode(request.prompt_token_ids)  # type: ignore[attr-defined]
        word = next(w for w in words if f"say {w}" in prompt)
        return Plan(tokens=reply_ids(chatml, f"{word} {word}"))

    chatml.core.plan = plan
    results = await asyncio.gather(*(chatml.engine.generate(chat(("user", f"say {w}"))) for w in words))
    assert [r.text for r in results] == [f"{w} {w}" for w in words]


# ---------------------------------------------------------------------------- shutdown
async def test_close_ends_open_streams_and_shuts_vllm_down(fresh: Served, wait_until: Wait) -> None:
    engine, core = fresh.engine, fresh.core
    plan = Plan(tokens=reply_ids(fresh), hold_after=1)
    core.plan = lambda request: plan
    stream = engine.stream(hi())
    await anext(stream)
    pending = asyncio.ensure_future(anext(stream))
    await engine.close()
    with pytest.raises(EngineUnavailable, match="shutting down"):
        await pending
    assert core.aborted == [core.requests[-1].request_id]
    assert core.shutdown_calls == 1
    handler = engine._engine.output_handler
    await wait_until(lambda: handler is None or handler.done())
    assert engine._engine.errored  # vLLM's own view: nothing runs any more
    await engine.close()  # idempotent
    assert core.shutdown_calls == 1
    with pytest.raises(EngineUnavailable, match="shutting down"):
        await engine.generate(hi())
