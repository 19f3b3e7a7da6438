"""The `delegate` command. Imports stay inside each command so `delegate --help` answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.usage.keys import KeyStore


def _serve(args: argparse.Namespace) -> int:
    from proxy.server.serve import serve

    return serve(Path(args.config), args.host, args.port, with_backend=not args.no_backend, json_logs=args.json)


def _report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from proxy.usage import report
    from proxy.usage.store import StoreError, UsageStore

    now = datetime.now(UTC)
    if args.since:
        try:
            since: datetime | None = datetime.strptime(args.since, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            return _fail(f"--since must be a date like 2026-11-25, not {args.since!r}")
    else:
        since = None if args.days == 0 else now - timedelta(days=args.days)
    try:
        store = UsageStore.open()
    except StoreError as e:
        return _fail(str(e))
    rows = store.rows(since=since.timestamp() if since else None)
    if args.export_jsonl:
        n = report.export_jsonl(rows, Path(args.export_jsonl))
        print(f"wrote {n} rows to {args.export_jsonl}")
        return 0
    result = report.build(rows, since, now, by=args.by)
    fmt = "json" if args.json else args.format
    out = {"table": report.render_table, "json": report.render_json, "csv": report.render_csv}[fmt](result)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0


def _key_store() -> KeyStore:
    from proxy.usage.keys import KeyStore
    from proxy.usage.store import UsageStore

    return KeyStore(UsageStore.open())


def _keys_create(args: argparse.Namespace) -> int:
    import json
    import time

    from proxy.usage.store import StoreError

    aliases = [a.strip() for a in args.aliases.split(",") if a.strip()] if args.aliases else None
    if aliases is not None and (unknown := _unknown_aliases(aliases, args.config)):
        return _fail(f"unknown alias {', '.join(unknown)} (config {args.config})")
    if args.budget is not None and args.budget < 0 or args.rpm is not None and args.rpm < 1:
        return _fail("--budget must be at least 0 and --rpm at least 1")
    try:
        keys = _key_store()
    except StoreError as e:
        return _fail(str(e))
    expires = time.time() + args.expires_days * 86400 if args.expires_days else None
    key, issued = keys.create(args.name, aliases, args.budget, args.rpm, expires)
    if args.json:
        print(json.dumps({"key": key, **issued.as_dict()}, indent=2))
    else:
        print(key)
        print(f"({issued.key_id}: shown once; the store keeps only its hash)", file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    import json

    from proxy.usage.store import StoreError

    try:
        listed = [k.as_dict() for k in _key_store().all()]
    except StoreError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    from rich.console import Console

    from proxy.client.tables import table

    rows = []
    for k in listed:
        state = "revoked" if k["revoked_at"] else ("active" if k["active"] else "expired")
        rows.append((k["key_id"], k["name"] or "", ",".join(k["aliases"]) if k["aliases"] else "all",
                     f"${k['budget_usd']:.2f}" if k["budget_usd"] is not None else "-", f"${k['spent_usd']:.4f}",
                     str(k["rpm"] or "-"), state))
    Console().print(table("Issued keys", ("key id", "name", "aliases", "budget", "spent", "rpm", "state"), rows))
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from proxy.usage.store import StoreError

    try:
        revoked = _key_store().revoke(args.key_id)
    except StoreError as e:
        return _fail(str(e))
    if not revoked:
        return _fail(f"no active key {args.key_id}")
    print(f"revoked {args.key_id}")
    return 0


def _unknown_aliases(aliases: list[str], config: str) -> list[str]:
    from proxy import settings

    path = Path(config)
    if not path.exists():
        return []
    known = set(settings.load(path).groups)
    return [a for a in aliases if a not in known]


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _ask(args: argparse.Namespace) -> int:
    from proxy.client import console

    return console.ask(args)


def _models(args: argparse.Namespace) -> int:
    from proxy.client import console

    return console.models(args)


def _status(args: argparse.Namespace) -> int:
    from proxy.client import console

    return console.status(args)


def _review(args: argparse.Namespace) -> int:
    from proxy.review import cli as review_cli

    if args.json:
        args.format = "json"
    return review_cli.run(args)


def _mcp(args: argparse.Namespace) -> int:
    from proxy.client.mcp_server import main

    return main()


def _listing(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str,
             func: Callable[[argparse.Namespace], int]) -> None:
    """A command whose one option is --json: what it lists as a table for people, as JSON for scripts."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="delegate", description="Hand routine LLM work to local models.",
                                     epilog="The proxy's address and key: DELEGATE_URL, DELEGATE_API_KEY.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("ask", help="ask a task alias; the answer streams to stdout")
    p.add_argument("prompt", nargs="?", help="the prompt; '-' or none reads stdin (stdin is also appended when piped)")
    p.add_argument("--task", "-t", default="coding", help="task alias (default coding; `delegate models` lists them)")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--json", action="store_true", help="print the whole response as JSON (no streaming)")
    p.set_defaults(func=_ask)

    _listing(sub, "models", "the task aliases and models the proxy serves", _models)
    _listing(sub, "status", "the proxy, its backends and the usage store", _status)

    p = sub.add_parser("review", help="review a diff: piped on stdin, --base REF, or the working tree")
    p.add_argument("--base", help="review `git diff BASE` (e.g. HEAD~1)")
    p.add_argument("--working-tree", action="store_true", help="review the working tree even when stdin is piped")
    p.add_argument("--format", choices=["markdown", "json", "sarif"], default="markdown")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--fail-on", choices=["high", "medium", "low"], help="exit 1 when a finding is this severe or worse")
    p.add_argument("--task", default="review", help="task alias to ask (default review)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply per piece of the diff (default 512)")
    p.set_defaults(func=_review)

    p = sub.add_parser("mcp", help="serve the delegate, review and savings tools to Claude over MCP (stdio)")
    p.set_defaults(func=_mcp)

    p = sub.add_parser("serve", help="start the local backend and the OpenAI-compatible proxy")
    p.add_argument("--config", default="config.yaml", help="router config (default: config.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4000, help="port (default 4000)")
    p.add_argument("--no-backend", action="store_true", help="do not start the tinygrad backend")
    p.add_argument("--json", action="store_true", help="log as JSON lines, for log collectors")
    p.set_defaults(func=_serve)

    p = sub.add_parser("keys", help="issue, list and revoke API keys (limited to aliases, a budget and a rate)")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    k = keys.add_parser("create", help="issue a key; it is printed once, the store keeps only its hash")
    k.add_argument("--name", help="who or what the key is for")
    k.add_argument("--aliases", help="comma-separated task aliases the key may use (default all)")
    k.add_argument("--budget", type=float, help="budget in reference-model dollars")
    k.add_argument("--rpm", type=int, help="requests per minute")
    k.add_argument("--expires-days", type=float, help="the key stops working after this many days")
    k.add_argument("--config", default="config.yaml", help="checked for the aliases (default config.yaml)")
    k.add_argument("--json", action="store_true", help="print the key and its limits as JSON")
    k.set_defaults(func=_keys_create)
    _listing(keys, "list", "every issued key, its limits, spend and state", _keys_list)
    k = keys.add_parser("revoke", help="revoke a key: 401 from its next request on")
    k.add_argument("key_id", help="the key's id, as `delegate keys list` shows it")
    k.set_defaults(func=_keys_revoke)

    p = sub.add_parser("report", help="what delegation saved: calls, tokens, latency, costs")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--days", type=int, default=7, help="the last N days (default 7; 0 for all time)")
    when.add_argument("--since", help="since a date, YYYY-MM-DD")
    p.add_argument("--by", choices=["task", "model", "day", "key", "source", "tier"], default="task",
                   help="breakdown (default task; source: api, cli, mcp, messages or review; tier: the Claude "
                        "model asked for, local or passed through)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--export-jsonl", metavar="FILE", help="write the rows in the old local-llm-usage.jsonl format")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
