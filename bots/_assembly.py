"""Building the conversation, once for every platform: settings → Redis → store → classify client → retrain desk.

The Telegram, Discord and terminal adapters and the load test get their `Conversation` from
`build_conversation` (and close it with `Conversation.aclose`); the bot commands bring up
Redis, and in the embedded mode the workers beside it, with `serving_redis`. An adapter
then only translates between its platform and the conversation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import redis

from bots._conversation import Conversation, connect_redis
from bots._retrain_desk import RetrainDesk
from bots._store import Store
from carbot import services
from carbot.connections import redis_connection
from carbot.settings import Settings
from worker import ClassifyClient, worker_running, workers_listening

log = logging.getLogger(__name__)


def build_conversation(
    settings: Settings, redis_url: str, *, store: Store | None = None, retrain: bool = True
) -> Conversation:
    """The conversation the settings describe, talking to the Redis at `redis_url`.

    `store`: the store to use; by default the settings' own, opened as every bot opens it (migrated, expired
    photos purged; blocking). `retrain`: whether the conversation gets a retrain desk (/retrain, /rollback).
    Nothing here needs a running event loop; close the conversation with `await conversation.aclose()`.
    """
    store = Store.open_for_bot(settings) if store is None else store
    return Conversation(
        classifier=ClassifyClient.from_settings(settings, redis_url),
        store=store,
        redis=connect_redis(redis_url),
        settings=settings,
        retrain=RetrainDesk(redis_url, settings, store.engine) if retrain else None,
    )


@contextlib.contextmanager
def serving_redis(settings: Settings, *, start_workers: bool | None = None) -> Iterator[str]:
    """The Redis URL a bot talks to, for as long as the block runs.

    With no `REDIS_URL` it is the machine's private Redis, and nobody else will serve it: a classify worker
    and a train worker are started beside it (`start_workers=True` starts them whatever the settings say,
    as `carbot shell` does). A Redis that cannot be reached ends the process with a message saying so; one
    that no worker serves yet only gets a warning (photos wait until one starts).
    """
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(services.redis_url(settings))
        try:
            listening = workers_listening(redis_connection(url), settings.classify_queue)
        except (redis.RedisError, OSError) as exc:
            raise SystemExit(f"Redis is unreachable ({exc}): check REDIS_URL.") from None
        if start_workers or (start_workers is None and not settings.redis_url):
            stack.enter_context(worker_running(settings, url))
            stack.enter_context(worker_running(settings, url, train=True))
        elif not listening:
            log.warning("no worker serves the %r queue yet: photos wait until one starts", settings.classify_queue)
        yield url
