"""No photo lost at the settings that ship: dead workers, long batches, hot swaps, poisoned photos, skewed clocks.

Every worker here runs with the defaults a user gets (no CARBOT_* override)
unless a test says which setting it changes and why. Nothing is timed: the
client's default deadline (30 s) is the bound, so a photo answered at all was
answered in time, and the assertions are on counts and orderings.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import redis
from rq.registry import FailedJobRegistry, StartedJobRegistry

from carbot.keys import photo_key
from model import ModelRegistry, Preprocessing, build_classifier, save_artefact
from tests.conftest import (
    TEST_LABELS,
    WorkerProcess,
    classify_queue,
    fetch_job,
    frozen_in_a_batch,
    jpeg_bytes,
    noisy_jpeg,
    slow_png,
    worker_env,
)
from worker import Classification, ClassifyClient, PhotoRejected
from worker._batch_worker import QUARANTINED
from worker._contract import photo_refs_key

SKEW = """
import os, time
_offset = float(os.environ["CLOCK_SKEW_S"])
_time = time.time
time.time = lambda: _time() + _offset
"""


@pytest.fixture(scope="module")
def big_photos() -> list[bytes]:
    return [noisy_jpeg(seed) for seed in range(60)]


def answered_once(url: str, job_ids: list[str]) -> None:
    """Every job finished with exactly one result, and RQ's registries say the same."""
    for job_id in job_ids:
        job = fetch_job(url, job_id)
        assert job.get_status() == "finished", (job_id, job.get_status())
        assert len(job.results()) == 1, [result.type for result in job.results()]
    queue = classify_queue(url)
    assert StartedJobRegistry(queue=queue).count == 0
    assert FailedJobRegistry(queue=queue).count == 0


async def test_a_worker_killed_mid_batch_costs_its_photos_a_few_seconds_at_the_defaults(
    redis_url, start_worker, big_photos
):
    workers = {name: start_worker(name) for name in ("w1", "w2")}
    async with ClassifyClient(redis_url) as client:  # the default deadline: 30 s
        submitted = [asyncio.ensure_future(client.classify(photo)) for photo in big_photos]
        # Both workers take batches at once: the first one's are the ones its death must not lose.
        doomed = workers["w1"]
        in_flight = await frozen_in_a_batch(redis_url, doomed)
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        outcomes = await asyncio.gather(*submitted, return_exceptions=True)

    assert all(isinstance(o, Classification) for o in outcomes), [
        o for o in outcomes if not isinstance(o, Classification)
    ]
    survivor = ({"w1", "w2"} - {doomed.name}).pop()
    for job_id in in_flight:  # the dead worker's photos were answered by the other one, once
        job = fetch_job(redis_url, job_id)
        assert job.latest_result().worker_name == survivor
    answered_once(redis_url, [o.job_id for o in outcomes])


async def test_a_worker_killed_while_idle_leaves_queued_photos_to_the_others(redis_url, start_worker):
    doomed, survivor = start_worker("idle-doomed"), start_worker("idle-survivor")
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()
    async with ClassifyClient(redis_url) as client:
        outcomes = await asyncio.gather(*(client.classify(jpeg_bytes(seed)) for seed in range(20)))
    assert {fetch_job(redis_url, o.job_id).latest_result().worker_name for o in outcomes} == {survivor.name}
    answered_once(redis_url, [o.job_id for o in outcomes])


async def test_a_photo_that_kills_two_workers_is_set_aside_and_the_third_lives(redis_url, start_worker, tmp_path):
    # One slow photo (a 49-megapixel PNG: seconds to decode) whose workers are killed while it runs,
    # twice, as a photo that exhausts memory would kill them. The deadline is longer than the default
    # because three workers start one after the other here (TensorFlow's import alone takes seconds).
    poisoned = slow_png()
    async with ClassifyClient(redis_url, timeout_s=120) as client:
        answer = asyncio.ensure_future(client.classify(poisoned))
        for name in ("first", "second"):
            worker = start_worker(name)
            [job_id] = await frozen_in_a_batch(redis_url, worker)
            worker.process.send_signal(signal.SIGKILL)
            worker.process.wait()
        third = start_worker("third")
        with pytest.raises(PhotoRejected, match="stopped the classifier twice"):
            await answer
        # The third worker is alive, and the next photo is answered as usual.
        assert isinstance(await client.classify(jpeg_bytes(1)), Classification)
    assert third.process.poll() is None
    assert fetch_job(redis_url, job_id).latest_result().exc_string.strip().endswith(QUARANTINED)


async def test_photos_of_a_killed_batch_run_alone_so_an_innocent_photo_is_not_blamed(redis_url, start_worker):
    # A batch killed once: each of its photos may be what killed it, so each runs again alone.
    queue = classify_queue(redis_url)
    async with ClassifyClient(redis_url) as client:
        answers = [asyncio.ensure_future(client.classify(noisy_jpeg(seed))) for seed in range(8)]
        while queue.count < 8:
            await asyncio.sleep(0.01)
        worker = start_worker("once")
        in_flight = await frozen_in_a_batch(redis_url, worker)
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait()
        rescuer = start_worker("rescuer")
        outcomes = await asyncio.gather(*answers)
    assert all(isinstance(o, Classification) for o in outcomes)
    rerun = [o for o in outcomes if o.job_id in in_flight]
    assert len(rerun) == len(in_flight) > 1
    assert {o.timings["batch_size"] for o in rerun} == {1}
    assert rescuer.process.poll() is None


async def test_a_photo_leaves_redis_when_its_last_job_ends(redis_url, start_worker):
    start_worker()
    connection = redis.Redis.from_url(redis_url)
    photo = jpeg_bytes(42)
    async with ClassifyClient(redis_url) as client:
        # The same photo three times at once: one copy in Redis, kept until the last job ends.
        outcomes = await asyncio.gather(*(client.classify(photo) for _ in range(3)))
        assert all(isinstance(o, Classification) for o in outcomes)
        assert connection.exists(photo_key(photo), photo_refs_key(photo_key(photo))) == 0
        with pytest.raises(PhotoRejected):
            await client.classify(b"not a picture at all")
    assert not connection.keys("carbot:photo*")


def slow_artefact(registry: ModelRegistry, version: str, image_size: int) -> None:
    """A real model whose forward pass is slow: the tiny network on large inputs."""
    network = build_classifier(len(TEST_LABELS), backbone="tiny", image_size=image_size)
    with registry.staging(version) as directory:
        save_artefact(network, directory, version=version, labels=TEST_LABELS, backbone="tiny",
                      preprocessing=Preprocessing(image_size=image_size))  # fmt: skip


async def test_a_hot_swap_during_a_burst_answers_every_photo_once_and_waits_for_no_load(
    redis_url, start_worker, model_registry, tmp_path
):
    root = tmp_path / "models"
    shutil.copytree(model_registry, root)
    registry = ModelRegistry(root)
    slow_artefact(registry, "bigger", 256)  # seconds to load, compile and warm up its 6 buckets
    start_worker(model_registry=root)
    async with ClassifyClient(redis_url) as client:
        before = await asyncio.gather(*(client.classify(jpeg_bytes(seed)) for seed in range(20)))
        registry.activate("bigger")
        after: list[Classification] = []
        for seed in range(20, 400):  # photos keep coming while the new model loads
            after.append(await client.classify(jpeg_bytes(seed)))
            if after[-1].model_version == "bigger":
                break
        tail = await asyncio.gather(*(client.classify(jpeg_bytes(seed)) for seed in range(400, 420)))

    versions = [o.model_version for o in after]
    assert {o.model_version for o in before} == {"tiny-test"}
    # The old model answered while the new one loaded: nobody waited for the load...
    assert versions[0] == "tiny-test" and versions[-1] == "bigger"
    # ...and once switched, the new one answers everything.
    assert versions == sorted(versions, key=lambda v: v == "bigger")
    assert {o.model_version for o in tail} == {"bigger"}
    answered_once(redis_url, [o.job_id for o in before + after + tail])


async def test_workers_whose_clocks_are_a_minute_off_answer_in_time_and_run_each_photo_once(
    redis_url, model_registry, tmp_path
):
    """Two workers, one clock a minute ahead and one a minute behind; the client's clock is right."""
    site = tmp_path / "skewed-clock"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SKEW)
    connection = redis.Redis.from_url(redis_url)
    workers = []
    for name, skew in (("ahead", 60), ("behind", -60)):
        env = worker_env(redis_url, model_registry, tmp_path / "data")
        env.update(PYTHONPATH=str(site), CLOCK_SKEW_S=str(skew))
        workers.append(WorkerProcess(env, tmp_path / f"{name}.log", name))
    for worker in workers:
        worker.wait_until_listening(connection)
    try:
        async with ClassifyClient(redis_url) as client:
            outcomes = await asyncio.gather(
                *(client.classify(noisy_jpeg(seed, (800, 600))) for seed in range(40)), return_exceptions=True
            )
    finally:
        for worker in workers:
            worker.stop()
    assert all(isinstance(o, Classification) for o in outcomes), [
        o for o in outcomes if not isinstance(o, Classification)
    ]
    answered_once(redis_url, [o.job_id for o in outcomes])
    assert {fetch_job(redis_url, o.job_id).latest_result().worker_name for o in outcomes} == {"ahead", "behind"}


PLAIN_RQ_WORKER = """
import sys
import redis
from rq import SimpleWorker
from carbot.keys import SERIALIZER
SimpleWorker(["classify"], connection=redis.Redis.from_url(sys.argv[1]), serializer=SERIALIZER).work(burst=True)
"""


async def test_a_plain_rq_worker_a_minute_ahead_answers_on_redis_clock(redis_url, model_registry, tmp_path):
    """RQ's own SimpleWorker running the plain job function, on a host whose clock is a minute fast.

    The photo's deadline (30 s) is on Redis's clock: read on the worker's own, it had passed already.
    """
    site = tmp_path / "skewed-clock"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SKEW)
    env = {**worker_env(redis_url, model_registry, tmp_path / "data"), "PYTHONPATH": str(site), "CLOCK_SKEW_S": "60"}
    async with ClassifyClient(redis_url) as client:
        answer = asyncio.ensure_future(client.classify(jpeg_bytes(5)))
        while classify_queue(redis_url).count == 0:
            await asyncio.sleep(0.01)
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PLAIN_RQ_WORKER, redis_url, env=env, cwd=Path(__file__).parent.parent
        )
        assert await worker.wait() == 0
        prediction = await answer
    assert isinstance(prediction, Classification)
    assert prediction.timings["batch_size"] == 1  # the plain job function answered it, one photo per pass


def test_the_worker_survives_a_redis_restart(tmp_path: Path, model_registry: Path) -> None:
    """Redis goes away mid-stream and comes back (empty: nothing kept on disk); the worker carries on."""
    from carbot.services import PrivateRedis

    with PrivateRedis(tmp_path / "redis") as server:
        env = worker_env(server.url, model_registry, tmp_path / "data")
        worker = WorkerProcess(env, tmp_path / "w.log", "survivor")
        worker.wait_until_listening(redis.Redis.from_url(server.url))

        async def one_photo(seed: int) -> Classification:
            async with ClassifyClient(server.url) as client:
                return await client.classify(jpeg_bytes(seed))

        assert isinstance(asyncio.run(one_photo(1)), Classification)
        server.stop(crash=True)
        time.sleep(1)  # the worker's blocking dequeue sees the connection die and backs off
        server.start()
        answer = asyncio.run(one_photo(2))
        assert isinstance(answer, Classification)
        assert worker.process.poll() is None
        log = worker.log()
        worker.stop()
    assert "could not connect to Redis" in log  # it did see Redis go, and waited for it
