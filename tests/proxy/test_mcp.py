"""`delegate mcp` and the proxy's /mcp, driven by the real `mcp` client: over stdio (the command as Claude Code starts
it) and over streamable HTTP, in front of a real proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import write_config
from tests.servers import ROOT, refused_port

FINDINGS = json.dumps({"findings": [
    {"severity": "high", "file": "calc.py", "line": 2, "message": "division by zero when b is 0", "suggestion": "check b"}]})
DIFF = ("diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def div(a, b):\n"
        "-    return 1\n+    return a / b\n")
MASTER = "sk-master-test"


def stdio(url: str, cwd: Path = ROOT, key: str | None = None) -> StdioServerParameters:
    env = {**os.environ, "DELEGATE_URL": url}
    if key:
        env["DELEGATE_API_KEY"] = key
    return StdioServerParameters(command=sys.executable, args=["-m", "proxy.client.cli", "mcp"], env=env, cwd=str(cwd))


def http(url: str, key: str | None = None) -> Any:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return streamable_http_client(url + "/mcp", http_client=httpx2.AsyncClient(headers=headers, timeout=120))


def with_client(server: Any, body: Callable[[Client], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with Client(server) as client:
            return await body(client)

    return anyio.run(run)


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content)


@pytest.fixture
def proxy(tmp_path: Path, fake_backend, start_proxy) -> Callable[..., tuple[str, Any]]:  # type: ignore[no-untyped-def]
    """A real proxy whose `coding` alias answers `answer from ok` and whose `review` alias finds one bug."""

    def start(master_key: str | None = None) -> tuple[str, Any]:
        coder, coder_url = fake_backend("ok")
        _, reviewer_url = fake_backend("reviewer", reply=FINDINGS)
        config = write_config(tmp_path / "c.yaml", [("coding", "openai/ok", coder_url),
                                                    ("review", "openai/reviewer", reviewer_url)],
                              aliases=["coding", "review"])
        return start_proxy(config, master_key).url, coder

    return start


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=path, check=True,
                       capture_output=True)

    git("init", "-q")
    (path / "calc.py").write_text("def div(a, b):\n    return 1\n")
    git("add", ".")
    git("commit", "-qm", "first")
    (path / "calc.py").write_text("def div(a, b):\n    return a / b\n")
    git("commit", "-qam", "second")
    return path


def test_few_tools_with_short_schemas() -> None:
    from proxy.client.mcp_server import Link, build_server

    server = build_server(lambda ctx: Link("http://127.0.0.1:1", None), local_git=True)
    tools = with_client(server, lambda c: c.list_tools()).tools
    assert [t.name for t in tools] == ["delegate", "review", "savings"]
    for t in tools:
        assert len(json.dumps(t.input_schema)) < 500, t.name  # every turn carries them
        assert "title" not in json.dumps(t.input_schema)
    delegate = tools[0].description
    assert "Delegating pays for" in delegate and "Do it yourself for" in delegate and "conversation" in delegate


def test_stdio_delegate_review_and_savings(proxy, repo: Path) -> None:  # type: ignore[no-untyped-def]
    url, coder = proxy()

    async def session(c: Client) -> dict[str, Any]:
        return {
            "tools": [t.name for t in (await c.list_tools()).tools],
            "delegate": await c.call_tool("delegate", {"prompt": "write a CLI parser", "task": "coding"}),
            "review_text": await c.call_tool("review", {"diff": DIFF}),
            "review_git": await c.call_tool("review", {"git_range": "HEAD~1", "repo": str(repo)}),
            "savings": await c.call_tool("savings", {"days": 1}),
        }

    out = with_client(stdio(url), session)
    assert out["tools"] == ["delegate", "review", "savings"]
    d = out["delegate"]
    assert not d.is_error and d.content[0].text == "answer from ok"
    s = d.structured_content
    assert s["served_by"] == ["ok"] and s["task"] == "coding" and s["completion_tokens"] > 0
    assert s["saved_usd"] is not None and s["saved_usd"] == pytest.approx(s["reference_cost_usd"] - s["local_cost_usd"])
    assert "[delegate] served by ok" in text(d) and "saved $" in text(d)
    assert coder.requests[-1]["messages"][-1]["content"] == "write a CLI parser"
    for name in ("review_text", "review_git"):
        r = out[name]
        assert not r.is_error, text(r)
        assert r.structured_content["findings"][0]["line"] == 2 and r.structured_content["served_by"] == ["reviewer"]
        assert "**high** `calc.py:2`: division by zero" in text(r)
    savings = out["savings"]
    assert not savings.is_error, text(savings)
    by_task = savings.structured_content["by_task"]
    assert by_task["coding"]["calls"] == 1 and by_task["review"]["calls"] == 2
    by_source = savings.structured_content["by_source"]
    assert list(by_source) == ["mcp"] and by_source["mcp"]["calls"] == 3  # every request the tools made says mcp
    assert "from mcp: 3 calls" in text(savings)
    assert text(savings).startswith("Last 1 day against ")


def test_every_request_says_it_came_from_mcp(proxy) -> None:  # type: ignore[no-untyped-def]
    url, _ = proxy()
    with_client(stdio(url), lambda c: c.call_tool("delegate", {"prompt": "hi"}))
    rows = httpx.get(url + "/spend/logs").json()
    assert len(rows) == 1
    from proxy.usage.store import UsageStore

    stored = UsageStore.open().rows()
    if "source" not in stored[0]:
        pytest.skip("this proxy's usage rows have no source column yet")
    assert [r["source"] for r in stored] == ["mcp"]


def test_stdio_bad_arguments_are_tool_errors(proxy) -> None:  # type: ignore[no-untyped-def]
    url, coder = proxy()
    calls: list[tuple[str, dict[str, Any]]] = [
        ("delegate", {"prompt": "  "}), ("delegate", {"prompt": 3}), ("delegate", {"prompt": "x", "max_tokens": 0}),
        ("delegate", {"prompt": "x", "task": "nope"}), ("review", {}), ("review", {"diff": DIFF, "git_range": "HEAD"}),
        ("review", {"git_range": "--output=/tmp/x"}), ("savings", {"days": 0}), ("no_such_tool", {}),
    ]

    async def session(c: Client) -> list[Any]:
        return [await c.call_tool(name, args) for name, args in calls]

    results = with_client(stdio(url), session)
    for (name, args), r in zip(calls, results, strict=True):
        assert r.is_error, (name, args, text(r))
    assert "prompt" in text(results[0]) and "max_tokens" in text(results[2])
    assert "unknown model 'nope'" in text(results[3]).lower() or "nope" in text(results[3])
    assert "exactly one" in text(results[5]) and "not a revision" in text(results[6])
    assert coder.requests == []  # nothing bad reached a model


def test_stdio_unreachable_proxy_is_a_tool_error() -> None:
    async def session(c: Client) -> list[Any]:
        return [await c.call_tool("delegate", {"prompt": "hi"}), await c.call_tool("savings", {})]

    for r in with_client(stdio(f"http://127.0.0.1:{refused_port()}"), session):
        assert r.is_error and "cannot reach the Delegate proxy" in text(r)


def test_stdio_speaks_only_protocol_and_exits_0_when_stdin_closes() -> None:
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize",
         "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"arguments": {}}},  # no tool name
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "delegate", "arguments": {}}},
    ]
    env = {**os.environ, "DELEGATE_URL": f"http://127.0.0.1:{refused_port()}"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy.client.cli", "mcp"], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        replies = {}
        for m in messages:
            proc.stdin.write(json.dumps(m) + "\n")
            proc.stdin.flush()
            if "id" in m:
                reply = json.loads(proc.stdout.readline())  # every line on stdout is one JSON-RPC message
                replies[reply["id"]] = reply
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [t["name"] for t in replies[2]["result"]["tools"]] == ["delegate", "review", "savings"]
    assert replies[3]["error"]["code"] == -32602  # invalid params
    assert replies[4]["result"]["isError"] and "prompt" in replies[4]["result"]["content"][0]["text"]


def test_http_mcp_in_the_proxy(proxy) -> None:  # type: ignore[no-untyped-def]
    url, _ = proxy()

    async def session(c: Client) -> dict[str, Any]:
        tools = (await c.list_tools()).tools
        return {
            "tools": {t.name: t for t in tools},
            "delegate": await c.call_tool("delegate", {"prompt": "write a CLI parser"}),
            "review": await c.call_tool("review", {"diff": DIFF}),
            "git": await c.call_tool("review", {"git_range": "HEAD~1"}),
            "savings": await c.call_tool("savings", {}),
        }

    out = with_client(http(url), session)
    assert list(out["tools"]) == ["delegate", "review", "savings"]
    assert "git_range" not in out["tools"]["review"].input_schema["properties"]  # the proxy is not beside the repo
    assert out["delegate"].content[0].text == "answer from ok"
    assert out["delegate"].structured_content["saved_usd"] is not None
    assert out["review"].structured_content["findings"][0]["file"] == "calc.py"
    assert out["git"].is_error
    assert out["savings"].structured_content["by_task"]["coding"]["calls"] == 1
    rebound = httpx.post(url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                         headers={"host": "evil.example", "accept": "application/json, text/event-stream"})
    assert rebound.status_code == 403  # an open proxy answers only requests addressed to this machine


def test_http_mcp_takes_the_proxy_keys(proxy) -> None:  # type: ignore[no-untyped-def]
    url, coder = proxy(master_key=MASTER)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    accept = {"accept": "application/json, text/event-stream"}
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = httpx.post(url + "/mcp", json=init, headers={**accept, **headers})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    from proxy.usage.keys import KeyStore
    from proxy.usage.store import UsageStore

    issued, _ = KeyStore(UsageStore.open()).create("claude", None, None, None, None)

    async def session(c: Client) -> list[Any]:
        return [await c.call_tool("delegate", {"prompt": "hi"}), await c.call_tool("savings", {})]

    master = with_client(http(url, MASTER), session)
    assert not master[0].is_error and master[0].structured_content["saved_usd"] is not None
    assert not master[1].is_error
    limited = with_client(http(url, issued), session)
    assert not limited[0].is_error and limited[0].content[0].text == "answer from ok"
    assert limited[0].structured_content["saved_usd"] is None
    assert "cannot read spend logs" in limited[0].structured_content["saved_note"]
    assert limited[1].is_error and "master key" in text(limited[1])
    assert len(coder.requests) == 2
    stdio_issued = with_client(stdio(url, key=issued), session)
    assert stdio_issued[0].content[0].text == "answer from ok" and stdio_issued[1].is_error


def test_delegate_to_the_real_model(real_proxy: str) -> None:
    result = with_client(stdio(real_proxy), lambda c: c.call_tool(
        "delegate", {"prompt": "What is the capital of France? Answer in one word.", "task": "quick", "max_tokens": 10}))
    assert not result.is_error, text(result)
    assert "Paris" in result.content[0].text
    assert result.structured_content["served_by"] == ["smollm2"]
