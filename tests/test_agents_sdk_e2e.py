"""The OpenAI Agents SDK's default agent through hoosh, as its users run it: ``Agent(...)``
with a function tool and ``Runner.run`` / ``Runner.run_streamed`` on the SDK's default
model, the Responses one (``POST /v1/responses``), with the SDK pointed at hoosh by
``set_default_openai_client`` and its trace export off. Over the local model (which has
no tool-call parser: the agent offers its tool with ``tool_choice: none``) and over the
Anthropic-format stand-in, where the function tool makes the whole round trip: the model
calls it, the SDK runs it, its output goes back through hoosh as Anthropic's
``tool_result`` and the model answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from agents import (
    Agent,
    AgentHooks,
    ModelSettings,
    RunContextWrapper,
    Runner,
    Tool,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.models.openai_provider import OpenAIProvider
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI

from .conftest import LOCAL_MODEL, RunningStack
from .test_responses_e2e import REPLY, make_key, upstream_last_body

TOOL_MODEL = "claude-tool-1"  # the Anthropic stand-in calls the first tool offered (bench/upstream.py: *tool*)
ANSWER_MODEL = "claude-3-haiku"  # the same stand-in, answering in text
FORECAST = "Sunny in {city}, 21 C"


@pytest.fixture
async def api_key(hoosh: RunningStack) -> AsyncIterator[str]:
    """The SDK's default client, aimed at hoosh with a key of its own; no trace export
    (it would go to OpenAI). A fresh client per test: each test has its own event loop."""
    key = make_key(hoosh)
    client = AsyncOpenAI(base_url=f"{hoosh.base_url}/v1", api_key=key, max_retries=0)
    set_tracing_disabled(True)
    set_default_openai_api("responses")  # the SDK's default; stated so a changed default shows here
    set_default_openai_client(client, use_for_tracing=False)
    try:
        yield key
    finally:
        await client.close()


def weather_tool(calls: list[str]) -> Tool:
    @function_tool
    def weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: The city's name.
        """
        calls.append(city)
        return FORECAST.format(city=city)

    return weather


class AnswerAfterTheTool(AgentHooks[Any]):
    """The stand-in (a model named *tool*) calls the first tool offered on every turn;
    once the tool has run the agent moves to the same stand-in under a name without that
    switch, which answers the tool's output in text as a real model would. The tools stay
    offered on that turn (Anthropic wants them whenever tool_use blocks are sent)."""

    async def on_tool_end(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool, result: object) -> None:
        agent.model = ANSWER_MODEL


def stored(hoosh: RunningStack, key: str, response_id: str) -> dict[str, Any]:
    """A response as hoosh stored it (any edge reads it from Redis), for this key."""
    reply = httpx.get(
        f"{hoosh.base_url}/v1/responses/{response_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def test_the_default_model_is_the_responses_model() -> None:
    model = OpenAIProvider(api_key="unused", base_url="http://127.0.0.1:9/v1").get_model(TOOL_MODEL)
    assert isinstance(model, OpenAIResponsesModel)


# --------------------------------------------------------------------------- the local model


async def test_agent_with_a_function_tool_over_the_local_model(hoosh: RunningStack, api_key: str) -> None:
    calls: list[str] = []
    agent = Agent(
        name="greeter",
        instructions="You are a friendly assistant. Answer in one short sentence.",
        model=LOCAL_MODEL,
        tools=[weather_tool(calls)],
        # SmolLM2 has no tool-call parser here: the tool is offered, the model told not to call it
        # (tool_choice auto would be a 400 naming the model). Room enough to stop on its own:
        # the SDK raises on an incomplete response.
        model_settings=ModelSettings(tool_choice="none", temperature=0, max_tokens=200),
    )
    result = await Runner.run(agent, "Say hello.", max_turns=2)
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert calls == []
    [raw] = result.raw_responses
    assert raw.response_id is not None and raw.response_id.startswith("resp_")
    assert raw.usage.output_tokens > 0 and raw.usage.input_tokens > 0
    body = stored(hoosh, api_key, raw.response_id)
    assert body["status"] == "completed" and body["model"] == LOCAL_MODEL
    assert body["output"][-1]["content"][0]["text"] == result.final_output
    assert [tool["name"] for tool in body["tools"]] == ["weather"] and body["tool_choice"] == "none"
    assert body["instructions"] == agent.instructions


async def test_streamed_agent_over_the_local_model(hoosh: RunningStack, api_key: str) -> None:
    agent = Agent(
        name="greeter",
        instructions="Answer in one short sentence.",
        model=LOCAL_MODEL,
        model_settings=ModelSettings(temperature=0, max_tokens=200),
    )
    result = Runner.run_streamed(agent, "Say hello.", max_turns=2)
    deltas = [
        event.data.delta
        async for event in result.stream_events()
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"
    ]
    assert deltas and "".join(deltas) == result.final_output
    assert result.last_response_id is not None
    assert stored(hoosh, api_key, result.last_response_id)["output"][-1]["content"][0]["text"] == result.final_output


# --------------------------------------------------------------------------- the Anthropic format


def assert_anthropic_round_trip(hoosh: RunningStack) -> None:
    """What the stand-in was sent on the last turn: the call as tool_use, the tool's output
    as tool_result answering it, the tool still offered."""
    assert hoosh.stand_ins is not None
    sent = upstream_last_body(hoosh.stand_ins.anthropic)
    assert sent["model"] == ANSWER_MODEL
    assert [tool["name"] for tool in sent["tools"]] == ["weather"]
    uses = [block for block in sent["messages"][-2]["content"] if block.get("type") == "tool_use"]
    assert [(use["name"], use["input"]) for use in uses] == [("weather", {"city": "Paris"})]
    [result] = sent["messages"][-1]["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == uses[0]["id"]
    content = result["content"]
    text = content if isinstance(content, str) else "".join(block["text"] for block in content)
    assert text == FORECAST.format(city="Paris")


async def test_agent_function_tool_round_trip_over_the_anthropic_format(hoosh: RunningStack, api_key: str) -> None:
    calls: list[str] = []
    agent = Agent(
        name="forecaster",
        instructions="Use the weather tool, then answer.",
        model=TOOL_MODEL,
        tools=[weather_tool(calls)],
        hooks=AnswerAfterTheTool(),
    )
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=3)
    assert calls == ["Paris"]
    assert result.final_output == REPLY
    assert [item.type for item in result.new_items] == [
        "message_output_item",  # the stand-in's "Let me check." beside its tool_use
        "tool_call_item",
        "tool_call_output_item",
        "message_output_item",
    ]
    assert_anthropic_round_trip(hoosh)
    first, second = result.raw_responses
    assert first.response_id and second.response_id and first.response_id != second.response_id
    # Both turns stored for this key; the second's input holds the call and its output.
    call = stored(hoosh, api_key, first.response_id)["output"][-1]
    assert call["type"] == "function_call" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert stored(hoosh, api_key, second.response_id)["output"][-1]["content"][0]["text"] == REPLY


async def test_streamed_agent_tool_round_trip_continued_by_previous_response_id(
    hoosh: RunningStack, api_key: str
) -> None:
    """Streamed, and with ``auto_previous_response_id`` the SDK sends each turn only its new
    items (the tool's output) and the previous response's id: hoosh rebuilds the
    conversation from Redis."""
    calls: list[str] = []
    agent = Agent(
        name="forecaster",
        instructions="Use the weather tool, then answer.",
        model=TOOL_MODEL,
        tools=[weather_tool(calls)],
        hooks=AnswerAfterTheTool(),
    )
    result = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=3, auto_previous_response_id=True)
    kinds = [
        event.data.type
        async for event in result.stream_events()
        if event.type == "raw_response_event" and event.data.type.startswith("response.")
    ]
    assert calls == ["Paris"]
    assert result.final_output == REPLY
    assert "response.function_call_arguments.delta" in kinds
    assert kinds.count("response.completed") == 2 and kinds.count("response.created") == 2
    assert_anthropic_round_trip(hoosh)
    assert result.last_response_id is not None
    last = stored(hoosh, api_key, result.last_response_id)
    assert last["previous_response_id"] is not None and last["previous_response_id"].startswith("resp_")
    items = httpx.get(
        f"{hoosh.base_url}/v1/responses/{result.last_response_id}/input_items",
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10,
    ).json()["data"]
    assert [item["type"] for item in items] == ["function_call_output"]  # only the new item was sent


# --------------------------------------------------------------------------- the SDK's own default model


async def test_an_agent_with_no_model_runs_on_the_sdks_default(hoosh: RunningStack, api_key: str) -> None:
    """No model named: the SDK picks its default GPT-5 model and its default settings
    (reasoning effort, verbosity low); hoosh routes it (``gpt-*``: the OpenAI-wire stand-in,
    through chat) and serves those settings rather than refusing them."""
    from agents.models import get_default_model, get_default_model_settings

    agent = Agent(name="plain", instructions="Be brief.")
    assert agent.model is None and get_default_model().startswith("gpt-5")
    assert get_default_model_settings().reasoning is not None  # what makes this test matter
    result = await Runner.run(agent, "Hello?", max_turns=1)
    assert result.final_output == REPLY
    [raw] = result.raw_responses
    body = stored(hoosh, api_key, raw.response_id or "")
    assert body["model"] == get_default_model() and body["status"] == "completed"
    assert body["reasoning"]["effort"] == get_default_model_settings().reasoning.effort  # type: ignore[union-attr]
