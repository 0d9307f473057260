"""Retraining from feedback: learns people's corrections, keeps a worse model out, never trains on the hold-out.

Real TensorFlow throughout: a tiny classifier trained here on synthetic shapes is the
active model; the "feedback" is shapes seen through another camera (an edge filter), which
that model gets systematically wrong, labelled with the right shape, as people's
corrections would be.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image, ImageFilter

import training._fine_tune as retrain_module
from model import ModelRegistry, Predictor, Preprocessing, build_classifier, load_image, read_artefact, save_artefact
from tests.conftest import PNG_SIGNATURE
from training import (
    SYNTHETIC_CLASSES,
    FeedbackPhoto,
    RetrainConfig,
    RetrainProgress,
    is_held_out,
    load_split,
    make_synthetic_dataset,
    retrain,
    synthetic_photo,
)
from training._feedback import FeedbackPolicy, Vote, choose_feedback
from training._fine_tune import gate, judge, oversample_factor

IMAGE_SIZE = 32
PHOTO_SIZE = (64, 48)
BASE_VERSION = "base"

# The main scenario's fine-tuning: the tiny backbone has no pretrained features to protect, so all of
# it may move, at the rate that suits it (the recipe's tiny-network tests use 0.2 as well).
LEARN = RetrainConfig(epochs=25, learning_rate=0.2, finetune_fraction=1.0)
QUICK = RetrainConfig(epochs=1, learning_rate=0.2, finetune_fraction=1.0)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def shapes(
    n: int, stream: int, *, style: Callable[[Image.Image], Image.Image] | None = None
) -> list[tuple[bytes, str]]:
    """`n` synthetic photos (JPEG bytes, label), the classes in turn, from generator stream `stream`."""
    photos = []
    for i in range(n):
        label = SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]
        image = synthetic_photo(label, np.random.default_rng([stream, i]), PHOTO_SIZE)
        photos.append((jpeg(style(image) if style else image), label))
    return photos


def edge_camera(image: Image.Image) -> Image.Image:
    """Another "camera": only the outlines, white on black. The base model has never seen such a photo."""
    return image.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB")


def store(photos: list[tuple[bytes, str]], folder: Path) -> list[FeedbackPhoto]:
    """Write photos into a photo store (named by their SHA-256, as carbot's is) and describe them as feedback."""
    folder.mkdir(parents=True, exist_ok=True)
    feedback = []
    for data, label in photos:
        sha = hashlib.sha256(data).hexdigest()
        (folder / sha).write_bytes(data)
        feedback.append(FeedbackPhoto(sha256=sha, path=folder / sha, label=label))
    return feedback


@pytest.fixture(scope="module")
def base_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry whose active version "base" is a tiny model trained on shapes, and a base dataset beside it."""
    root = tmp_path_factory.mktemp("retrain-world")
    preprocessing = Preprocessing(image_size=IMAGE_SIZE)
    photos = shapes(600, stream=1)
    images = np.stack([load_image(data, preprocessing) for data, _ in photos]).astype("float32")
    targets = np.array([SYNTHETIC_CLASSES.index(label) for _, label in photos])
    keras.utils.set_random_seed(0)
    network = build_classifier(len(SYNTHETIC_CLASSES), backbone="tiny", image_size=IMAGE_SIZE)
    network.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="sparse_categorical_crossentropy")
    network.fit(images, targets, batch_size=16, epochs=15, verbose=0)
    registry = ModelRegistry(root / "models")
    with registry.staging(BASE_VERSION) as directory:
        save_artefact(
            network,
            directory,
            version=BASE_VERSION,
            labels=SYNTHETIC_CLASSES,
            backbone="tiny",
            preprocessing=preprocessing,
        )
    registry.activate(BASE_VERSION)
    make_synthetic_dataset(root / "data", per_class=30, size=PHOTO_SIZE, seed=5)
    return root


@pytest.fixture
def world(base_world: Path, tmp_path: Path) -> Path:
    """A private copy of the base world: each test may retrain and promote without touching the others."""
    shutil.copytree(base_world, tmp_path / "world")
    return tmp_path / "world"


def top1(version_dir: Path, feedback: list[FeedbackPhoto]) -> float:
    """Share of the photos the saved model at `version_dir` names correctly, read as the worker reads them."""
    predictor = Predictor.from_artefact(version_dir)
    images = np.stack([load_image(photo.path.read_bytes(), predictor.preprocessing) for photo in feedback])
    guesses = predictor.predict_topk(images, k=1)
    return float(np.mean([answer[0][0] == photo.label for answer, photo in zip(guesses, feedback)]))


# --------------------------------------------------------------------------
# Without TensorFlow


def test_feedback_names_import_without_tensorflow() -> None:
    code = (
        "import sys\n"
        "from training import FeedbackPhoto, is_held_out\n"
        "is_held_out('ab' * 32)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_is_held_out_is_fixed_by_the_hash_and_about_the_fraction() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]
    held = [h for h in hashes if is_held_out(h)]
    assert 0.18 < len(held) / len(hashes) < 0.22
    assert [h for h in hashes if is_held_out(h)] == held  # the same answer every time
    assert all(is_held_out(h.upper()) for h in held)  # the digest's case does not matter
    wider = {h for h in hashes if is_held_out(h, 0.3)}
    assert set(held) <= wider  # raising the fraction only adds photos to the hold-out
    assert 0.28 < len(wider) / len(hashes) < 0.32
    assert not any(is_held_out(h, 0.0) for h in hashes[:100])
    assert all(is_held_out(h, 1.0) for h in hashes[:100])
    with pytest.raises(ValueError):
        is_held_out(hashes[0], 1.5)


def test_oversampling_and_gate_rules() -> None:
    # 100 feedback photos next to 900 base ones make half the epoch when repeated 9 times.
    assert oversample_factor(900, 100, 0.5, 20) == 9
    assert oversample_factor(900, 10, 0.5, 20) == 20  # capped
    assert oversample_factor(100, 900, 0.5, 20) == 1  # never below once
    assert oversample_factor(0, 50, 0.5, 20) == 1  # feedback alone is the whole epoch already

    def m(overall: float, feedback: float | None, n_feedback: int = 10) -> dict:
        return {"overall_accuracy": overall, "feedback_accuracy": feedback, "feedback_n": n_feedback}

    assert gate(m(0.8, 0.5), m(0.8, 0.6)) == "better"
    assert gate(m(0.8, 0.5), m(0.8 - 1e-12, 0.6)) == "better"  # float noise is not "worse"
    assert gate(m(0.8, 0.5), m(0.79, 0.9)) == "worse_overall"
    assert gate(m(0.8, 0.5), m(0.9, 0.5)) == "not_better_on_feedback"
    assert gate(m(0.8, None, 0), m(0.9, None, 0)) == "no_feedback_holdout"


def test_the_gate_refuses_a_candidate_that_ruins_one_class_or_is_at_chance_on_one() -> None:
    def m(overall: float, feedback: float, **per_class: tuple[int, float]) -> dict:
        classes = {label: {"n": n, "accuracy": accuracy} for label, (n, accuracy) in per_class.items()}
        return {"overall_accuracy": overall, "feedback_accuracy": feedback, "feedback_n": 10, "per_class": classes}

    active = m(0.80, 0.5, a=(20, 0.90), b=(20, 0.70))
    # Better overall and on the feedback, bought with class a: refused, and the class is named.
    reason, failing = judge(active, m(0.85, 0.9, a=(20, 0.50), b=(20, 1.0)), num_labels=5)
    assert (reason, failing) == ("worse_on_a_class", {"a": {"n": 20, "active": 0.90, "candidate": 0.50}})
    # Within the margin (5 points, one photo of the class, and what chance explains on its photos) it passes.
    assert gate(active, m(0.85, 0.9, a=(20, 0.85), b=(20, 1.0)), num_labels=5) == "better"
    # A large class: 5 points and the noise of 400 photos (2.5 standard errors, about 5 points here).
    big = m(0.80, 0.5, a=(400, 0.90))
    assert gate(big, m(0.85, 0.9, a=(400, 0.86)), num_labels=5) == "better"
    assert gate(big, m(0.85, 0.9, a=(400, 0.82)), num_labels=5) == "worse_on_a_class"
    # A small class: 2 of 10 photos lost is within what chance explains, 6 of 10 is not.
    small = m(0.80, 0.5, a=(10, 1.0))
    assert gate(small, m(0.85, 0.9, a=(10, 0.8)), num_labels=5) == "better"
    assert gate(small, m(0.85, 0.9, a=(10, 0.4)), num_labels=5) == "worse_on_a_class"
    # No better than chance (1/5) on a class with at least 3 photos: refused, even if the active model was too.
    at_chance = m(0.80, 0.5, a=(20, 0.9), b=(10, 0.2))
    reason, failing = judge(at_chance, m(0.85, 0.9, a=(20, 0.9), b=(10, 0.2)), num_labels=5)
    assert (reason, list(failing)) == ("chance_on_a_class", ["b"])
    assert gate(at_chance, m(0.85, 0.9, a=(20, 0.9), b=(10, 0.3)), num_labels=5) == "better"


def _vote(person: int, photo: int, label: str, *, model: str = "A", p: float = 0.5, minute: int = 0) -> Vote:
    return Vote(person, f"{photo:064x}", label, label != model, model, p, datetime(2026, 12, 1, 0, minute, tzinfo=UTC))


def test_one_person_cannot_steer_which_feedback_enters() -> None:
    # 200 corrections of confident answers by one account, next to three honest people.
    attacker = [_vote(666, photo, "B", p=0.97, minute=photo % 60) for photo in range(200)]
    honest = [_vote(person, 1000 + person * 10 + n, "C", model="A", p=0.6) for person in (1, 2, 3) for n in range(5)]
    chosen, counts = choose_feedback(attacker + honest)
    assert {photo.label for photo in chosen} == {"C"} and len(chosen) == 15
    assert counts["feedback_untrusted"] == 200 and counts["feedback_people_untrusted"] == 1

    # Unconfident answers give no evidence against them: then the caps hold them to 25 corrections, and those
    # do not enter either while nobody else says anything is a "B".
    attacker = [_vote(666, photo, "B", p=0.4, minute=photo % 60) for photo in range(200)]
    chosen, counts = choose_feedback(attacker)
    assert chosen == [] and counts["feedback_capped"] == 175 and counts["feedback_single_source"] == 25
    one_voice_enough = FeedbackPolicy(min_correctors=1)
    assert len(choose_feedback(attacker, one_voice_enough)[0]) == 25
    assert len(choose_feedback(attacker, FeedbackPolicy(corrections_per_person=10, min_correctors=1))[0]) == 10
    # A second person correcting one photo to "B" is a second voice: the capped 25 enter.
    chosen, counts = choose_feedback([*attacker, _vote(7, 5000, "B")])
    assert len(chosen) == 26 and counts["feedback_single_source"] == 0

    # People who agree with others and with confident answers weigh fully; a contested photo weighs nothing.
    agreeing = [_vote(person, 1, "C") for person in (1, 2)] + [_vote(person, 2, "A", p=0.95) for person in (1, 2)]
    contested = [_vote(3, 3, "C"), _vote(4, 3, "D")]
    chosen, counts = choose_feedback(agreeing + contested)
    assert [(photo.label, photo.weight) for photo in chosen] == [("C", 1.0), ("A", 1.0)]
    assert counts["feedback_low_weight"] == 1
    # The same photo voted on twice by one person (sent twice) is one voice.
    twice = [_vote(1, 5, "C", minute=1), _vote(1, 5, "D", minute=2)]
    assert [photo.label for photo in choose_feedback(twice, one_voice_enough)[0]] == ["D"]


# --------------------------------------------------------------------------
# Retraining


@pytest.mark.slow
def test_retrain_learns_corrections_and_is_promoted(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = ModelRegistry(world / "models")
    feedback = store(shapes(120, stream=9, style=edge_camera), world / "photos")
    held_out = [photo for photo in feedback if is_held_out(photo.sha256)]
    trained_on = [photo for photo in feedback if not is_held_out(photo.sha256)]
    assert held_out and trained_on

    # Every list of photos that becomes a tf.data pipeline, and whether it is a training one (shuffled).
    pipelines: list[tuple[bool, set[Path]]] = []
    real_make_tf_dataset = retrain_module.make_tf_dataset

    def spy(samples, *args, **kwargs):
        pipelines.append((kwargs.get("shuffle", False), {Path(sample.path) for sample in samples}))
        return real_make_tf_dataset(samples, *args, **kwargs)

    monkeypatch.setattr(retrain_module, "make_tf_dataset", spy)
    progress: list[RetrainProgress] = []
    outcome = retrain(
        world / "models",
        feedback,
        version="r1",
        base_dataset=world / "data",
        split_file=world / "split.csv",
        config=LEARN,
        on_epoch=progress.append,
        variants=False,
    )

    # Promoted because it learnt: better on the feedback hold-out, no worse overall.
    assert (outcome.reason, outcome.promoted) == ("better", True), outcome
    assert outcome.base_version == BASE_VERSION and outcome.candidate_version == "r1"
    assert registry.active_version() == "r1" and registry.previous_version() == BASE_VERSION
    active, candidate = outcome.active_metrics, outcome.candidate_metrics
    assert candidate["feedback_accuracy"] > active["feedback_accuracy"] + 0.2, outcome
    assert candidate["overall_accuracy"] >= active["overall_accuracy"]
    assert active["feedback_accuracy"] < 0.4  # the base model really was wrong about these photos

    # The counts: 180 base photos, 15 % of each class held out; the feedback split by its hash.
    split = load_split(world / "split.csv")
    assert outcome.counts["base_holdout"] == len(split.test) == 24
    assert outcome.counts["base_train"] == 180 - 24
    assert outcome.counts["feedback_holdout"] == len(held_out) == candidate["feedback_n"] == active["feedback_n"]
    assert outcome.counts["feedback_train"] == len(trained_on)
    assert outcome.counts["feedback_skipped"] == 0
    assert outcome.counts["oversample"] == round(0.5 * 156 / (0.5 * len(trained_on)))
    assert candidate["base_n"] == 24 and candidate["overall_n"] == 24 + len(held_out)

    # Held-out photos (feedback and base) never reached a training pipeline, yet both models were judged on them.
    training_paths = set().union(*(paths for shuffled, paths in pipelines if shuffled))
    judged_paths = [paths for shuffled, paths in pipelines if not shuffled]
    holdout_paths = {photo.path for photo in held_out} | {sample.path for sample in split.test}
    assert {photo.path for photo in trained_on} <= training_paths
    assert not training_paths & holdout_paths
    assert judged_paths == [holdout_paths, holdout_paths]

    # The new model names the corrected photos it was trained on; the old one did not.
    assert top1(registry.path_for("r1"), trained_on) >= 0.7
    assert top1(registry.path_for(BASE_VERSION), trained_on) < 0.4

    # Progress every epoch, with a time left that ends at zero.
    assert [p.epoch for p in progress] == list(range(1, LEARN.epochs + 1))
    assert all(p.epochs == LEARN.epochs and p.eta_s >= 0 and np.isfinite(p.loss) for p in progress)
    assert progress[-1].eta_s == 0 and progress[-1].elapsed_s > progress[0].elapsed_s

    # The artefact says where it came from and why it passed, and carries the admin's picture.
    meta = json.loads((registry.path_for("r1") / "model.json").read_text())
    assert meta["extra"]["retrained_from"] == BASE_VERSION
    assert meta["extra"]["gate"]["reason"] == "better"
    assert meta["extra"]["gate"]["active"] == active and meta["extra"]["gate"]["candidate"] == candidate
    assert sorted(meta["extra"]["feedback_holdout"]) == sorted(photo.sha256 for photo in held_out)
    assert meta["metrics"]["test_accuracy"] == candidate["overall_accuracy"]
    assert read_artefact(registry.path_for("r1")).labels == SYNTHETIC_CLASSES  # same labels, same preprocessing
    assert meta["preprocessing"] == Preprocessing(image_size=IMAGE_SIZE).to_dict()
    assert outcome.report_image == registry.path_for("r1") / "retrain_report.png"
    assert outcome.report_image.read_bytes()[:8] == PNG_SIGNATURE
    assert "## Retrain gate" in (registry.path_for("r1") / "report.md").read_text()
    # Its out-of-distribution score is its own, refitted and calibrated on the hold-out.
    assert meta["ood"]["calibrated_on"] == len(holdout_paths) and (registry.path_for("r1") / "ood.npz").is_file()


@pytest.mark.slow
def test_a_worse_candidate_is_saved_but_not_promoted(world: Path) -> None:
    registry = ModelRegistry(world / "models")
    # Confirmations (👍) of ordinary photos, but a learning rate that wrecks whatever it touches.
    feedback = store(shapes(60, stream=11), world / "photos")
    wrecking = RetrainConfig(epochs=2, learning_rate=1e5, finetune_fraction=1.0)
    outcome = retrain(
        world / "models", feedback, version="r-bad", base_dataset=world / "data", config=wrecking, variants=False
    )

    assert outcome.promoted is False
    assert outcome.reason in ("worse_overall", "not_better_on_feedback"), outcome
    assert registry.active_version() == BASE_VERSION
    assert registry.exists("r-bad")  # kept for the admin to look at, or discard
    meta = json.loads((registry.path_for("r-bad") / "model.json").read_text())
    assert meta["extra"]["gate"]["reason"] == outcome.reason
    assert outcome.report_image is not None and outcome.report_image.is_file()


@pytest.mark.slow
def test_without_a_feedback_holdout_nothing_is_promoted_and_the_split_is_reused(world: Path) -> None:
    registry = ModelRegistry(world / "models")
    photos = store(shapes(40, stream=13, style=edge_camera), world / "photos")
    feedback = [photo for photo in photos if not is_held_out(photo.sha256)]
    split_file = world / "retrain-split.csv"

    first = retrain(world / "models", feedback, version="r1", base_dataset=world / "data", split_file=split_file,
                    config=QUICK, variants=False)  # fmt: skip
    saved_split = split_file.read_bytes()
    second = retrain(world / "models", feedback, version="r2", base_dataset=world / "data", split_file=split_file,
                     config=QUICK, variants=False)  # fmt: skip

    for outcome in (first, second):
        assert (outcome.reason, outcome.promoted) == ("no_feedback_holdout", False)
        assert outcome.counts["feedback_holdout"] == 0 and outcome.candidate_metrics["feedback_accuracy"] is None
    assert registry.active_version() == BASE_VERSION
    assert registry.exists("r1") and registry.exists("r2")
    # The second run judged on the very same base photos: the same split, and the same active model's score.
    assert split_file.read_bytes() == saved_split
    assert first.counts == second.counts
    assert first.active_metrics == second.active_metrics
    fingerprints = {
        json.loads((registry.path_for(v) / "model.json").read_text())["extra"]["base_split_fingerprint"]
        for v in ("r1", "r2")
    }
    assert fingerprints == {load_split(split_file).fingerprint}


def test_with_nothing_to_train_on_nothing_is_saved(world: Path) -> None:
    registry = ModelRegistry(world / "models")
    photos = store(shapes(60, stream=17), world / "photos")
    held_out = [photo for photo in photos if is_held_out(photo.sha256)]
    trainable = [photo for photo in photos if not is_held_out(photo.sha256)]
    unreadable = FeedbackPhoto(trainable[1].sha256, world / "photos" / "gone", trainable[1].label)
    feedback = [
        *held_out,
        FeedbackPhoto(trainable[0].sha256, trainable[0].path, "NOT A CAR"),  # a label the model does not know
        unreadable,  # the photo store lost it
        held_out[0],  # listed twice
    ]
    outcome = retrain(world / "models", feedback, version="r1", config=QUICK)

    assert (outcome.reason, outcome.promoted) == ("no_training_data", False)
    assert outcome.candidate_version == "r1" and outcome.report_image is None
    assert outcome.counts["feedback_train"] == 0 and outcome.counts["feedback_holdout"] == len(held_out)
    assert outcome.counts["feedback_skipped"] == 3
    assert not registry.exists("r1") and registry.active_version() == BASE_VERSION


@pytest.mark.slow
def test_a_failed_retrain_leaves_nothing_behind(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = ModelRegistry(world / "models")
    feedback = store(shapes(40, stream=19, style=edge_camera), world / "photos")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    # Fails during training (the progress callback raises: the job was cancelled, say).
    with pytest.raises(RuntimeError, match="disk full"):
        retrain(world / "models", feedback, version="r1", base_dataset=world / "data", config=QUICK, on_epoch=broken)
    assert not registry.exists("r1") and registry.active_version() == BASE_VERSION

    # Fails while the candidate is being written, after the artefact itself was saved.
    monkeypatch.setattr(retrain_module, "_plot_comparison", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        retrain(world / "models", feedback, version="r1", base_dataset=world / "data", config=QUICK, variants=False)
    assert not registry.exists("r1")
    assert registry.active_version() == BASE_VERSION
    assert sorted(p.name for p in registry.root.iterdir()) == ["ACTIVE", BASE_VERSION]


def test_retrain_needs_an_active_model_and_a_new_version_name(world: Path, tmp_path: Path) -> None:
    feedback = store(shapes(6, stream=23), world / "photos")
    with pytest.raises(LookupError):
        retrain(tmp_path / "empty-registry", feedback, version="r1")
    with pytest.raises(ValueError, match="active"):
        retrain(world / "models", feedback, version=BASE_VERSION)
    with pytest.raises(ValueError, match="version"):
        retrain(world / "models", feedback, version="../escape")
