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
    worker = start_worker(model_registry=root)
    async with ClassifyClient(redis_url) as client:
        assert (await client.classify(jpeg_bytes(1))).model_version == "tiny-test"

        add_version(registry, "tiny-b")
        registry.activate("tiny-b")
        # The new version loads in the background while the old one answers; then it takes over for good.
        versions = [(await client.classify(jpeg_bytes(2))).model_version]
        while versions[-1] != "tiny-b" and len(versions) < 500:
            versions.append((await client.classify(jpeg_bytes(len(versions) + 10))).model_version)
        assert versions[-1] == "tiny-b" and set(versions) <= {"tiny-test", "tiny-b"}

        add_version(registry, "tiny-c")
        registry.activate("tiny-c")
        weights = registry.path_for("tiny-c") / "model.weights.h5"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        # Corrupted on disk right after activation, before a worker could have read it (it checks for a
        # new model between batches and every maintenance interval, and reads the weights after that).
        weights.write_bytes(bytes(data))
        for seed in range(1000, 1100):  # while it fails to load in the background, and after
            assert (await client.classify(jpeg_bytes(seed))).model_version == "tiny-b"
            if "could not load model" in worker.log():
                break
        assert "could not load model" in worker.log()
        assert (await client.classify(jpeg_bytes(3))).model_version == "tiny-b"
