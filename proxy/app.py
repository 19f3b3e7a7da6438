"""The proxy's HTTP surface: OpenAI's endpoints in front of the Router, plus health.

A request travels: auth (auth.py) -> body limit and validation (validation.py) -> Router with the
alias's fallbacks (router.py) -> a provider (LiteLLM's, or tinygrad_provider.py) -> the answer, with
headers saying who served it -> one usage row (usage.py). Starlette rather than FastAPI: every
request is parsed and checked by hand anyway, for OpenAI-shaped errors, and the hot path stays short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import litellm
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy import validation
from proxy.auth import Auth, Caller
from proxy.errors import ProxyError, context_too_long, from_backend
from proxy.health import HealthMonitor
from proxy.keys import Hold, KeyStore, RateLimiter
from proxy.pricing import token_cost
from proxy.recorder import Recorder
from proxy.responses import dumps, json_response, sse
from proxy.router import Deployment, active_cooldowns, build_router, cool_down
from proxy.settings import Settings
from proxy.shapes import chat_chunk, chat_dict, has_text, text_chunk, text_dict
from proxy.shared_state import SharedRateLimiter, redis_settings
from proxy.spend import SpendAPI
from proxy.store import UsageStore
from proxy.ui import SavingsPage
from proxy.usage import Attempt, RequestTrace, UsageLogger, usage_logger

log = logging.getLogger("delegate")
DONE = b"data: [DONE]\n\n"
BUDGET_DEFAULT_MAX_TOKENS = 4096  # a budgeted request that names no max_tokens is capped at this
PROMPT_TEMPLATE_BYTES = 256  # what a chat template adds around the messages, at most, in the worst case
# sent with the messages and rendered into the prompt: by the chat template (tools), or by a provider that turns
# them into a system prompt or a tool (a cloud fallback); each adds input tokens the budget must cover
RENDERED_FIELDS = ("tools", "tool_choice", "response_format")
TOOLS_TEMPLATE_BYTES = 1024  # the instructions wrapped around tools or a format (Anthropic's tool prompt: ~350 tokens)


_STATED_CONTEXT = re.compile(r"maximum context length is (\d+)")  # OpenAI's wording, and the tinygrad backend's
_PROMPT_TOKENS = re.compile(r"(?:messages|prompt) resulted in (\d+) tokens")


def _connection_failure(exc: BaseException | None) -> bool:
    if isinstance(exc, litellm.ServiceUnavailableError | litellm.APIConnectionError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("connection error", "connection refused", "connecterror", "unreachable",
                                   "all connection attempts failed", "name or service not known"))


class Proxy:
    def __init__(self, settings: Settings, master_key: str | None, store: UsageStore,
                 usage: UsageLogger = usage_logger) -> None:
        self.settings = settings
        self.router, self.deployments = build_router(settings)
        self.store = store
        self.keys = KeyStore(store)
        self.auth = Auth(master_key, self.keys)
        self.rates = RateLimiter()
        redis_conn = redis_settings(settings.router_settings)
        self.shared_rates = SharedRateLimiter(redis_conn) if redis_conn else None
        self.usage = usage
        self.health = HealthMonitor(self.deployments, partial(cool_down, self.router))
        self.known = set(settings.groups)
        self.started = int(time.time())
        self.chain_ids = {g: [i for grp in settings.chain(g) for i, d in self.deployments.items() if d.group == grp]
                          for g in settings.groups}
        self.model_info = {dep_id: settings.model_list[i].get("model_info") or {} for i, dep_id in enumerate(self.deployments)}
        self.recorder = Recorder(store, self.deployments, settings.delegate, {g: settings.chain(g) for g in settings.groups},
                                 self.keys)
        self.draining = False

    # --- one request -------------------------------------------------------------------------------

    async def _read(self, request: Request) -> tuple[Caller, dict[str, Any]]:
        caller = await self.auth.check(request)
        limit = self.settings.delegate.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ProxyError(413, f"the request body is {int(length)} bytes; the limit is {limit}",
                             code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProxyError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return caller, validation.parse_json(b"".join(chunks))

    def _served(self, hidden: dict[str, Any], alias: str) -> tuple[Deployment | None, int]:
        dep = self.deployments.get(str(hidden.get("model_id")))
        if dep is None:
            return None, 0
        chain = self.settings.chain(alias)
        hops = chain.index(dep.group) if dep.group in chain else int(
            (hidden.get("additional_headers") or {}).get("x-litellm-attempted-fallbacks", 0))
        return dep, hops

    def _headers(self, trace: RequestTrace, dep: Deployment | None, hops: int) -> dict[str, str]:
        return {"x-request-id": trace.request_id, "x-delegate-alias": trace.alias,
                "x-delegate-served-by": dep.model if dep else "none", "x-delegate-fallbacks": str(hops)}

    def _failure(self, trace: RequestTrace, exc: Exception) -> ProxyError:
        """Turn the Router's final exception into the status the client should see."""
        failed = [a for a in trace.attempts if not a.ok]
        chain_ids = self.chain_ids.get(trace.alias, [])
        cooling = active_cooldowns(self.router, chain_ids) if chain_ids else {}
        attempted = {a.deployment_id for a in failed}
        untried = [i for i in chain_ids if i not in attempted]
        all_cooling = bool(untried) and all(i in cooling for i in untried) and not failed
        unreachable = (bool(failed) or bool(cooling)) and all(_connection_failure(a.exception) for a in failed)
        too_long = [a for a in failed if isinstance(a.exception, litellm.ContextWindowExceededError)]
        if isinstance(exc, litellm.ContextWindowExceededError) or (too_long and all(
                a in too_long or _connection_failure(a.exception) for a in failed)):
            # some deployment said "too long" and the others could not be reached: the prompt's length is the answer
            return self._too_long(trace, too_long, failed)
        down = list(dict.fromkeys(self.deployments[a.deployment_id].model for a in failed
                                  if a.deployment_id in self.deployments and _connection_failure(a.exception)))
        return from_backend(exc, unreachable, min(cooling.values()) if all_cooling and cooling else None, down)

    def _too_long(self, trace: RequestTrace, too_long: list[Attempt], failed: list[Attempt]) -> ProxyError:
        """400 context_length_exceeded naming the largest context that was reachable and the deployments that could
        not be reached and might take more (context_window_fallbacks whose backend is down or cooling down)."""
        contexts: dict[str, int] = {}
        prompt_tokens = None
        for a in too_long:
            text = str(a.exception)
            stated = _STATED_CONTEXT.search(text)
            known = int(stated.group(1)) if stated else self._known_context(a.deployment_id)
            if known:
                contexts[a.deployment_id] = known
            if prompt_tokens is None and (m := _PROMPT_TOKENS.search(text)):
                prompt_tokens = int(m.group(1))
        largest = max(((n, self.deployments[d].model) for d, n in contexts.items() if d in self.deployments), default=None)
        down = [a.deployment_id for a in failed if _connection_failure(a.exception)]
        candidates = self.chain_ids.get(trace.alias, []) + self._context_fallback_ids(trace.alias)
        tried = {a.deployment_id for a in failed}
        cooling = active_cooldowns(self.router, [i for i in candidates if i not in tried]) if candidates else {}
        larger = []
        for dep_id in dict.fromkeys(down + list(cooling)):
            dep, known = self.deployments.get(dep_id), self._known_context(dep_id)
            if dep is not None and (known is None or largest is None or known > largest[0]):
                larger.append(dep.model + (" (cooling down)" if dep_id in cooling else ""))
        return context_too_long(trace.alias, largest, list(dict.fromkeys(larger)), prompt_tokens,
                                param="prompt" if trace.endpoint == "text" else "messages")

    def _known_context(self, dep_id: str) -> int | None:
        probe = self.health.probes.get(dep_id)
        value = self.model_info.get(dep_id, {}).get("max_input_tokens") or (probe.context_length if probe else None)
        return int(value) if value else None

    def _context_fallback_ids(self, alias: str) -> list[str]:
        """The deployments context_window_fallbacks can move a request for `alias` to, from any group of its chain."""
        chain = self.settings.chain(alias)
        groups = [g for entry in self.settings.router_settings.get("context_window_fallbacks") or []
                  for src, dests in entry.items() if src in chain for g in dests]
        return [i for g in dict.fromkeys(groups) for i, d in self.deployments.items() if d.group == g]

    def _kwargs(self, trace: RequestTrace, body: dict[str, Any]) -> dict[str, Any]:
        metadata = {"delegate_request_id": trace.request_id}
        if body.get("user") is not None:
            metadata["delegate_user"] = body["user"]  # for providers LiteLLM would not hand `user` to
        kwargs = {"model": trace.alias, "metadata": metadata, **validation.forwarded(body)}
        if trace.stream:
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}  # real token counts, always
        return kwargs

    async def _admit(self, caller: Caller, alias: str, body: dict[str, Any], prompt: Any) -> Hold | None:
        """An issued key's limits: its aliases, its request rate, and a reservation on its budget."""
        issued = caller.issued
        if issued is None:
            return None
        if issued.aliases is not None and alias not in issued.aliases:
            raise ProxyError(403, f"this key may not use '{alias}'; it may use: {', '.join(issued.aliases) or 'nothing'}",
                             type_="permission_error", code="alias_not_allowed", param="model")
        if issued.rpm is not None and (wait := await self._rate(issued.key_id, issued.rpm)) is not None:
            raise ProxyError(429, f"this key's limit of {issued.rpm} requests a minute is reached", type_="rate_limit_error",
                             code="rate_limited", retry_after=wait)
        if issued.budget_usd is None:
            return None
        # the worst case: every byte of the prompt (tools included) a token, every allowed completion token used
        completion = body.get("max_completion_tokens") or body.get("max_tokens")
        if completion is None:
            completion = body["max_tokens"] = BUDGET_DEFAULT_MAX_TOKENS
        prompt_bytes = _worst_prompt_bytes(body, prompt)
        amount = token_cost(self.settings.delegate.reference_model, prompt_bytes, int(completion))
        try:
            reserved = await self._reserve(issued.key_id, amount)
        except Exception as e:
            raise ProxyError(503, f"the key's budget cannot be checked now: {e}", type_="service_unavailable",
                             code="budget_unavailable", retry_after=5) from e
        if not reserved:
            try:
                current = await asyncio.to_thread(self.keys.get, issued.key_id) or issued
            except Exception:  # noqa: BLE001 - only for the message: what the key check read will do
                current = issued
            raise ProxyError(429, f"this key's budget of ${issued.budget_usd:.2f} would be exceeded (spent "
                                  f"${current.spent_usd:.4f}, held ${current.reserved_usd:.4f}, this request up to "
                                  f"${amount:.4f})", type_="insufficient_quota", code="insufficient_quota")
        return reserved

    async def _reserve(self, kid: str, amount: float) -> Hold | None:
        """keys.reserve in a worker thread, off the event loop. A request cancelled while the thread runs does not
        leave its hold behind: the hold is released as soon as the thread has made it."""
        reserving = asyncio.ensure_future(asyncio.to_thread(self.keys.reserve, kid, amount))
        try:
            return await asyncio.shield(reserving)
        except asyncio.CancelledError:
            reserving.add_done_callback(self._release_orphan)
            raise

    def _release_orphan(self, reserving: asyncio.Future[Hold | None]) -> None:
        if reserving.cancelled() or reserving.exception() is not None or (hold := reserving.result()) is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: the shutdown's own release takes it
            asyncio.get_running_loop().run_in_executor(None, self.keys.settle, hold, 0.0)

    async def _rate(self, kid: str, rpm: int) -> float | None:
        if self.shared_rates is not None:
            return await self.shared_rates.allow(kid, rpm)
        return self.rates.allow(kid, rpm)

    async def chat_completions(self, request: Request) -> Response:
        caller, body = await self._read(request)
        validation.check_keys(body)
        alias = validation.check_model(body, self.known, self.settings.aliases)
        validation.check_messages(body)
        validation.check_common(body)
        validation.check_tools(body)
        hold = await self._admit(caller, alias, body, body["messages"])
        trace = self.usage.begin(alias, "chat", bool(body.get("stream")), caller.key_id, self.recorder.record)
        trace.hold = hold
        trace.prompt = body["messages"]
        kwargs = {**self._kwargs(trace, body), "messages": body["messages"]}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._complete(trace, kwargs, include_usage, self.router.acompletion, chat_dict, chat_chunk)

    async def completions(self, request: Request) -> Response:
        caller, body = await self._read(request)
        validation.check_keys(body)
        alias = validation.check_model(body, self.known, self.settings.aliases)
        validation.check_prompt(body)
        validation.check_common(body)
        hold = await self._admit(caller, alias, body, body["prompt"])
        trace = self.usage.begin(alias, "text", bool(body.get("stream")), caller.key_id, self.recorder.record)
        trace.hold = hold
        prompt = body["prompt"][0] if isinstance(body["prompt"], list) else body["prompt"]
        trace.prompt = prompt
        kwargs = {**self._kwargs(trace, body), "prompt": prompt}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._complete(trace, kwargs, include_usage, self.router.atext_completion, text_dict, text_chunk)

    async def _complete(self, trace: RequestTrace, kwargs: dict[str, Any], include_usage: bool, call: Any,
                        to_dict: Any, to_chunk: Any) -> Response:
        try:
            async with asyncio.timeout(self.settings.delegate.request_timeout_s):  # no extra task, unlike wait_for
                result = await call(**kwargs)
        except ProxyError:
            raise
        except asyncio.CancelledError:
            # shutdown's grace period ran out and uvicorn cancels what still runs: the row and the release of the
            # budget hold must not go down with the task
            self.usage.end(trace, "cancelled", ConnectionAbortedError("the proxy shut down before the answer came"))
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the Router raised becomes an OpenAI error
            if isinstance(exc, TimeoutError):
                exc = litellm.Timeout("the request took longer than delegate.request_timeout_s", model=trace.alias,
                                      llm_provider="delegate")
            error = self._failure(trace, exc)
            self.usage.end(trace, "error", exc)
            tried = {self.deployments[a.deployment_id].group for a in trace.attempts if a.deployment_id in self.deployments}
            return error.response(self._headers(trace, None, max(len(tried) - 1, 0)))
        dep, hops = self._served(getattr(result, "_hidden_params", None) or {}, trace.alias)
        trace.served_by = dep.id if dep else None
        headers = self._headers(trace, dep, hops)
        served_model = dep.model if dep else trace.alias
        if not trace.stream:
            trace.first_token_at = trace.finished_at = time.perf_counter()
            usage = getattr(result, "usage", None)
            trace.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            trace.completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            trace.backend_timings = (getattr(result, "_hidden_params", None) or {}).get("timings")
            self.usage.end(trace, "success")
            return json_response(to_dict(result, served_model), headers=headers)
        body = self._stream(trace, result, include_usage, served_model, to_chunk)
        return _TracedStream(body, partial(self._stream_closed, trace, result, body),
                             media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})

    async def _stream_closed(self, trace: RequestTrace, stream: Any, body: AsyncGenerator[bytes, None]) -> None:
        """However the response ended, its trace is closed now."""
        with contextlib.suppress(Exception):
            await body.aclose()  # a generator left at a yield runs its finally now, not when it is collected
        if trace.status == "pending":  # the generator never ran: the client left before its first chunk
            self.close_unfinished(trace, ConnectionAbortedError("the client went away before the stream began"))
            await _close_backend(stream)

    def close_unfinished(self, trace: RequestTrace, error: BaseException) -> None:
        """Close a trace its request left open: what it delivered is counted and priced, and its hold settled."""
        dep = self.deployments.get(trace.served_by or "")
        _count_cut_short(trace, dep.model if dep else trace.alias)
        self.usage.end(trace, "partial" if trace.delivered else "cancelled", error)

    async def _stream(self, trace: RequestTrace, stream: Any, include_usage: bool, model: str,
                      to_chunk: Any) -> AsyncGenerator[bytes, None]:
        status = "partial"
        error: BaseException | None = None
        try:
            async for chunk in stream:
                chunk_usage = getattr(chunk, "usage", None)
                if chunk_usage is not None:
                    trace.prompt_tokens = int(chunk_usage.prompt_tokens or 0)
                    trace.completion_tokens = int(chunk_usage.completion_tokens or 0)
                timings = getattr(chunk, "timings", None)
                if timings:
                    trace.backend_timings = timings
                out = to_chunk(chunk, model)
                if out is None:
                    continue
                if chunk_usage is not None and not out["choices"] and not include_usage:
                    continue
                if out["choices"] and has_text(out["choices"][0]):
                    trace.delivered += 1  # about one token: the count that stands when no usage chunk arrives
                    if trace.first_token_at is None:
                        trace.first_token_at = time.perf_counter()
                if not include_usage:
                    out.pop("usage", None)
                yield sse(out)
            status = "success"
        except (asyncio.CancelledError, GeneratorExit):
            error = ConnectionAbortedError("the client disconnected mid-stream")
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the Router raised becomes an OpenAI error
            # the answer died half-way: say so, so no client takes a truncated answer for a whole one
            error = exc
            err = ProxyError(502, f"the backend failed mid-stream: {exc}".split("\n", 1)[0][:500],
                             type_="upstream_error", code="stream_interrupted")
            yield sse(err.body())
        finally:
            trace.finished_at = time.perf_counter()
            if status != "success":
                _count_cut_short(trace, model)
            self.usage.end(trace, status, error)
            await _close_backend(stream)
        yield DONE

    # --- listing and health ------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        await self.auth.check(request)
        data = []
        for group in self.settings.groups:
            is_alias = group in self.settings.delegate.aliases
            data.append({
                "id": group, "object": "model", "created": self.started, "owned_by": "delegate",
                "kind": "alias" if is_alias else "model",
                "description": self.settings.delegate.aliases.get(group),
                "fallbacks": self.settings.chain(group)[1:],
                "deployments": [d.model for d in self.deployments.values() if d.group == group],
                "context_length": self.context_length(group),
            })
        return json_response({"object": "list", "data": data})

    def context_length(self, group: str) -> int | None:
        """The smallest context any deployment in the group's chain is known to take (None: none known).

        Known from model_info.max_input_tokens in config.yaml, or from what a tinygrad backend reports."""
        known = []
        for dep_id in self.chain_ids.get(group, []):
            info = self.model_info.get(dep_id, {})
            value = info.get("max_input_tokens") or self.health.probes[dep_id].context_length
            if value:
                known.append(int(value))
        return min(known) if known else None

    async def liveliness(self, request: Request) -> Response:
        return json_response({"status": "alive"})

    async def readiness_problems(self) -> list[str]:
        problems = []
        if self.draining:
            problems.append("draining: shutting down")
        if not self.health.any_ready():
            problems.append("no deployment is reachable")
        if self.shared_rates is not None and (redis_problem := await self.shared_rates.problem()):
            problems.append(redis_problem)
        if problem := self.recorder.problem():
            problems.append(problem)
        else:
            try:
                await asyncio.to_thread(self.store.check_writable)
            except Exception as e:  # noqa: BLE001 - any failure means rows cannot be written now
                problems.append(f"usage store not writable: {e}")
        return problems

    async def readiness(self, request: Request) -> Response:
        problems = await self.readiness_problems()
        body = {"status": "ready" if not problems else "not_ready", "problems": problems, "config": str(self.settings.path),
                "litellm_version": _litellm_version()}
        return json_response(body, status=200 if not problems else 503)

    async def health_report(self, request: Request) -> Response:
        caller = await self.auth.check(request)
        cooldowns = active_cooldowns(self.router, list(self.deployments))
        deployments = self.health.report(cooldowns)
        if caller.issued is not None:  # status for anyone let in; where the backends live, for the operator only
            deployments = [{**d, "api_base": None, "detail": None} for d in deployments]
        healthy = [d for d in deployments if d["status"] in ("ready", "not_probed") and d["cooldown_remaining_s"] is None]
        return json_response({"healthy_count": len(healthy), "unhealthy_count": len(deployments) - len(healthy),
                      "deployments": deployments})


class _TracedStream(StreamingResponse):
    """An SSE response that closes its request's trace however it ends. The generator does so itself once it
    runs; one the client left before asking for the first chunk never runs, and would leave no row and its
    budget hold held for as long as the process lives."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def _close_backend(stream: Any) -> None:
    """Close the backend connection of a stream, which stops its generation."""
    with contextlib.suppress(Exception):
        inner = getattr(stream, "completion_stream", None)
        if inner is not None and hasattr(inner, "aclose"):
            await inner.aclose()


def _count_cut_short(trace: RequestTrace, model: str) -> None:
    """A request that ended before its usage came: one token per content chunk sent, the prompt counted here."""
    trace.completion_tokens = max(trace.completion_tokens, trace.delivered)
    if not trace.prompt_tokens:
        trace.prompt_tokens = _estimate_prompt_tokens(trace, model)


def _worst_prompt_bytes(body: dict[str, Any], prompt: Any) -> int:
    """The prompt's size as the backend will see it, in bytes: the messages, the template around them, and the
    tools and format rendered in with them."""
    size = len(dumps(prompt)) + PROMPT_TEMPLATE_BYTES
    size += sum(len(dumps(body[k])) for k in RENDERED_FIELDS if body.get(k) is not None)
    if body.get("tools") or body.get("response_format") is not None:
        size += TOOLS_TEMPLATE_BYTES
    return size


def _estimate_prompt_tokens(trace: RequestTrace, model: str) -> int:
    """A stream cut short never got its usage chunk: count the prompt with LiteLLM's tokenizer instead."""
    if trace.prompt is None:
        return 0
    try:
        if isinstance(trace.prompt, str):
            return int(litellm.token_counter(model=model, text=trace.prompt))
        return int(litellm.token_counter(model=model, messages=trace.prompt))
    except Exception:  # noqa: BLE001 - an estimate; zero when even that fails
        return 0


def _litellm_version() -> str:
    from importlib.metadata import version

    return version("litellm")


# --- the application ---------------------------------------------------------------------------------

async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    return ProxyError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_=kind).response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return ProxyError(500, "internal error in the proxy; see its log", type_="server_error").response()


def create_app(settings: Settings, master_key: str | None, store: UsageStore | None = None) -> Starlette:
    proxy = Proxy(settings, master_key, store or UsageStore.open())

    async def check_key(request: Request) -> None:
        await proxy.auth.check_admin(request)

    spend = SpendAPI(proxy.store, check_key)
    savings = SavingsPage(proxy.store, settings.delegate.reference_model, proxy.auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.recorder.tend_holds()  # the holds a crashed process left are released before the first request
        proxy.recorder.start()
        await proxy.health.start()
        try:
            yield
        finally:
            proxy.draining = True
            await proxy.health.stop()
            # what shutdown's grace period cut off: its rows are written and its holds settled before the store closes
            for trace in proxy.usage.unfinished(proxy.recorder.record):
                proxy.close_unfinished(trace, ConnectionAbortedError("the proxy shut down before the request finished"))
            await proxy.usage.drain()
            await proxy.recorder.stop()
            if proxy.shared_rates is not None:
                await proxy.shared_rates.close()

    routes = [
        Route("/v1/chat/completions", proxy.chat_completions, methods=["POST"]),
        Route("/chat/completions", proxy.chat_completions, methods=["POST"]),
        Route("/v1/completions", proxy.completions, methods=["POST"]),
        Route("/completions", proxy.completions, methods=["POST"]),
        Route("/v1/models", proxy.models, methods=["GET"]),
        Route("/models", proxy.models, methods=["GET"]),
        Route("/health/liveliness", proxy.liveliness, methods=["GET"]),
        Route("/health/liveness", proxy.liveliness, methods=["GET"]),
        Route("/health/readiness", proxy.readiness, methods=["GET"]),
        Route("/health", proxy.health_report, methods=["GET"]),
        Route("/spend/logs", spend.logs, methods=["GET"]),
        Route("/global/spend/report", spend.report, methods=["GET"]),
        Route("/ui", savings.page, methods=["GET"]),
        Route("/ui/data", savings.data, methods=["GET"]),
        Route("/ui/login", savings.login, methods=["POST"]),
        Route("/ui/logout", savings.logout, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error, Exception: _unexpected})
    app.state.proxy = proxy
    return app
