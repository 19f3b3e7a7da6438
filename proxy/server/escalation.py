"""Checked answers: an answer that fails its alias's checks goes on to a model that may do better.

The Router's fallbacks cover a deployment that fails; this covers one that answers badly. After the Router
answers, the alias's checks (routing/answer_checks.py) judge the answer; one that fails is asked again of
the alias's `escalate_to` deployment when it has one (a cloud model, say), else of the rest of its chain
below the deployment that answered, with the Router's fallbacks over that rest. Each verdict goes onto the
request's trace with what the judged answer cost, for its usage row. When nothing better can be had (the
chain is spent, or what is left fails), the client gets the last answer made, marked failed: an answer the
checks doubt is still worth more than an error.

A stream on a checked alias is checked after it was sent (the verdict recorded, nothing escalated), or, where
the alias says `stream: hold`, answered whole, checked and escalated, and only then sent as a stream.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from proxy.routing.answer_checks import AliasChecks, Answer, Verdict
from proxy.routing.router import Deployment
from proxy.server.ask_router import ChainFailed, ask
from proxy.settings import Settings
from proxy.usage.trace import Judged, RequestTrace

if TYPE_CHECKING:
    from proxy.server.app import Proxy


def checks_for(proxy: Proxy, alias: str) -> AliasChecks | None:
    return proxy.settings.answer_checks.get(alias)


def holds_stream(proxy: Proxy, trace: RequestTrace) -> bool:
    """Whether this stream is answered whole first, to be checked before anything is sent."""
    checks = checks_for(proxy, trace.alias)
    return trace.stream and checks is not None and checks.hold_streams


async def ask_checked(proxy: Proxy, trace: RequestTrace, call: Callable[..., Awaitable[Any]], kwargs: dict[str, Any],
                      response_format: dict[str, Any] | None) -> Any:
    """The Router's answer, judged by the alias's checks and escalated until one passes or nothing is left."""
    started = time.perf_counter()
    result = await ask(proxy, trace, call, kwargs)
    checks = checks_for(proxy, trace.alias)
    if checks is None or kwargs.get("stream"):  # a stream being relayed is judged once sent (judge_stream)
        return result
    tried: set[str] = set()
    while True:
        dep = proxy.deployments.get(str(_hidden(result).get("model_id")))
        verdict = checks.judge(answer_of(result, response_format))
        judge(trace, dep, verdict, result, time.perf_counter() - started)
        if verdict.passed:
            return result
        tried.add(dep.group if dep else trace.alias)
        target = next_target(proxy.settings, trace.alias, dep, checks, tried)
        if target is None:
            return result
        group, rest = target
        trace.escalations += 1
        trace.asking_again()
        started = time.perf_counter()
        try:
            result = await ask(proxy, trace, call, {**kwargs, "model": group,
                                                    "fallbacks": [{group: rest}] if rest else []})
        except ChainFailed:
            trace.answer_never_came()
            return result  # nothing better could be had: the doubted answer, marked failed


def next_target(settings: Settings, alias: str, dep: Deployment | None, checks: AliasChecks,
                tried: set[str]) -> tuple[str, list[str]] | None:
    """Where an answer that failed goes next: (model group, its fallbacks), or None when nothing is left."""
    if checks.escalate_to is not None:
        return None if checks.escalate_to in tried else (checks.escalate_to, [])
    chain = settings.chain(alias)
    below = chain.index(dep.group) + 1 if dep is not None and dep.group in chain else \
        max((chain.index(g) + 1 for g in tried if g in chain), default=len(chain))
    rest = [g for g in chain[below:] if g not in tried]
    return (rest[0], rest[1:]) if rest else None


def answer_of(result: Any, response_format: dict[str, Any] | None) -> Answer:
    """What the checks read of a chat or text completion: its first choice."""
    choice = result.choices[0]
    message = getattr(choice, "message", None)
    if message is not None:
        return Answer(message.content or "", len(getattr(message, "tool_calls", None) or []), choice.finish_reason,
                      response_format)
    return Answer(getattr(choice, "text", "") or "", 0, choice.finish_reason, response_format)


def judge(trace: RequestTrace, dep: Deployment | None, verdict: Verdict, result: Any | None,
          elapsed_s: float) -> None:
    """Put one verdict on the trace, with the tokens and time its answer took (a rejected answer is priced too)."""
    usage = getattr(result, "usage", None)
    timings = _hidden(result).get("timings") or {}
    generation_s = (float(timings["prompt_ms"]) + float(timings["predicted_ms"])) / 1000 \
        if "prompt_ms" in timings and "predicted_ms" in timings else elapsed_s
    trace.judged.append(Judged(dep.id if dep else None, dep.model if dep else None, verdict.passed, verdict.check,
                               verdict.reason, int(getattr(usage, "prompt_tokens", 0) or 0),
                               int(getattr(usage, "completion_tokens", 0) or 0), generation_s))


def judge_stream(proxy: Proxy, trace: RequestTrace, text: str, tool_calls: int, finish_reason: str | None,
                 response_format: dict[str, Any] | None) -> None:
    """A stream already sent is checked once whole: its verdict is recorded; there is nothing to escalate."""
    checks = checks_for(proxy, trace.alias)
    if checks is None:
        return
    dep = proxy.deployments.get(trace.served_by or "")
    verdict = checks.judge(Answer(text, tool_calls, finish_reason, response_format))
    trace.judged.append(Judged(dep.id if dep else None, dep.model if dep else None, verdict.passed, verdict.check,
                               verdict.reason, trace.prompt_tokens, trace.completion_tokens, trace.generation_s))


def verdict_headers(trace: RequestTrace) -> dict[str, str]:
    """What the checks said, for the client: `x-delegate-check` and, when it was sent on, `x-delegate-escalations`."""
    if trace.verdict is None:
        return {}
    headers = {"x-delegate-check": trace.verdict}
    if trace.escalations:
        headers["x-delegate-escalations"] = str(trace.escalations)
    return headers


def _hidden(result: Any) -> dict[str, Any]:
    return getattr(result, "_hidden_params", None) or {}
