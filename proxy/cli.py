"""The `delegate` command. Imports stay inside each command so `delegate --help` answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from proxy.serve import serve

    return serve(Path(args.config), args.host, args.port, with_backend=not args.no_backend)


def _report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from proxy import report
    from proxy.store import StoreError, UsageStore

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


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="delegate", description="Hand routine LLM work to local models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="start the local backend and the OpenAI-compatible proxy")
    p.add_argument("--config", default="config.yaml", help="router config (default: config.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4000, help="port (default 4000)")
    p.add_argument("--no-backend", action="store_true", help="do not start the tinygrad backend")
    p.set_defaults(func=_serve)

    p = sub.add_parser("report", help="what delegation saved: calls, tokens, latency, costs")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--days", type=int, default=7, help="the last N days (default 7; 0 for all time)")
    when.add_argument("--since", help="since a date, YYYY-MM-DD")
    p.add_argument("--by", choices=["task", "model", "day", "key"], default="task", help="breakdown (default task)")
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
