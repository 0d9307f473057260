"""A model made by the training recipe serves through a real `carbot worker` and answers with its own labels.

The demo model is a `train()` artefact (tiny backbone, synthetic shapes), so the session's
demo registry is reused here rather than training a second model: what this adds is the
way from the artefact on disk to an answer in a bot, through the queue and another process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import redis

from model import ModelRegistry, Predictor, load_image, read_artefact
from tests.conftest import WorkerProcess, worker_env
from training import SYNTHETIC_CLASSES, synthetic_jpeg
from worker import ClassifyClient


@pytest.mark.slow
async def test_trained_artefact_serves_through_the_worker_with_the_right_labels(
    demo_registry: Path, redis_url: str, tmp_path: Path
) -> None:
    artefact = read_artefact(ModelRegistry(demo_registry).path_for("demo"))
    # Held-out photos: seeds the training set never used, at a phone-like size the worker must resize.
    truth = [SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)] for i in range(36)]
    photos = [synthetic_jpeg(label, seed=200_000 + i, size=(320, 240)) for i, label in enumerate(truth)]

    worker = WorkerProcess(worker_env(redis_url, demo_registry, tmp_path / "data"), tmp_path / "worker.log", "serve")
    try:
        worker.wait_until_listening(redis.Redis.from_url(redis_url))
        async with ClassifyClient(redis_url, timeout_s=60) as client:
            predictions = await asyncio.gather(*(client.classify(photo) for photo in photos))
    finally:
        worker.stop()

    served = [prediction.top_k[0].label for prediction in predictions]
    for prediction in predictions:
        assert prediction.model_version == "demo"
        assert len(prediction.top_k) == 3
        assert {candidate.label for candidate in prediction.top_k} <= set(artefact.labels)
    right = np.mean([label == expected for label, expected in zip(served, truth, strict=True)])
    assert right >= 0.9, (right, list(zip(served, truth, strict=True)))

    # The worker's answers are the artefact's own, computed in this process: same preprocessing, same labels.
    images = np.stack([load_image(photo, artefact.preprocessing) for photo in photos])
    local = [guesses[0][0] for guesses in Predictor.from_artefact(artefact.path).predict_topk(images, k=1)]
    assert served == local
    assert "batch size=" in worker.log_path.read_text()  # answered in batches by the BatchWorker
