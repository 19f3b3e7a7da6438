"""What both HTTP APIs share: the loaded model's card, prompt building, and running a generation.

The OpenAI routes and the Ollama routes differ only in request and response shapes; everything about
the model (its name, its template, its context, how a prompt becomes token ids) lives here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from typing import Annotated, Any

from pydantic import Field

from tinygrad_backend.chat_template import ChatTemplate, TemplateError
from tinygrad_backend.constraints import Constraint, GrammarError, Grammars
from tinygrad_backend.engine import (
    ContextLengthExceeded,
    Engine,
    Event,
    Finished,
    Generation,
    NotReady,
    QueueFull,
    TextDelta,
    TokenLogprob,
)
from tinygrad_backend.errors import APIError
from tinygrad_backend.gguf_file import GGUFHeader
from tinygrad_backend.sampling import SamplingParams
from tinygrad_backend.tokenizer import GGUFTokenizer
from tinygrad_backend.tool_calls import Tools, prompt_messages, template_renders_tools, template_tools

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
MAX_LOGIT_BIAS = 1024
MAX_STOPS, MAX_STOP_CHARS = 16, 1000  # each generated token is matched against every stop string
Stops = Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)]


class Backend:
    def __init__(self, model_id: str, header: GGUFHeader, tokenizer: GGUFTokenizer, template: ChatTemplate,
                 engine: Engine, max_context: int) -> None:
        self.model_id, self.header, self.tokenizer, self.template = model_id, header, tokenizer, template
        self.engine, self.max_context = engine, max_context
        self.created = int(time.time())
        self.grammars = Grammars(tokenizer)
        self.native_tools = template_renders_tools(template.source)  # the template writes tools and calls itself

    # --- the model ---------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        """Requests name the model they want; answer 404 for any other, as Ollama and OpenAI do."""
        if not name or name in (self.model_id, f"{self.model_id}:latest", f"tinygrad/{self.model_id}"):
            return
        raise APIError(404, f"model '{name}' not found; this server runs '{self.model_id}'",
                       code="model_not_found", param="model")

    @property
    def device(self) -> str:
        model = self.engine.model
        return model.info.device if model is not None else "unknown"

    def health(self) -> dict[str, Any]:
        """`loading`, `ready`, or `unhealthy` with the reason: the engine cannot serve (the proxy then takes
        this backend out of rotation, and the watchdog restarts it)."""
        ready = self.engine.ready.is_set()
        problem = self.engine.problem()
        return {
            "status": "unhealthy" if problem else "ready" if ready else "loading",
            "problem": problem,
            "model": self.model_id,
            "device": self.device,
            "context_length": self.max_context,
            "architecture": self.header.architecture,
            "busy": self.engine.busy,
            "slots": self.engine.model.slots if self.engine.model is not None else None,
            "running": self.engine.running,
            "waiting": self.engine.waiting,
        }

    # --- prompts -----------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, Any]], tools: Tools | None = None) -> list[int]:
        rendered = prompt_messages([_template_message(m) for m in messages], tools, self.native_tools)
        try:
            text = self.template.render(rendered, tools=template_tools(tools) if self.native_tools else None)
        except TemplateError as e:
            raise APIError(400, str(e), param="messages") from e
        return self.tokenizer.encode(text)

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    # --- generation --------------------------------------------------------------------------------

    async def constraint(self, make: Callable[[Grammars], Constraint | None], param: str) -> Constraint | None:
        """Compile a request's grammar before anything is submitted, on a worker thread (a large schema takes a
        while, and llguidance releases the GIL); a schema it cannot take is a 400 naming the problem."""
        try:
            return await asyncio.to_thread(make, self.grammars)
        except GrammarError as e:
            raise APIError(400, f"invalid {param}: {e}", param=param, code="invalid_schema") from e

    def submit(self, prompt: list[int], params: SamplingParams, constraint: Constraint | None = None) -> Generation:
        try:
            return self.engine.submit(prompt, params, constraint)
        except NotReady as e:
            raise APIError(503, "the model is still loading; retry shortly", type_="service_unavailable",
                           code="model_loading", headers={"Retry-After": "5"}) from e
        except ContextLengthExceeded as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from e
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry shortly", type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "2"}) from e

    async def run_to_end(self, gen: Generation, disconnected: Any,
                         logprobs: list[TokenLogprob] | None = None) -> tuple[str, Finished]:
        """Collect a whole generation (its tokens' log-probabilities into `logprobs`, if given), cancelling it if
        `disconnected()` turns true while we wait."""
        parts: list[str] = []
        events: AsyncGenerator[Event, None] = gen.events()
        pending = asyncio.ensure_future(anext(events))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=0.5)
                if not done:
                    if await disconnected():
                        gen.cancel()
                    continue
                event = pending.result()
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    if logprobs is not None:
                        logprobs.extend(event.logprobs)
                    pending = asyncio.ensure_future(anext(events))
                    continue
                return "".join(parts), event
        finally:
            pending.cancel()
            await events.aclose()


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI/Ollama message as chat templates expect it: a role and a plain-text content."""
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise APIError(400, f"invalid role {role!r}; expected one of {', '.join(sorted(ROLES))}", param="messages")
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        pieces = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "this model reads text only: every content part must be {'type': 'text', "
                               "'text': ...}", param="messages")
            pieces.append(part["text"])
        text = "".join(pieces)
    else:
        raise APIError(400, "message content must be a string or a list of text parts", param="messages")
    out = {**message, "role": "system" if role == "developer" else role, "content": text}
    return out


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({"token id": bias in [-100, 100]}) as SamplingParams takes it, or a 400."""
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS:
        raise APIError(400, f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    out = []
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0-{vocab_size - 1})",
                           param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias for token {key} must lie in [-100, 100]", param="logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)
