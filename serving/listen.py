"""The listening socket, bound before anything slow starts so that a port that is taken stops a start at once."""

from __future__ import annotations

import ipaddress
import socket


class ListenError(Exception):
    """The address cannot be bound; the message names it and says why."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to bind, or "localhost") is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A socket listening on host:port, for uvicorn.Server.run(sockets=[...])."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(backlog)
    return sock
