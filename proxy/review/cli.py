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

import httpx

from proxy.client.api import api_key, proxy_url
from proxy.client.console import stdin_is_piped
from proxy.review import diff
from proxy.review import findings as review

DEFAULT_CONTEXT = 2048  # when the proxy cannot tell: Ollama's default num_ctx, and our backend's
PROMPT_OVERHEAD_TOKENS = 250
EXIT_RUN_FAILED = 2


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


def served_context(alias: str) -> int:
    try:
        r = httpx.get(proxy_url() + "/v1/models", headers={"authorization": f"Bearer {api_key()}"}, timeout=10)
    except httpx.HTTPError as e:
        raise review.ReviewError(f"cannot reach the Delegate proxy at {proxy_url()}: start it with `make serve`") from e
    if r.status_code == 401:
        raise review.ReviewError("the proxy wants a key: set DELEGATE_API_KEY")
    models = {m["id"]: m for m in r.json().get("data", [])}
    if alias not in models:
        raise review.ReviewError(f"the proxy has no {alias!r} alias")
    return int(models[alias].get("context_length") or DEFAULT_CONTEXT)


def asker(alias: str, max_tokens: int) -> review.Ask:
    import openai

    c = openai.OpenAI(base_url=proxy_url() + "/v1", api_key=api_key(), max_retries=1)

    def ask(messages: list[dict[str, str]]) -> str:
        try:
            reply = c.chat.completions.create(model=alias, messages=messages, temperature=0,  # type: ignore[arg-type]
                                              max_tokens=max_tokens)
        except openai.APIConnectionError as e:
            raise review.ReviewError(f"cannot reach the Delegate proxy at {proxy_url()}: start it with `make serve`") from e
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            raise review.ReviewError(f"the proxy could not review (HTTP {e.status_code}): {body.get('message') or e}") from e
        return reply.choices[0].message.content or ""

    return ask


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
        context = served_context(args.task)
        max_chars = max(500, (context - args.max_tokens - PROMPT_OVERHEAD_TOKENS) * review.CHARS_PER_TOKEN)
        result = review.review(files, asker(args.task, args.max_tokens), max_chars, progress=_progress())
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
