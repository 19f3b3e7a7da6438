"""The real `anthropic` SDK against the real proxy and the real tinygrad backend (the bundled SmolLM2, 512 tokens
of context): Claude Code's haiku tier answered locally, sync, async and streaming, tools included.

The shipped config.yaml runs unchanged (conftest.real_proxy): `claude-haiku-*` maps to `quick`, whose chain
ends in the tinygrad backend. No Anthropic key is given, so nothing here can reach the cloud.
"""

from __future__ import annotations

import asyncio

import anthropic
import pytest

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
HAIKU = "claude-haiku-4-5"
GREEDY = {"temperature": 0}  # the SDK no longer has a `temperature` argument; the API still takes the field
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def sdk(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="sk-local", max_retries=0, timeout=300)


def test_sync(real_proxy: str) -> None:
    raw = sdk(real_proxy).messages.with_raw_response.create(model=HAIKU, max_tokens=10, extra_body=GREEDY, messages=PARIS)
    message = raw.parse()
    assert message.id.startswith("msg_") and message.stop_reason in ("end_turn", "max_tokens")
    assert "Paris" in message.content[0].text  # type: ignore[union-attr]
    assert message.usage.input_tokens > 10 and message.usage.output_tokens >= 1
    assert raw.headers["x-delegate-alias"] == "quick" and raw.headers["x-delegate-served-by"] == "tinygrad/smollm2"


def test_async_and_streaming(real_proxy: str) -> None:
    async def run() -> tuple[anthropic.types.Message, list[str], list[int | None], anthropic.types.Message]:
        c = anthropic.AsyncAnthropic(base_url=real_proxy, api_key="sk-local", max_retries=0, timeout=300)
        whole = await c.messages.create(model=HAIKU, max_tokens=10, extra_body=GREEDY, messages=PARIS)
        kinds, inputs = [], []
        async with c.messages.stream(model=HAIKU, max_tokens=10, extra_body=GREEDY, messages=PARIS) as s:
            async for ev in s:
                kinds.append(ev.type)
                if ev.type == "message_start":
                    inputs.append(ev.message.usage.input_tokens)
                elif ev.type == "message_delta":
                    inputs.append(ev.usage.input_tokens)
            final = await s.get_final_message()
        return whole, kinds, inputs, final

    whole, kinds, inputs, final = asyncio.run(run())
    assert final.content[0].text == whole.content[0].text  # type: ignore[union-attr]  # greedy: the same answer
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds
    assert final.usage.input_tokens == whole.usage.input_tokens and final.usage.output_tokens >= 1
    # message_start already says how long the prompt is (the backend counted it as the stream opened), and
    # message_delta says it again with the output tokens
    assert inputs == [whole.usage.input_tokens, whole.usage.input_tokens]


@pytest.mark.parametrize("request_", [
    {"messages": PARIS},
    {"messages": PARIS, "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
     "tools": [WEATHER]},
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"},
                  {"role": "assistant", "content": [
                      {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}]}],
     "tools": [WEATHER], "tool_choice": {"type": "auto"}},
], ids=["plain", "system-and-tools", "tool-round"])
def test_count_tokens_is_the_input_tokens_the_request_is_served_with(real_proxy: str, request_: dict) -> None:
    """Counted by the backend that serves it (the quick chain's Ollama cannot be reached here), with its own
    tokenizer and template, on the translation /v1/messages makes: the count is the served usage, never a guess."""
    c = sdk(real_proxy)
    counted = c.messages.with_raw_response.count_tokens(model=HAIKU, **request_)
    served = c.messages.create(model=HAIKU, max_tokens=1, extra_body=GREEDY, **request_)
    assert counted.parse().input_tokens == served.usage.input_tokens > 10
    assert counted.headers["x-delegate-served-by"] == "tinygrad/smollm2" and counted.headers["x-delegate-alias"] == "quick"


def test_tool_use_from_the_local_model(real_proxy: str) -> None:
    c = sdk(real_proxy)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    message = c.messages.create(model=HAIKU, max_tokens=40, extra_body=GREEDY, messages=ask, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"})
    assert message.stop_reason == "tool_use"
    call = next(b for b in message.content if b.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input, dict) and "city" in call.input  # type: ignore[union-attr]
    assert call.id  # type: ignore[union-attr]
    # streamed: the arguments arrive as input_json_delta
    deltas = []
    with c.messages.stream(model=HAIKU, max_tokens=40, extra_body=GREEDY, messages=ask, tools=[WEATHER],
                           tool_choice={"type": "tool", "name": "get_weather"}) as s:
        for ev in s:
            if ev.type == "content_block_delta":
                deltas.append(ev.delta.type)
        streamed = s.get_final_message()
    assert "input_json_delta" in deltas and streamed.stop_reason == "tool_use"
    assert next(b for b in streamed.content if b.type == "tool_use").input == call.input  # type: ignore[union-attr]
    # the result goes back as a tool_result block
    again = c.messages.create(model=HAIKU, max_tokens=10, extra_body=GREEDY, tools=[WEATHER], messages=[
        *ask, {"role": "assistant", "content": [b.model_dump() for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]}])  # type: ignore[union-attr]
    assert again.content and again.usage.output_tokens >= 1


def test_claude_code_shaped_request_served_locally(real_proxy: str) -> None:
    c = anthropic.Anthropic(base_url=real_proxy, api_key="sk-local", max_retries=0, timeout=300,
                            default_headers={"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"})
    message = c.messages.create(
        model="claude-haiku-4-5-20251001", max_tokens=10, extra_body=GREEDY,
        system=[{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        metadata={"user_id": "user_1_account__session_2"}, tools=[WEATHER],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi.",
                                                "cache_control": {"type": "ephemeral"}}]}])
    assert message.content and message.usage.input_tokens > 0
