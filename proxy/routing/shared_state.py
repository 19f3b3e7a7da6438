"""State that replicas share through Redis, when router_settings names one.

LiteLLM's Router keeps its own shared state there (cooldowns, deployment usage) once it is given
`redis_host`/`redis_port`/`redis_password` (or `redis_url`). The one thing of ours that must be shared is
each issued key's request rate: with Redis, every replica counts into the same sliding minute. Budgets
need no Redis: they are reserved in the one Postgres (proxy/usage/keys.py).
When Redis fails after start-up the proxy keeps serving (key rates are then counted per replica) and
/health/readiness says so.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any
from urllib.parse import quote

import redis
import redis.asyncio as aioredis

from proxy.usage.keys import RateLimiter

log = logging.getLogger("delegate")
TIMEOUT_S = 2.0

# one sorted set per key: members are requests, scores their times; trim, count, then admit or refuse
_SLIDING_MINUTE = """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(tonumber(oldest[2]) + 60 - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], 61)
return ''
"""


def redis_settings(router_settings: dict[str, Any]) -> dict[str, str] | None:
    """The connection the Router was given, as a URL for our own client; None when there is no Redis."""
    if router_settings.get("redis_url"):
        return {"url": str(router_settings["redis_url"]), "field": "redis_url"}
    if router_settings.get("redis_host"):
        password = router_settings.get("redis_password")
        auth = f":{quote(str(password), safe='')}@" if password else ""
        port = int(router_settings.get("redis_port") or 6379)
        return {"url": f"redis://{auth}{router_settings['redis_host']}:{port}/0", "field": "redis_host"}
    return None


def _where(conn: dict[str, str]) -> str:
    return conn["url"].split("@")[-1].removeprefix("redis://").split("/")[0]


def check_reachable(conn: dict[str, str]) -> None:
    """At start-up: raise ConnectionError naming Redis when it does not answer."""
    client = redis.Redis.from_url(conn["url"], socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
    try:
        client.ping()
    except redis.RedisError as e:
        raise ConnectionError(f"Redis at {_where(conn)} is unreachable: {e}") from e
    finally:
        client.close()


class SharedRateLimiter:
    """Requests per rolling minute per key, counted in Redis for every replica; per replica if Redis fails."""

    def __init__(self, conn: dict[str, str]) -> None:
        self._redis = aioredis.from_url(conn["url"], socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._script = self._redis.register_script(_SLIDING_MINUTE)
        self._local = RateLimiter()
        self.where = _where(conn)
        self.last_error: str | None = None

    async def allow(self, kid: str, rpm: int) -> float | None:
        try:
            wait = await self._script(keys=[f"delegate:rpm:{kid}"], args=[time.time(), rpm, uuid.uuid4().hex])
        except redis.RedisError as e:
            if self.last_error is None:
                log.error("Redis at %s failed; counting key rates per replica until it is back: %s", self.where, e)
            self.last_error = f"Redis at {self.where} unreachable: {e}"
            return self._local.allow(kid, rpm)
        self.last_error = None
        text = wait.decode() if isinstance(wait, bytes) else str(wait)
        return float(text) if text else None

    async def problem(self) -> str | None:
        try:
            await self._redis.ping()
        except redis.RedisError as e:
            self.last_error = f"Redis at {self.where} unreachable: {e}"
            return self.last_error
        self.last_error = None
        return None

    async def close(self) -> None:
        await self._redis.aclose()
