"""The out-of-distribution answer: photos unlike the training photos are told apart, end to end.

The score itself (fitted, calibrated, saved under the artefact's checksum), the predictor that
returns it from the same forward pass as the probabilities, the result field the worker adds
and the client parses (old results still parse), the conversation's reply in both languages
(with the top-3 and the buttons still there), and the demo model on photos unlike its shapes.
"""

from __future__ import annotations

import io
from math import comb
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from bots import Conversation, Sender, Store
from bots._texts import TEXTS
from carbot.photos import PhotoStore
from carbot.settings import Settings
from model import (
    DEFAULT_FALSE_REJECTION,
    ArtefactCorrupt,
    ModelRegistry,
    OodScorer,
    Predictor,
    Preprocessing,
    build_classifier,
    like_photos_flagged,
    load_artefact,
    load_image,
    read_artefact,
    save_artefact,
    with_features,
)
from tests.conftest import TEST_IMAGE_SIZE, TEST_LABELS, WorkerProcess, jpeg_bytes, worker_env
from training import SYNTHETIC_CLASSES, UNLIKE_KINDS, synthetic_jpeg, unlike_photos
from worker import Classification, ClassifyClient, Familiarity

ALICE = Sender(platform="telegram", user_id="1", chat_id="100", language_code="en")
BRUNO = Sender(platform="telegram", user_id="2", chat_id="100", language_code="pt-BR")


def clusters(rng: np.random.Generator, n: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    targets = rng.integers(len(centres), size=n)
    # Non-negative and skewed, like pooled ReLU activations.
    return np.abs(centres[targets] + rng.gamma(2.0, 0.3, size=(n, centres.shape[1]))), targets


def test_score_flags_features_far_from_every_class_at_the_chosen_false_rejection_rate() -> None:
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 4, size=(3, 16))
    fit_x, fit_y = clusters(rng, 600, centres)
    scorer = OodScorer.fit(fit_x, fit_y, 3)
    val_x, _ = clusters(rng, 400, centres)
    threshold = scorer.calibrate(val_x, false_rejection=0.05)
    assert np.mean(scorer.score(val_x) > threshold) == pytest.approx(0.05, abs=0.01)

    like, _ = clusters(rng, 400, centres)
    assert np.mean(scorer.unfamiliar(like)) <= 0.1
    unlike = np.abs(rng.normal(8.0, 3.0, size=(200, 16)))  # another place in feature space
    assert np.mean(scorer.unfamiliar(unlike)) >= 0.95
    verdicts = scorer.verdicts(unlike[:3])
    assert all(v.unfamiliar and v.score > v.threshold == threshold for v in verdicts)
    assert verdicts[0].to_dict()["unfamiliar"] is True

    with pytest.raises(ValueError):
        scorer.calibrate(val_x, false_rejection=0.0)


@pytest.fixture(scope="module")
def scored_artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained classifier saved with a score fitted on its own features of random photos."""
    network = build_classifier(len(TEST_LABELS), backbone="tiny", image_size=TEST_IMAGE_SIZE)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(64, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), dtype=np.uint8)
    _, features = with_features(network).predict_on_batch(images.astype(np.float32))
    scorer = OodScorer.fit(features, np.arange(64) % len(TEST_LABELS), len(TEST_LABELS))
    scorer.calibrate(features, 0.1)
    directory = tmp_path_factory.mktemp("scored") / "v1"
    save_artefact(network, directory, version="v1", labels=TEST_LABELS, backbone="tiny",
                  preprocessing=Preprocessing(image_size=TEST_IMAGE_SIZE), ood=scorer,
                  ood_calibration={"false_rejection": 0.1})  # fmt: skip
    return directory


def test_the_score_travels_in_the_artefact_under_its_checksum(scored_artefact: Path, tmp_path: Path) -> None:
    artefact = read_artefact(scored_artefact)
    assert artefact.ood["false_rejection"] == 0.1 and artefact.ood["features"] == 128
    assert "ood.npz" in (scored_artefact / "checksum.sha256").read_text()
    loaded = load_artefact(scored_artefact)
    assert loaded.ood is not None and loaded.ood.threshold == artefact.ood["threshold"]

    # A tampered score is refused like tampered weights.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in scored_artefact.iterdir():
        (tampered / path.name).write_bytes(path.read_bytes())
    data = bytearray((tampered / "ood.npz").read_bytes())
    data[-100] ^= 0xFF
    (tampered / "ood.npz").write_bytes(bytes(data))
    with pytest.raises(ArtefactCorrupt, match="ood.npz"):
        read_artefact(tampered)
    # ...and so is one deleted from an artefact whose model.json describes it.
    (tampered / "ood.npz").unlink()
    with pytest.raises(ArtefactCorrupt, match="ood.npz"):
        read_artefact(tampered)


def test_the_predictor_answers_the_verdict_from_the_same_forward_pass(scored_artefact: Path) -> None:
    predictor = Predictor.from_artefact(scored_artefact, max_batch=4)
    assert predictor.has_ood
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), dtype=np.uint8)
    answers = predictor.predict(images, k=3)
    assert predictor.trace_count == 2  # buckets 4 and 2: one pass each, no second pass for the features

    loaded = load_artefact(scored_artefact)
    probabilities, features = with_features(loaded.keras_model).predict_on_batch(images.astype(np.float32))
    expected = loaded.ood.score(features)
    for answer, row, score in zip(answers, probabilities, expected, strict=True):
        assert answer.top_k[0] == (TEST_LABELS[int(np.argmax(row))], pytest.approx(float(row.max()), abs=1e-5))
        assert answer.ood.score == pytest.approx(float(score), rel=1e-4)
        assert answer.ood.unfamiliar == (answer.ood.score > answer.ood.threshold)
    assert predictor.predict_topk(images, k=3) == [answer.top_k for answer in answers]


def test_a_version_without_a_score_still_serves(model_registry: Path) -> None:
    predictor = Predictor.from_artefact(ModelRegistry(model_registry).path_for("tiny-test"))
    assert not predictor.has_ood
    answer = predictor.predict(np.zeros((1, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), np.uint8))[0]
    assert answer.ood is None and len(answer.top_k) == 3


def test_results_with_and_without_the_ood_field_parse() -> None:
    base = {"model_version": "v1", "photo": "ab", "top_k": [{"label": "FIAT ARGO", "probability": 0.9}]}
    old = Classification.from_result("j1", base)
    assert old.ood is None and not old.unfamiliar
    new = Classification.from_result("j2", {**base, "ood": {"score": 3.5, "threshold": 1.2, "unfamiliar": True}})
    assert new.ood == Familiarity(3.5, 1.2, True) and new.unfamiliar
    for junk in ("x", {"score": "a", "threshold": 1, "unfamiliar": True}, {"unfamiliar": "yes"}, [1], None):
        assert Classification.from_result("j3", {**base, "ood": junk}).ood is None  # bad input: no verdict, no crash


def registry_with(tmp_path: Path, source: Path, threshold: float) -> Path:
    """A registry whose active version is `source` saved again with its score's threshold set to `threshold`."""
    loaded = load_artefact(source)
    loaded.ood.threshold = threshold
    registry = ModelRegistry(tmp_path / "registry")
    with registry.staging("ood-v1") as directory:
        save_artefact(loaded.keras_model, directory, version="ood-v1", labels=TEST_LABELS, backbone="tiny",
                      preprocessing=loaded.artefact.preprocessing, ood=loaded.ood)  # fmt: skip
    registry.activate("ood-v1")
    return registry.root


@pytest.mark.parametrize("threshold", [-1.0, 1e9], ids=["flagged", "familiar"])
async def test_an_unfamiliar_photo_is_answered_as_such_in_both_languages_and_can_still_be_corrected(
    scored_artefact: Path, redis_url: str, tmp_path: Path, threshold: float
) -> None:
    # Every score is >= 0: a threshold of -1 flags every photo, one of 1e9 none. Through a real worker.
    root = registry_with(tmp_path, scored_artefact, threshold)
    worker = WorkerProcess(worker_env(redis_url, root, tmp_path / "data"), tmp_path / "worker.log", "ood")
    settings = Settings(model_registry=root, data_dir=tmp_path, rate_limit_per_minute=50)
    store = Store(f"sqlite:///{tmp_path / 'carbot.db'}", PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    connection = aioredis.Redis.from_url(redis_url)
    try:
        worker.wait_until_listening(redis.Redis.from_url(redis_url))
        async with ClassifyClient(redis_url, timeout_s=60) as client:
            conversation = Conversation(classifier=client, store=store, redis=connection, settings=settings)
            english = await conversation.photo(ALICE, "m1", jpeg_bytes(1))
            portuguese = await conversation.photo(BRUNO, "m2", jpeg_bytes(2))
            flagged = threshold < 0
            for reply, lang in ((english, "en"), (portuguese, "pt")):
                first = reply.text.splitlines()[0]
                assert (first == TEXTS[lang]["header_unfamiliar"]) == flagged, reply.text
                assert sum(label in reply.text for label in TEST_LABELS) == 3  # the top-3 is still shown
                assert reply.buttons and reply.prediction_id is not None
            assert "doesn't look like a car model I know" in TEXTS["en"]["header_unfamiliar"]
            assert "não parece um modelo de carro que eu conheça" in TEXTS["pt"]["header_unfamiliar"]

            # A wrongly flagged photo is voted on and corrected like any other.
            down = await conversation.button(ALICE, f"v:{english.prediction_id}:d")
            choice = down.follow_up.buttons[0][0]
            corrected = await conversation.button(ALICE, choice.data)
            assert "✅" in corrected.notice
            record = await store.get_prediction(english.prediction_id)
            assert record is not None
    finally:
        worker.stop()
        await connection.aclose()
        await store.close()


def chance_of_flagging_at_least(flagged: int, *, test: int, validation: int, validation_flagged: int) -> float:
    """The chance that `flagged` or more of `test` photos go above a threshold set on `validation` photos.

    Both are assumed drawn alike. The threshold flags `validation_flagged` validation photos, so it
    is the next-highest validation score. Photos drawn alike are exchangeable: every order of the
    pooled scores is equally likely, whatever the scores' distribution, and the number of test
    photos above the threshold is negative hypergeometric.
    """
    r = validation_flagged + 1  # the threshold's rank among the validation scores, from the top
    pooled = validation + test
    # k test photos above it: among the top k + r - 1 scores, r - 1 are validation ones; then the threshold.
    ways = sum(comb(k + r - 1, k) * comb(pooled - k - r, validation - r) for k in range(flagged, test + 1))
    return ways / comb(pooled, validation)


def test_the_chance_of_flagging_like_photos_matches_drawing_them() -> None:
    # The formula against a simulation of the same draw: 228 + 228 photos, the 5th-highest validation score.
    rng = np.random.default_rng(0)
    scores = rng.random((20_000, 456))
    threshold = np.sort(scores[:, :228], axis=1)[:, -5]
    above = (scores[:, 228:] > threshold[:, None]).sum(axis=1)
    for flagged in (1, 5, 12):
        exact = chance_of_flagging_at_least(flagged, test=228, validation=228, validation_flagged=4)
        assert abs(np.mean(above >= flagged) - exact) < 0.01, flagged
    assert chance_of_flagging_at_least(0, test=228, validation=228, validation_flagged=4) == pytest.approx(1.0)


def test_the_share_of_like_photos_a_threshold_flags_spreads_as_calibrating_on_so_few_makes_it() -> None:
    # 20,000 calibrations on 228 photos of uniform scores, 4 of them flagged: the share of all photos
    # above such a threshold is 1 - threshold. The formula holds whatever the scores' distribution.
    rng = np.random.default_rng(0)
    shares = 1.0 - np.sort(rng.random((20_000, 228)), axis=1)[:, -5]
    rate = like_photos_flagged(228, 4)
    assert rate.expected == pytest.approx(shares.mean(), abs=0.0005)
    assert (rate.low, rate.high) == pytest.approx(tuple(np.quantile(shares, [0.05, 0.95])), abs=0.001)
    assert rate.high > 0.03 > DEFAULT_FALSE_REJECTION  # what the report warns of: far from the rate chosen
    assert like_photos_flagged(20_000, 399).high < 0.022  # and what many calibration photos give
    with pytest.raises(ValueError):
        like_photos_flagged(10, 10)


@pytest.mark.slow
def test_the_demo_model_flags_unlike_photos_and_passes_like_ones(demo_registry: Path) -> None:
    """The issue's targets for the demo model: >= 90 % of unlike photos flagged, <= 5 % of its own test photos."""
    artefact = read_artefact(ModelRegistry(demo_registry).path_for("demo"))
    calibration, flagged = artefact.ood, artefact.ood["flagged"]
    print("demo model out-of-distribution measurements:", flagged)
    assert flagged["unlike"]["all"] >= 0.9 and all(flagged["unlike"][kind] >= 0.8 for kind in UNLIKE_KINDS)

    # Like photos. The threshold flags at most the chosen 2 % of the validation photos it was set on,
    # and so flags (its rank) / (photos + 1) of new photos drawn alike, on average: 5 / 229 = 2.2 %
    # for the demo's 228, within the 5 % target.
    validation, test = calibration["calibrated_on"], artefact.meta["extra"]["counts"]["test"]
    validation_flagged = round(flagged["validation"] * validation)
    assert flagged["validation"] <= calibration["false_rejection"]
    rate = like_photos_flagged(validation, validation_flagged)
    assert rate.expected <= 0.05
    # Its own 228 test photos scatter around that 2.2 %: 12 or more of them (5.3 %) go above such a
    # threshold in 3.6 % of builds by chance alone, and a CI build flagged exactly 12. So the test
    # split is held to what chance explains at least once in a thousand builds: more fails only
    # when test photos score as stranger than validation ones (a calibration or serving mismatch).
    test_flagged = round(flagged["test"] * test)
    chance = chance_of_flagging_at_least(test_flagged, test=test, validation=validation,
                                         validation_flagged=validation_flagged)  # fmt: skip
    assert chance >= 0.001, f"{test_flagged} of {test} test photos flagged; chance alone gives that {chance:.2%}"
    report = (artefact.path / "report.md").read_text()
    assert "Photos unlike the training photos" in report
    assert f"the threshold flags about {rate.expected:.1%} of new photos like them, and from {rate.low:.1%}" in report

    # Fresh photos through the serving path: unlike ones of another seed than the training-time
    # measurement's, and like ones the training never drew.
    predictor = Predictor.from_artefact(artefact.path)
    size = (320, 240)
    unlike = []
    for _, image in unlike_photos(15, seed=4242, size=size):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        unlike.append(load_image(buffer.getvalue(), artefact.preprocessing))
    like = [load_image(synthetic_jpeg(SYNTHETIC_CLASSES[i % 6], seed=300_000 + i, size=size), artefact.preprocessing)
            for i in range(120)]  # fmt: skip
    unlike_flagged = np.mean([answer.ood.unfamiliar for answer in predictor.predict(np.stack(unlike))])
    like_flagged = np.mean([answer.ood.unfamiliar for answer in predictor.predict(np.stack(like))])
    print(f"fresh photos flagged: unlike {unlike_flagged:.1%}, like {like_flagged:.1%}")
    assert unlike_flagged >= 0.9
    assert like_flagged <= 0.1  # 3 % expected; 120 photos leave room for chance
