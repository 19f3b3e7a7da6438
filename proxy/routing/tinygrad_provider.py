"""The `tinygrad` LiteLLM provider: how the Router talks to a tinygrad_backend server.

A deployment `model: tinygrad/smollm2` with `api_base: http://127.0.0.1:8001` reaches here. We speak
the backend's OpenAI-compatible HTTP API over pooled clients and translate its failures into the
LiteLLM exceptions the Router retries and falls back on:

  connection refused, 503 while loading  -> ServiceUnavailableError
  400 context_length_exceeded            -> ContextWindowExceededError (context_window_fallbacks)
  429 (its wait queue is full)           -> RateLimitError
  no answer within the deployment timeout -> Timeout

A deployment's `api_key` (the backend's --api-key) is sent as a Bearer token.

The backend's own timings (time to first token, decode tokens/s, device) travel in the response's
`provider_specific_fields["timings"]`, where the usage callback reads them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import litellm
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import ChatCompletionMessageToolCall, GenericStreamingChunk, ModelResponse

PROVIDER = "tinygrad"
DEFAULT_API_BASE = "http://127.0.0.1:8001"
_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=16)
# what the backend understands (OpenAI's fields and llama.cpp server's top_k, min_p, repeat_penalty and
# repeat_last_n); LiteLLM hands over whatever the caller sent, in optional_params
_PASSED = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "tools", "tool_choice", "user",
           "response_format", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
           "top_k", "min_p", "repeat_penalty", "repeat_last_n")


def _timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout or 600.0, connect=5.0)


def _body(model: str, messages: list, optional_params: dict, litellm_params: dict | None, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    body.update({k: optional_params[k] for k in _PASSED if optional_params.get(k) is not None})
    # LiteLLM drops `user` before a custom provider sees it; the proxy carries it in the metadata
    user = ((litellm_params or {}).get("metadata") or {}).get("delegate_user")
    if user is not None:
        body["user"] = user
    if stream:
        body["stream_options"] = {"include_usage": True}  # usage is always wanted, for the books
    return body


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _url(api_base: str | None) -> str:
    return (api_base or DEFAULT_API_BASE).rstrip("/").removesuffix("/v1") + "/v1/chat/completions"


def _post(model: str, messages: list, api_base: str | None, api_key: str | None, optional_params: dict,
          litellm_params: dict | None, timeout: float | httpx.Timeout | None, stream: bool) -> dict[str, Any]:
    """The POST every call sends, sync or async, one answer or a stream: httpx's url, json, headers, timeout."""
    return {"url": _url(api_base), "json": _body(model, messages, optional_params, litellm_params, stream),
            "headers": _headers(api_key), "timeout": _timeout(timeout)}


def _error_from_status(status: int, text: str, model: str) -> Exception:
    try:
        err = json.loads(text).get("error", {})
        message, code = (err.get("message") or text), err.get("code")
    except (ValueError, AttributeError):
        message, code = text, None
    response = httpx.Response(status, text=text, request=httpx.Request("POST", "http://tinygrad-backend"))
    if code == "context_length_exceeded":
        return litellm.ContextWindowExceededError(message, model=model, llm_provider=PROVIDER, response=response)
    if status == 503:
        return litellm.ServiceUnavailableError(message, llm_provider=PROVIDER, model=model, response=response)
    if status == 429:
        return litellm.RateLimitError(message, llm_provider=PROVIDER, model=model, response=response)
    if status == 404:
        return litellm.NotFoundError(message, model=model, llm_provider=PROVIDER, response=response)
    if status == 400:
        return litellm.BadRequestError(message, model=model, llm_provider=PROVIDER, response=response)
    return litellm.InternalServerError(message, llm_provider=PROVIDER, model=model, response=response)


def _error_from_transport(e: httpx.HTTPError, model: str, api_base: str | None) -> Exception:
    where = api_base or DEFAULT_API_BASE
    if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
        return litellm.Timeout(f"tinygrad backend at {where} did not answer in time", model=model, llm_provider=PROVIDER)
    return litellm.ServiceUnavailableError(f"tinygrad backend at {where} is unreachable: {e}", llm_provider=PROVIDER,
                                           model=model)


def _fill(model_response: ModelResponse, data: dict[str, Any], model: str) -> ModelResponse:
    choice = data["choices"][0]
    message = choice.get("message") or {}
    out = model_response.choices[0]
    out.message.content = message.get("content")  # type: ignore[union-attr]  # None beside tool calls, as OpenAI's
    if message.get("tool_calls"):
        out.message.tool_calls = [ChatCompletionMessageToolCall(**call) for call in message["tool_calls"]]  # type: ignore[union-attr]
    elif out.message.content is None:  # type: ignore[union-attr]
        out.message.content = ""  # type: ignore[union-attr]
    out.finish_reason = choice.get("finish_reason") or "stop"
    if choice.get("logprobs"):
        out.logprobs = choice["logprobs"]  # type: ignore[union-attr]
    model_response.model = f"{PROVIDER}/{data.get('model') or model}"
    usage = data.get("usage") or {}
    model_response.usage = litellm.Usage(  # type: ignore[attr-defined]
        prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
        total_tokens=usage.get("total_tokens", 0),
    )
    if data.get("timings"):
        model_response.choices[0].message.provider_specific_fields = {"timings": data["timings"]}  # type: ignore[union-attr]
        model_response._hidden_params["timings"] = data["timings"]
    return model_response


def _answer(r: httpx.Response, model_response: ModelResponse, model: str) -> ModelResponse:
    if r.status_code != 200:
        raise _error_from_status(r.status_code, r.text, model)
    return _fill(model_response, r.json(), model)


def _chunk(text: str = "", finish: str | None = None, usage: dict | None = None,
           timings: dict | None = None, tool_use: dict | None = None) -> GenericStreamingChunk:
    chunk: GenericStreamingChunk = {
        "text": text, "is_finished": finish is not None, "finish_reason": finish or "", "index": 0,
        "tool_use": tool_use, "usage": None,  # type: ignore[typeddict-item]
    }
    if usage:
        chunk["usage"] = {"prompt_tokens": usage.get("prompt_tokens", 0),
                          "completion_tokens": usage.get("completion_tokens", 0),
                          "total_tokens": usage.get("total_tokens", 0)}
    if timings:
        chunk["provider_specific_fields"] = {"timings": timings}
    return chunk


class _SSE:
    """Turns the backend's SSE lines into GenericStreamingChunks, raising on an error event."""

    def __init__(self, model: str) -> None:
        self.model, self.finish, self.timings = model, "", None

    def feed(self, line: str) -> GenericStreamingChunk | None:
        if not line.startswith("data: "):
            return None
        data = line[6:]
        if data == "[DONE]":
            return None
        obj = json.loads(data)
        if "error" in obj:
            raise litellm.InternalServerError(f"tinygrad backend failed mid-stream: {obj['error'].get('message')}",
                                              llm_provider=PROVIDER, model=self.model)
        if obj.get("timings"):
            self.timings = obj["timings"]
        if obj.get("usage"):
            return _chunk(finish=self.finish or "stop", usage=obj["usage"], timings=self.timings)
        choice = (obj.get("choices") or [{}])[0]
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]  # sent with the usage chunk that follows
        if delta.get("tool_calls"):  # the backend streams a whole call in one delta
            call = delta["tool_calls"][0]
            return _chunk(text, tool_use={"index": call.get("index", 0), "id": call.get("id"), "type": "function",
                                          "function": call.get("function") or {}})
        return _chunk(text) if text else None


class TinygradProvider(CustomLLM):
    def __init__(self) -> None:
        super().__init__()
        self._async: httpx.AsyncClient | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._sync: httpx.Client | None = None

    def _aclient(self) -> httpx.AsyncClient:
        # a pooled client belongs to the event loop that opened its connections
        loop = asyncio.get_running_loop()
        if self._async is None or self._async.is_closed or self._async_loop is not loop:
            self._async, self._async_loop = httpx.AsyncClient(limits=_LIMITS), loop
        return self._async

    def _client(self) -> httpx.Client:
        if self._sync is None or self._sync.is_closed:
            self._sync = httpx.Client(limits=_LIMITS)
        return self._sync

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
        if self._sync is not None:
            self._sync.close()

    # --- one answer --------------------------------------------------------------------------------

    async def acompletion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,  # type: ignore[no-untyped-def,override]
                          encoding, api_key, logging_obj, optional_params, acompletion=None, litellm_params=None,
                          logger_fn=None, headers={}, timeout=None, client=None) -> ModelResponse:  # noqa: B006
        post = _post(model, messages, api_base, api_key, optional_params, litellm_params, timeout, stream=False)
        try:
            r = await self._aclient().post(**post)
        except httpx.HTTPError as e:
            raise _error_from_transport(e, model, api_base) from e
        return _answer(r, model_response, model)

    def completion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,  # type: ignore[no-untyped-def,override]
                   encoding, api_key, logging_obj, optional_params, acompletion=None, litellm_params=None,
                   logger_fn=None, headers={}, timeout=None, client=None) -> ModelResponse:  # noqa: B006
        post = _post(model, messages, api_base, api_key, optional_params, litellm_params, timeout, stream=False)
        try:
            r = self._client().post(**post)
        except httpx.HTTPError as e:
            raise _error_from_transport(e, model, api_base) from e
        return _answer(r, model_response, model)

    # --- streams -----------------------------------------------------------------------------------

    async def astreaming(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,  # type: ignore[no-untyped-def,override,misc]
                         encoding, api_key, logging_obj, optional_params, acompletion=None, litellm_params=None,
                         logger_fn=None, headers={}, timeout=None, client=None) -> AsyncIterator[GenericStreamingChunk]:  # noqa: B006
        post = _post(model, messages, api_base, api_key, optional_params, litellm_params, timeout, stream=True)
        request = self._aclient().build_request("POST", **post)
        parser = _SSE(model)
        try:
            r = await self._aclient().send(request, stream=True)
            try:
                if r.status_code != 200:
                    raise _error_from_status(r.status_code, (await r.aread()).decode(errors="replace"), model)
                async for line in r.aiter_lines():
                    if (chunk := parser.feed(line)) is not None:
                        yield chunk
            finally:
                await r.aclose()
        except httpx.HTTPError as e:
            raise _error_from_transport(e, model, api_base) from e

    def streaming(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,  # type: ignore[no-untyped-def,override]
                  encoding, api_key, logging_obj, optional_params, acompletion=None, litellm_params=None,
                  logger_fn=None, headers={}, timeout=None, client=None) -> Iterator[GenericStreamingChunk]:  # noqa: B006
        post = _post(model, messages, api_base, api_key, optional_params, litellm_params, timeout, stream=True)
        parser = _SSE(model)
        try:
            with self._client().stream("POST", **post) as r:
                if r.status_code != 200:
                    raise _error_from_status(r.status_code, r.read().decode(errors="replace"), model)
                for line in r.iter_lines():
                    if (chunk := parser.feed(line)) is not None:
                        yield chunk
        except httpx.HTTPError as e:
            raise _error_from_transport(e, model, api_base) from e


provider = TinygradProvider()
