"""GET /v1/models: the task aliases and models the proxy serves, each with its chain and known context.

Client tools (the Python API, `delegate ask`) read the aliases from here instead of copying config.yaml.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from proxy.server.responses import json_response

if TYPE_CHECKING:
    from proxy.server.app import Proxy


class Models:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def list(self, request: Request) -> Response:
        p = self.proxy
        await p.auth.check(request)
        data = []
        for group in p.settings.groups:
            is_alias = group in p.settings.delegate.aliases
            data.append({
                "id": group, "object": "model", "created": p.started, "owned_by": "delegate",
                "kind": "alias" if is_alias else "model",
                "description": p.settings.delegate.aliases.get(group),
                "fallbacks": p.settings.chain(group)[1:],
                "deployments": [d.model for d in p.deployments.values() if d.group == group],
                "context_length": self.context_length(group),
            })
        if p.auto.aliases:  # model="auto": no chain of its own, it hands each request to one of these
            data.append({"id": "auto", "object": "model", "created": p.started, "owned_by": "delegate", "kind": "auto",
                         "description": "picks one of its aliases from the request itself", "aliases": p.auto.aliases,
                         "fallbacks": [], "deployments": [], "context_length": None})
        return json_response({"object": "list", "data": data})

    def context_length(self, group: str) -> int | None:
        """The smallest context any deployment in the group's chain is known to take (None: none known).

        Known from model_info.max_input_tokens in config.yaml, or from what a tinygrad backend reports."""
        known = [n for dep_id in self.proxy.chain_ids.get(group, []) if (n := self.proxy.known_context(dep_id))]
        return min(known) if known else None
