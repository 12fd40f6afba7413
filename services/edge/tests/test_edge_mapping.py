"""The OpenAI <-> router mapping: request to router_pb2.ChatRequest, replies to OpenAI JSON."""

from __future__ import annotations

from typing import Any

import orjson
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2
from hoosh_edge.protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from hoosh_edge.serving_chat import chunk_to_dict, completion_to_dict, to_router_request


def parse(body: dict[str, Any]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(body)


def test_full_request_maps_exactly() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    req = parse(
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
                {
                    "role": "user",
                    "name": "ann",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "high"}},
                        {"type": "input_audio", "input_audio": {"data": "AAA=", "format": "mp3"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "weather", "description": "d", "parameters": schema, "strict": False},
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "parallel_tool_calls": True,
            "max_tokens": 5,
            "max_completion_tokens": 50,
            "temperature": 0.5,
            "top_p": 0.25,
            "stop": ["x", "y"],
            "seed": -7,
            "user": "u-1",
            "stream": True,
            "stream_options": {"include_usage": True},
            "presence_penalty": 1.5,
            "frequency_penalty": -0.5,
            "response_format": {"type": "json_object"},
            "pool": "team-a",
        }
    )
    expected = router_pb2.ChatRequest(
        request_id="rid-1",
        model="gpt-4o",
        messages=[
            chat_pb2.ChatMessage(role="system", text="sys"),
            chat_pb2.ChatMessage(
                role="developer", parts=chat_pb2.ContentParts(parts=[chat_pb2.ContentPart(text="dev")])
            ),
            chat_pb2.ChatMessage(
                role="user",
                name="ann",
                parts=chat_pb2.ContentParts(
                    parts=[
                        chat_pb2.ContentPart(text="look"),
                        chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url="https://x/y.png", detail="high")),
                        chat_pb2.ContentPart(input_audio=chat_pb2.InputAudio(data="AAA=", format="mp3")),
                    ]
                ),
            ),
            chat_pb2.ChatMessage(
                role="assistant",
                tool_calls=[
                    chat_pb2.ToolCall(
                        id="call_1", type="function", function=chat_pb2.FunctionCall(name="weather", arguments="{}")
                    )
                ],
            ),
            chat_pb2.ChatMessage(role="tool", text="sunny", tool_call_id="call_1"),
        ],
        sampling=chat_pb2.SamplingParams(
            max_tokens=50,
            temperature=0.5,
            top_p=0.25,
            stop=["x", "y"],
            seed=-7,
            presence_penalty=1.5,
            frequency_penalty=-0.5,
        ),
        tools=[
            chat_pb2.Tool(
                type="function",
                function=chat_pb2.FunctionDefinition(
                    name="weather", description="d", parameters_json=orjson.dumps(schema).decode(), strict=False
                ),
            )
        ],
        tool_choice=chat_pb2.ToolChoice(mode=chat_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="weather"),
        parallel_tool_calls=True,
        user="u-1",
        pool="team-a",
        include_usage=True,
        response_format_json='{"type":"json_object"}',
    )
    mapped = to_router_request(req, "rid-1")
    assert mapped == expected
    # The assistant turn's content is absent (JSON null), not an empty string.
    assert mapped.messages[3].WhichOneof("content") is None
    assert mapped.tools[0].function.HasField("strict")


def test_minimal_request_sets_no_optional_field() -> None:
    mapped = to_router_request(parse({"model": "m", "messages": [{"role": "user", "content": ""}]}), "r")
    assert mapped == router_pb2.ChatRequest(
        request_id="r", model="m", pool="default", messages=[chat_pb2.ChatMessage(role="user", text="")]
    )
    assert mapped.messages[0].WhichOneof("content") == "text"  # "" is content, not null
    sampling = mapped.sampling
    for name in ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        assert not sampling.HasField(name), name
    assert not mapped.HasField("parallel_tool_calls")
    assert not mapped.HasField("tool_choice")
    assert mapped.include_usage is False


def test_max_tokens_alone_stop_string_and_tool_choice_modes() -> None:
    mapped = to_router_request(
        parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 9, "stop": "END"}), "r"
    )
    assert mapped.sampling.max_tokens == 9
    assert list(mapped.sampling.stop) == ["END"]
    for name, mode in [
        ("none", chat_pb2.TOOL_CHOICE_MODE_NONE),
        ("auto", chat_pb2.TOOL_CHOICE_MODE_AUTO),
        ("required", chat_pb2.TOOL_CHOICE_MODE_REQUIRED),
    ]:
        req = parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": name})
        assert to_router_request(req, "r").tool_choice == chat_pb2.ToolChoice(mode=mode)


def test_include_usage_only_when_streaming() -> None:
    req = parse(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": False},
        }
    )
    assert to_router_request(req, "r").include_usage is False


def test_assistant_refusal_travels_as_a_part() -> None:
    req = parse({"model": "m", "messages": [{"role": "assistant", "content": "a", "refusal": "no"}]})
    assert to_router_request(req, "r").messages[0] == chat_pb2.ChatMessage(
        role="assistant",
        parts=chat_pb2.ContentParts(parts=[chat_pb2.ContentPart(text="a"), chat_pb2.ContentPart(refusal="no")]),
    )


# --------------------------------------------------------------------------- replies


def test_completion_with_text() -> None:
    reply = router_pb2.ChatResponse(
        id="ignored",
        model="m-served",
        created=1700000000,
        choices=[
            chat_pb2.Choice(index=0, message=chat_pb2.ChatMessage(role="assistant", text="hi"), finish_reason="length")
        ],
        usage=chat_pb2.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5, cached_tokens=1, cost_usd_micros=9),
        system_fingerprint="fp_1",
    )
    body = completion_to_dict(reply, completion_id="chatcmpl-r", model="m")
    assert body == {
        "id": "chatcmpl-r",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m-served",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 1},
            "cost_usd_micros": 9,
        },
        "system_fingerprint": "fp_1",
    }
    ChatCompletionResponse.model_validate(body)


def test_completion_with_only_tool_calls_has_null_content() -> None:
    reply = router_pb2.ChatResponse(
        choices=[
            chat_pb2.Choice(
                message=chat_pb2.ChatMessage(
                    role="assistant",
                    tool_calls=[
                        chat_pb2.ToolCall(
                            id="c1", type="function", function=chat_pb2.FunctionCall(name="f", arguments='{"a":1}')
                        )
                    ],
                ),
                finish_reason="tool_calls",
            )
        ]
    )
    body = completion_to_dict(reply, completion_id="chatcmpl-r", model="requested")
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
    }
    assert body["model"] == "requested"
    assert "system_fingerprint" not in body
    assert body["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0},
        "cost_usd_micros": 0,
    }
    ChatCompletionResponse.model_validate(body)


def test_completion_parts_split_text_and_refusal() -> None:
    reply = router_pb2.ChatResponse(
        choices=[
            chat_pb2.Choice(
                message=chat_pb2.ChatMessage(
                    parts=chat_pb2.ContentParts(
                        parts=[chat_pb2.ContentPart(text="a"), chat_pb2.ContentPart(refusal="no")]
                    )
                ),
                finish_reason="stop",
            )
        ]
    )
    message = completion_to_dict(reply, completion_id="c", model="m")["choices"][0]["message"]
    assert (message["content"], message["refusal"]) == ("a", "no")


def _chunk(**fields: Any) -> router_pb2.ChatStreamResponse:
    return router_pb2.ChatStreamResponse(id="x", model="m", created=5, **fields)


def test_first_chunk_carries_role_and_unset_fields_are_left_out() -> None:
    first = _chunk(choices=[chat_pb2.ChunkChoice(delta=chat_pb2.Delta(role="assistant", content=""))])
    body = chunk_to_dict(first, chunk_id="chatcmpl-r", created=5, model="m", include_usage=False)
    assert body == {
        "id": "chatcmpl-r",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ],
    }
    last = _chunk(choices=[chat_pb2.ChunkChoice(delta=chat_pb2.Delta(), finish_reason="stop")])
    body = chunk_to_dict(last, chunk_id="chatcmpl-r", created=5, model="m", include_usage=False)
    assert body is not None
    assert body["choices"][0]["delta"] == {}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in body
    ChatCompletionChunk.model_validate(body)


def test_usage_null_on_every_chunk_but_the_usage_chunk() -> None:
    content = _chunk(choices=[chat_pb2.ChunkChoice(delta=chat_pb2.Delta(content="hi"))])
    usage = _chunk(usage=chat_pb2.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    body = chunk_to_dict(content, chunk_id="c", created=5, model="m", include_usage=True)
    assert body is not None and body["usage"] is None
    body = chunk_to_dict(usage, chunk_id="c", created=5, model="m", include_usage=True)
    assert body is not None
    assert body["choices"] == []
    assert body["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 0},
        "cost_usd_micros": 0,
    }
    ChatCompletionChunk.model_validate(body)
    # Without include_usage a usage-only message is not sent at all.
    assert chunk_to_dict(usage, chunk_id="c", created=5, model="m", include_usage=False) is None


def test_tool_call_deltas() -> None:
    message = _chunk(
        choices=[
            chat_pb2.ChunkChoice(
                delta=chat_pb2.Delta(
                    tool_calls=[
                        chat_pb2.ToolCallDelta(
                            index=0, id="call_1", type="function", function=chat_pb2.FunctionCall(name="f")
                        ),
                        chat_pb2.ToolCallDelta(index=1, function=chat_pb2.FunctionCall(arguments='{"a"')),
                    ]
                )
            )
        ]
    )
    body = chunk_to_dict(message, chunk_id="c", created=5, model="m", include_usage=False)
    assert body is not None
    assert body["choices"][0]["delta"] == {
        "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}},
            {"index": 1, "function": {"arguments": '{"a"'}},
        ]
    }
    ChatCompletionChunk.model_validate(body)
