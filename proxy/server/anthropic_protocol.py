"""Anthropic's Messages API: the request's shape, what a local model can take of it, the translation to and
from OpenAI's (LiteLLM's own adapter), the stream's events, and errors in Anthropic's shape.

What a local deployment cannot take, as rules (a request refused locally that came through a Claude tier goes
to that Claude model instead when a key is available; see messages.py):

- refused: image and document blocks (in a message or a tool_result), and Anthropic's server tools (web
  search, code execution, bash, text editor, computer: any tool whose `type` is not `custom`); the local
  models read text and call the caller's own tools only.
- dropped: extended thinking (`thinking`, and thinking / redacted_thinking blocks in earlier turns),
  `cache_control` (accepted anywhere, meaningless locally), and the Anthropic-only fields a local model has no
  use for (`service_tier`, `container`, `mcp_servers`, `context_management`, ...).
- `stop_reason`: `end_turn`, `max_tokens` or `tool_use`. A local answer that ended at one of
  `stop_sequences` says `end_turn`: OpenAI-compatible backends do not say which stop ended an answer.

Errors: `{"type": "error", "error": {"type": ..., "message": ...}}` with Anthropic's statuses and type names;
a 503 (nothing can answer now) is Anthropic's 529 overloaded_error.
"""

from __future__ import annotations

import json
import uuid
import warnings
from typing import Any

from starlette.responses import Response

from proxy.server.errors import ProxyError
from proxy.server.responses import dumps

# LiteLLM's Anthropic types build pydantic schemas on first use, and pydantic warns about each ReadOnly item in
# them: noise in the proxy's log on the first request, nothing to act on
warnings.filterwarnings("ignore", message=r".*using the `ReadOnly` qualifier", category=UserWarning)

# the Messages API fields a local deployment is given; everything else is dropped (the rules above)
LOCAL_FIELDS = ("model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k",
                "tools", "tool_choice", "metadata")
TEXT_ONLY_BLOCKS = ("image", "document", "search_result", "container_upload")
DROPPED_BLOCKS = ("thinking", "redacted_thinking")
ROLES = ("user", "assistant")
TOOL_CHOICES = ("auto", "any", "tool", "none")

# status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error", 500: "api_error",
               502: "api_error", 504: "timeout_error", 529: "overloaded_error"}


# --- errors --------------------------------------------------------------------------------------------

def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def anthropic_status(err: ProxyError) -> int:
    return 529 if err.status == 503 else err.status


def error_response(err: ProxyError, headers: dict[str, str] | None = None) -> Response:
    """A ProxyError (admission's, the chain's, ours) in Anthropic's shape and status."""
    status = anthropic_status(err)
    return Response(dumps(error_body(status, err.message)), status_code=status, media_type="application/json",
                    headers={**err.headers(), **(headers or {})})


def invalid(message: str) -> ProxyError:
    return ProxyError(400, message)


# --- the request ---------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_model(body: dict[str, Any]) -> str:
    """The one field a request that passes through to Anthropic needs here (Anthropic checks the rest)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: field required, a model name (e.g. claude-haiku-4-5) or a Delegate alias")
    return model


def check_request(body: dict[str, Any]) -> None:
    """What a request served here needs, checked as Anthropic does (400 naming the field)."""
    check_messages(body)
    system = body.get("system")
    if system is not None and not isinstance(system, str) and not (
            isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                             and isinstance(b.get("text"), str) for b in system)):
        raise invalid("system: a string, or a list of {\"type\": \"text\", \"text\": ...} blocks")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools: a list of tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
                raise invalid(f"tools.{i}.name: field required")
            if tool.get("type") in (None, "custom") and not isinstance(tool.get("input_schema"), dict):
                raise invalid(f"tools.{i}.input_schema: field required, a JSON schema object")
    choice = body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") in TOOL_CHOICES):
        raise invalid("tool_choice: {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}")
    if isinstance(choice, dict) and choice.get("type") == "tool" and not isinstance(choice.get("name"), str):
        raise invalid("tool_choice.name: field required for {\"type\": \"tool\"}")


def check_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: field required, a non-empty list of {\"role\", \"content\"}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise invalid(f"messages.{i}.role: 'user' or 'assistant'")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(isinstance(b, dict) and isinstance(b.get("type"), str)
                                                    for b in content):
            raise invalid(f"messages.{i}.content: a string, or a list of content blocks each with a 'type'")


def check_generation(body: dict[str, Any]) -> None:
    """What /v1/messages needs beyond what count_tokens does."""
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid("max_tokens: field required, an integer of at least 1")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise invalid("stop_sequences: a list of strings")
    for name in ("temperature", "top_p"):
        if body.get(name) is not None and not _is_number(body[name]):
            raise invalid(f"{name}: a number")
    if body.get("top_k") is not None and (not _is_int(body["top_k"]) or body["top_k"] < 0):
        raise invalid("top_k: an integer of at least 0")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise invalid("stream: true or false")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise invalid("metadata: an object (e.g. {\"user_id\": ...})")


# --- what a local model can take -------------------------------------------------------------------------

def _blocks(content: Any) -> list[dict[str, Any]]:
    return content if isinstance(content, list) else []


def local_refusal(body: dict[str, Any]) -> str | None:
    """Why no local model can take this request (the rules above), or None."""
    for m in body["messages"]:
        for block in _blocks(m.get("content")):
            inner = _blocks(block.get("content")) if block.get("type") == "tool_result" else []
            kinds = [block.get("type"), *(b.get("type") for b in inner if isinstance(b, dict))]
            found = next((k for k in kinds if k in TEXT_ONLY_BLOCKS), None)
            if found:
                return f"the local models read text only; this request carries a {found} block"
    for tool in body.get("tools") or []:
        if tool.get("type") not in (None, "custom"):
            return f"the local models cannot run Anthropic's server tool {tool.get('name')!r} ({tool.get('type')})"
    return None


def _uncached(block: Any) -> Any:
    """A block without its cache_control, and so its nested tool_result blocks."""
    if not isinstance(block, dict):
        return block
    out = {k: v for k, v in block.items() if k != "cache_control"}
    if isinstance(out.get("content"), list):
        out["content"] = [_uncached(b) for b in out["content"]]
    return out


def local_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as a local model is given it: the fields it can use, earlier thinking and every cache_control
    left out."""
    out = {k: body[k] for k in LOCAL_FIELDS if body.get(k) is not None}
    messages = []
    for m in body["messages"]:
        content = m.get("content")
        if isinstance(content, list):
            content = [_uncached(b) for b in content if b.get("type") not in DROPPED_BLOCKS] or ""
        messages.append({**m, "content": content})
    out["messages"] = messages
    if isinstance(out.get("system"), list):
        out["system"] = [_uncached(b) for b in out["system"]]
    if out.get("tools"):
        out["tools"] = [_uncached(t) for t in out["tools"]]
    if out.get("tool_choice", {}).get("type") == "none":  # LiteLLM's adapter has no `none`: no tools offered
        out.pop("tool_choice")
        out.pop("tools", None)
    return out


def to_openai(body: dict[str, Any], provider: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """LiteLLM's own Anthropic -> OpenAI translation of the local body: (chat kwargs without the model, the
    mapping back from tool names it had to shorten)."""
    from litellm.llms.anthropic.messages.adapters.transformation import AnthropicAdapter

    try:
        request, mapping = AnthropicAdapter().translate_completion_input_params_with_tool_mapping(
            local_body(body), custom_llm_provider=provider, drop_params=True)
    except Exception as e:  # LiteLLM's adapter refuses a malformed block in its own words
        raise invalid(f"messages: this request cannot be translated for a local model: {e}"[:500]) from e
    if request is None:
        raise invalid("messages: this request cannot be translated for a local model")
    kwargs = {k: v for k, v in dict(request).items()
              if k not in ("model", "reasoning_effort", "thinking") and v is not None}
    return kwargs, mapping


# --- the answer ----------------------------------------------------------------------------------------

def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def usage_dict(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def to_message(result: Any, model: str, mapping: dict[str, str]) -> dict[str, Any]:
    """An OpenAI-shaped answer (LiteLLM's ModelResponse) as an Anthropic message, by LiteLLM's adapter."""
    from litellm.llms.anthropic.messages.adapters.transformation import AnthropicAdapter

    translated = AnthropicAdapter().translate_completion_output_params(result, tool_name_mapping=mapping) or {}
    message: dict[str, Any] = dict(translated)
    usage: dict[str, Any] = dict(message.get("usage") or {})
    return {"id": message_id(), "type": "message", "role": "assistant", "model": model,
            "content": message.get("content") or [], "stop_reason": message.get("stop_reason") or "end_turn",
            "stop_sequence": message.get("stop_sequence"),
            "usage": usage_dict(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))}


def event(data: dict[str, Any]) -> bytes:
    """One server-sent event as Anthropic writes it: the event name, then its data."""
    return b"event: " + str(data.get("type", "message")).encode() + b"\ndata: " + dumps(data) + b"\n\n"


PING = event({"type": "ping"})


def stream_error(status: int, message: str) -> bytes:
    """Anthropic's error event, for a stream that fails after it began."""
    return event(error_body(status, message))


def is_messages_path(path: str) -> bool:
    """A route of this API, whose errors (even the router's own 404 and 405) are in Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def message_events(message: dict[str, Any]) -> bytes:
    """A whole message as Anthropic's event stream, for a stream held back until its answer was checked: each
    block opened, its content in one delta, closed; then the stop reason and usage, as a live stream sends them."""
    usage = message.get("usage") or usage_dict(0, 0)
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 0}}
    out = [event({"type": "message_start", "message": start})]
    for i, block in enumerate(message.get("content") or []):
        if block.get("type") == "tool_use":
            opened = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block.get("input") or {})}
        else:
            opened = {**block, "text": ""}
            delta = {"type": "text_delta", "text": block.get("text") or ""}
        out.append(event({"type": "content_block_start", "index": i, "content_block": opened}))
        if i == 0:
            out.append(PING)
        out.append(event({"type": "content_block_delta", "index": i, "delta": delta}))
        out.append(event({"type": "content_block_stop", "index": i}))
    if not message.get("content"):
        out.append(PING)
    out.append(event({"type": "message_delta", "delta": {"stop_reason": message.get("stop_reason"),
                                                         "stop_sequence": message.get("stop_sequence")},
                      "usage": usage}))
    out.append(event({"type": "message_stop"}))
    return b"".join(out)
