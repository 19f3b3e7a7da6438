"""The usage callback: what happened to one request, from first attempt to last byte.

LiteLLM calls a `CustomLogger` once per deployment attempt (failures synchronously, before the Router
moves on; successes a moment after the answer), so no single LiteLLM event describes a request that
fell back twice and then streamed. The proxy opens a `RequestTrace` per request (`begin`), LiteLLM's
events fill in the attempts, and the proxy closes it (`end`) with what the client actually got; the
finished trace becomes exactly one usage row, written off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from litellm.integrations.custom_logger import CustomLogger

if TYPE_CHECKING:
    from proxy.usage.keys import Hold

log = logging.getLogger("delegate")
SUCCESS_EVENT_WAIT_S = 2.0  # LiteLLM's success event trails the response; wait this long for it


@dataclass
class Attempt:
    deployment_id: str
    model: str
    ok: bool
    error_class: str | None = None
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)


@dataclass
class CloudUsage:
    """A request passed through to Anthropic (proxy/server/passthrough.py): the model, and the usage Anthropic
    itself reported. `fallback`: a tier's local chain could not answer, so the Claude model it named did."""

    model: str
    fallback: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0


@dataclass
class Judged:
    """One answer an alias's checks judged (proxy/routing/answer_checks.py), with what it took to make."""

    deployment_id: str | None
    model: str | None
    passed: bool
    check: str | None = None  # the check it failed
    reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_s: float = 0.0


Sink = Callable[["RequestTrace"], Awaitable[None]]


@dataclass
class RequestTrace:
    request_id: str
    alias: str
    endpoint: str
    stream: bool
    key_id: str | None = None
    source: str = "api"  # where the request came from: api | cli | mcp | messages | review (sources.py)
    started_at: float = field(default_factory=time.time)  # wall clock, for the row
    started: float = field(default_factory=time.perf_counter)
    attempts: list[Attempt] = field(default_factory=list)
    served_by: str | None = None  # deployment id that answered
    prompt_tokens: int = 0
    completion_tokens: int = 0
    delivered: int = 0  # content chunks sent to the client, about one token each: what a cut stream delivered
    first_token_at: float | None = None  # perf_counter
    finished_at: float | None = None
    backend_timings: dict[str, Any] | None = None
    status: str = "pending"  # success | error | partial (a stream cut short) | cancelled (shut down, nothing sent)
    error_class: str | None = None
    error: str | None = None
    hold: Hold | None = None  # budget held for an issued key until the real cost is known
    prompt: Any = field(default=None, repr=False)  # the messages or prompt, to estimate tokens if usage never comes
    litellm_cost: float | None = None  # LiteLLM's own price for the deployment that served (cloud)
    cloud: CloudUsage | None = None  # passed through to Anthropic, not served by a deployment
    requested_model: str | None = None  # the model the client named when it was not the alias: a Claude model, auto
    judged: list[Judged] = field(default_factory=list)  # the answers the alias's checks judged, in order
    escalations: int = 0  # times the request was sent on because an answer failed its checks
    sink: Sink | None = field(default=None, repr=False)  # where the finished trace goes (the proxy's recorder)
    _success_seen: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _answers_due: int = field(default=1, repr=False)  # LiteLLM success events to wait for: one per answer asked for
    _answers_seen: int = field(default=0, repr=False)

    def asking_again(self) -> None:
        """Another answer is asked for (an escalation): the row waits for its success event too."""
        self._answers_due += 1
        self._success_seen.clear()

    def answer_never_came(self) -> None:
        self._answers_due -= 1
        if self._answers_seen >= self._answers_due:
            self._success_seen.set()

    def answer_logged(self) -> None:
        self._answers_seen += 1
        if self._answers_seen >= self._answers_due:
            self._success_seen.set()

    @property
    def verdict(self) -> str | None:
        """passed | failed: what the checks said of the answer the client got; None where nothing was checked."""
        if not self.judged:
            return None
        return "passed" if self.judged[-1].passed else "failed"

    @property
    def latency_s(self) -> float:
        return ((self.finished_at or time.perf_counter()) - self.started)

    @property
    def ttft_s(self) -> float | None:
        if self.backend_timings and not self.stream and "ttft_ms" in self.backend_timings:
            return float(self.backend_timings["ttft_ms"]) / 1000
        return self.first_token_at - self.started if self.first_token_at else None

    @property
    def generation_s(self) -> float:
        """Seconds the backend spent on this request (prefill and decode), for the local energy cost."""
        t = self.backend_timings
        if t and "prompt_ms" in t and "predicted_ms" in t:
            return (float(t["prompt_ms"]) + float(t["predicted_ms"])) / 1000
        return self.latency_s

    @property
    def decode_tps(self) -> float | None:
        t = self.backend_timings
        if t and t.get("predicted_per_second"):
            return float(t["predicted_per_second"])
        if self.first_token_at and self.finished_at and self.completion_tokens > 1:
            span = self.finished_at - self.first_token_at
            return (self.completion_tokens - 1) / span if span > 0 else None
        return None


def _request_id(kwargs: dict[str, Any]) -> str | None:
    metadata = (kwargs.get("litellm_params") or {}).get("metadata") or kwargs.get("metadata") or {}
    return metadata.get("delegate_request_id")


class UsageLogger(CustomLogger):
    """Registered as a LiteLLM callback by routing/router.py's configure_litellm, whatever config.yaml says."""

    def __init__(self) -> None:
        super().__init__()
        self._open: dict[str, RequestTrace] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def begin(self, alias: str, endpoint: str, stream: bool, key_id: str | None, sink: Sink | None,
              source: str = "api") -> RequestTrace:
        trace = RequestTrace(f"req_{uuid.uuid4().hex}", alias, endpoint, stream, key_id, source=source, sink=sink)
        self._open[trace.request_id] = trace
        return trace

    def end(self, trace: RequestTrace, status: str, error: BaseException | None = None) -> None:
        """Close the trace; its row is written in the background once LiteLLM's success event is in.

        Only the first close counts: a request that two paths close (its own handler, and shutdown's sweep
        of what is left open) makes one row and settles its hold once."""
        if trace.status != "pending":
            return
        trace.finished_at = trace.finished_at or time.perf_counter()
        trace.status = status
        if error is not None:
            trace.error_class, trace.error = type(error).__name__, str(error).split("\n", 1)[0][:500]
        task = asyncio.get_running_loop().create_task(self._finish(trace))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, trace: RequestTrace) -> None:
        # a request passed through to Anthropic never went through LiteLLM: no event is coming
        if trace.status == "success" and trace.cloud is None and not trace._success_seen.is_set():
            try:
                await asyncio.wait_for(trace._success_seen.wait(), SUCCESS_EVENT_WAIT_S)
            except TimeoutError:
                pass  # the proxy already holds the usage; LiteLLM's event only adds its cost
        self._open.pop(trace.request_id, None)
        if trace.sink is not None:
            try:
                await trace.sink(trace)
            except Exception:
                log.exception("recording usage failed for %s", trace.request_id)

    def unfinished(self, sink: Sink) -> list[RequestTrace]:
        """The traces going to `sink` that no one has closed yet (requests still in flight)."""
        return [t for t in self._open.values() if t.sink == sink and t.status == "pending"]

    async def drain(self) -> None:
        """Wait for every closed trace to reach the sinks (at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- LiteLLM's events --------------------------------------------------------------------------

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        trace = self._open.get(_request_id(kwargs) or "")
        if trace is None:
            return
        slo = kwargs.get("standard_logging_object") or {}
        exc = kwargs.get("exception")
        trace.attempts.append(Attempt(
            deployment_id=str(slo.get("model_id") or (kwargs.get("litellm_params") or {}).get("model_info", {}).get("id")),
            model=str(kwargs.get("model")), ok=False,
            error_class=type(exc).__name__ if exc else None, error=str(exc).split("\n", 1)[0][:300] if exc else None,
            exception=exc,
        ))

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        trace = self._open.get(_request_id(kwargs) or "")
        if trace is None:
            return
        slo = kwargs.get("standard_logging_object") or {}
        model_id = str(slo.get("model_id") or "")
        trace.attempts.append(Attempt(deployment_id=model_id, model=str(kwargs.get("model")), ok=True))
        trace.litellm_cost = slo.get("response_cost")
        trace.answer_logged()


usage_logger = UsageLogger()
