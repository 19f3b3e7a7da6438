"""/mcp: the tools of `delegate mcp` (proxy/client/mcp_server.py), served by the proxy over streamable HTTP.

Every request to /mcp passes the proxy's own auth first (auth.py's `check`: 401 without a valid key when keys are
required; while the proxy is open, only requests addressed to this machine and JSON bodies), then goes to the
official `mcp` SDK's streamable-HTTP transport. Its session manager is run by the proxy's lifespan (`running`).
Stateless, with JSON answers: any replica behind a load balancer can take any request, and nothing is kept
between requests.

The tools ask the proxy's own HTTP endpoints in-process (an httpx ASGI transport on this app), with the caller's
own key and address and `x-delegate-source: mcp`: the same code as over stdio, and each call meets admission,
the key's aliases, budget and rate, the Router and the usage books exactly as any client's request does, once.
Calling the endpoint functions directly would mean repeating admission; a loopback socket would need to know the
address the proxy is bound to and would make every caller look local to the admin endpoints.
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager

import httpx
from mcp.server.mcpserver import Context
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from proxy.client.mcp_server import Link, build_server
from proxy.server.auth import Auth, bearer
from proxy.server.errors import ProxyError

PROXY_APP = "delegate.proxy_app"  # the scope key that carries the proxy's app to the tools


class McpEndpoint:
    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        self.server = build_server(self._link, local_git=False)
        root.handlers[:], root.level = handlers, level  # the SDK's MCPServer sets up the root logger: the proxy has its own
        # the proxy's auth checks the Host header while it is open; with a key it may serve any name
        self.server.streamable_http_app(stateless_http=True, json_response=True,
                                        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
        self._asgi = StreamableHTTPASGIApp(self.server.session_manager)

    def running(self) -> AbstractAsyncContextManager[None]:
        """The SDK's session manager, entered once by the proxy's lifespan."""
        return self.server.session_manager.run()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.auth.check(Request(scope, receive))
        except ProxyError as e:
            await e.response()(scope, receive, send)
            return
        scope[PROXY_APP] = scope["app"]
        await self._asgi(scope, receive, send)

    @staticmethod
    def _link(ctx: Context) -> Link:
        request = ctx.request_context.request
        if not isinstance(request, Request):
            raise RuntimeError("an /mcp tool call without its HTTP request")
        client = (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0)
        transport = httpx.ASGITransport(app=request.scope[PROXY_APP], client=client)
        return Link("http://127.0.0.1", bearer(request.headers.get("authorization")), transport)
