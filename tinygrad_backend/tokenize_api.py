"""POST /v1/chat/tokenize: how many tokens a chat completion's prompt is, without generating.

The body is a /v1/chat/completions body (messages, tools, tool_choice, model, and the rest, which is checked and
otherwise ignored), read and rendered by the very code that route uses (openai_api.read_chat: the chat template,
the tools written in, the tokenizer), so `prompt_tokens` here is the `usage.prompt_tokens` the same body gets
there. A body the completion would refuse is refused the same way (400 in OpenAI's shape; 404 for another
model). A grammar (tools, response_format) is named but not compiled: an invalid JSON schema inside one surfaces
on the completion only.

The answer: `{"object": "chat.tokenize", "model", "prompt_tokens", "context_length"}`; a prompt of
`context_length` tokens or more is counted all the same (its completion would be a 400 context_length_exceeded).
The tokenizer needs no model, so this answers while the model is still loading. The proxy counts a local
request's tokens here (Anthropic's /v1/messages/count_tokens). Behind the same access rules as every route
(access.py: the API key, the body limit).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinygrad_backend.openai_api import read_chat

PATH = "/v1/chat/tokenize"


async def chat_tokenize(request: Request) -> Response:
    call = await read_chat(request)
    backend = call.backend
    return JSONResponse({"object": "chat.tokenize", "model": backend.model_id, "prompt_tokens": len(call.prompt),
                         "context_length": backend.max_context})


routes = [Route(PATH, chat_tokenize, methods=["POST"])]
