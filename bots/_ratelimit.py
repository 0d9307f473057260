"""A per-person rate limit kept in Redis, so every bot process shares it."""

from __future__ import annotations

import redis.asyncio as aioredis

from bots._messages import Sender
from carbot import keys


class RateLimiter:
    """At most `per_minute` photos per person in a minute that starts with their first photo."""

    def __init__(self, redis: aioredis.Redis, *, per_minute: int) -> None:
        self.redis = redis
        self.per_minute = per_minute

    async def allow(self, sender: Sender) -> bool:
        """Count one photo for `sender`; False once they are past the limit for this minute."""
        key = keys.rate_key(sender.platform, sender.user_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=60, nx=True)  # opens the window; a no-op while one is open
            pipe.incr(key)
            _, count = await pipe.execute()
        return count <= self.per_minute
