"""`python -m bench serving`: this system against the model's ceilings, one-at-a-time predict and plain RQ.

One run builds one model (ResNet50 at 224 px by default, its backbone trained on
training's synthetic classes, `bench.backbone`: the weights change nothing about
speed, but a random network's int8 variant is refused), saves it as an artefact in a throw-away
registry so every process serves exactly the same network, exports its
optimised serving variants (`model.export_variants`: ONNX Runtime, OpenVINO
fp32/bf16/int8, each verified against the Keras model; a variant that does not
agree is refused and never serves), generates one set of JPEGs in the mix the
bots submit (`photo_mix`: Telegram photos at the size the Telegram bot downloads
for this model (a photo sent as a file too: its thumbnail), and one in four a
4032x3024 phone photo sent on Discord, as the Discord bot classifies it: the copy
Discord's media proxy serves it at the size that covers the model's input, or with
`phone_copies=False` the file itself), starts a private Redis,
and then measures, one after the other, on the same photos:

(a) TensorFlow's ceiling: the `Predictor`'s compiled Keras forward pass on photos
    already decoded, in batches of 32.
(a') the ceiling of the runtime the worker chose: the same, through that
    runtime's backend (`model.load_predictor`). The worker runs with
    CARBOT_RUNTIME=auto by default: on a CPU it serves the fastest *verified*
    variant, so (a') is what this machine can do with this model, and (d) can
    beat (a) by as much as the variant is faster.
(b) the original web app's way: for each photo, decode and resize, then
    `keras_model.predict(x[None])`, one photo at a time. The decoding is the
    project's `load_image` and the model is the same, so only the serving style
    differs (the original app also scaled pixels by /255 itself; here the model
    scales its own input).
(c) plain RQ: one job per photo, a stock `rq.SimpleWorker` in its own process
    running the plain job function `worker._tasks.classify_photo` with a resident
    model (a batch-1 forward pass per photo, on the runtime its `ModelSource`
    chooses); photos submitted all at once through the bots' `ClassifyClient`.
(d) this system: `carbot worker` (the `BatchWorker`, batches of up to 32) in its
    own process, the photos submitted all at once through the same client. The
    client is configured as the bots' (`ClassifyClient.from_settings`): it reduces
    a photo much larger than the model's input to a small uncompressed BMP of it
    (`model.reduce_for_queue`) before queueing it, and that time counts. Its answers are compared with the
    Keras model's on the same photos (top-1 agreement).
(e) one photo alone: photos sent one after another through (d)'s worker; the
    overhead is its median latency minus the median time of the worker's runtime
    for one pre-decoded photo at batch 1, measured in this process.
(f) decoding + model, no queue: the worker's own `BatchClassifier` in this
    process, on the same JPEGs (not reduced) in batches of 32, on the worker's
    runtime: what a worker fed the original files would do if Redis, RQ and the
    client cost nothing. f/a' is what decoding the photos costs the model on this
    machine (on a CPU the two share the cores). It has no target.

The claim is the ratios, not the absolute numbers: a shared 2-core CPU runs
ResNet50 at about 20-130 photos/s depending on the runtime and the minute, and a
GPU hundreds of times faster. Measured side by side in one run, d/a (what the
whole system gains over TensorFlow's own ceiling), d/a' (how much of the chosen
runtime's ceiling the whole queue keeps), d/b and d/c (what batching gains over
the usual ways to serve a Keras model) stay meaningful where an images/s figure
does not. To keep them so, both workers are started (and warmed) before anything
is timed, and the phases run in the order c, a, a', d, a', a, f, b, e: (d) sits
next to every phase it is compared with, and the ceilings, measured just before
and just after (d), show how much the machine's speed drifted meanwhile (the
table says so when it moved more than 15 %). In (e) the queued photo and the
model's own time alternate, photo by photo.

Where a photo's milliseconds go comes from the worker's own figures (its counters
in Redis and the timings in each answer: queued, decode, forward) and from the
client's reduction, timed in this process on the same photos.

Each worker's peak memory is its VmHWM (the high-water mark of its resident
set, read from /proc just before it is stopped): batching costs activations.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bench.figures import WorkerStats, peak_rss_mb, percentile, percentiles
from bench.workers import start_logged, wait_registered
from carbot.connections import redis_connection
from carbot.keys import RUNTIME_KEY
from carbot.services import PrivateRedis
from carbot.settings import Settings
from model import covering_size

BATCH = 32  # batch size of the ceilings (a), (a') and max_batch of the batch worker (d)
# The photo sizes Telegram keeps of a camera photo (the long side 320, 800, 1280 px); the Telegram bot
# downloads the smallest whose shorter side covers the model's input (bots' `pick_photo_size`).
TELEGRAM_SIZES = ((320, 240), (800, 600), (1280, 960))
PHONE_PHOTO = (4032, 3024)  # a phone's photo, sent on Discord (Telegram's bot reads a thumbnail of a file)
PHONE_EVERY = 4  # one photo in four is a phone's (0: none)
JPEG_QUALITY = 90
NUM_CLASSES = 190  # as in the original study
VERSION = "bench"
SINGLE_PHOTOS = 20  # photos sent one at a time in (e)
PARTIAL_BATCH = 23  # a batch that is no bucket size, as at the tail of a burst: run as planned, and padded
# Synthetic photos to fit the head on, and to verify the variants on. With 240 to fit on, the head's margins
# were thin enough that int8 flipped 7 answers in 204 (refused); with 2400, none.
HEAD_TRAIN, HEAD_TEST = 2400, 204
WORKER_START_TIMEOUT_S = 600.0  # the worker times every verified runtime at warm-up before it takes a photo

TARGETS = {  # name: (comparison, threshold); issue 16's targets on a 2-core CPU
    "d/a": (">=", 2.5),  # this system against TensorFlow's own ceiling
    "d/a'": (">=", 0.75),  # ...against the ceiling of the runtime the worker chose
    "d/a'_drift_free": (">=", 0.75),
    "d/b": (">=", 2.0),
    # Issue 16 asks d/b and d/c to stay at least what they were; 1.5 is the serving benchmark's target from
    # before it. The code before issue 16 reached d/c 1.23-1.35 on the AVX-512 EPYC (docs/benchmarks.md).
    "d/c": (">=", 1.5),
    "single_photo_overhead_ms": ("<=", 15.0),
}


# -- the recipe -------------------------------------------------------------------------------------------------


def run_benchmark(
    settings: Settings,
    *,
    photos: int = 192,
    image_size: int = 224,
    backbone: str = "resnet50",
    backbone_weights: Path | None = None,
    head_photos: int = HEAD_TRAIN,
    phone_size: tuple[int, int] = PHONE_PHOTO,
    phone_every: int = PHONE_EVERY,
    phone_copies: bool = True,
    single_photos: int = SINGLE_PHOTOS,
    verbose: bool = True,
) -> dict[str, Any]:
    """Measure (a) to (f) on one model and one set of photos, print a table, and return everything as a dict.

    `backbone_weights`: a weights file for the backbone (`bench.backbone.synthetic_backbone`'s, or
    ImageNet's); None leaves it random. `head_photos`: how many synthetic photos the head is fitted on.
    `phone_copies`: the phone photos are submitted as the media proxy's copies the Discord bot fetches
    (`model.covering_size`); False: as the files themselves (what the bot classifies without a usable copy).
    """
    if photos < 1:
        raise ValueError("photos must be at least 1")
    say = _Progress(verbose)
    started_at, load_before = datetime.now(UTC), _load_average()
    telegram = telegram_photo_size(image_size)
    phone_copy = covering_size(phone_size, image_size) if phone_copies else None
    mix = photo_mix(photos, telegram, phone_size, phone_every, phone_copy)
    with tempfile.TemporaryDirectory(prefix="carbot-bench-") as tmp:
        tmp_dir = Path(tmp)
        say(f"generating {photos} JPEGs ({mix})")
        jpegs = make_photos(photos, small_size=telegram, phone_size=phone_size, phone_every=phone_every,
                            phone_copy=phone_copy)  # fmt: skip

        say(f"building {backbone} at {image_size} px ({weights_name(backbone_weights)}), saving it as the active "
            "artefact, exporting its serving variants and verifying each against the Keras model")  # fmt: skip
        registry, keras_model, manifest = save_benchmark_model(
            tmp_dir / "models",
            backbone=backbone,
            image_size=image_size,
            weights=backbone_weights,
            head_photos=head_photos,
            say=say,
        )
        # The clients read the active model's preprocessing from this registry, as the bots do from theirs.
        settings = settings.with_overrides(model_registry=registry)

        with PrivateRedis(tmp_dir / "redis") as server:
            plain_queue = f"{settings.classify_queue}-plain"
            plain_worker = _WorkerProcess.plain_rq(settings, server.url, registry, tmp_dir, queue=plain_queue)
            batch_worker = _WorkerProcess.batch(settings, server.url, registry, tmp_dir)
            with plain_worker, batch_worker:
                say("loading the model here while both workers start, choose their runtime and load it too")
                from model import Predictor, load_predictor

                predictor = Predictor.from_artefact(registry / VERSION, max_batch=BATCH)
                predictor.warmup()
                decoded = np.stack([_decode(jpeg, predictor) for jpeg in jpegs])
                decode_ms = measure_decode(jpegs, predictor)
                reduction = measure_reduce(jpegs, predictor)
                say(f"a batch of {PARTIAL_BATCH} run as planned {predictor.plan(PARTIAL_BATCH)}, and padded")
                partial = measure_partial_batch(predictor, registry / VERSION, decoded)
                plain_worker.wait_ready(settings, jpegs, queue=plain_queue)
                batch_worker.wait_ready(settings, jpegs)
                served = batch_worker.served()
                say(f"the worker serves on {served['runtime']}: {served['reason']}")
                chosen = load_predictor(registry / VERSION, runtime=served["runtime"], max_batch=BATCH)

                say("(c) plain RQ: all photos at once, one job per photo, SimpleWorker")
                plain_rq = measure_plain_rq(settings, server.url, jpegs, queue=plain_queue)
                say(f"    {plain_rq['images_per_s']:.1f} images/s")
                say("(a) TensorFlow's ceiling: compiled forward pass on pre-decoded batches of 32")
                ceiling = measure_model_ceiling(predictor, decoded)
                say(f"    {ceiling['images_per_s']:.1f} images/s")
                say(f"(a') the worker's runtime's ceiling: {chosen.runtime} on pre-decoded batches of 32")
                runtime_ceiling = measure_model_ceiling(chosen, decoded)
                say(f"    {runtime_ceiling['images_per_s']:.1f} images/s")
                say("(d) this system: all photos at once, reduced by the bots' client, carbot worker")
                batched = measure_batch_worker(settings, server.url, jpegs)
                say(f"    {batched['images_per_s']:.1f} images/s, mean batch size {batched['mean_batch_size']:.1f}")
                say("(a') and (a) again, to see how much the machine's speed drifted")
                runtime_ceiling_after = measure_model_ceiling(chosen, decoded)
                ceiling_after = measure_model_ceiling(predictor, decoded)
                say(f"    {runtime_ceiling_after['images_per_s']:.1f} and {ceiling_after['images_per_s']:.1f} images/s")
                say("(f) decoding + model, no queue: the worker's BatchClassifier here, batches of 32")
                no_queue = measure_decode_and_model(chosen, jpegs, decode_threads=settings.decode_threads)
                say(f"    {no_queue['images_per_s']:.1f} images/s")
                say("(b) the original web app: decode, then keras_model.predict(x[None]), one photo at a time")
                one_at_a_time = measure_predict_one_at_a_time(keras_model, jpegs, predictor)
                say(f"    {one_at_a_time['images_per_s']:.1f} images/s")
                say(f"(e) one photo alone, {single_photos} times, each next to the runtime's own time for one photo")
                single = measure_single_photo(settings, server.url, jpegs, decoded, chosen, single_photos)
                say(f"    p50 {single['latency_ms']['p50']:.1f} ms, overhead {single['overhead_ms']:.1f} ms")
            plain_rq["peak_rss_mb"], batched["peak_rss_mb"] = plain_worker.peak_rss_mb, batch_worker.peak_rss_mb

    ceiling = _combined_ceiling(ceiling, ceiling_after)
    runtime_ceiling = _combined_ceiling(runtime_ceiling, runtime_ceiling_after)
    runtime_ceiling["runtime"] = chosen.runtime
    batched["top1_agreement_with_a"] = _agreement(batched.pop("top1"), ceiling.pop("top1"))
    batched["top1_agreement_with_a_prime"] = _agreement(
        [prediction.top_k[0].label for prediction in batched["predictions"]], runtime_ceiling.pop("top1")
    )
    batched["ms_per_photo"] = _where_the_time_goes(batched, reduction)
    single["client_reduce_ms"] = reduction["telegram_ms_p50"]
    del batched["predictions"]
    results = {
        "config": {
            "photos": photos,
            "photo_mix": mix,
            "client": "ClassifyClient.from_settings, as the bots: photos reduced to the model's input "
            "(model.reduce_for_queue) before they are queued",
            "image_size": image_size,
            "backbone": backbone,
            "weights": weights_name(backbone_weights),
            "num_classes": NUM_CLASSES,
            "max_batch": BATCH,
            "max_wait_ms": settings.max_wait_ms,
            "decode_threads": settings.decode_threads,
            "runtime_setting": settings.runtime,
            "single_photos": single_photos,
            "phase_order": "c, a, a', d, a', a, f, b, e",
        },
        "machine": _machine_info(started_at, load_before),
        "variants": _variant_figures(manifest),
        "runtime": served,
        "decode_ms_p50": decode_ms,
        "client_reduce": reduction,
        "partial_batch": partial,
        "methods": {
            "a_model_ceiling": ceiling,
            "a_prime_runtime_ceiling": runtime_ceiling,
            "b_predict_one_at_a_time": one_at_a_time,
            "c_plain_rq": plain_rq,
            "d_batch_worker": batched,
            "e_single_photo": single,
            "f_decode_and_model": no_queue,
        },
        "ratios": _ratios(ceiling, runtime_ceiling, one_at_a_time, plain_rq, batched, single),
        "shares": {
            "f/a": round(no_queue["images_per_s"] / ceiling["images_per_s"], 3),
            "f/a'": round(no_queue["images_per_s"] / runtime_ceiling["images_per_s"], 3),
            "d/f": round(batched["images_per_s"] / no_queue["images_per_s"], 3),
            # What d/c can reach here: a (d) at the runtime's ceiling. And what batching buys the model
            # itself: its ceiling (batches of 32) against its own time for one photo at batch 1.
            "a'/c": round(runtime_ceiling["images_per_s"] / plain_rq["images_per_s"], 3),
            "a'/batch_1": round(runtime_ceiling["images_per_s"] * single["model_batch1_ms"]["p50"] / 1000, 3),
        },
        "seconds": round(time.monotonic() - say.started, 1),
    }
    print(format_table(results), flush=True)
    return results


# -- inputs: photos and the model --------------------------------------------------------------------------------


def make_photos(
    count: int,
    *,
    small_size: tuple[int, int] = TELEGRAM_SIZES[0],
    phone_size: tuple[int, int] = PHONE_PHOTO,
    phone_every: int = PHONE_EVERY,
    phone_copy: tuple[int, int] | None = None,
    seed: int = 0,
) -> list[bytes]:
    """`count` distinct JPEGs: `small_size` (a Telegram photo), and every `phone_every`-th one a phone's.

    A phone's photo is `phone_size`, or given `phone_copy`, that photo resized to it (Lanczos, as a
    media proxy would; the copy is what the Discord bot classifies of a phone's photo).

    Drawing a synthetic photo is slow (a second for a phone-size one here), so a
    few scenes are drawn and each photo is one of them shifted by a random offset
    and maybe mirrored: every photo is different (the worker computes identical
    photos only once), while decoding costs what a real photo of that size costs.
    """
    rng = np.random.default_rng(seed)
    phone_count = _phone_count(count, phone_every)
    small_scenes = [draw_scene(rng, small_size) for _ in range(min(12, count - phone_count))]
    phone_scenes = [_phone_scene(rng, phone_size) for _ in range(min(3, phone_count))]
    if phone_copy is not None:
        phone_scenes = [np.asarray(Image.fromarray(scene).resize(phone_copy, Image.LANCZOS)) for scene in phone_scenes]
    photos = []
    for index in range(count):
        if phone_every and index % phone_every == phone_every - 1:
            scene = phone_scenes[(index // phone_every) % len(phone_scenes)]
        else:
            scene = small_scenes[index % len(small_scenes)]
        shifted = np.roll(scene, (int(rng.integers(scene.shape[0])), int(rng.integers(scene.shape[1]))), (0, 1))
        if rng.random() < 0.5:
            shifted = shifted[:, ::-1]
        photos.append(jpeg_bytes(shifted))
    return photos


def telegram_photo_size(image_size: int) -> tuple[int, int]:
    """The Telegram photo size the Telegram bot downloads for a model reading `image_size` px."""
    covering = [size for size in TELEGRAM_SIZES if min(size) >= image_size]
    return min(covering, key=lambda size: size[0] * size[1]) if covering else TELEGRAM_SIZES[-1]


def photo_mix(
    count: int,
    telegram: tuple[int, int],
    phone_size: tuple[int, int],
    phone_every: int,
    phone_copy: tuple[int, int] | None = None,
) -> str:
    """The benchmark's photos in words."""
    phones = _phone_count(count, phone_every)
    phone = f"{phone_size[0]}x{phone_size[1]}"
    on_discord = (
        f"{phones} phone photos sent on Discord as the Discord bot classifies them: {phone_copy[0]}x{phone_copy[1]} "
        f"copies of the {phone} photos from Discord's media proxy"
        if phone_copy is not None
        else f"{phones} phone files at {phone} (Discord attachments without a usable copy from the media proxy)"
    )
    return (
        f"{count - phones} Telegram photos at {telegram[0]}x{telegram[1]} (the size the Telegram bot downloads "
        f"for this model), {on_discord}"
    )


def _phone_count(count: int, phone_every: int) -> int:
    return count // phone_every if phone_every else 0


def draw_scene(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A synthetic photo of `size` (one of training's synthetic classes), as pixels."""
    try:
        from training import SYNTHETIC_CLASSES, synthetic_photo
    except ImportError:  # a checkout without training/: random boxes will do
        image = Image.new("RGB", size, _colour(rng))
        draw = ImageDraw.Draw(image)
        for _ in range(20):
            x, y = int(rng.integers(size[0])), int(rng.integers(size[1]))
            draw.rectangle((x, y, x + int(rng.integers(8, size[0] // 2)), y + int(rng.integers(8, size[1] // 2))),
                           fill=_colour(rng))  # fmt: skip
        return np.asarray(image)
    label = SYNTHETIC_CLASSES[int(rng.integers(len(SYNTHETIC_CLASSES)))]
    return np.asarray(synthetic_photo(label, rng, size))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = (int(value) for value in rng.integers(0, 256, 3))
    return red, green, blue


def _phone_scene(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    # A quarter-size scene blown up, with sensor-like grain, so the JPEG is as large (2 MB) and as
    # slow to decode as a phone's.
    small = Image.fromarray(draw_scene(rng, (size[0] // 4, size[1] // 4)))
    pixels = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    pixels += rng.integers(-6, 7, size=pixels.shape, dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    """`pixels` as a JPEG of the benchmark's quality."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def weights_name(path: Path | None) -> str:
    return "random backbone" if path is None else f"backbone weights {path.name}"


def save_benchmark_model(
    registry_root: Path,
    *,
    backbone: str,
    image_size: int,
    weights: Path | None = None,
    head_photos: int = HEAD_TRAIN,
    say: Callable[[str], None] = print,
) -> tuple[Path, Any, Any]:
    """Build the classifier, save it as the active version of a new registry, with its verified variants.

    The backbone's weights come from `weights` (random when None); they change nothing about speed.
    Its head is fitted to training's synthetic classes (`fit_head`), so the network answers with the
    margins of a classifier, and its variants are verified as a trained version's are: on labelled
    photos it never saw (agreement and accuracy), quantised on others.
    Returns the registry's root, the Keras model and the variants manifest.
    """
    import keras

    from model import (
        ModelRegistry,
        Preprocessing,
        build_classifier,
        export_variants,
        save_artefact,
        with_features,
    )

    keras.utils.set_random_seed(0)
    network = build_classifier(NUM_CLASSES, backbone=backbone, image_size=image_size, weights=weights)
    preprocessing = Preprocessing(image_size=image_size)
    train, test = labelled_photos(registry_root.parent / "labelled-photos", head_photos)
    labels = benchmark_labels()
    if train:
        say(f"fitting the head on {len(train)} synthetic photos, verifying the variants on {len(test)} others")
        fit_head(network, train, labels, preprocessing)
    registry = ModelRegistry(registry_root)
    with registry.staging(VERSION) as directory:
        save_artefact(network, directory, version=VERSION, labels=labels, backbone=backbone,
                      preprocessing=preprocessing)  # fmt: skip
        # With the penultimate features as a second output, as training exports them.
        manifest = export_variants(
            with_features(network), directory, preprocessing=preprocessing, labels=labels,
            verification=test, calibration=[path for path, _ in train], say=lambda line: say("    " + line),
        )  # fmt: skip
    registry.activate(VERSION)
    return registry_root, network, manifest


def benchmark_labels() -> list[str]:
    """NUM_CLASSES labels: training's synthetic classes first (when training/ is here), then made-up car models."""
    try:
        from training import SYNTHETIC_CLASSES
    except ImportError:
        SYNTHETIC_CLASSES = ()  # noqa: N806
    return [*SYNTHETIC_CLASSES, *(f"CAR MODEL {i:03d}" for i in range(NUM_CLASSES - len(SYNTHETIC_CLASSES)))]


def labelled_photos(
    folder: Path, train_count: int = HEAD_TRAIN
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(train, test): synthetic photos of training's classes as JPEG files, `train_count` and HEAD_TEST of them.

    Both empty in a checkout without training/: the variants are then verified on generated images.
    """
    try:
        from training import SYNTHETIC_CLASSES, synthetic_jpeg
    except ImportError:
        return [], []
    folder.mkdir(parents=True, exist_ok=True)

    def make(count: int, first_seed: int) -> list[tuple[Path, str]]:
        photos = []
        for seed in range(first_seed, first_seed + count):
            label = SYNTHETIC_CLASSES[seed % len(SYNTHETIC_CLASSES)]
            path = folder / f"{seed}.jpg"
            path.write_bytes(synthetic_jpeg(label, seed))
            photos.append((path, label))
        return photos

    return make(train_count, 0), make(HEAD_TEST, 1_000_000)


def fit_head(network: Any, photos: Sequence[tuple[Path, str]], labels: Sequence[str], preprocessing: Any) -> None:
    """Fit `network`'s softmax head (only) to `photos` on the backbone's features, as they are.

    A softmax regression on the standardised features, folded back into the head's kernel and
    bias: the network's architecture, and so its speed, stay exactly those of `build_classifier`.
    """
    import keras

    from model import load_image, with_features

    images = np.stack([load_image(path.read_bytes(), preprocessing) for path, _ in photos]).astype(np.float32)
    features = np.asarray(with_features(network).predict(images, batch_size=BATCH, verbose=0)[1], dtype=np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    targets = np.array([list(labels).index(label) for _, label in photos])
    regression = keras.Sequential([keras.Input((features.shape[1],)), keras.layers.Dense(len(labels), "softmax")])
    regression.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    regression.fit(((features - mean) / std).astype(np.float32), targets, epochs=100, batch_size=64, verbose=0)
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in regression.layers[-1].get_weights())
    network.get_layer("head").set_weights(
        [(kernel / std[:, None]).astype(np.float32), (bias - (mean / std) @ kernel).astype(np.float32)]
    )


# -- (a), (b): in this process ------------------------------------------------------------------------------------


def measure_decode(jpegs: Sequence[bytes], predictor: Any) -> dict[str, float]:
    """Median time of `load_image` per photo size: the part of a photo's cost that is not the model."""
    by_size: dict[str, list[float]] = {}
    for jpeg in jpegs:
        with Image.open(io.BytesIO(jpeg)) as image:
            size = f"{image.width}x{image.height}"
        by_size.setdefault(size, []).append(_timed_ms(lambda jpeg=jpeg: _decode(jpeg, predictor)))
    return {size: round(percentile(times, 50), 2) for size, times in by_size.items()}


def measure_reduce(jpegs: Sequence[bytes], predictor: Any) -> dict[str, Any]:
    """What the bots' client does to each photo before queueing it (`model.reduce_for_queue`), timed here.

    p50 per photo size, the total for all the photos (the client's work in (d), on the same cores),
    and the bytes queued against the original's.
    """
    from model import reduce_for_queue

    by_size: dict[str, list[float]] = {}
    times_ms, original_bytes, queued_bytes = [], 0, 0
    for jpeg in jpegs:
        with Image.open(io.BytesIO(jpeg)) as image:
            size = f"{image.width}x{image.height}"
        started = time.perf_counter()
        reduced = reduce_for_queue(jpeg, predictor.preprocessing)
        times_ms.append((time.perf_counter() - started) * 1000)
        by_size.setdefault(size, []).append(times_ms[-1])
        original_bytes, queued_bytes = original_bytes + len(jpeg), queued_bytes + len(reduced)
    total_ms = sum(times_ms)
    return {
        "format": _queue_formats(jpegs[:BATCH], predictor),
        "ms_p50": {size: round(percentile(times, 50), 2) for size, times in by_size.items()},
        "telegram_ms_p50": round(percentile([times_ms[i] for i in _small_indices(jpegs)], 50), 2),
        "total_ms": round(total_ms, 1),
        "mean_ms": round(total_ms / max(1, len(jpegs)), 2),
        "original_kb_mean": round(original_bytes / 1024 / max(1, len(jpegs)), 1),
        "queued_kb_mean": round(queued_bytes / 1024 / max(1, len(jpegs)), 1),
    }


def _queue_formats(jpegs: Sequence[bytes], predictor: Any) -> dict[str, dict[str, float]]:
    """The queued photo written and read back as BMP (what `reduce_for_queue` writes) and as PNG, side by side."""
    from model import load_image

    pixels = [load_image(jpeg, predictor.preprocessing) for jpeg in jpegs]
    figures = {}
    for name, options in (("bmp", {"format": "BMP"}), ("png", {"format": "PNG", "compress_level": 1})):
        write_ms, read_ms, size = [], [], 0
        for image in pixels:
            buffer, started = io.BytesIO(), time.perf_counter()
            Image.fromarray(image).save(buffer, **options)
            written = time.perf_counter()
            load_image(buffer.getvalue(), predictor.preprocessing)
            write_ms.append((written - started) * 1000)
            read_ms.append((time.perf_counter() - written) * 1000)
            size += buffer.tell()
        figures[name] = {
            "write_ms_p50": round(percentile(write_ms, 50), 3),
            "read_ms_p50": round(percentile(read_ms, 50), 3),
            "kb_mean": round(size / 1024 / max(1, len(pixels)), 1),
        }
    return figures


def measure_partial_batch(predictor: Any, artefact: Path, decoded: np.ndarray, repeats: int = 3) -> dict[str, Any]:
    """A batch of PARTIAL_BATCH photos run as `predictor` plans it, and padded to one bucket, alternately.

    The padded side is a second `Predictor` of the same artefact that was never timed, so its
    plans are still "pad to the smallest bucket that holds the batch".
    """
    from model import Predictor

    count = min(PARTIAL_BATCH, len(decoded))
    images = np.resize(decoded, (count, *decoded.shape[1:]))  # repeats photos if there are fewer
    padding = Predictor.from_artefact(artefact, max_batch=predictor.max_batch)
    padding.warmup([count])
    planned_ms, padded_ms = [], []
    for _ in range(repeats):
        planned_ms.append(_timed_ms(lambda: predictor.probabilities(images)))
        padded_ms.append(_timed_ms(lambda: padding.probabilities(images)))
    planned, padded = percentile(planned_ms, 50), percentile(padded_ms, 50)
    return {
        "photos": count,
        "plan": list(predictor.plan(count)),
        "padded_to": list(padding.plan(count)),
        "planned_ms": round(planned, 1),
        "padded_ms": round(padded, 1),
        "speedup": round(padded / planned, 3),
    }


def measure_model_ceiling(predictor: Any, decoded: np.ndarray) -> dict[str, Any]:
    """(a) The compiled forward pass on pre-decoded batches of BATCH: the most this machine can do."""
    predictor.predict_topk(decoded[:BATCH], k=3)  # warm: the same shapes as below
    top1: list[str] = []
    with _Stopwatch() as watch:
        for start in range(0, len(decoded), BATCH):
            top1 += [ranked[0][0] for ranked in predictor.predict_topk(decoded[start : start + BATCH], k=3)]
    return {
        "what": f"Predictor.predict_topk on pre-decoded uint8 batches of {BATCH} (compiled forward pass)",
        "images_per_s": _rate(len(decoded), watch.seconds),
        "photos": len(decoded),
        "seconds": round(watch.seconds, 4),
        "top1": top1,
    }


def measure_decode_and_model(predictor: Any, jpegs: Sequence[bytes], *, decode_threads: int) -> dict[str, Any]:
    """(f) The worker's `BatchClassifier` on batches of BATCH photos, in this process: decoding and model, no queue."""
    from worker import BatchClassifier

    classifier = BatchClassifier(_Resident(predictor), decode_threads=decode_threads)
    batches = [
        [(hashlib.sha256(jpeg).hexdigest(), jpeg) for jpeg in jpegs[start : start + BATCH]]
        for start in range(0, len(jpegs), BATCH)
    ]
    try:
        classifier.classify(batches[0], [3] * len(batches[0]))  # warm: the decoding threads start
        with _Stopwatch() as watch:
            for batch in batches:
                classifier.classify(batch, [3] * len(batch))
    finally:
        classifier.close()
    return {
        "what": f"worker.BatchClassifier in this process on the JPEGs in batches of {BATCH}: "
        f"load_image on {decode_threads} threads, then the compiled forward pass",
        "images_per_s": _rate(len(jpegs), watch.seconds),
        "seconds": round(watch.seconds, 4),
    }


class _Resident:
    """A model source that always serves the one predictor already loaded here (`ModelSource.current`)."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def current(self) -> Any:
        return self.predictor


def measure_predict_one_at_a_time(keras_model: Any, jpegs: Sequence[bytes], predictor: Any) -> dict[str, Any]:
    """(b) The original web app: per photo, decode and resize, then `model.predict` on a batch of one."""
    keras_model.predict(_decode(jpegs[0], predictor).astype("float32")[None], verbose=0)  # the app's first request
    latencies = []
    with _Stopwatch() as watch:
        for jpeg in jpegs:
            started = time.perf_counter()
            x = _decode(jpeg, predictor).astype("float32")
            keras_model.predict(x[None], verbose=0)
            latencies.append((time.perf_counter() - started) * 1000)
    return {
        "what": "per photo: load_image, then keras_model.predict(x[None]), one at a time, in one process",
        "images_per_s": _rate(len(jpegs), watch.seconds),
        "seconds": round(watch.seconds, 3),
        "latency_ms": percentiles(latencies),
    }


# -- (c), (d), (e): through Redis to a worker process -------------------------------------------------------------


def measure_plain_rq(settings: Settings, url: str, jpegs: Sequence[bytes], *, queue: str) -> dict[str, Any]:
    """(c) A stock RQ SimpleWorker running `worker._tasks.classify_photo`, one job (one forward pass) per photo."""
    run = _classify_concurrently(settings, url, jpegs, queue=queue)
    return {
        "what": "rq.SimpleWorker subprocess running worker._tasks.classify_photo: resident model, "
        "one job and one compiled batch-1 forward pass per photo; all photos submitted at once through ClassifyClient",
        "images_per_s": _rate(len(jpegs), run.seconds),
        "seconds": round(run.seconds, 3),
        "latency_ms": percentiles(run.latencies_ms),
        # Its worker chooses its runtime as (d)'s does (auto), on its own: d/c is fair only where both chose alike.
        "runtimes": sorted({prediction.runtime for prediction in run.predictions}),
    }


def measure_batch_worker(settings: Settings, url: str, jpegs: Sequence[bytes]) -> dict[str, Any]:
    """(d) `carbot worker`, all photos submitted at once; its batches and their times from its counters in Redis.

    The worker's time in forward passes (on photos, and on the padding of their plans) and in
    decoding split (d)'s wall time into those and the rest (Redis, RQ's bookkeeping, waiting),
    and give the model's speed inside the worker at that very moment: d/a against it is free
    of the machine's drift.
    """
    connection = redis_connection(url)
    before = WorkerStats.read(connection)
    run = _classify_concurrently(settings, url, jpegs)
    figures = WorkerStats.read(connection) - before
    batches, photos, padded = figures.count("batches"), figures.count("photos"), figures.count("padded")
    forward_s, decode_s = figures.forward_s, figures.decode_s
    padding_s = forward_s * (padded - photos) / max(1, padded)
    images_per_s = _rate(len(jpegs), run.seconds)
    return {
        "what": f"carbot worker (BatchWorker) subprocess, max_batch {BATCH}, max_wait_ms {settings.max_wait_ms:g}; "
        "all photos submitted at once through ClassifyClient",
        "images_per_s": images_per_s,
        "seconds": round(run.seconds, 3),
        "latency_ms": percentiles(run.latencies_ms),
        "batches": batches,
        "mean_batch_size": round(photos / batches, 2) if batches else 0.0,
        "batch_sizes": figures.sizes,
        "wall_s": {
            "forward": round(forward_s - padding_s, 2),
            "forward_on_padding": round(padding_s, 2),
            "decode": round(decode_s, 2),
            "rest": round(run.seconds - forward_s - decode_s, 2),
        },
        "worker_ms": {"forward": round(forward_s * 1000, 1), "decode": round(decode_s * 1000, 1)},  # padding included
        "worker_forward_images_per_s": _rate(padded, forward_s),
        "d_over_worker_forward": round(images_per_s / _rate(padded, forward_s), 3) if forward_s else None,
        # Each photo as the worker saw it: how long it waited in the queue, and its batch's decode and forward.
        "worker_queue_ms": percentiles([p.timings.get("queue_ms", 0.0) for p in run.predictions]),
        "worker_decode_ms": percentiles([p.timings.get("decode_ms", 0.0) for p in run.predictions]),
        "worker_forward_ms": percentiles([p.timings.get("inference_ms", 0.0) for p in run.predictions]),
        "top1": [prediction.top_k[0].label for prediction in run.predictions],
        "predictions": run.predictions,  # compared with (a') and then dropped: not for the JSON
    }


def measure_single_photo(
    settings: Settings, url: str, jpegs: Sequence[bytes], decoded: np.ndarray, predictor: Any, repeats: int
) -> dict[str, Any]:
    """(e) Photos sent one at a time through (d)'s worker, each right after the model's own time for one photo.

    The model's time is the compiled forward pass at batch 1 on the same photo pre-decoded, in this
    process; measuring the two alternately keeps the machine's drift out of their difference. One
    client serves all the photos, as in a bot, so its connections are open before the first is timed.
    """
    small = _small_indices(jpegs)
    model_ms: list[float] = []
    run = _ClientRun()
    connection = redis_connection(url)
    before = WorkerStats.read(connection)

    async def alternate() -> None:
        async with _client(settings, url) as client:
            await _classify_all(client, jpegs[:1])  # opens the client's connections
            for repeat in range(repeats):
                index = small[repeat % len(small)]
                model_ms.append(_timed_ms(lambda image=decoded[index][None]: predictor.predict_topk(image, k=3)))
                alone = await _classify_all(client, [jpegs[index]])
                run.latencies_ms += alone.latencies_ms
                run.predictions += alone.predictions

    asyncio.run(alternate())
    worker = WorkerStats.read(connection) - before
    model, latency = percentiles(model_ms), percentiles(run.latencies_ms)
    return {
        "what": f"{repeats} Telegram photos one after another through (d)'s client and worker; overhead = "
        f"p50 latency - p50 of the {predictor.runtime} batch-1 forward pass on the decoded photo",
        "latency_ms": latency,
        "model_batch1_ms": model,
        "overhead_ms": round(latency["p50"] - model["p50"], 1),
        # The worker's own view of each photo: how long it was queued, decoded and computed.
        "worker_queue_ms": percentiles([p.timings.get("queue_ms", 0.0) for p in run.predictions]),
        "worker_decode_ms": percentiles([p.timings.get("decode_ms", 0.0) for p in run.predictions]),
        "worker_forward_ms": percentiles([p.timings.get("inference_ms", 0.0) for p in run.predictions]),
        # Images the worker's passes computed per photo: 1 unless its timed plan pads a lone photo.
        "worker_images_per_photo": round(worker.count("padded") / max(1, worker.count("photos")), 2),
    }


@dataclass
class _ClientRun:
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    predictions: list[Any] = field(default_factory=list)


def _client(settings: Settings, url: str, *, queue: str | None = None, timeout_s: float = 600.0) -> Any:
    """The bots' `ClassifyClient`, with room for every photo of the benchmark and a generous deadline."""
    from worker import ClassifyClient

    return ClassifyClient.from_settings(
        settings.with_overrides(
            classify_queue=queue, queue_limit=max(settings.queue_limit, 10_000), request_timeout_s=timeout_s
        ),
        url,
    )


async def _classify_all(client: Any, jpegs: Sequence[bytes]) -> _ClientRun:
    """Submit every photo at once and await all results, each timed from submit to result; raises if one fails."""

    async def one(jpeg: bytes) -> tuple[Any, float]:
        started = time.perf_counter()
        prediction = await client.classify(jpeg, top_k=3)
        return prediction, (time.perf_counter() - started) * 1000

    with _Stopwatch() as watch:
        outcomes = await asyncio.gather(*(one(jpeg) for jpeg in jpegs))
    return _ClientRun(watch.seconds, [ms for _, ms in outcomes], [prediction for prediction, _ in outcomes])


def _classify_concurrently(
    settings: Settings, url: str, jpegs: Sequence[bytes], *, queue: str | None = None, timeout_s: float = 600.0
) -> _ClientRun:
    """`_classify_all` from synchronous code, with a client of its own."""

    async def run() -> _ClientRun:
        async with _client(settings, url, queue=queue, timeout_s=timeout_s) as client:
            return await _classify_all(client, jpegs)

    return asyncio.run(run())


class _WorkerProcess:
    """A worker child process on the benchmark's Redis, its log in a file; stopped with SIGTERM on exit."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, name: str) -> None:
        self.command, self.env, self.log_path, self.name = command, env, log_path, name
        self.peak_rss_mb: float | None = None

    @classmethod
    def plain_rq(cls, settings: Settings, url: str, registry: Path, tmp_dir: Path, *, queue: str) -> _WorkerProcess:
        """(c)'s worker: RQ's own SimpleWorker, with nothing of ours but the job function it imports."""
        name = f"bench-plain-{os.getpid()}"
        command = [sys.executable, "-c", _PLAIN_RQ_WORKER, url, queue, name]
        return cls(command, worker_env(settings, url, registry, tmp_dir), tmp_dir / "plain-rq.log", name)

    @classmethod
    def batch(cls, settings: Settings, url: str, registry: Path, tmp_dir: Path) -> _WorkerProcess:
        """(d)'s worker: `carbot worker`, exactly as it runs in production."""
        name = f"bench-batch-{os.getpid()}"
        command = [sys.executable, "-m", "carbot", "worker", "--name", name,
                   "--max-batch", str(BATCH), "--max-wait-ms", str(settings.max_wait_ms)]  # fmt: skip
        return cls(command, worker_env(settings, url, registry, tmp_dir), tmp_dir / "batch-worker.log", name)

    def __enter__(self) -> _WorkerProcess:
        self.process = start_logged(self.command, self.env, self.log_path)
        return self

    def wait_ready(self, settings: Settings, jpegs: Sequence[bytes], *, queue: str | None = None) -> None:
        """Wait until the worker has registered, then warm it: a full batch of distinct photos, then one alone."""
        url = self.env["REDIS_URL"]
        wait_registered(url, self.name, self.process, timeout_s=WORKER_START_TIMEOUT_S, log=self.log)
        _classify_concurrently(settings, url, jpegs[:BATCH], queue=queue, timeout_s=WORKER_START_TIMEOUT_S)
        _classify_concurrently(settings, url, jpegs[:1], queue=queue)

    def served(self) -> dict[str, str]:
        """{"version", "runtime", "reason"} the worker published for `carbot status` (`carbot.keys.RUNTIME_KEY`)."""
        raw = redis_connection(self.env["REDIS_URL"]).hget(RUNTIME_KEY, self.name)
        if raw is None:
            raise RuntimeError(f"worker {self.name} published no runtime; its log:\n{self.log()[-3000:]}")
        return json.loads(raw)

    def log(self) -> str:
        """The worker's log, for a person to read when it did not start."""
        return self.log_path.read_bytes().decode(errors="replace")

    def __exit__(self, *exc_info: object) -> None:
        self.peak_rss_mb = peak_rss_mb(self.process.pid)
        self.process.send_signal(signal.SIGTERM)  # RQ's warm shutdown
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# The plain RQ worker of (c).
_PLAIN_RQ_WORKER = """
import sys
import redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer
url, queue, name = sys.argv[1:4]
SimpleWorker([queue], connection=redis.Redis.from_url(url), serializer=JSONSerializer, name=name).work(
    logging_level="WARNING"
)
"""


def worker_env(settings: Settings, url: str, registry: Path, tmp_dir: Path) -> dict[str, str]:
    """The environment of a worker child process on the benchmark's Redis, registry and data folder."""
    return {
        **os.environ,
        "REDIS_URL": url,
        "CARBOT_MODEL_REGISTRY": str(registry),
        "CARBOT_DATA_DIR": str(tmp_dir / "data"),
        "CARBOT_CLASSIFY_QUEUE": settings.classify_queue,
        "CARBOT_DECODE_THREADS": str(settings.decode_threads),
        "CARBOT_RUNTIME": settings.runtime,  # "auto" unless the environment names one
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


# -- results -------------------------------------------------------------------------------------------------------


def _combined_ceiling(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """(a) measured just before and just after (d): their pooled rate, and how far the machine drifted."""
    seconds = before["seconds"] + after["seconds"]
    return {
        **before,
        "images_per_s": _rate(before["photos"] + after["photos"], seconds),
        "photos": before["photos"] + after["photos"],
        "seconds": round(seconds, 4),
        "images_per_s_before_d": before["images_per_s"],
        "images_per_s_after_d": after["images_per_s"],
        "drift": round(after["images_per_s"] / before["images_per_s"] - 1, 3),
    }


def _ratios(
    ceiling: dict, runtime_ceiling: dict, one_at_a_time: dict, plain_rq: dict, batched: dict, single: dict
) -> dict[str, dict]:
    d = batched["images_per_s"]
    values = {
        "d/a": d / ceiling["images_per_s"],
        "d/a'": d / runtime_ceiling["images_per_s"],
        # (d) against the model's speed inside the worker during (d) itself: immune to the machine's drift.
        "d/a'_drift_free": batched["d_over_worker_forward"] or 0.0,
        "d/b": d / one_at_a_time["images_per_s"],
        "d/c": d / plain_rq["images_per_s"],
        "single_photo_overhead_ms": single["overhead_ms"],
    }
    ratios = {}
    for name, value in values.items():
        comparison, target = TARGETS[name]
        passed = value >= target if comparison == ">=" else value <= target
        ratios[name] = {"value": round(value, 3), "target": f"{comparison} {target:g}", "pass": bool(passed)}
    return ratios


def _where_the_time_goes(batched: dict[str, Any], reduction: dict[str, Any]) -> dict[str, float]:
    """(d)'s wall time per photo, split: the client's reduction (timed here on the same photos), the worker's
    decoding and forward passes (its counters), and the rest (Redis, RQ, the client's submits, idle cores)."""
    photos = max(1, sum(batched["batch_sizes"]))
    worker = batched["worker_ms"]
    per_photo = {
        "wall": 1000 * batched["seconds"] / photos,
        "client_reduce": reduction["mean_ms"],
        "worker_decode": worker["decode"] / photos,
        "model": worker["forward"] / photos,
    }
    per_photo["rest"] = per_photo["wall"] - per_photo["client_reduce"] - per_photo["worker_decode"] - per_photo["model"]
    return {name: round(ms, 2) for name, ms in per_photo.items()}


def _variant_figures(manifest: Any) -> dict[str, dict[str, Any]]:
    """Each variant's verdict and figures, as `carbot models` shows them."""
    return {
        name: {
            "status": variant.status,
            "reason": variant.reason,
            "agreement": variant.figures.get("agreement"),
            "max_top3_diff": variant.figures.get("max_top3_diff"),
            "accuracy": variant.figures.get("accuracy"),
            "accuracy_drop": variant.figures.get("accuracy_drop"),
            "verified_on": manifest.verified_on.get("source"),
            "images": manifest.verified_on.get("images"),
        }
        for name, variant in manifest.variants.items()
    }


_CLAIMS = {
    "d/a": "d/a   vs TensorFlow's ceiling",
    "d/a'": "d/a'  share of the chosen runtime's ceiling",
    "d/a'_drift_free": "   ... against (d)'s own forward passes",
    "d/b": "d/b   vs the original web app",
    "d/c": "d/c   vs plain RQ",
    "single_photo_overhead_ms": "single-photo overhead, ms",
}


def format_table(results: dict[str, Any]) -> str:
    """The results as a text table for a person."""
    config, machine, methods, ratios = results["config"], results["machine"], results["methods"], results["ratios"]
    a, a_prime = methods["a_model_ceiling"], methods["a_prime_runtime_ceiling"]
    b, c = methods["b_predict_one_at_a_time"], methods["c_plain_rq"]
    d, e, f = methods["d_batch_worker"], methods["e_single_photo"], methods["f_decode_and_model"]
    latency, shares, reduction = d["latency_ms"], results["shares"], results["client_reduce"]
    a_prime_label = f"(a') {a_prime['runtime']} ceiling: pre-decoded batches of 32"
    f_over_a_prime, a_prime_over_c, batching_gain = shares["f/a'"], shares["a'/c"], shares["a'/batch_1"]
    lines = [
        "",
        f"python -m bench serving: {config['backbone']} at {config['image_size']} px, {config['weights']}, "
        f"{config['photos']} photos ({config['photo_mix']}), JPEG quality {JPEG_QUALITY}",
        f"machine: {machine['cpu_count']} CPUs ({machine.get('cpu_model', '?')}; "
        f"{' '.join(machine.get('cpu_flags', [])) or 'no flags read'}), {machine['platform']}, "
        f"Python {machine['python']}, "
        f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, {machine['date']}",
        f"load average {machine['load_average_before']} before, {machine['load_average_after']} after; "
        "decode (load_image) p50: " + ", ".join(f"{size} {ms:.1f} ms" for size, ms in results["decode_ms_p50"].items()),
        "client reduction (reduce_for_queue) p50: "
        + ", ".join(f"{size} {ms:.1f} ms" for size, ms in reduction["ms_p50"].items())
        + f"; {reduction['original_kb_mean']:.0f} KB a photo on average, {reduction['queued_kb_mean']:.0f} KB queued",
        "queued as BMP: written "
        + _format_line(reduction["format"]["bmp"])
        + "; as PNG (compress level 1) it would be written "
        + _format_line(reduction["format"]["png"]),
        "",
        "variants (verified against the Keras model: top-1 agreement >= 99 %, accuracy lost <= 0.5 point):",
    ]
    for name, variant in results["variants"].items():
        lines.append(
            f"  {name:<14} {variant['status']:<9} agreement {_pct(variant['agreement'])}, max top-3 diff "
            f"{_num(variant['max_top3_diff'])}, accuracy {_pct(variant['accuracy'])}: {variant['reason']}"
        )
    lines += [
        f"the worker (CARBOT_RUNTIME={config['runtime_setting']}) serves on {results['runtime']['runtime']}: "
        f"{results['runtime']['reason']}",
        plain_runtime_line(c["runtimes"], results["runtime"]["runtime"]),
        "",
        f"{'method':<66}{'images/s':>9}{'peak RSS':>12}",
        f"{'(a) model ceiling on TensorFlow: compiled forward, pre-decoded batches of 32':<66}{a['images_per_s']:>9.1f}"
        f"   ({a['images_per_s_before_d']:.1f} before d, {a['images_per_s_after_d']:.1f} after)",
        f"{a_prime_label:<66}{a_prime['images_per_s']:>9.1f}"
        f"   ({a_prime['images_per_s_before_d']:.1f} before d, {a_prime['images_per_s_after_d']:.1f} after)",
        f"{'(b) original web app: decode + model.predict, one at a time':<66}{b['images_per_s']:>9.1f}",
        f"{'(c) plain RQ: SimpleWorker + classify_photo, one job per photo':<66}{c['images_per_s']:>9.1f}"
        f"{_mb(c['peak_rss_mb']):>12}",
        f"{'(d) this system: bots client + carbot worker, batches of up to 32':<66}{d['images_per_s']:>9.1f}"
        f"{_mb(d['peak_rss_mb']):>12}",
        f"{'(f) decoding + model, no queue: BatchClassifier, batches of 32':<66}{f['images_per_s']:>9.1f}",
        "",
        f"{'claim':<46}{'value':>8}  {'target':<9}",
    ]
    for name, label in _CLAIMS.items():
        ratio = ratios[name]
        lines.append(f"{label:<46}{ratio['value']:>8.2f}  {ratio['target']:<9} {'PASS' if ratio['pass'] else 'MISS'}")
    per_photo = d["ms_per_photo"]
    lines += [
        "",
        f"(d) latency, submit to result: p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms, "
        f"p99 {latency['p99']:.0f} ms; mean batch size {d['mean_batch_size']:.1f} ({d['batches']} batches: "
        f"{' '.join(map(str, d['batch_sizes']))})",
        _wall_line(d),
        f"(d) per photo: {per_photo['wall']:.1f} ms of wall time = model {per_photo['model']:.1f} ms + worker decode "
        f"{per_photo['worker_decode']:.1f} ms + client reduce {per_photo['client_reduce']:.1f} ms + the rest "
        f"(client submits, Redis, RQ, idle) {per_photo['rest']:.1f} ms; queued p50 "
        f"{d['worker_queue_ms']['p50']:.0f} ms",
        f"(e) one photo alone: p50 {e['latency_ms']['p50']:.1f} ms = {a_prime['runtime']} at batch 1 "
        f"{e['model_batch1_ms']['p50']:.1f} ms + overhead {e['overhead_ms']:.1f} ms; of it: client reduce "
        f"{e['client_reduce_ms']:.1f} ms, queued {e['worker_queue_ms']['p50']:.1f} ms, worker decode "
        f"{e['worker_decode_ms']['p50']:.1f} ms, worker forward {e['worker_forward_ms']['p50']:.1f} ms (p50s; "
        f"{e.get('worker_images_per_photo', 1):g} images computed a photo)",
        f"(f) where (d) stands: decoding the original files keeps f/a' = {f_over_a_prime:.2f} of "
        f"the runtime's ceiling on this machine; (d), fed reduced photos, keeps d/f = {shares['d/f']:.2f} of (f)",
        f"(c) where d/c stands: a (d) at the runtime's ceiling would reach a'/c = {a_prime_over_c:.2f}; batching "
        f"itself buys {a_prime['runtime']} {batching_gain:.2f}x on this CPU (batches of 32 against batch 1)",
    ]
    for name, ceiling in (("TensorFlow", a), (a_prime["runtime"], a_prime)):
        if abs(ceiling["drift"]) > 0.15:
            lines.append(
                f"note: the {name} ceiling moved {ceiling['drift']:+.0%} between just before and just after (d): "
                "the machine was busy, so the ratios are rough this time"
            )
    partial = results["partial_batch"]
    planned, padded = (" + ".join(map(str, partial[key])) for key in ("plan", "padded_to"))
    lines.append(
        f"a batch of {partial['photos']} (TensorFlow): run as {planned} {partial['planned_ms']:.0f} ms, "
        f"padded to {padded} {partial['padded_ms']:.0f} ms: {partial['speedup']:.2f}x"
    )
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)


def plain_runtime_line(plain: Sequence[str], served: str) -> str:
    """Which runtime (c)'s worker answered on, and a warning where it is not (d)'s."""
    line = f"(c)'s worker (the same setting) answered on {', '.join(plain) or 'an unnamed runtime'}"
    if list(plain) != [served]:
        line += f": NOT {served} as (d)'s, so d/c compares runtimes as well as the ways of serving"
    return line


def _format_line(figures: dict[str, float]) -> str:
    return f"in {figures['write_ms_p50']:.2f} ms, read in {figures['read_ms_p50']:.2f} ms, {figures['kb_mean']:.0f} KB"


def _wall_line(d: dict[str, Any]) -> str:
    wall, total = d["wall_s"], max(d["seconds"], 1e-9)
    return (
        f"(d) where its {d['seconds']:.1f} s went: forward passes {wall['forward'] / total:.0%} "
        f"(+ {wall['forward_on_padding'] / total:.0%} on padding), decoding {wall['decode'] / total:.0%}, "
        f"the rest (client, Redis, RQ's bookkeeping, waiting) {wall['rest'] / total:.0%}; the model ran at "
        f"{d['worker_forward_images_per_s']:.1f} images/s inside the worker meanwhile; top-1 equal to the Keras "
        f"model's (a) for {d['top1_agreement_with_a']:.1%} of photos, to (a')'s for "
        f"{d['top1_agreement_with_a_prime']:.1%}"
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MB"


def _machine_info(started_at: datetime, load_before: list[float]) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **_cpu_model(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "date": started_at.isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
    }


# Instructions that decide int8's and bf16's speed: the same int8 ResNet50 ran several times faster on a CPU with
# AMX than on one with VNNI alone, so a figure means little without them.
_SPEED_FLAGS = ("amx_int8", "amx_bf16", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512f", "avx2")


def _cpu_model() -> dict[str, Any]:
    """The CPU's name and which of `_SPEED_FLAGS` it has, from /proc/cpuinfo (nothing where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", "?"), "cpu_flags": [f for f in _SPEED_FLAGS if f in flags]}


# -- small helpers -------------------------------------------------------------------------------------------------


class _Stopwatch:
    """`with _Stopwatch() as watch: ...` then `watch.seconds`."""

    def __enter__(self) -> _Stopwatch:
        self.seconds = 0.0
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._started


class _Progress:
    """Prints what the benchmark is doing, with the time since it started."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        if self.verbose:
            print(f"[bench {time.monotonic() - self.started:6.1f}s] {message}", flush=True)


def _timed_ms(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


def _rate(count: int, seconds: float) -> float:
    return round(count / max(seconds, 1e-6), 2)


def _decode(jpeg: bytes, predictor: Any) -> np.ndarray:
    from model import load_image

    return load_image(jpeg, predictor.preprocessing)


def _small_indices(jpegs: Sequence[bytes]) -> list[int]:
    """The indices of the Telegram photos (the smallest ones) among `jpegs`."""
    sizes = [Image.open(io.BytesIO(jpeg)).size for jpeg in jpegs]
    smallest = min(sizes, key=lambda size: size[0] * size[1])
    return [index for index, size in enumerate(sizes) if size == smallest]


def _agreement(labels: Sequence[str], reference: Sequence[str]) -> float:
    return round(sum(x == y for x, y in zip(labels, reference)) / max(1, len(reference)), 3)


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else []
