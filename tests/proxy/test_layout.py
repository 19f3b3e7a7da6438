"""The package's boundaries, checked in fresh interpreters: client-side tools import neither LiteLLM nor the
server's modules (litellm's import alone takes seconds, and a script that only asks the proxy needs neither),
and starting the server's modules reaches nothing beyond this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.servers import ROOT

CLIENT_MODULES = ["proxy.client", "proxy.client.api", "proxy.client.cli", "proxy.client.connection",
                  "proxy.client.console", "proxy.review.cli", "proxy.review.findings", "proxy.review.diff",
                  "proxy.review.repetition"]
SERVER_PACKAGES = ("litellm", "proxy.server", "proxy.routing", "uvicorn", "starlette")


def _run(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env or dict(os.environ))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("module", CLIENT_MODULES)
def test_client_side_modules_import_no_server_code(module: str) -> None:
    loaded = json.loads(_run(f"""
        import importlib, json, sys
        importlib.import_module({module!r})
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("litellm", "uvicorn", "starlette")
                                or m.startswith(("proxy.server", "proxy.routing")))))
    """))
    assert loaded == [], f"{module} imports {loaded[:5]}"


def test_the_mcp_server_imports_no_server_code() -> None:
    """`delegate mcp` loads the `mcp` SDK, which brings starlette and uvicorn along, but never LiteLLM or our server."""
    loaded = json.loads(_run("""
        import json, sys
        import proxy.client.mcp_server
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "litellm"
                                or m.startswith(("proxy.server", "proxy.routing")))))
    """))
    assert loaded == [], f"proxy.client.mcp_server imports {loaded[:5]}"


def test_the_python_api_keeps_its_names() -> None:
    names = _run("""
        from proxy.client import delegate, delegate_with_retry, quick_code, quick_analysis, quick_answer, LLMResponse
        print(LLMResponse.__name__)
    """)
    assert names == "LLMResponse"


GUARD = """
    import ipaddress, json, socket, sys
    reached = []

    def _loopback(host):
        if host in (None, "", "localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            reached.append(f"lookup {host}")
            raise socket.gaierror(socket.EAI_NONAME, "blocked by the test")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            reached.append(f"connect {address[0]}")
            raise OSError("blocked by the test")
        return real_connect(self, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
"""


def test_starting_the_server_reaches_nothing_beyond_this_machine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITELLM")}  # nothing set before we run
    env["DELEGATE_HOME"] = str(tmp_path)
    reached = json.loads(_run(GUARD + f"""
    from pathlib import Path
    from proxy.server.serve import load_settings
    from proxy.server.app import create_app
    from proxy.usage.store import UsageStore
    settings, routing = load_settings(Path({str(ROOT / "config.yaml")!r}))
    create_app(settings, None, UsageStore.open("sqlite:///{tmp_path / 'usage.db'}"), routing)
    import litellm
    assert litellm.model_cost.get("claude-sonnet-4-5"), "the price table is LiteLLM's own copy"
    print(json.dumps(reached))
    """, env))
    assert reached == []
