"""Workers follow the registry's active model between batches, and never serve a corrupt one."""

from __future__ import annotations

import shutil

from model import ModelRegistry
from tests.conftest import add_version, jpeg_bytes
from worker import ClassifyClient


async def test_new_active_version_is_served_and_a_corrupt_one_is_refused(
    redis_url, start_worker, model_registry, tmp_path
):
    root = tmp_path / "models"
    shutil.copytree(model_registry, root)
    registry = ModelRegistry(root)
    start_worker(model_registry=root)
    async with ClassifyClient(redis_url) as client:
        assert (await client.classify(jpeg_bytes(1))).model_version == "tiny-test"

        add_version(registry, "tiny-b")
        registry.activate("tiny-b")
        assert (await client.classify(jpeg_bytes(2))).model_version == "tiny-b"

        add_version(registry, "tiny-c")
        registry.activate("tiny-c")
        weights = registry.path_for("tiny-c") / "model.weights.h5"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))  # corrupted on disk after activation
        assert (await client.classify(jpeg_bytes(3))).model_version == "tiny-b"
