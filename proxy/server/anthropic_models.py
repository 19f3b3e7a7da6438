"""GET /v1/models in Anthropic's list shape, for a client that sends `anthropic-version` (Claude Code's model
discovery reads the ids starting with `claude`): the Claude models of LiteLLM's price table, each said to be
answered here (a tier maps it) or by Anthropic (passed through), then the aliases and `auto`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import litellm
from starlette.requests import Request
from starlette.responses import Response

from proxy.routing.auto import AUTO
from proxy.server import anthropic_protocol as protocol
from proxy.server.errors import ProxyError
from proxy.server.model_tiers import Local, ModelTiers
from proxy.server.responses import json_response

if TYPE_CHECKING:
    from proxy.server.app import Proxy


class AnthropicModels:
    def __init__(self, proxy: Proxy, tiers: ModelTiers) -> None:
        self.proxy, self.tiers = proxy, tiers
        self.claude_models = claude_models()

    async def list(self, request: Request) -> Response:
        try:
            await self.proxy.auth.check(request)
        except ProxyError as e:
            return protocol.error_response(e)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.proxy.started))
        data = []
        for model in self.claude_models:
            route = self.tiers.route(model)
            if route is None:  # passthrough is off: nothing answers it
                continue
            served = f"served by Delegate's '{route.alias}'" if isinstance(route, Local) else "Anthropic"
            data.append({"type": "model", "id": model, "display_name": f"{model} ({served})", "created_at": created})
        for alias in self.proxy.settings.aliases:
            data.append({"type": "model", "id": alias, "display_name": f"Delegate alias {alias}", "created_at": created})
        if self.proxy.auto.aliases:
            data.append({"type": "model", "id": AUTO, "display_name": "Delegate picks the alias from the request",
                         "created_at": created})
        return json_response({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})


def claude_models() -> list[str]:
    """Anthropic's own Claude model ids in LiteLLM's price table, newest names first."""
    names = {name for name, info in litellm.model_cost.items()
             if isinstance(info, dict) and info.get("litellm_provider") == "anthropic" and name.startswith("claude")
             and info.get("mode", "chat") == "chat"}
    return sorted(names, reverse=True)
