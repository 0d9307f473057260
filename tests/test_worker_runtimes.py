"""The worker serves the fastest verified variant the host runs, with Keras' answers, and falls back when one is
missing or altered; hot swap and rollback work across runtimes; `carbot status` and /metrics say which runs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import redis
from prometheus_client import generate_latest

from carbot import metrics
from carbot.cli._status import collect_status, format_status
from carbot.settings import Settings
from model import RUNTIME_CHOICES, RUNTIMES, ModelRegistry, host_supports, load_predictor, read_variants
from model._variants import variants_dir
from tests.conftest import add_version
from training._synthetic import SYNTHETIC_CLASSES, synthetic_jpeg
from worker import BatchClassifier, ClassifyClient, ModelSource

# Photos of the demo model's own classes (seeds it never trained on), so its answers are confident ones.
PHOTOS = [synthetic_jpeg(SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)], seed=10_000 + i) for i in range(24)]


def test_the_setting_offers_exactly_the_runtimes_the_model_knows():
    assert set(get_args(Settings.model_fields["runtime"].annotation)) == set(RUNTIME_CHOICES)
    assert Settings().runtime == "auto"


def test_the_serve_image_locks_the_runtimes_and_no_tensorflow():
    import tomllib

    root = Path(__file__).parent.parent
    locked = {line.split("==")[0] for line in (root / "requirements" / "serve.txt").read_text().splitlines()
              if line[:1].isalpha()}  # fmt: skip
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"onnxruntime", "openvino"} <= locked and {"tensorflow", "tensorflow-cpu", "keras"}.isdisjoint(locked)
    assert {"onnxruntime", "openvino"} <= {requirement.split(">")[0] for requirement in extras["serve"]}


def servable(directory: Path) -> list[str]:
    """The runtimes that may serve the version in `directory` on this host: TensorFlow and its verified variants."""
    manifest = read_variants(directory)
    return [name for name in RUNTIMES if host_supports(name)[0]
            and (name == "tensorflow" or manifest.variants[name].verified)]  # fmt: skip


def classify(source: ModelSource, photos: list[bytes]) -> list[dict]:
    classifier = BatchClassifier(source, decode_threads=2)
    try:
        report = classifier.classify([(f"{i:064x}", photo) for i, photo in enumerate(photos)], [3] * len(photos))
    finally:
        classifier.close()
    return report.outcomes


def top1(outcomes: list[dict]) -> list[str]:
    return [outcome["top_k"][0]["label"] for outcome in outcomes]


@pytest.fixture(scope="module")
def keras_answers(demo_registry) -> list[dict]:
    """The demo model's answers to PHOTOS from Keras itself (TensorFlow), through the worker's own classifier."""
    source = ModelSource(registry=demo_registry, max_batch=8, runtime="tensorflow")
    outcomes = classify(source, PHOTOS)
    assert {outcome["runtime"] for outcome in outcomes} == {"tensorflow"}
    return outcomes


def test_every_runtime_serves_the_demo_model_with_the_answers_of_keras(demo_registry, keras_answers):
    directory = ModelRegistry(demo_registry).path_for("demo")
    runtimes = servable(directory)
    # This host has ONNX Runtime and OpenVINO (the ml extra installs them): at least the fp32 forms serve.
    assert {"tensorflow", "onnxruntime", "openvino-fp32"} <= set(runtimes)
    for runtime in runtimes:
        source = ModelSource(registry=demo_registry, max_batch=8, runtime=runtime)
        predictor = source.current()
        # Warmed up as on TensorFlow: each bucket compiled once and timed, the plans made from those times.
        assert predictor.trace_count == len(predictor.buckets) and set(predictor.bucket_ms) == set(predictor.buckets)
        outcomes = classify(source, PHOTOS)  # 24 photos: 8 + 8 + 8
        for size in (3, 5, 7):
            assert top1(classify(source, PHOTOS[:size])) == top1(keras_answers)[:size]
        assert predictor.trace_count == len(predictor.buckets), runtime  # no new compilation for any batch size
        assert {outcome["runtime"] for outcome in outcomes} == {runtime}
        assert top1(outcomes) == top1(keras_answers), runtime
        if runtime in ("onnxruntime", "openvino-fp32"):  # the same arithmetic, to float rounding
            for ours, theirs in zip(outcomes, keras_answers):
                assert [c["label"] for c in ours["top_k"]] == [c["label"] for c in theirs["top_k"]]
                for a, b in zip(ours["top_k"], theirs["top_k"]):
                    assert a["probability"] == pytest.approx(b["probability"], abs=1e-3)


def test_openvino_streams_a_full_batch_in_parts_with_the_answers_of_one_photo_at_a_time(demo_registry):
    """A batch of 32 runs as parts the CPU's streams take in turn; each photo's output is what it gets alone."""
    from model import load_image

    directory = ModelRegistry(demo_registry).path_for("demo")
    predictor = load_predictor(directory, runtime="openvino-fp32", max_batch=32, warm=False)
    assert predictor.runtime == "openvino-fp32"
    images = np.stack([load_image(photo, predictor.preprocessing) for photo in PHOTOS + PHOTOS[:8]])
    together, features = predictor.outputs(images)  # 32: the largest bucket
    alone = [predictor.outputs(image[None]) for image in images]  # batch 1: one stream, every thread
    np.testing.assert_allclose(together, np.concatenate([a[0] for a in alone]), atol=1e-5)
    if features is not None:
        np.testing.assert_allclose(features, np.concatenate([a[1] for a in alone]), rtol=1e-4, atol=1e-4)
    # 24 photos: the plan's buckets (16 + 8), each streamed in parts, still in the photos' order.
    np.testing.assert_allclose(predictor.outputs(images[:24])[0], together[:24], atol=1e-5)


@pytest.mark.parametrize("variant", ["openvino-fp32", "openvino-int8"])
def test_openvino_reads_the_pixels_as_bytes_and_answers_as_the_verified_float_model(demo_registry, variant):
    """The worker's uint8 batch goes in as it is (converted inside the graph), with the float IR's own answers."""
    import openvino as ov

    from model import load_image

    directory = ModelRegistry(demo_registry).path_for("demo")
    predictor = load_predictor(directory, runtime=variant, max_batch=32, warm=False)
    images = np.stack([load_image(photo, predictor.preprocessing) for photo in PHOTOS + PHOTOS[:8]])
    served = predictor.outputs(images)[0]

    xml = variants_dir(directory) / ("model-int8.xml" if variant.endswith("int8") else "model.xml")
    core = ov.Core()
    as_exported = core.read_model(str(xml))
    assert as_exported.inputs[0].get_element_type() == ov.Type.f32  # what was exported and verified
    compiled = core.compile_model(as_exported, "CPU", {"INFERENCE_PRECISION_HINT": "f32"} if "fp32" in variant else {})
    np.testing.assert_allclose(served, compiled(images.astype(np.float32))[0], atol=1e-6)
    # And alone (one stream, every thread), the path a lone photo takes.
    np.testing.assert_allclose(predictor.outputs(images[:1])[0], served[:1], atol=1e-5)


def test_auto_serves_the_runtime_fastest_at_warmup_and_says_why(demo_registry, caplog):
    directory = ModelRegistry(demo_registry).path_for("demo")
    with caplog.at_level(logging.INFO, logger="model"):
        predictor = load_predictor(directory, max_batch=8)  # the default: auto
    choice = predictor.runtime_choice
    # Every verified variant was loaded and timed on the buckets; the least total time serves. TensorFlow,
    # the reference they were verified against, is not timed: it serves only when no variant can.
    assert set(choice.timings_ms) == set(servable(directory)) - {"tensorflow"}
    assert choice.runtime == min(choice.timings_ms, key=choice.timings_ms.get) == predictor.runtime
    assert choice.reason.startswith("fastest on this CPU at warm-up")
    assert f"model demo serves on {choice.runtime}" in caplog.text
    assert predictor.bucket_ms and set(predictor.bucket_ms) == set(predictor.buckets)  # plans timed on it


def burn_cpu(seconds: float) -> None:
    """Keep this thread busy until it has used `seconds` of CPU."""
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


def candidates_slowed(monkeypatch, directory: Path, slow_down) -> list[str]:
    """The variants `auto` will time, each forward pass of variant `name` first running `slow_down(name, calls)`
    (`calls`: how many passes that variant's backend has run, this one included)."""
    from model import _runtimes

    candidates = [name for name in servable(directory) if name != "tensorflow"]
    assert len(candidates) >= 2, "this host should run at least ONNX Runtime and OpenVINO fp32"
    open_variant = _runtimes.open_variant

    def slowed(folder, name):
        backend = open_variant(folder, name)
        forward, calls = backend.forward, [0]

        def slowed_forward(batch):
            calls[0] += 1
            slow_down(name, calls[0])
            return forward(batch)

        backend.forward = slowed_forward
        return backend

    monkeypatch.setattr(_runtimes, "open_variant", slowed)
    return candidates


def test_auto_ranks_the_variants_by_the_cpu_their_pass_costs_not_by_how_long_the_machine_made_it_wait(
    demo_registry, monkeypatch
):
    """Workers that start together on one host time their variants while the others load: a pass that waits
    for a core looks slow by the clock though it costs no more (a benchmark's worker once chose bf16, 0.6x
    as fast as int8, that way: docs/benchmarks.md). Here one variant's pass waits 0.3 s for a core (a sleep:
    wall time without CPU) and every other variant's pass costs 0.1 s more CPU than its own (a busy loop):
    the waiting one is the cheapest and must serve. Wall time, as the trial measured before, chose another."""
    directory = ModelRegistry(demo_registry).path_for("demo")
    waiting = None

    def slow_down(name, calls):
        if name == waiting:
            time.sleep(0.3)
        else:
            burn_cpu(0.1)

    candidates = candidates_slowed(monkeypatch, directory, slow_down)
    waiting = candidates[-1]
    choice = load_predictor(directory, max_batch=4).runtime_choice
    assert choice.runtime == waiting, choice.reason
    assert all(choice.timings_ms[waiting] + 50 < choice.timings_ms[name] for name in candidates if name != waiting)
    assert "CPU time of a batch of 4" in choice.reason


def test_auto_times_short_passes_long_enough_that_a_moment_of_other_work_does_not_decide(demo_registry, monkeypatch):
    """A lone photo's pass is short: two of them can both fall in a moment when something else in the process
    runs (two starts of six on a 2-core AMD EPYC timed int8 at twice its cost that way; one served bf16). Here the
    first passes of one variant (its warm-up and the next two) each take 0.1 s more CPU, then none; every
    other variant's pass always takes 0.03 s more. The variant is the cheapest and must serve: timed for
    `TRIAL_S`, not on two passes, as before."""
    directory = ModelRegistry(demo_registry).path_for("demo")
    unlucky = None

    def slow_down(name, calls):
        burn_cpu((0.1 if calls <= 3 else 0.0) if name == unlucky else 0.03)

    unlucky = candidates_slowed(monkeypatch, directory, slow_down)[0]
    choice = load_predictor(directory, max_batch=1).runtime_choice
    assert choice.runtime == unlucky, choice.reason


def test_auto_holds_one_candidate_at_a_time_and_compiles_every_bucket_only_for_the_one_that_serves(
    demo_registry, monkeypatch
):
    """Memory at start: each runtime tried is let go before the next loads (two fully warmed ResNet50 runtimes
    held at once took a worker to 2 GB at start where it serves in 0.6 GB: docs/benchmarks.md)."""
    import weakref

    from model import _predictor

    alive: weakref.WeakSet = weakref.WeakSet()
    most_alive, warmed = 0, []
    construct, warm = _predictor.Predictor.__init__, _predictor.Predictor.warmup

    def counted_init(self, *args, **kwargs):
        nonlocal most_alive
        construct(self, *args, **kwargs)
        alive.add(self)
        most_alive = max(most_alive, len(alive))

    def recorded_warmup(self, batch_sizes=None):
        warmed.append((self.runtime, None if batch_sizes is None else tuple(batch_sizes)))
        warm(self, batch_sizes)

    monkeypatch.setattr(_predictor.Predictor, "__init__", counted_init)
    monkeypatch.setattr(_predictor.Predictor, "warmup", recorded_warmup)
    directory = ModelRegistry(demo_registry).path_for("demo")
    predictor = load_predictor(directory, max_batch=8)
    candidates = set(servable(directory)) - {"tensorflow"}
    assert len(candidates) >= 2, "this host should run at least ONNX Runtime and OpenVINO fp32"
    assert set(predictor.runtime_choice.timings_ms) == candidates
    assert most_alive == 1
    # Each candidate was compiled for the largest bucket only; the one that serves, then, for every bucket.
    assert sorted(warmed[:-1]) == sorted((name, (8,)) for name in candidates)
    assert warmed[-1] == (predictor.runtime, None) and set(predictor.bucket_ms) == set(predictor.buckets)


def test_on_a_gpu_host_where_tensorflow_cannot_load_the_model_a_verified_variant_serves(demo_registry, monkeypatch):
    # No GPU here: the host is told it has one, and TensorFlow's load fails as a GPU's can (out of memory).
    from model import _predictor, _runtimes

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA_ERROR_OUT_OF_MEMORY: out of memory")

    monkeypatch.setattr(_runtimes, "has_gpu", lambda: True)
    monkeypatch.setattr(_predictor.Predictor, "from_artefact", out_of_memory)
    directory = ModelRegistry(demo_registry).path_for("demo")
    predictor = load_predictor(directory, max_batch=4)
    choice = predictor.runtime_choice
    assert predictor.runtime in set(servable(directory)) - {"tensorflow"}
    assert choice.reason.startswith("a GPU, but TensorFlow cannot serve (RuntimeError: CUDA_ERROR_OUT_OF_MEMORY")
    assert "fastest on this CPU at warm-up" in choice.reason and "tensorflow" not in choice.timings_ms


def test_a_missing_or_altered_variant_is_not_served_and_the_next_one_is(demo_registry, tmp_path, caplog):
    directory = tmp_path / "demo"
    shutil.copytree(ModelRegistry(demo_registry).path_for("demo"), directory)
    onnx_file = variants_dir(directory) / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    (variants_dir(directory) / "model-int8.bin").unlink()

    with caplog.at_level(logging.INFO, logger="model"):
        predictor = load_predictor(directory, runtime="onnxruntime", max_batch=4)
    choice = predictor.runtime_choice
    assert predictor.runtime not in ("onnxruntime", "openvino-int8")
    assert choice.reason.startswith("CARBOT_RUNTIME=onnxruntime cannot serve (ArtefactCorrupt")
    assert "model.onnx does not match its checksum" in choice.skipped["onnxruntime"]
    if "openvino-int8" in servable(directory):
        assert "model-int8.bin is missing" in choice.skipped["openvino-int8"]
    assert "runtime onnxruntime cannot serve" in caplog.text  # logged as a warning

    # With every variant gone (and the manifest unreadable), Keras on TensorFlow serves.
    (variants_dir(directory) / "variants.json").write_text("{not json")
    predictor = load_predictor(directory, runtime="openvino-fp32", max_batch=4)
    assert predictor.runtime == "tensorflow"
    assert "this version has no such variant" in predictor.runtime_choice.skipped["openvino-fp32"]


def test_hot_swap_and_rollback_across_runtimes(demo_registry, keras_answers, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(demo_registry, root)
    registry = ModelRegistry(root)
    add_version(registry, "tiny-b")  # saved without variants: only TensorFlow can serve it
    source = ModelSource(registry=root, max_batch=8, runtime="onnxruntime")

    first = classify(source, PHOTOS)
    assert {(o["model_version"], o["runtime"]) for o in first} == {("demo", "onnxruntime")}
    assert top1(first) == top1(keras_answers)
    assert metric_labels("carbot_worker_runtime_info") == {"onnxruntime"}

    registry.activate("tiny-b")
    served = serve_until(source, "tiny-b")  # the old model answers while the new one loads in the background
    assert served.runtime == "tensorflow"
    assert "CARBOT_RUNTIME=onnxruntime cannot serve (this version has no such variant)" in served.reason
    assert {(o["model_version"], o["runtime"]) for o in classify(source, PHOTOS[:3])} == {("tiny-b", "tensorflow")}
    assert metric_labels("carbot_worker_runtime_info") == {"tensorflow"}

    assert registry.rollback() == "demo"
    serve_until(source, "demo")
    again = classify(source, PHOTOS)
    assert {(o["model_version"], o["runtime"]) for o in again} == {("demo", "onnxruntime")}
    assert [o["top_k"] for o in again] == [o["top_k"] for o in first]


class Served:
    def __init__(self, served: dict) -> None:
        self.version, self.runtime, self.reason = served["version"], served["runtime"], served["reason"]


def serve_until(source: ModelSource, version: str, timeout: float = 120) -> Served:
    """Let `source` switch (between batches, as the worker does) until it serves `version`."""
    deadline = time.monotonic() + timeout
    while source.served()["version"] != version:
        assert time.monotonic() < deadline, f"still serving {source.served()}"
        time.sleep(0.1)
        source.refresh()
    return Served(source.served())


def metric_labels(name: str) -> set[str]:
    text = generate_latest(metrics.WORKER).decode()
    return {line.split('runtime="')[1].split('"')[0] for line in text.splitlines() if line.startswith(name + "{")}


@pytest.mark.parametrize("tensorflow", ["left out", "installed"])
def test_a_cpu_worker_serves_a_variant_without_loading_tensorflow(tensorflow, demo_registry, keras_answers, tmp_path):
    for i, photo in enumerate(PHOTOS):
        (tmp_path / f"{i:03d}.jpg").write_bytes(photo)
    # "left out": TensorFlow and Keras made unimportable, as in a CPU image without them. "installed": they
    # could be imported, and the worker at its default (auto) still never imports them to time them.
    hide = 'sys.modules["tensorflow"] = None\nsys.modules["keras"] = None' if tensorflow == "left out" else ""
    code = f"""
import json, sys
from pathlib import Path
{hide}
from worker import BatchClassifier, ModelSource
source = ModelSource(registry=Path({str(demo_registry)!r}), max_batch=8)
photos = [path.read_bytes() for path in sorted(Path({str(tmp_path)!r}).glob("*.jpg"))]
classifier = BatchClassifier(source, decode_threads=2)
report = classifier.classify([(f"{{i:064x}}", photo) for i, photo in enumerate(photos)], [3] * len(photos))
heavy = ("tensorflow", "keras")
loaded = sorted(name for name, module in sys.modules.items() if module and name.split(".")[0] in heavy)
print(json.dumps({{"served": source.served(), "outcomes": report.outcomes, "loaded": loaded}}))
"""
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert reply["loaded"] == []
    assert reply["served"]["runtime"] in set(servable(ModelRegistry(demo_registry).path_for("demo"))) - {"tensorflow"}
    assert top1(reply["outcomes"]) == top1(keras_answers)


async def test_the_worker_reports_its_runtime_in_status_and_metrics(demo_registry, start_worker, redis_url, tmp_path):
    # At the default settings (CARBOT_RUNTIME=auto), a real `carbot worker` process.
    worker = start_worker(model_registry=demo_registry)
    async with ClassifyClient(redis_url) as client:
        prediction = await client.classify(PHOTOS[0])
    assert prediction.model_version == "demo"
    settings = Settings(model_registry=demo_registry, data_dir=tmp_path / "data")
    report = collect_status(settings, redis_url)
    (entry,) = report["workers"]
    served = entry["model"]
    assert served["version"] == "demo" and served["runtime"] in servable(ModelRegistry(demo_registry).path_for("demo"))
    assert served["reason"].startswith("fastest on this CPU at warm-up")
    assert f"model demo on {served['runtime']}: fastest on this CPU" in format_status(report)
    assert prediction.runtime == served["runtime"]  # each answer says which backend gave it
    assert f"model demo serves on {served['runtime']}" in worker.log()
    redis.Redis.from_url(redis_url).close()
