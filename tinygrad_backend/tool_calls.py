"""Tool calls: the tools a request offers, how the model is told of them, the grammar its call follows, and the
`tool_calls` read back out of what it wrote.

One format on the wire to the model, Hermes' (Qwen2.5's): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>`. A template that renders tools itself (it mentions `tools` and `tool_calls`, as Qwen2.5's does) gets
the request's tools and messages as Hugging Face's templates expect them; for one that does not (SmolLM2's
ChatML), the tools are described in the system message in Qwen2.5's words, earlier calls are written back in
the same markup and tool results come back as `<tool_response>` user turns, so the model sees one format.

`tool_choice`: `none` leaves the tools out; `required` and a named function hold the whole answer to a call
whose arguments validate against the function's parameters; `auto` lets the model write, and holds it to the
tools' schemas from the moment it opens `<tool_call>` (a lazy grammar). Either way the client gets `tool_calls`,
never the markup. One call per answer.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tinygrad_backend.constraints import TOOL_CLOSE, TOOL_OPEN, Constraint, Grammars, json_rule
from tinygrad_backend.errors import APIError

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_TOOLS = 128
_HERMES = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class Tools:
    """A request's tools, checked, and what its tool_choice asks: `none`, `auto`, `required`, or a function name."""

    functions: dict[str, dict[str, Any]]  # name -> the OpenAI `function` object
    choice: str
    named: str | None = None

    @property
    def offered(self) -> bool:
        return bool(self.functions) and self.choice != "none"

    def schema(self) -> dict[str, Any]:
        """The JSON schema of one call: {"name": <a function>, "arguments": <its parameters>}."""
        names = [self.named] if self.named else list(self.functions)
        options = [{"type": "object", "properties": {"name": {"const": n}, "arguments": _parameters(self.functions[n])},
                    "required": ["name", "arguments"], "additionalProperties": False} for n in names]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def constraint(self, grammars: Grammars) -> Constraint | None:
        """The grammar the answer follows: the whole of it for `required` or a named function, and for `auto`
        what follows an opening `<tool_call>`."""
        if not self.offered:
            return None
        call = f"call: {json_rule(self.schema())}\n"
        close = grammars.token_ref(TOOL_CLOSE)
        if self.choice == "auto":
            return grammars.lark(f'start: /\\n?/ call /\\n?/ {close}\n{call}', trigger=TOOL_OPEN)
        return grammars.lark(f'start: {grammars.token_ref(TOOL_OPEN)} "\\n" call "\\n" {close}\n{call}')


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}


def read_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, param: str = "tools") -> Tools | None:
    """The request's tools in OpenAI's shape (Ollama's is the same), or a 400 naming what is wrong."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"at most {MAX_TOOLS} tools", param=param)
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"{param}[{i}] must be {{'type': 'function', 'function': {{...}}}}", param=param)
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(400, f"{param}[{i}].function.name must be 1-64 letters, digits, '_', '.', ':' or '-'",
                           param=param)
        if name in functions:
            raise APIError(400, f"{param}: the function name {name!r} appears twice", param=param)
        if fn.get("parameters") is not None and not isinstance(fn.get("parameters"), dict):
            raise APIError(400, f"{param}[{i}].function.parameters must be a JSON schema object", param=param)
        functions[name] = fn
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return Tools(functions, tool_choice or "auto")
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        named = (tool_choice.get("function") or {}).get("name")
        if named not in functions:
            raise APIError(400, f"tool_choice names the function {named!r}, which is not among the tools",
                           param="tool_choice")
        return Tools(functions, "function", named)
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                   "{'name': ...}}", param="tool_choice")


# --- the prompt -------------------------------------------------------------------------------------------


def template_renders_tools(source: str) -> bool:
    return "tool_calls" in source and "tools" in source


def prompt_messages(messages: list[dict[str, Any]], tools: Tools | None, native: bool) -> list[dict[str, Any]]:
    """The messages as the template should see them. `native`: the template renders tools and tool calls itself
    (it gets arguments as objects, Hugging Face's convention); otherwise they are written in Hermes' markup."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if m.get("role") == "assistant" else None
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise APIError(400, f"messages[{i}].tool_calls must be a list of tool calls, as the model returned them",
                           param=f"messages[{i}].tool_calls")
        if native:
            out.append({**m, "tool_calls": [_native_call(c) for c in calls]} if calls else m)
        elif calls:
            text = m.get("content") if isinstance(m.get("content"), str) else ""
            blocks = [f"{TOOL_OPEN}\n{json.dumps(_call_body(c), ensure_ascii=False)}\n{TOOL_CLOSE}" for c in calls]
            out.append({"role": "assistant", "content": "\n".join(([text] if text else []) + blocks)})
        elif m.get("role") == "tool":
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            out.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        else:
            out.append(m)
    if tools is not None and tools.offered and not native:
        described = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                              for f in tools.functions.values())
        system = _HERMES.format(tools=described)
        if out and out[0].get("role") in ("system", "developer") and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _call_body(call: Any) -> dict[str, Any]:
    fn = call.get("function", call) if isinstance(call, dict) else {}
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"name": fn.get("name"), "arguments": args}


def _native_call(call: Any) -> dict[str, Any]:
    body = _call_body(call)
    return {"type": "function", "function": body, **({"id": call["id"]} if isinstance(call, dict) and "id" in call else {})}


def template_tools(tools: Tools | None) -> list[dict[str, Any]] | None:
    if tools is None or not tools.offered:
        return None
    return [{"type": "function", "function": f} for f in tools.functions.values()]


# --- the answer -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return {"index": index, **out} if index is not None else out

    def ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments}}


def parse_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The text outside `<tool_call>` blocks, and the calls inside them. A block that is cut short (the answer
    ran out of tokens) or does not parse is dropped: the client never gets the markup."""
    calls: list[ToolCall] = []
    content: list[str] = []
    rest = text
    while True:
        start = rest.find(TOOL_OPEN)
        if start < 0:
            content.append(rest)
            break
        content.append(rest[:start])
        end = rest.find(TOOL_CLOSE, start)
        body = rest[start + len(TOOL_OPEN): end if end >= 0 else len(rest)]
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("name"), str):
            args = parsed.get("arguments", {})
            calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", parsed["name"], args if isinstance(args, dict) else {}))
        if end < 0:
            break
        rest = rest[end + len(TOOL_CLOSE):]
    return "".join(content).strip() if calls else "".join(content), calls


class ToolStream:
    """Splits a streamed answer into the content a client may see now and the tool call markup it must not:
    text that might be the start of `<tool_call>` is held back until it is clearly not."""

    def __init__(self) -> None:
        self._held = ""
        self._in_call = False
        self.markup = ""

    def feed(self, text: str) -> str:
        if self._in_call:
            self.markup += text
            return ""
        self._held += text
        at = self._held.find(TOOL_OPEN)
        if at >= 0:
            out, self.markup, self._in_call = self._held[:at], self._held[at:], True
            self._held = ""
            return out
        keep = next((k for k in range(min(len(TOOL_OPEN) - 1, len(self._held)), 0, -1)
                     if self._held.endswith(TOOL_OPEN[:k])), 0)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The held-back text that turned out to be content, and the calls."""
        held, self._held = self._held, ""
        if not self._in_call:
            return held, []
        _, calls = parse_calls(self.markup)
        return held, calls
