"""Check a request body before it reaches the Router, and keep only what a backend may see.

Only OpenAI's documented parameters pass. Anything that could point the request somewhere else or
change how LiteLLM behaves (`api_base`, `base_url`, `api_key`, `mock_response`, `metadata`, ...) is
refused with 400: LiteLLM would honour them, which is how a client could make the proxy call any URL
with any key (SSRF) or fake an answer.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from proxy.server.errors import ProxyError, bad_request
from serving.json_body import no_constants, without_lone_surrogates

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_TOKENS_LIMIT = 1 << 20
SEED_LIMIT = 1 << 63  # seeds are in [0, 2^63): what every backend takes (llama.cpp's and Ollama's are unsigned)
# client-settable parameters forwarded to the Router; the rest of OpenAI's list is accepted and dropped
FORWARDED = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "user", "tools",
             "tool_choice", "parallel_tool_calls", "response_format", "presence_penalty", "frequency_penalty",
             "logit_bias", "logprobs", "top_logprobs",
             # llama.cpp server's and Ollama's sampling controls, which local backends take (OpenAI's do not)
             "top_k", "min_p", "repeat_penalty", "repeat_last_n")
ACCEPTED = frozenset((*FORWARDED, "model", "messages", "prompt", "stream", "stream_options", "n", "store",
                      "service_tier", "modalities", "reasoning_effort", "prediction", "audio", "verbosity",
                      "suffix", "echo", "best_of", "web_search_options", "prompt_cache_key", "safety_identifier"))
# keys LiteLLM reads as routing or credentials; named in the error so the client knows why
REFUSED = frozenset(("api_base", "base_url", "api_key", "api_version", "custom_llm_provider", "organization",
                     "mock_response", "metadata", "litellm_metadata", "extra_headers", "headers", "timeout",
                     "num_retries", "fallbacks", "context_window_fallbacks", "model_list", "deployment_id",
                     "litellm_logging_obj", "aws_access_key_id", "aws_secret_access_key", "vertex_credentials",
                     "azure_ad_token", "input_cost_per_token", "output_cost_per_token", "caching", "cache"))


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object. orjson first for speed; the stdlib keeps lone surrogates orjson refuses."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            body = without_lone_surrogates(json.loads(raw.decode("utf-8"), parse_constant=no_constants))
        except UnicodeDecodeError as e:
            raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})") from e
        except RecursionError as e:
            raise bad_request("the request body nests too deeply") from e
        except ValueError as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def check_keys(body: dict[str, Any]) -> None:
    for key in body:
        if key in REFUSED:
            raise bad_request(f"'{key}' cannot be set by a client; the proxy decides where requests go", param=key)
        if key not in ACCEPTED:
            raise bad_request(f"unrecognized request argument supplied: {key}", param=key)


def check_model(body: dict[str, Any], known: set[str], aliases: list[str]) -> str:
    model = body.get("model")
    if model is None:
        raise bad_request("'model' is required: one of the task aliases " + ", ".join(aliases), param="model")
    if not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    if model not in known:
        shown = model if len(model) <= 80 else model[:77] + "..."
        raise ProxyError(404, f"the model '{shown}' does not exist; use one of the task aliases: {', '.join(aliases)}",
                         code="model_not_found", param="model")
    return model


def check_common(body: dict[str, Any]) -> None:
    """The sampling and streaming parameters shared by chat and legacy completions."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise bad_request(f"'{name}' must be a positive integer, got {value!r}", param=name)
            if value > MAX_TOKENS_LIMIT:
                raise bad_request(f"'{name}' is too large ({value}); at most {MAX_TOKENS_LIMIT}", param=name)
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0, low_open=True)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "min_p", 0.0, 1.0)
    _number(body, "repeat_penalty", 0.0, 10.0, low_open=True)
    for name, low, high in (("top_k", 0, 1 << 20), ("repeat_last_n", -1, 1 << 20)):
        value = body.get(name)
        if value is not None and (not _is_int(value) or not low <= value <= high):
            raise bad_request(f"'{name}' must be an integer from {low} to {high}, got {value!r}", param=name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object", "json_schema")
                                and (fmt["type"] != "json_schema" or isinstance(fmt.get("json_schema"), dict)
                                     and isinstance(fmt["json_schema"].get("schema", {}), dict))):
        raise bad_request("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                          "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                          param="response_format")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad_request("'logprobs' must be true or false", param="logprobs")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (not _is_int(top_logprobs) or not 0 <= top_logprobs <= 20):
        raise bad_request(f"'top_logprobs' must be an integer from 0 to 20, got {top_logprobs!r}", param="top_logprobs")
    bias = body.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or len(bias) > 1024 or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) and -100 <= v <= 100 for k, v in bias.items())):
        raise bad_request("'logit_bias' must map up to 1024 token ids to numbers from -100 to 100", param="logit_bias")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n < 1):
        raise bad_request(f"'n' must be a positive integer, got {n!r}", param="n")
    if n is not None and n > 1:
        raise bad_request("n > 1 is not supported: ask once per answer", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad_request("'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4
                                                             and all(isinstance(s, str) for s in stop))):
        raise bad_request("'stop' must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise bad_request(f"'seed' must be an integer from 0 to 2^63 - 1, got {seed!r}", param="seed")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("'user' must be a string", param="user")


def check_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        content = m.get("content")
        if content is None:
            if role != "assistant" or not (m.get("tool_calls") or m.get("function_call")):
                raise bad_request(f"{where}.content is required", param=f"{where}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise bad_request(f"{where}.content[{j}] must be an object with a 'type'", param=f"{where}.content")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise bad_request(f"{where}.content[{j}].text must be a string", param=f"{where}.content")
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise bad_request(f"{where}.tool_call_id is required for a tool message", param=f"{where}.tool_call_id")
        calls = m.get("tool_calls")
        if calls is not None and not (role == "assistant" and isinstance(calls, list) and all(_is_tool_call(c) for c in calls)):
            raise bad_request(f"{where}.tool_calls must be an assistant's list of {{\"id\": ..., \"type\": \"function\", "
                              f"\"function\": {{\"name\": ..., \"arguments\": \"<JSON text>\"}}}}", param=f"{where}.tool_calls")


def check_tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list", param="tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"] \
                or not isinstance(fn.get("parameters", {}), dict):
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                              f"\"parameters\": {{...}}}}}}", param=f"tools[{i}]")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") and not (
            isinstance(choice, dict) and isinstance(choice.get("function"), dict)):
        raise bad_request("'tool_choice' must be none, auto, required or {\"type\": \"function\", ...}",
                          param="tool_choice")


def _is_tool_call(call: Any) -> bool:
    fn = call.get("function") if isinstance(call, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments", ""), str) \
        and isinstance(call.get("id", ""), str)


def check_prompt(body: dict[str, Any]) -> None:
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if body.get(name) is not None:
            raise bad_request(f"'{name}' is for chat completions (/v1/chat/completions), not legacy completions",
                              param=name)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required", param="prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request("'prompt' must be a string (or a list holding one string)", param="prompt")
    elif not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string", param="prompt")


def forwarded(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in FORWARDED if body.get(k) is not None}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str, low: float, high: float, low_open: bool = False) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not low <= value <= high \
            or (low_open and value == low):
        above = f"above {low:g}" if low_open else f"from {low:g}"
        raise bad_request(f"'{name}' must be a number {above} to {high:g}, got {value!r}", param=name)
