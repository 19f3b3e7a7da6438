"""What both HTTP APIs share: the loaded model's card, prompt building, and running a generation.

The OpenAI routes and the Ollama routes differ only in request and response shapes; everything about
the model (its name, its template, its context, how a prompt becomes token ids) lives here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

from tinygrad_backend.chat_template import ChatTemplate, TemplateError
from tinygrad_backend.engine import ContextLengthExceeded, Engine, Event, Finished, Generation, NotReady, TextDelta
from tinygrad_backend.errors import APIError
from tinygrad_backend.gguf_file import GGUFHeader
from tinygrad_backend.sampling import SamplingParams
from tinygrad_backend.tokenizer import GGUFTokenizer

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


class Backend:
    def __init__(self, model_id: str, header: GGUFHeader, tokenizer: GGUFTokenizer, template: ChatTemplate,
                 engine: Engine, max_context: int) -> None:
        self.model_id, self.header, self.tokenizer, self.template = model_id, header, tokenizer, template
        self.engine, self.max_context = engine, max_context
        self.created = int(time.time())

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
        ready = self.engine.ready.is_set()
        return {
            "status": "ready" if ready else "loading",
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

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        try:
            text = self.template.render([_template_message(m) for m in messages], tools=tools)
        except TemplateError as e:
            raise APIError(400, str(e), param="messages") from e
        return self.tokenizer.encode(text)

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    # --- generation --------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams) -> Generation:
        try:
            return self.engine.submit(prompt, params)
        except NotReady as e:
            raise APIError(503, "the model is still loading; retry shortly", type_="service_unavailable",
                           code="model_loading", headers={"Retry-After": "5"}) from e
        except ContextLengthExceeded as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from e

    async def run_to_end(self, gen: Generation, disconnected: Any) -> tuple[str, Finished]:
        """Collect a whole generation, cancelling it if `disconnected()` turns true while we wait."""
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
                    pending = asyncio.ensure_future(anext(events))
                    continue
                return "".join(parts), event
        finally:
            pending.cancel()
            await events.aclose()


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI/Ollama message as chat templates expect it: a role and a plain-text content."""
    role = message.get("role")
    if role not in ROLES:
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
