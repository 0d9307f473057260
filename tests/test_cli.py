"""The `carbot` command as a person runs it: embedded defaults, the queue, status, local mode."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from carbot import cli
from carbot.settings import get_settings
from tests.conftest import TEST_LABELS, jpeg_bytes
from worker import ClassifyClient, PhotoRejected


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    paths = []
    for seed in range(3):
        path = tmp_path / f"car{seed}.jpg"
        path.write_bytes(jpeg_bytes(seed))
        paths.append(path)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    return [*paths, bad]


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, model_registry: Path, tmp_path: Path):
    """Point the in-process settings at the test's registry and data folder."""

    def apply(**env: str) -> None:
        monkeypatch.setenv("CARBOT_MODEL_REGISTRY", str(model_registry))
        monkeypatch.setenv("CARBOT_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.delenv("REDIS_URL", raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield apply
    get_settings.cache_clear()


def test_classify_with_embedded_defaults_starts_and_stops_redis_and_a_worker(photos, model_registry, tmp_path):
    """No REDIS_URL, no worker: `carbot classify` brings up a private Redis and a worker, then stops both."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(CARBOT_MODEL_REGISTRY=str(model_registry), CARBOT_DATA_DIR=str(tmp_path / "data"))
    run = subprocess.run(
        [sys.executable, "-m", "carbot", "classify", "--json", *map(str, photos)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr  # one of the files is not a photo
    rows = json.loads(run.stdout)
    assert [row["file"] for row in rows] == [str(p) for p in photos]
    for row in rows[:3]:
        assert row["model_version"] == "tiny-test"
        assert [c["label"] in TEST_LABELS for c in row["top_k"]] == [True] * 3
    assert rows[3]["error"] == "PhotoRejected" and "picture" in rows[3]["message"]
    assert not list((tmp_path / "data" / "run").glob("*.sock"))  # the private Redis is gone


def test_classify_local_runs_the_model_in_process(photos, settings_env):
    settings_env()
    result = CliRunner().invoke(cli.main, ["classify", "--local", str(photos[0])])
    assert result.exit_code == 0, result.output
    assert "model tiny-test" in result.output
    assert sum(label in result.output for label in TEST_LABELS) == 3


async def queue_unreduced(redis_url: str, photo: bytes) -> None:
    async with ClassifyClient(redis_url) as client:
        with pytest.raises(PhotoRejected):
            await client.classify(photo)


def test_status_reports_queue_workers_and_model(redis_url, start_worker, photos, settings_env):
    settings_env(REDIS_URL=redis_url)
    start_worker("status-worker")
    runner = CliRunner()
    assert runner.invoke(cli.main, ["classify", *map(str, photos)]).exit_code == 1
    # `carbot classify` refuses the bad file before queueing it (as the bots do); queued as it is, the worker
    # rejects it, and that failed job is what status must count.
    asyncio.run(queue_unreduced(redis_url, photos[3].read_bytes()))

    result = runner.invoke(cli.main, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"]["active_version"] == "tiny-test"
    assert report["queue"]["queued"] == 0
    assert report["queue"]["finished"] == 3 and report["queue"]["failed"] == 1
    assert report["batches"]["photos"] == 4 and report["batches"]["rejected"] == 1
    assert [w["name"] for w in report["workers"]] == ["status-worker"]

    text = runner.invoke(cli.main, ["status"]).output
    assert "tiny-test" in text and "status-worker" in text and "1 failed" in text


def test_status_without_redis_says_so(settings_env):
    settings_env()
    result = CliRunner().invoke(cli.main, ["status"])
    assert result.exit_code == 0
    assert "no Redis running" in result.output
