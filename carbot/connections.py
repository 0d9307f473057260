"""Every Redis client of the system comes from `redis_connection`, so a network that dies silently is noticed.

A Redis host that vanishes without closing its connections (a cable pulled, a VM
frozen, a firewall dropping packets) leaves a client waiting for a reply that
never comes. Each connection made here therefore has:

- a socket timeout: a command gets no reply for `SOCKET_TIMEOUT_S` past the time
  it may block in Redis (`blocking_s`: an XREAD's `block`, RQ's dequeue timeout)
  and fails with `redis.TimeoutError` instead of hanging; the connection is then
  dropped and the next command opens a fresh one;
- TCP keepalive (TCP URLs only: a Unix socket cannot go silent): the kernel
  probes a connection idle for `KEEPALIVE_IDLE_S` and declares it dead after
  `KEEPALIVE_PROBES` unanswered probes, and the probes keep NAT and firewall
  entries from expiring under an idle pool;
- a health check: a connection idle for `HEALTH_CHECK_INTERVAL_S` is PINGed
  before its next command, and one that fails is reconnected and the command
  sent once more (a connection refused or reset, never a timeout: a command
  that may have reached Redis is not sent twice after a silence).

redis-py's own defaults differ between versions (5.x has no socket timeout at
all), so every value is explicit here.
"""

from __future__ import annotations

import socket
from typing import Literal, overload
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# A command that does not block in Redis and gets no reply byte for this long is on a dead connection.
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# A connection idle this long is PINGed before it is used again.
HEALTH_CHECK_INTERVAL_S = 15
# The kernel's probes on an idle TCP connection: dead after 10 + 3 x 5 = 25 s without an answer.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3


def _keepalive_options() -> dict[int, int]:
    options = {}
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):  # fmt: skip
        option = getattr(socket, name, None)  # not every platform has all three
        if option is not None:
            options[option] = value
    return options


def connection_options(url: str, *, blocking_s: float = 0.0, timeout_s: float | None = None,
                       asyncio: bool = False) -> dict:  # fmt: skip
    """The keyword arguments `redis_connection` gives redis-py for `url`."""
    retry_class = AsyncRetry if asyncio else Retry
    options: dict = {
        "socket_timeout": blocking_s + (SOCKET_TIMEOUT_S if timeout_s is None else timeout_s),
        "socket_connect_timeout": CONNECT_TIMEOUT_S if timeout_s is None else min(timeout_s, CONNECT_TIMEOUT_S),
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # No CLIENT SETINFO on connect: redis-py pipelines it, and on a reconnect after the health-check
        # interval its PING read that reply instead of PONG (Redis 6.2 answers SETINFO with an error), which
        # stopped the bots' result listener in CI (2026-12-04). The name only shows in Redis' CLIENT LIST.
        "driver_info": None,
        # Once, and only for a refused or reset connection: see the module's docstring.
        "retry": retry_class(ExponentialBackoff(cap=0.5, base=0.05), 1, supported_errors=(redis.ConnectionError,)),
    }
    if urlsplit(url).scheme in ("redis", "rediss"):
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = _keepalive_options()
    return options


@overload
def redis_connection(
    url: str, *, asyncio: Literal[False] = False, blocking_s: float = 0.0, timeout_s: float | None = None
) -> redis.Redis: ...
@overload
def redis_connection(
    url: str, *, asyncio: Literal[True], blocking_s: float = 0.0, timeout_s: float | None = None,
    max_connections: int | None = None, pool_timeout: float | None = None,
) -> aioredis.Redis: ...  # fmt: skip
def redis_connection(
    url: str,
    *,
    asyncio: bool = False,
    blocking_s: float = 0.0,
    timeout_s: float | None = None,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
) -> redis.Redis | aioredis.Redis:
    """A Redis client for `url` that notices a silently dead network (see the module's docstring).

    `blocking_s`: the longest a command sent on it may block in Redis (an XREAD's `block`, a
    blocking dequeue's timeout); the socket timeout is that plus `SOCKET_TIMEOUT_S`, or plus
    `timeout_s` for a probe that must answer sooner (a health check, `carbot status`).
    `asyncio`: a `redis.asyncio` client. With `max_connections` (asyncio only) the pool holds at
    most that many connections and a caller beyond them waits up to `pool_timeout` seconds for one.
    """
    options = connection_options(url, blocking_s=blocking_s, timeout_s=timeout_s, asyncio=asyncio)
    if not asyncio:
        if max_connections is not None:
            raise ValueError("max_connections is for asyncio clients")
        return redis.Redis.from_url(url, **options)
    if max_connections is None:
        return aioredis.Redis.from_url(url, **options)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout,
                                                    **options)  # fmt: skip
    return aioredis.Redis.from_pool(pool)
