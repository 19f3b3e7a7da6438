"""The `delegate` command. Imports stay inside each command so `delegate --help` answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from proxy.serve import serve

    return serve(Path(args.config), args.host, args.port, with_backend=not args.no_backend)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="delegate", description="Hand routine LLM work to local models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="start the local backend and the OpenAI-compatible proxy")
    p.add_argument("--config", default="config.yaml", help="router config (default: config.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4000, help="port (default 4000)")
    p.add_argument("--no-backend", action="store_true", help="do not start the tinygrad backend")
    p.set_defaults(func=_serve)
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
