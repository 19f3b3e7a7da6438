"""The backend runs under serving/'s header timeout (slowloris); tests/serving/ checks the protocol itself."""

from __future__ import annotations

import re

import uvicorn

from serving import header_timeout
from tests.servers import ROOT


def test_serve_runs_uvicorn_with_the_header_timeout() -> None:
    source = (ROOT / "tinygrad_backend/cli.py").read_text()
    spec = re.search(r'http="([\w.:]+)"', source)
    assert spec is not None, "tinygrad_backend/cli.py's uvicorn.Config names no http protocol"
    assert uvicorn.importer.import_from_string(spec.group(1)) is header_timeout.HeaderTimeoutProtocol
    assert header_timeout.HeaderTimeoutProtocol.header_timeout_s == 10.0
