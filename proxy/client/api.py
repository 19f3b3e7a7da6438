"""The Python API scripts already use, now answered by the proxy (`from proxy.client import delegate`).

It keeps the old `scripts.local_llm` API: delegate, delegate_with_retry, quick_code, quick_analysis,
quick_answer and LLMResponse, with the same fields. Backend and network failures come back as
`success=False` with a readable `error`, never as an exception; programmer errors (an empty prompt, a task
the proxy serves no alias for) raise ValueError. The aliases are the proxy's own (GET /v1/models, kept for a
few seconds), so an alias added to config.yaml works here as soon as the proxy serves it. It speaks to the
proxy through proxy.client.connection (the `openai` SDK, requests marked `x-delegate-source: api`) and never
imports litellm. Set DELEGATE_URL (default http://127.0.0.1:4000) and DELEGATE_API_KEY (default sk-local) to
point it elsewhere. Safe to use from a thread pool.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from proxy.client.connection import DEFAULT_KEY as DEFAULT_KEY  # re-exported: the names scripts used
from proxy.client.connection import DEFAULT_URL as DEFAULT_URL
from proxy.client.connection import Connection, ProxyError, Unreachable
from proxy.client.connection import api_key as api_key
from proxy.client.connection import proxy_url as proxy_url

SOURCE = "api"  # what usage rows say these requests came from
CODE_SYSTEM = "You are a careful programmer. Answer with working code and at most a short explanation."


@dataclass
class LLMResponse:
    text: str  # the generated response
    model: str  # the model that answered, e.g. "qwen2.5-coder:7b"
    backend: str  # where it ran: "ollama", "tinygrad", or a cloud provider
    latency_ms: float
    tokens: int  # output tokens
    tokens_per_sec: float
    success: bool
    error: str | None = None
    task: str | None = None
    fallbacks: int = 0  # hops down the task's chain inside the proxy
    request_id: str | None = None
    status_code: int | None = None  # the proxy's HTTP status when it refused or failed
    check: str | None = None  # what the task's answer checks said: "passed", "failed", or None (not checked)
    escalations: int = 0  # times the proxy asked a better model because an answer failed its checks

    def __str__(self) -> str:
        return self.text if self.success else f"[failed: {self.error}]"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_model(served: str) -> tuple[str, str]:
    """`ollama_chat/qwen2.5-coder:7b` -> ("qwen2.5-coder:7b", "ollama")."""
    provider, _, name = served.partition("/")
    if not name:
        return served, "unknown"
    return name, {"ollama_chat": "ollama"}.get(provider, provider)


def _check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty")


def _error_text(e: Exception, conn: Connection) -> tuple[str, int | None]:
    if isinstance(e, openai.APITimeoutError):
        return "the request timed out", None
    if isinstance(e, openai.APIConnectionError):
        return conn.unreachable_message(), None
    if isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        message = body.get("message") or str(e)
        return f"HTTP {e.status_code}: {message}", e.status_code
    return f"{type(e).__name__}: {e}", None


def delegate(prompt: str, task: str = "coding", system: str | None = None, max_tokens: int = 1024,
             temperature: float = 0.2, timeout: float = 300.0) -> LLMResponse:
    """Ask the proxy's `task` alias; failures come back as success=False with a readable error.

    ValueError for an empty prompt, and for a task the proxy serves no alias for (the message names its
    aliases); the proxy is asked which it serves, so an unreachable proxy is a failed result, not an error."""
    return delegate_via(Connection(SOURCE), prompt, task, system, max_tokens, temperature, timeout)


def delegate_via(conn: Connection, prompt: str, task: str = "coding", system: str | None = None,
                 max_tokens: int = 1024, temperature: float = 0.2, timeout: float = 300.0) -> LLMResponse:
    """`delegate` over a given connection: other client tools (`delegate ask --json`) name their own source."""
    _check_prompt(prompt)
    start = time.perf_counter()
    try:
        conn.check_alias(task)
    except Unreachable as e:
        return LLMResponse("", "", "", (time.perf_counter() - start) * 1000, 0, 0.0, False, str(e), task)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        raw = conn.openai().chat.completions.with_raw_response.create(
            model=task, messages=messages, max_tokens=max_tokens, temperature=temperature,  # type: ignore[arg-type]
            timeout=timeout)
        reply = raw.parse()
    except openai.OpenAIError as e:
        text, status = _error_text(e, conn)
        return LLMResponse("", "", "", (time.perf_counter() - start) * 1000, 0, 0.0, False, text, task, status_code=status)
    latency_ms = (time.perf_counter() - start) * 1000
    model, backend = split_model(reply.model)
    tokens = reply.usage.completion_tokens if reply.usage else 0
    return LLMResponse(
        text=reply.choices[0].message.content or "", model=model, backend=backend, latency_ms=latency_ms,
        tokens=tokens, tokens_per_sec=tokens / (latency_ms / 1000) if latency_ms > 0 else 0.0, success=True,
        task=task, fallbacks=int(raw.headers.get("x-delegate-fallbacks") or 0), request_id=raw.headers.get("x-request-id"),
        check=raw.headers.get("x-delegate-check"), escalations=int(raw.headers.get("x-delegate-escalations") or 0))


def delegate_with_retry(prompt: str, task: str = "coding", max_retries: int = 3, backoff_s: float = 1.0,
                        **kwargs: Any) -> LLMResponse:
    """Ask `task` again, with backoff, while the failure may pass; always the same alias.

    Retried: a proxy that cannot be reached, a request that timed out, 429 (every deployment cooling down)
    and 5xx. Not retried: any other 4xx (the request itself is wrong) and ValueError (an empty prompt, an
    unknown task). Where to fall back is the alias's chain in config.yaml, which the proxy has already walked
    when it answers 502/503/504: to fall back further, lengthen that chain. The old scripts also hopped to
    another alias (coding -> quick, ...) from a table copied from config; it is gone, since every shipped
    chain already ends in the models it led to, and an alias added to config.yaml had no entry in it.
    """
    result = LLMResponse("", "", "", 0.0, 0, 0.0, False, "not attempted", task)
    for attempt in range(max_retries + 1):
        result = delegate(prompt, task=task, **kwargs)
        if result.success:
            return result
        status = result.status_code
        if status is not None and 400 <= status < 500 and status != 429:
            return result  # the request itself is wrong: asking again will not help
        if attempt < max_retries:
            time.sleep(backoff_s * 2**attempt)
    return result


def quick_code(prompt: str, **kwargs: Any) -> LLMResponse:
    return delegate(prompt, task="coding", system=CODE_SYSTEM, **kwargs)


def quick_analysis(text: str, **kwargs: Any) -> LLMResponse:
    return delegate(text, task="analysis", **kwargs)


def quick_answer(question: str, **kwargs: Any) -> LLMResponse:
    return delegate(question, task="quick", max_tokens=kwargs.pop("max_tokens", 256), **kwargs)


def is_proxy_running(timeout: float = 1.0) -> bool:
    try:
        return Connection(SOURCE).get("/health/liveliness", timeout=timeout).status_code == 200
    except ProxyError:
        return False


def start_proxy(config: str | Path | None = None, timeout: float = 900.0) -> bool:
    """Start `delegate serve` (backend and proxy) in the background unless it runs; wait until it is ready.

    Its output goes to $DELEGATE_HOME/serve.log. Returns whether the proxy answered ready in time.
    """
    from proxy.usage.store import delegate_home

    conn = Connection(SOURCE)
    if not is_proxy_running():
        url = httpx.URL(conn.url)
        home = delegate_home()
        home.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "proxy.client.cli", "serve", "--host", url.host, "--port", str(url.port or 4000)]
        if config is not None:
            cmd += ["--config", str(config)]
        with (home / "serve.log").open("ab") as log:
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if conn.get("/health/readiness", timeout=2).status_code == 200:
                return True
        except ProxyError:
            pass
        time.sleep(0.5)
    return False


# the names the old scripts used for the same checks
is_ollama_running = is_proxy_running
start_ollama = start_proxy
