"""`delegate mcp`: Delegate's tools for Claude (Claude Code, Claude Desktop) over the Model Context Protocol.

Three tools, each with a short schema (every tool costs the calling model context on every turn):
  delegate  a self-contained prompt to a task alias -> the answer, who served it, tokens, what it saved
  review    a diff (or, beside the repository, a git range) -> findings pinned to lines (proxy/review/)
  savings   what delegation saved over N days, per task and per source
Their descriptions carry the seed system's rule of thumb for when delegating pays and when it does not.

The tools reach the proxy over HTTP like every client tool (DELEGATE_URL, DELEGATE_API_KEY; connection.py), and
every request they make says `x-delegate-source: mcp`, so its usage row says where it came from. The same tools
are served by the proxy itself at /mcp (proxy/server/mcp_http.py), where a `Link` carries the caller's own key
and an in-process transport instead. Failures a model can act on (bad arguments, a proxy that is not running,
a key that may not read spend) come back as tool errors (`isError`) in one sentence. Only the protocol goes to
stdout: the SDK's stdio transport moves file descriptor 1 away from stray prints while it serves, and logs go
to stderr. The server exits 0 when its stdin closes. Client-side: no litellm, no proxy.server here.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from proxy.client.connection import SOURCE_HEADER, api_key, proxy_url
from proxy.review import diff as diffs
from proxy.review import findings
from proxy.review.cli import DEFAULT_CONTEXT, PROMPT_OVERHEAD_TOKENS, git_diff, reply_tokens

SOURCE = "mcp"
REVIEW_ALIAS = "review"
REVIEW_MAX_TOKENS = 512  # per piece of the diff, as `delegate review` (and at most half the context)
ROW_WAIT_S = 2.0  # how long the usage row of an answer may take to be written before "saved" is left unknown
TIMEOUT_S = 300.0
_GIT_RANGE = re.compile(r"[A-Za-z0-9_./~^@{}:-]+(?:\.\.\.?[A-Za-z0-9_./~^@{}:-]+)?")

WHEN = (
    "Delegating pays for: boilerplate and simple code generation or refactoring, summarising logs or files, "
    "code review, translation, quick Q&A that needs no conversation context. Do it yourself for: complex "
    "multi-step reasoning, work that needs this conversation's context, high-stakes decisions or external "
    "actions, user-facing text where tone matters, tasks that need tool use. The local models are small: "
    "check what comes back."
)
DELEGATE_DESCRIPTION = (
    "Hand one self-contained task to a local model through the Delegate proxy; returns its answer, the model "
    "that served it, tokens, and what it saved against the cloud reference model. The model sees only `prompt`: "
    "put in it the code or text it needs. " + WHEN
)
REVIEW_DESCRIPTION = (
    "Review a unified diff with a local model (the proxy's `review` alias); returns findings (severity, file, "
    "line, message, suggestion) and what it saved. A cheap first pass over patches and PRs, security smells "
    "included; confirm a finding before acting on it."
)
REVIEW_GIT = " Pass `diff` (the text of `git diff`), or `git_range` (e.g. HEAD~1, main..HEAD) read by git in `repo`."
REVIEW_TEXT_ONLY = " Pass `diff`: the text of `git diff` (this server runs inside the proxy, not beside your code)."
SAVINGS_DESCRIPTION = (
    "What delegating to local models has saved over the last `days`: calls, tokens, what the cloud reference "
    "model would have cost, the local cost, saved $ and %, per task and per source (api, cli, mcp, messages, "
    "review). Needs the proxy's master key, or a proxy on this machine without one."
)


@dataclass(frozen=True)
class Link:
    """How the tools reach the proxy: its address and key, and for the proxy's own /mcp an in-process transport."""

    url: str
    key: str | None
    transport: httpx.AsyncBaseTransport | None = None

    @classmethod
    def from_env(cls) -> Link:
        return cls(proxy_url(), api_key())

    def client(self) -> httpx.AsyncClient:
        headers = {SOURCE_HEADER: SOURCE}
        if self.key:
            headers["authorization"] = f"Bearer {self.key}"
        return httpx.AsyncClient(base_url=self.url, headers=headers, transport=self.transport, timeout=TIMEOUT_S)

    @property
    def unreachable(self) -> str:
        return f"cannot reach the Delegate proxy at {self.url}: start it with `make serve` (or set DELEGATE_URL)"


@dataclass
class Answer:
    """One chat completion as the proxy reported it."""

    text: str
    alias: str
    model: str
    fallbacks: int
    request_id: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


@dataclass
class Usage:
    """Several answers (a review asks once per piece of the diff) and what their usage rows say they saved."""

    answers: list[Answer] = field(default_factory=list)
    saved: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"served_by": sorted({a.model for a in self.answers}), "requests": len(self.answers),
                "fallbacks": sum(a.fallbacks for a in self.answers),
                "prompt_tokens": sum(a.prompt_tokens for a in self.answers),
                "completion_tokens": sum(a.completion_tokens for a in self.answers),
                "latency_s": round(sum(a.latency_s for a in self.answers), 3), **self.saved}

    def line(self) -> str:
        d = self.as_dict()
        served = ", ".join(d["served_by"]) or "nobody"
        out = (f"[delegate] served by {served}; {d['prompt_tokens']} tokens in, {d['completion_tokens']} out, "
               f"{d['latency_s']:.1f} s")
        if d["fallbacks"]:
            out += f", {d['fallbacks']} fallback hop{'s' if d['fallbacks'] != 1 else ''}"
        if d.get("saved_usd") is not None:
            out += (f"; saved ${d['saved_usd']:.4f} against {d['reference_model']} "
                    f"(it would have cost ${d['reference_cost_usd']:.4f}, local ${d['local_cost_usd']:.4f})")
        else:
            out += f"; saved: unknown ({d.get('saved_note', 'no usage row')})"
        return out


# --- talking to the proxy ----------------------------------------------------------------------------

class Refused(ToolError):
    """The proxy answered with an error status: the tool error says which, with the proxy's own message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the proxy could not answer (HTTP {status}): {message}")
        self.status, self.message = status, message


def _error_message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300] or r.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(body)[:300]


async def _send(link: Link, client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return await client.request(method, path, **kwargs)
    except httpx.TimeoutException as e:
        raise ToolError(f"the Delegate proxy at {link.url} did not answer in time") from e
    except httpx.HTTPError as e:
        raise ToolError(link.unreachable) from e


async def chat(link: Link, client: httpx.AsyncClient, alias: str, messages: list[dict[str, str]], max_tokens: int,
               temperature: float, **extra: Any) -> Answer:
    start = time.perf_counter()
    r = await _send(link, client, "POST", "/v1/chat/completions", json={
        "model": alias, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, **extra})
    if r.status_code != 200:
        raise Refused(r.status_code, _error_message(r))
    body = r.json()
    usage = body.get("usage") or {}
    served = r.headers.get("x-delegate-served-by") or str(body.get("model") or "")
    return Answer(text=body["choices"][0]["message"].get("content") or "", alias=alias,
                  model=served.partition("/")[2] or served, fallbacks=int(r.headers.get("x-delegate-fallbacks") or 0),
                  request_id=r.headers.get("x-request-id"), prompt_tokens=int(usage.get("prompt_tokens") or 0),
                  completion_tokens=int(usage.get("completion_tokens") or 0), latency_s=time.perf_counter() - start)


async def saved(link: Link, client: httpx.AsyncClient, answers: list[Answer]) -> dict[str, Any]:
    """What the answers saved, from their usage rows (GET /spend/logs?request_id=...: priced by the proxy when it
    wrote them). Those are admin reads: with a key that may not make them, saved is left unknown and says why."""
    wanted = {a.request_id for a in answers if a.request_id}
    if not wanted or len(wanted) < len(answers):
        return {"saved_usd": None, "saved_note": "the proxy did not name the requests"}
    rows: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + ROW_WAIT_S
    while True:
        for request_id in sorted(wanted - rows.keys()):
            r = await _send(link, client, "GET", "/spend/logs", params={"request_id": request_id})
            if r.status_code in (401, 403):
                return {"saved_usd": None, "saved_note": f"this key cannot read spend logs: {_error_message(r)}"}
            if r.status_code == 200 and r.json():
                rows[request_id] = r.json()[0]
        if len(rows) == len(wanted) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)  # the recorder writes rows just after the answer
    if len(rows) < len(wanted):
        return {"saved_usd": None, "saved_note": "the usage rows were not written yet; see the savings tool"}
    return {"saved_usd": sum(r["saved"] or 0.0 for r in rows.values()),
            "reference_cost_usd": sum(r["reference_cost"] or 0.0 for r in rows.values()),
            "local_cost_usd": sum(r["spend"] or 0.0 for r in rows.values()),
            "reference_model": ", ".join(sorted({str(r["reference_model"]) for r in rows.values()})),
            "saved_from": "the proxy's usage rows for these requests"}


def _result(text: str, usage: Usage, extra: dict[str, Any] | None = None) -> CallToolResult:
    data = {**(extra or {}), **usage.as_dict()}
    return CallToolResult(content=[TextContent(type="text", text=text), TextContent(type="text", text=usage.line())],
                          structured_content=data)


# --- the tools -----------------------------------------------------------------------------------------

async def delegate_tool(link: Link, prompt: str, task: str, max_tokens: int) -> CallToolResult:
    if not prompt.strip():
        raise ToolError("`prompt` is empty: put the whole task in it, with the code or text it needs")
    if not task.strip():
        raise ToolError("`task` is empty: name a task alias such as coding, quick or analysis")
    async with link.client() as client:
        answer = await chat(link, client, task.strip(), [{"role": "user", "content": prompt}], max_tokens, 0.0)
        usage = Usage([answer])
        usage.saved = await saved(link, client, usage.answers)
    return _result(answer.text, usage, {"answer": answer.text, "task": answer.alias, "request_id": answer.request_id})


def read_git_range(git_range: str, repo: str | None) -> str:
    if not _GIT_RANGE.fullmatch(git_range) or git_range.startswith("-"):
        raise ToolError(f"`git_range` {git_range[:80]!r} is not a revision or range such as HEAD~1 or main..HEAD")
    where = Path(repo).expanduser() if repo else Path.cwd()
    if not where.is_dir():
        raise ToolError(f"`repo` {str(where)!r} is not a directory")
    try:
        return git_diff(git_range, where)
    except findings.ReviewError as e:
        raise ToolError(str(e)) from e


async def served_context(link: Link, client: httpx.AsyncClient, alias: str) -> int:
    r = await _send(link, client, "GET", "/v1/models")
    if r.status_code != 200:
        raise ToolError(f"the proxy could not list its models (HTTP {r.status_code}): {_error_message(r)}")
    models = {m.get("id"): m for m in r.json().get("data", []) if isinstance(m, dict)}
    if alias not in models:
        raise ToolError(f"the proxy has no {alias!r} alias to review with")
    return int(models[alias].get("context_length") or DEFAULT_CONTEXT)


async def review_tool(link: Link, text: str) -> CallToolResult:
    files = diffs.parse(text)
    reviewable = [f for f in files if not f.binary and f.added]
    if not reviewable:
        why = "the diff is empty" if not files else "no file in it adds lines"
        return CallToolResult(content=[TextContent(type="text", text=f"nothing to review: {why}")],
                              structured_content={"findings": [], "notes": [], "skipped": [], "requests": 0})
    async with link.client() as client:
        context = await served_context(link, client, REVIEW_ALIAS)
        max_tokens = reply_tokens(REVIEW_MAX_TOKENS, context)
        max_chars = max(500, (context - max_tokens - PROMPT_OVERHEAD_TOKENS) * findings.CHARS_PER_TOKEN)
        usage = Usage()
        schema = {"response_format": findings.RESPONSE_FORMAT}  # as `delegate review`: dropped if a backend refuses it

        async def ask_async(messages: list[dict[str, str]]) -> str:
            try:
                answer = await chat(link, client, REVIEW_ALIAS, messages, max_tokens, 0.0, **schema)
            except Refused as e:
                if not (schema and e.status == 400 and "response_format" in e.message):
                    raise
                schema.clear()
                answer = await chat(link, client, REVIEW_ALIAS, messages, max_tokens, 0.0)
            usage.answers.append(answer)
            return answer.text

        def ask(messages: list[dict[str, str]]) -> str:  # findings.review is synchronous: it runs in a thread
            return anyio.from_thread.run(ask_async, messages)

        result = await anyio.to_thread.run_sync(findings.review, files, ask, max_chars)
        usage.saved = await saved(link, client, usage.answers)
    report = json.loads(findings.to_json(result))
    return _result(findings.to_markdown(result), usage, report)


async def savings_tool(link: Link, days: int) -> CallToolResult:
    async with link.client() as client:
        r = await _send(link, client, "GET", "/ui/data", params={"days": str(days)})
    if r.status_code != 200:
        raise ToolError(f"the savings summary needs the proxy's master key or a proxy on this machine without one "
                        f"(HTTP {r.status_code}: {_error_message(r)})")
    data = r.json()
    total, by_task, by_source = data.get("total") or {}, data.get("by_task") or {}, data.get("by_source")
    out = {"days": days, "reference_model": data.get("reference_model"), "total": _money(total),
           "by_task": {k: _money(v) for k, v in by_task.items()},
           "by_source": {k: _money(v) for k, v in by_source.items()} if isinstance(by_source, dict) else None}
    lines = [f"Last {days} day{'s' if days != 1 else ''} against {out['reference_model']}: {_summary(total)}"]
    lines += [f"  task {name}: {_summary(v)}" for name, v in by_task.items()]
    if isinstance(by_source, dict):
        lines += [f"  from {name}: {_summary(v)}" for name, v in by_source.items()]
    else:
        lines.append("  per source: not recorded by this proxy")
    return CallToolResult(content=[TextContent(type="text", text="\n".join(lines))], structured_content=out)


def _money(t: dict[str, Any]) -> dict[str, Any]:
    keys = ("calls", "tokens_in", "tokens_out", "reference_cost", "local_cost", "saved", "saved_pct", "success_rate")
    return {k: t[k] for k in keys if k in t}


def _summary(t: dict[str, Any]) -> str:
    pct = t.get("saved_pct")
    calls = t.get("calls", 0)
    tokens = f", {t['tokens_in']} tokens in, {t['tokens_out']} out" if "tokens_in" in t else ""
    return (f"{calls} calls{tokens}; would have cost ${t.get('reference_cost', 0.0):.4f}, local "
            f"${t.get('local_cost', 0.0):.4f}, saved ${t.get('saved', 0.0):.4f}"
            + (f" ({pct:.0f}%)" if pct is not None else ""))


# --- the server ------------------------------------------------------------------------------------------

LinkFor = Callable[[Context], Link]

Prompt = Annotated[str, Field(description="the whole task, with the code or text it needs")]
Task = Annotated[str, Field(description="task alias: coding, quick, analysis, translation, creative, heavy, or "
                                        "another the proxy serves")]
MaxTokens = Annotated[int, Field(ge=1, le=32768, description="longest answer")]
DiffText = Annotated[str | None, Field(description="unified diff text")]
Days = Annotated[int, Field(ge=1, le=3660)]


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    """The argument schema without pydantic's titles: they repeat the names, in every turn's context."""
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
        if prop.get("anyOf") and {"type": "null"} in prop["anyOf"]:  # optional: say the type once
            kinds = [k for k in prop.pop("anyOf") if k != {"type": "null"}]
            prop.update(kinds[0] if len(kinds) == 1 else {"anyOf": kinds})
            prop.pop("default", None)
    return schema


def tools(link_for: LinkFor, local_git: bool) -> list[Tool]:
    async def delegate(prompt: Prompt, ctx: Context, task: Task = "coding", max_tokens: MaxTokens = 1024) -> CallToolResult:
        return await delegate_tool(link_for(ctx), prompt, task, max_tokens)

    async def review_text(diff: Annotated[str, Field(description="unified diff text")], ctx: Context) -> CallToolResult:
        return await review_tool(link_for(ctx), diff)

    async def review_git(ctx: Context, diff: DiffText = None,
                         git_range: Annotated[str | None, Field(description="e.g. HEAD~1 or main..HEAD")] = None,
                         repo: Annotated[str | None, Field(description="repository path (default: cwd)")] = None,
                         ) -> CallToolResult:
        if (diff is None) == (git_range is None):
            raise ToolError("pass exactly one of `diff` (the text of a diff) and `git_range` (such as HEAD~1)")
        if git_range is not None:
            diff = await anyio.to_thread.run_sync(read_git_range, git_range, repo)
        assert diff is not None
        return await review_tool(link_for(ctx), diff)

    async def savings(ctx: Context, days: Days = 7) -> CallToolResult:
        return await savings_tool(link_for(ctx), days)

    listed = [
        Tool.from_function(delegate, name="delegate", description=DELEGATE_DESCRIPTION, structured_output=False,
                           annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False)),
        Tool.from_function(review_git if local_git else review_text, name="review", structured_output=False,
                           description=REVIEW_DESCRIPTION + (REVIEW_GIT if local_git else REVIEW_TEXT_ONLY),
                           annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False)),
        Tool.from_function(savings, name="savings", description=SAVINGS_DESCRIPTION, structured_output=False,
                           annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)),
    ]
    for tool in listed:
        tool.parameters = _compact(tool.parameters)
    return listed


def build_server(link_for: LinkFor, local_git: bool) -> MCPServer:
    # the SDK logs (to stderr) a line per tool error at INFO; warnings are enough beside Claude
    return MCPServer("delegate", instructions="Hand routine work to local models and see what it saved. " + WHEN,
                     tools=tools(link_for, local_git), log_level="WARNING")


def main() -> int:
    """`delegate mcp`: serve the tools over stdio until stdin closes."""
    link = Link.from_env()
    build_server(lambda ctx: link, local_git=True).run("stdio")
    return 0
