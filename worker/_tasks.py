"""The classify job as a plain function, for RQ workers that are not batch workers.

`BatchWorker` never calls this: it reads the same keyword arguments and runs
many photos at once. A plain `rq worker` (or `SimpleWorker`) that picks up a
classify job calls it and gets the same JSON result, one photo per forward pass;
the benchmark uses exactly that as its "plain RQ" baseline.
"""

from __future__ import annotations

import time
from functools import lru_cache

from rq import get_current_job

from carbot.settings import get_settings
from worker._contract import JobExpired, PhotoRequest
from worker._inference import BatchClassifier, ModelSource


@lru_cache(maxsize=1)
def _classifier() -> BatchClassifier:
    # Resident for the life of the process: loaded by the first job, reused by the next ones.
    settings = get_settings()
    return BatchClassifier(ModelSource(registry=settings.registry_dir, max_batch=1), decode_threads=1)


def classify_photo(**kwargs: object) -> dict:
    """Classify one photo (see `worker._contract` for the arguments and the result)."""
    request = PhotoRequest.from_kwargs(kwargs)
    if request.expired(time.time()):
        raise JobExpired()
    photo = get_current_job().connection.get(request.photo)
    report = _classifier().classify([(request.digest, photo)], [request.top_k])
    outcome = report.outcomes[0]
    if isinstance(outcome, Exception):
        raise outcome
    outcome["timings"] = {"decode_ms": report.decode_ms, "inference_ms": report.inference_ms, "batch_size": 1}
    return outcome
