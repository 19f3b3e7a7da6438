"""`delegate review` and `make review`: find the diff, ask the proxy, print findings, set the exit status.

The diff comes from stdin when one is piped (`git diff HEAD~1 | make review`), from `git diff BASE` with
`--base` (`BASE=HEAD~1 make review`), or else from the working tree's changes against HEAD.
Exit status: 0, or 1 when a finding reaches --fail-on; 2 when the review could not run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from proxy.client.connection import Connection, ProxyError, unknown_alias
from proxy.client.console import stdin_is_piped
from proxy.review import diff
from proxy.review import findings as review
from proxy.review.repetition import looping_tail

DEFAULT_CONTEXT = 2048  # when the proxy cannot tell: Ollama's default num_ctx, and our backend's
PROMPT_OVERHEAD_TOKENS = 250
EXIT_RUN_FAILED = 2
SOURCE = "review"  # what usage rows say these requests came from
CHECK_EVERY_CHARS = 64  # a streamed reply is checked for a loop each time it grows this much


def git_diff(base: str | None, cwd: Path) -> str:
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=cwd, capture_output=True, text=True)
    if inside.returncode != 0:
        raise review.ReviewError(f"{cwd} is not a git repository: run this inside one, or pipe a diff on stdin")
    args = ["git", "diff", "--no-color", "--no-ext-diff", base or "HEAD"]
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, errors="replace")
    if result.returncode != 0 and base is None:  # a repository without commits has no HEAD
        result = subprocess.run(["git", "diff", "--no-color", "--cached"], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise review.ReviewError(f"git diff {base or 'HEAD'} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout


def read_diff(args: argparse.Namespace) -> str:
    if args.base is None and not args.working_tree and stdin_is_piped():
        return sys.stdin.read()
    return git_diff(args.base, Path.cwd())


def served_context(conn: Connection, alias: str) -> int:
    try:
        models = {m["id"]: m for m in conn.models()}
    except ProxyError as e:
        raise review.ReviewError(str(e)) from e
    entry = models.get(alias)
    if entry is None or entry.get("kind", "alias") != "alias":  # a server that names no kinds is taken at its word
        raise review.ReviewError(unknown_alias(alias, [m for m, v in models.items() if v.get("kind") == "alias"]))
    return int(entry.get("context_length") or DEFAULT_CONTEXT)


def reply_tokens(requested: int, context: int) -> int:
    """The longest reply to ask for: what was asked, but never more than half the context (the diff needs the
    rest), since a reply held to the findings schema that loops inside a string runs until this limit."""
    return max(16, min(requested, context // 2))


def asker(conn: Connection, alias: str, max_tokens: int) -> review.Ask:
    """Ask with the findings schema as response_format; a backend that refuses it (400 naming response_format) is
    asked without it from then on. The reply streams, and stops being read once it loops."""
    import openai

    c = conn.openai(max_retries=1)
    schema = {"response_format": review.RESPONSE_FORMAT}

    def ask(messages: list[dict[str, str]]) -> str:
        try:
            stream = c.chat.completions.create(model=alias, messages=messages, temperature=0,  # type: ignore[call-overload]
                                               max_tokens=max_tokens, stream=True, **schema)
            return read_stream(stream)
        except openai.APIConnectionError as e:
            raise review.ReviewError(conn.unreachable_message()) from e
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            message = str(body.get("message") or e)
            if schema and e.status_code == 400 and "response_format" in message:
                schema.clear()
                return ask(messages)
            raise review.ReviewError(f"the proxy could not review (HTTP {e.status_code}): {message}") from e
        except (openai.APIError, httpx.HTTPError) as e:
            raise review.ReviewError(f"the reply broke off: {e}") from e

    return ask


def read_stream(stream: Any) -> str:
    """The text of a streamed reply, read until it ends or its tail starts looping (then the stream is closed)."""
    parts: list[str] = []
    size = checked = 0
    for chunk in stream:
        text = chunk.choices[0].delta.content if chunk.choices else None
        if not text:
            continue
        parts.append(text)
        size += len(text)
        if size - checked >= CHECK_EVERY_CHARS:
            checked = size
            if looping_tail(joined := "".join(parts)) is not None:
                stream.close()
                return joined
    return "".join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        text = read_diff(args)
        files = diff.parse(text)
        if not text.strip() or not files:
            print("nothing to review: the diff is empty", file=sys.stderr)
            return 0
        reviewable = [f for f in files if not f.binary and f.added]
        if not reviewable:
            why = ", ".join(f"{f.path} ({'binary' if f.binary else 'no added lines'})" for f in files)
            print(f"nothing to review: {why}", file=sys.stderr)
            return 0
        conn = Connection(SOURCE)
        context = served_context(conn, args.task)
        max_tokens = reply_tokens(args.max_tokens, context)
        max_chars = max(500, (context - max_tokens - PROMPT_OVERHEAD_TOKENS) * review.CHARS_PER_TOKEN)
        result = review.review(files, asker(conn, args.task, max_tokens), max_chars, progress=_progress())
    except review.ReviewError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    out = {"markdown": review.to_markdown, "json": review.to_json, "sarif": review.to_sarif}[args.format](result)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 1 if review.fails(result, args.fail_on) else 0


def _progress():  # type: ignore[no-untyped-def]
    """Progress on stderr: a bar in a terminal, a line per piece otherwise."""
    from rich.console import Console

    err = Console(stderr=True)

    def show(i: int, n: int, path: str) -> None:
        if n > 1 or err.is_terminal:
            err.print(f"[dim]reviewing {i}/{n}: {path}[/dim]" if err.is_terminal else f"reviewing {i}/{n}: {path}")

    return show
