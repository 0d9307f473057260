"""The classify job as a plain function, for RQ workers that are not batch workers.

`BatchWorker` never calls this: it reads the same keyword arguments and runs
many photos at once. A plain `rq worker` (or `SimpleWorker`) that picks up a
classify job calls it and gets the same JSON result, one photo per forward pass;
the benchmark uses exactly that as its "plain RQ" baseline.
"""

from __future__ import annotations

from functools import lru_cache

import redis
from rq import get_current_job

from carbot.jobs import RedisClock
from carbot.settings import get_settings
from worker._contract import JobExpired, PhotoRequest
from worker._inference import BatchClassifier, ModelSource


@lru_cache(maxsize=1)
def _classifier() -> BatchClassifier:
    # Resident for the life of the process: loaded by the first job, reused by the next ones.
    settings = get_settings()
    return BatchClassifier(ModelSource(registry=settings.registry_dir, max_batch=1), decode_threads=1)


@lru_cache(maxsize=4)
def _clock(connection: redis.Redis) -> RedisClock:
    # One per connection, so the offset is measured every 30 s, not once per photo.
    return RedisClock(connection)


def classify_photo(**kwargs: object) -> dict:
    """Classify one photo (see `worker._contract` for the arguments and the result)."""
    request = PhotoRequest.from_kwargs(kwargs)
    connection = get_current_job().connection
    # The deadline is on Redis's clock (the client wrote it so): this host's clock may be off.
    if request.expired(_clock(connection).now()):
        raise JobExpired()
    photo = connection.get(request.photo)
    report = _classifier().classify([(request.digest, photo)], [request.top_k])
    outcome = report.outcomes[0]
    if isinstance(outcome, Exception):
        raise outcome
    outcome["timings"] = {"decode_ms": report.decode_ms, "inference_ms": report.inference_ms, "batch_size": 1}
    return outcome
