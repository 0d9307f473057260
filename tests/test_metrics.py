"""Metrics, health and JSON logs of real processes: `carbot worker` and `carbot telegram`.

Each process is started as in production with `CARBOT_METRICS_PORT`; the tests scrape its endpoint
over HTTP, parse the text with Prometheus' own parser (so it must be valid exposition format),
and check the counters move with the photos that went through. Readiness is checked against a
Redis server that the test stops and starts again.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from carbot.logs import JsonFormatter
from carbot.services import PrivateRedis
from model import ModelRegistry
from tests.conftest import WorkerProcess, add_version, jpeg_bytes, worker_env
from tests.fake_telegram import FakeTelegram
from worker import ClassifyClient, PhotoRejected

TOKEN = "123:METRICS-SECRET-TOKEN"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:<port><path>."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics as {(name, labels): value}; Prometheus' parser rejects malformed text."""
    status, content_type, body = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain;")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def readiness(port: int) -> tuple[int, dict]:
    status, content_type, body = get(port, "/readyz")
    assert content_type == "application/json"
    return status, json.loads(body)


async def classify_all(redis_url: str, photos: list[bytes]) -> list[object]:
    async with ClassifyClient(redis_url, timeout_s=30) as client:
        return await asyncio.gather(*(client.classify(photo) for photo in photos), return_exceptions=True)


# -- the worker --------------------------------------------------------------------------------------------------


def test_worker_metrics_count_photos_batches_and_outcomes(start_worker, redis_url: str) -> None:
    port = free_port()
    start_worker("metered", metrics_port=port, metrics_listen="127.0.0.1")
    before = scrape(port)
    assert value(before, "carbot_worker_jobs_total", outcome="finished") == 0
    assert value(before, "carbot_worker_model_info", version="tiny-test") == 1  # loaded before the first job
    assert value(before, "process_resident_memory_bytes") > 0

    outcomes = asyncio.run(classify_all(redis_url, [jpeg_bytes(seed) for seed in range(7)] + [b"not a photo"]))
    assert [type(outcome).__name__ for outcome in outcomes].count("Classification") == 7
    assert isinstance(outcomes[-1], PhotoRejected)

    after = scrape(port)
    assert value(after, "carbot_worker_jobs_total", outcome="finished") == 7
    assert value(after, "carbot_worker_jobs_total", outcome="rejected") == 1
    assert value(after, "carbot_worker_jobs_total", outcome="failed") == 0
    batches = value(after, "carbot_worker_batch_size_count")
    assert 1 <= batches <= 8
    assert value(after, "carbot_worker_batch_size_sum") == 8  # every photo went through a batch once
    assert value(after, "carbot_worker_queue_wait_seconds_count") == 8  # one wait per job
    assert value(after, "carbot_worker_decode_seconds_count") == batches
    assert value(after, "carbot_worker_inference_seconds_count") == batches
    assert value(after, "carbot_worker_inference_seconds_sum") > 0

    assert get(port, "/healthz")[0] == 200
    assert readiness(port) == (200, {"ready": True, "checks": {"redis": "ok", "model": "ok"}})
    assert get(port, "/nothing-here")[0] == 404


def test_worker_counts_a_model_it_refuses_to_serve(start_worker, redis_url: str, model_registry: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    root = tmp_path / "models"
    shutil.copytree(model_registry, root)
    registry = ModelRegistry(root)
    port = free_port()
    start_worker("refusing", model_registry=root, metrics_port=port, metrics_listen="127.0.0.1")
    assert value(scrape(port), "carbot_worker_model_refusals_total") == 0

    add_version(registry, "broken")
    registry.activate("broken")
    weights = registry.path_for("broken") / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # damaged after activation: its checksum no longer matches
    deadline = time.monotonic() + 60
    while value(scrape(port), "carbot_worker_model_refusals_total") == 0 and time.monotonic() < deadline:
        [outcome] = asyncio.run(classify_all(redis_url, [jpeg_bytes(int(time.monotonic() * 1000))]))
        assert outcome.model_version == "tiny-test"  # the model it had keeps answering

    assert value(scrape(port), "carbot_worker_model_refusals_total") == 1
    assert value(scrape(port), "carbot_worker_model_info", version="tiny-test") == 1


def test_readiness_fails_while_redis_is_down_and_recovers_after(model_registry: Path, tmp_path: Path) -> None:
    """The worker stays alive (liveness) while Redis is away, says it is not ready, and serves again after."""
    server = PrivateRedis(tmp_path / "redis").start()
    port = free_port()
    env = worker_env(server.url, model_registry, tmp_path / "data", metrics_port=port, metrics_listen="127.0.0.1")
    worker = WorkerProcess(env, tmp_path / "worker.log", "outage")
    try:
        worker.wait_until_listening(redis.Redis.from_url(server.url))
        assert readiness(port)[0] == 200

        server.stop()
        status, body = readiness(port)
        assert status == 503, body
        assert body["checks"]["model"] == "ok" and body["checks"]["redis"] != "ok"
        assert get(port, "/healthz")[0] == 200  # not ready is not dead: nothing should restart it
        assert worker.process.poll() is None

        server.start()  # the same socket, an empty Redis
        assert readiness(port) == (200, {"ready": True, "checks": {"redis": "ok", "model": "ok"}})
        # The worker itself reconnects (RQ backs off 1 s, then 2 s, ...) and answers photos again.
        [prediction] = asyncio.run(classify_all(server.url, [jpeg_bytes(1)]))
        assert prediction.model_version == "tiny-test", worker.log()
    finally:
        worker.stop(signal.SIGKILL)
        server.stop()


# -- a bot -------------------------------------------------------------------------------------------------------


async def test_telegram_bot_metrics_count_photos_replies_and_votes_and_logs_are_json_without_the_token(
    start_worker, redis_url: str, model_registry: Path, tmp_path: Path
) -> None:
    """`carbot -v telegram` with JSON logs and an endpoint, against the fake Bot API and a real worker."""
    start_worker()
    port = free_port()
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith(("CARBOT_", "DATABASE_URL"))},
        "REDIS_URL": redis_url,
        "TELEGRAM_TOKEN": TOKEN,
        "CARBOT_DATA_DIR": str(tmp_path / "data"),
        "CARBOT_MODEL_REGISTRY": str(model_registry),
        "CARBOT_LOG_FORMAT": "json",
        "CARBOT_METRICS_PORT": str(port),
        "CARBOT_METRICS_LISTEN": "127.0.0.1",
        "CARBOT_RATE_LIMIT_PER_MINUTE": "1000",
    }
    async with FakeTelegram(TOKEN) as fake:
        env |= {"CARBOT_TELEGRAM_API_BASE_URL": fake.base_url, "CARBOT_TELEGRAM_FILE_BASE_URL": fake.base_file_url}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "carbot", "-v", "telegram",
            env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            await fake.wait_for("deleteWebhook", timeout=30)  # polling from here on
            assert await asyncio.to_thread(readiness, port) == (
                200, {"ready": True, "checks": {"redis": "ok", "database": "ok"}}
            )  # fmt: skip
            ana = fake.user(7, "Ana")
            chat = fake.private_chat(ana)
            photo = fake.send_photo(chat, ana, [(64, 48, jpeg_bytes(3))])
            [answer] = await fake.wait_for("sendMessage", lambda call: _replies_to(call, photo))
            [[up, _]] = answer.params["reply_markup"]["inline_keyboard"]
            query = fake.press_button(ana, answer.result, up["callback_data"])
            await fake.wait_for("answerCallbackQuery", lambda call: call.params["callback_query_id"] == query)
            broken = fake.send_photo(chat, ana, [(64, 48, b"\xff\xd8\xff not really a jpeg")])
            await fake.wait_for("sendMessage", lambda call: _replies_to(call, broken))

            samples = await asyncio.to_thread(scrape, port)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(process.communicate(), 30)

    telegram = {"platform": "telegram"}
    assert value(samples, "carbot_bot_requests_total", kind="photo", **telegram) == 2
    assert value(samples, "carbot_bot_requests_total", kind="button", **telegram) == 1
    assert value(samples, "carbot_bot_replies_total", outcome="answered", **telegram) == 1
    assert value(samples, "carbot_bot_replies_total", outcome="rejected", **telegram) == 1
    assert value(samples, "carbot_bot_votes_total", vote="up", **telegram) == 1
    assert value(samples, "carbot_bot_reply_seconds_count", **telegram) == 1  # answered photos only
    assert 0 < value(samples, "carbot_bot_reply_seconds_sum", **telegram) < 30
    assert ("carbot_bot_errors_total", frozenset({("platform", "telegram"), ("handler", "photo")})) not in samples

    log = output.decode(errors="replace")
    assert process.returncode == 0, log
    assert TOKEN not in log
    records = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    assert any(record["logger"] == "carbot.health" and str(port) in record["message"] for record in records)
    assert any(record["level"] == "DEBUG" for record in records)  # -v did reach the JSON handler


def _replies_to(call, message: dict) -> bool:
    reply = call.params.get("reply_parameters") or {}
    return call.params.get("chat_id") == message["chat"]["id"] and reply.get("message_id") == message["message_id"]


# -- the JSON log format -----------------------------------------------------------------------------------------


def test_json_log_records_are_single_lines_with_traceback_and_extra_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("line one\nline two")
        except ValueError:
            logger.exception("batch %d failed", 7, extra={"batch_size": 32})
    finally:
        logger.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "batch 7 failed" and record["level"] == "ERROR" and record["logger"] == "tests.json"
    assert record["batch_size"] == 32
    assert record["exception"].startswith("Traceback") and "line one\nline two" in record["exception"]
    assert time.time() - _epoch(record["time"]) < 60


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_the_endpoint_is_served_only_when_a_port_is_set() -> None:
    from carbot import health, metrics
    from carbot.settings import Settings

    port = free_port()
    with health.serving(Settings(metrics_port=None), metrics.PLAIN, {}), pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    with health.serving(Settings(metrics_port=port, metrics_listen="127.0.0.1"), metrics.PLAIN, {}):
        assert [get(port, path)[0] for path in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]
