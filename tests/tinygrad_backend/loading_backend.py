"""The real backend app (routes, errors, access control) with a tiny GGUF's tokenizer and a model that never
finishes loading: for what happens before a request reaches the engine, with no model to load."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.servers import ServerThread
from tests.tinygrad_backend.tiny_gguf import write_tiny


@contextlib.contextmanager
def loading_backend(tmp_path: Path, **access: Any) -> Iterator[str]:
    """Its URL; `access` goes to create_app (api_key, loopback_only_hosts, max_body_bytes)."""
    from tinygrad_backend.chat_template import ChatTemplate
    from tinygrad_backend.engine import Engine
    from tinygrad_backend.gguf_file import read_header
    from tinygrad_backend.server import create_app
    from tinygrad_backend.service import Backend
    from tinygrad_backend.tokenizer import GGUFTokenizer

    header = read_header(write_tiny(tmp_path / "tiny.gguf"))
    release = threading.Event()

    def load():  # type: ignore[no-untyped-def]
        release.wait()
        raise RuntimeError("test over")

    engine = Engine(load, on_fatal=lambda e: None)
    engine.start()
    app = create_app(Backend("smollm2", header, GGUFTokenizer(header.metadata), ChatTemplate(None), engine, 64), **access)
    try:
        with ServerThread(app) as server:
            yield server.url
    finally:
        release.set()
