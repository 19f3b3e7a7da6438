"""Client-side tools: the Python API scripts import (`from proxy.client import delegate`), the `delegate`
CLI, and the terminal front-ends. They reach the proxy over HTTP and never import LiteLLM or the server
(tests/proxy/test_layout.py checks it).

The API's names load on first use, so `delegate --help` (proxy.client.cli) imports neither openai nor httpx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.client.api import (
        LLMResponse,
        delegate,
        delegate_with_retry,
        quick_analysis,
        quick_answer,
        quick_code,
    )

__all__ = ["LLMResponse", "delegate", "delegate_with_retry", "quick_analysis", "quick_answer", "quick_code"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from proxy.client import api

        return getattr(api, name)
    raise AttributeError(f"module 'proxy.client' has no attribute {name!r}")
