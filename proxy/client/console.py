"""`delegate ask`, `delegate models` and `delegate status`: the proxy's answers, sized for a terminal.

Tokens stream as they come, a spinner runs on stderr while the first one is awaited, lists are tables;
`--json` gives scripts the same facts. Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import stat
import sys
import time
from typing import Any

from proxy.client.api import split_model
from proxy.client.connection import Connection, ProxyError, Unreachable
from proxy.client.tables import table

EXIT_FAILED, EXIT_UNREACHABLE = 1, 2
SOURCE = "cli"  # what usage rows say these requests came from


def fail(message: str, status: int = EXIT_FAILED) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def unreachable(conn: Connection) -> int:
    return fail(conn.unreachable_message(), EXIT_UNREACHABLE)


def stdin_is_piped() -> bool:
    """A pipe or a redirected file; not a terminal, not /dev/null (as under cron or CI)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt argument, stdin, or both (`git diff | delegate ask "explain this"`)."""
    piped = ""
    if stdin_is_piped():
        # with a prompt given, read stdin only if something is there: an idle inherited pipe must not hang us
        if args.prompt in (None, "-") or select.select([sys.stdin], [], [], 0.05)[0]:
            piped = sys.stdin.read()
    if args.prompt in (None, "-"):
        return piped
    return f"{args.prompt}\n\n{piped}" if piped.strip() else args.prompt


def ask(args: argparse.Namespace) -> int:
    from proxy.client import api as client

    prompt = read_prompt(args)
    if not prompt.strip():
        return fail("nothing to ask: give a prompt, or pipe one on stdin")
    conn = Connection(SOURCE)
    try:
        if args.json:
            result = client.delegate_via(conn, prompt, task=args.task, system=args.system, max_tokens=args.max_tokens,
                                         temperature=args.temperature)
            print(json.dumps(result.to_dict(), indent=2))
            return 0 if result.success else EXIT_FAILED
        conn.check_alias(args.task)
    except Unreachable:
        return unreachable(conn)
    except ValueError as e:  # a task the proxy serves no alias for
        return fail(str(e))
    return _stream(conn, prompt, args)


def _stream(conn: Connection, prompt: str, args: argparse.Namespace) -> int:
    import openai
    from rich.console import Console

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
    err = Console(stderr=True)
    c = conn.openai()
    start = time.perf_counter()
    status = err.status(f"asking {args.task}…") if err.is_terminal else None
    if status:
        status.start()
    tokens, served = 0, ""
    try:
        stream = c.chat.completions.create(  # type: ignore[call-overload]
            model=args.task, messages=messages, max_tokens=args.max_tokens, temperature=args.temperature, stream=True,
            stream_options={"include_usage": True})
        for chunk in stream:
            served = chunk.model or served
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                if status:
                    status.stop()
                    status = None
                sys.stdout.write(text)
                sys.stdout.flush()
    except openai.APIConnectionError:
        return unreachable(conn)
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return fail(f"HTTP {e.status_code}: {body.get('message') or e}")
    except openai.APIError as e:
        sys.stdout.write("\n")
        return fail(f"the answer broke off: {e}")
    finally:
        if status:
            status.stop()
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    model, backend = split_model(served)
    if err.is_terminal:
        err.print(f"[dim]{model} on {backend} · {tokens} tokens · {elapsed:.1f}s[/dim]")
    return 0


def models(args: argparse.Namespace) -> int:
    conn = Connection(SOURCE)
    try:
        data = conn.models(fresh=True)
    except Unreachable:
        return unreachable(conn)
    except ProxyError as e:
        return fail(str(e))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console

    rows = [(m["id"], m["kind"], m.get("description") or "", " → ".join([*m["deployments"], *m["fallbacks"]]),
             str(m.get("context_length") or "?")) for m in data]
    Console().print(table("Task aliases and models", ("name", "kind", "used for", "chain", "context"), rows))
    return 0


def status(args: argparse.Namespace) -> int:
    conn = Connection(SOURCE)
    facts: dict[str, Any] = {"proxy": conn.url}
    try:
        facts["alive"] = conn.get("/health/liveliness", timeout=3).status_code == 200
        ready = conn.get("/health/readiness")
        facts["ready"], facts["problems"] = ready.status_code == 200, ready.json().get("problems", [])
        health = conn.get("/health")
        facts["deployments"] = health.json()["deployments"] if health.status_code == 200 else []
    except Unreachable:
        facts.update(alive=False, ready=False, problems=["the proxy is not running"], deployments=[])
    except ProxyError as e:
        return fail(str(e))
    facts["store"] = _store_facts()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0 if facts["ready"] else EXIT_FAILED
    from rich.console import Console

    out = Console()
    state = "[green]ready[/green]" if facts["ready"] else ("[yellow]not ready[/yellow]" if facts["alive"] else "[red]down[/red]")
    out.print(f"proxy {facts['proxy']}: {state}")
    for problem in facts["problems"]:
        out.print(f"  - {problem}")
    if facts["deployments"]:
        rows = [(d["model_name"], d["model"], d["api_base"] or "", d["status"],
                 f"{d['cooldown_remaining_s']:.0f}s" if d["cooldown_remaining_s"] else "") for d in facts["deployments"]]
        out.print(table("Backends", ("model name", "deployment", "address", "status", "cooling down"), rows))
    store = facts["store"]
    out.print(f"usage store {store['url']}: " + (f"{store['rows']:,} rows" if "rows" in store else store["error"]))
    return 0 if facts["ready"] else EXIT_FAILED


def _store_facts() -> dict[str, Any]:
    from proxy.usage.store import StoreError, UsageStore

    try:
        store = UsageStore.open()
        return {"url": store.db.url, "rows": store.count()}
    except StoreError as e:
        return {"url": "?", "error": str(e)}
