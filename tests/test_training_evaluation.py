"""Evaluation metrics and the written report, on hand-made predictions (no training, no TensorFlow)."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from tests.conftest import PNG_SIGNATURE
from training import Evaluation, evaluate, write_report

# Four classes; D is never predicted. Predictions (argmax): A A B | B B | A | C.
LABELS = ("A", "B", "C", "D")
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 3])
PROBABILITIES = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],
        [0.6, 0.2, 0.1, 0.1],
        [0.3, 0.4, 0.2, 0.1],  # A taken for B, true class 2nd
        [0.1, 0.8, 0.05, 0.05],
        [0.2, 0.5, 0.2, 0.1],
        [0.5, 0.2, 0.3, 0.0],  # C taken for A, true class 2nd
        [0.3, 0.2, 0.4, 0.1],  # D taken for C, true class last: outside the top 3
    ]
)


@pytest.fixture
def small() -> Evaluation:
    return Evaluation(LABELS, Y_TRUE, PROBABILITIES)


def test_accuracy_and_top3(small):
    assert small.accuracy == pytest.approx(4 / 7)
    assert small.top3_accuracy == pytest.approx(6 / 7)
    # With two classes the top-k is top-2: always right.
    two = Evaluation(("x", "y"), np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]))
    assert two.accuracy == pytest.approx(2 / 3)
    assert two.top3_accuracy == 1.0


def test_confusion_matrix_rows_are_true_classes(small):
    expected = np.array([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(small.confusion_matrix(), expected)


def test_classification_report_matches_hand_computed_values(small):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # D is never predicted: precision 0.0, no division warning
        report = small.classification_report()
    expected = {
        "A": (2 / 3, 2 / 3, 2 / 3, 3),
        "B": (2 / 3, 1.0, 0.8, 2),
        "C": (0.0, 0.0, 0.0, 1),
        "D": (0.0, 0.0, 0.0, 1),
        "macro avg": (1 / 3, 5 / 12, 11 / 30, 7),
        "weighted avg": (10 / 21, 4 / 7, 18 / 35, 7),
    }
    for key, (precision, recall, f1, support) in expected.items():
        row = report[key]
        assert row["precision"] == pytest.approx(precision), key
        assert row["recall"] == pytest.approx(recall), key
        assert row["f1-score"] == pytest.approx(f1), key
        assert row["support"] == support, key
    assert report["accuracy"] == pytest.approx(4 / 7)
    assert list(report) == [*LABELS, "accuracy", "macro avg", "weighted avg"]

    metrics = small.metrics()
    assert metrics == {
        "accuracy": pytest.approx(4 / 7),
        "top3_accuracy": pytest.approx(6 / 7),
        "macro_f1": pytest.approx(11 / 30),
        "weighted_f1": pytest.approx(18 / 35),
        "test_images": 7,
    }


def test_classification_report_equals_scikit_learns():
    from sklearn import metrics

    rng = np.random.default_rng(0)
    labels = tuple(f"model {i}" for i in range(12))
    y_true = rng.integers(0, 12, size=300)
    probabilities = rng.random((300, 12)) ** 4
    probabilities[:, 11] = 0.0  # a class never predicted
    evaluation = Evaluation(labels, y_true, probabilities)
    kwargs = {"labels": list(range(12)), "target_names": list(labels), "zero_division": 0}
    theirs = metrics.classification_report(y_true, evaluation.y_pred, output_dict=True, **kwargs)
    ours = evaluation.classification_report()
    assert ours.keys() == theirs.keys()
    for key, row in theirs.items():
        if key == "accuracy":
            assert ours[key] == pytest.approx(row)
        else:
            assert {k: pytest.approx(v) for k, v in row.items()} == ours[key], key
    assert evaluation.report_text() == metrics.classification_report(y_true, evaluation.y_pred, **kwargs)


def test_report_text_is_formatted_like_scikit_learn():
    evaluation = Evaluation(
        ("cat", "dog"), np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.1, 0.9]])
    )
    expected = (
        "              precision    recall  f1-score   support\n"
        "\n"
        "         cat       1.00      0.50      0.67         2\n"
        "         dog       0.67      1.00      0.80         2\n"
        "\n"
        "    accuracy                           0.75         4\n"
        "   macro avg       0.83      0.75      0.73         4\n"
        "weighted avg       0.83      0.75      0.73         4\n"
    )
    assert evaluation.report_text() == expected


def test_most_confused_largest_first():
    labels = ("A", "B", "C")
    # A->C twice, B->A three times, C->B once; diagonal counts are larger and never listed.
    pairs = [(0, 0)] * 5 + [(0, 2)] * 2 + [(1, 1)] * 4 + [(1, 0)] * 3 + [(2, 2)] * 6 + [(2, 1)]
    y_true = np.array([t for t, _ in pairs])
    probabilities = np.eye(3)[[p for _, p in pairs]]
    evaluation = Evaluation(labels, y_true, probabilities)
    assert evaluation.most_confused() == [("B", "A", 3), ("A", "C", 2), ("C", "B", 1)]
    assert evaluation.most_confused(2) == [("B", "A", 3), ("A", "C", 2)]
    perfect = Evaluation(labels, np.array([0, 1, 2]), np.eye(3))
    assert perfect.most_confused() == []


def test_evaluate_concatenates_batches_in_order():
    # The "model" reads the class from the first pixel of each uint8 image.
    def predict(images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8
        return np.eye(3)[images[:, 0, 0, 0]]

    def batch(classes, truths):
        images = np.zeros((len(classes), 4, 4, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = classes
        return images, np.array(truths, dtype=np.int32)

    batches = [batch([0, 1, 2], [0, 1, 1]), batch([2, 0], [2, 0])]
    evaluation = evaluate(predict, iter(batches), ["a", "b", "c"])
    np.testing.assert_array_equal(evaluation.y_true, [0, 1, 1, 2, 0])
    np.testing.assert_array_equal(evaluation.y_pred, [0, 1, 2, 2, 0])
    assert evaluation.probabilities.shape == (5, 3)
    assert evaluation.labels == ("a", "b", "c")
    assert evaluation.accuracy == pytest.approx(4 / 5)

    with pytest.raises(ValueError, match="no test samples"):
        evaluate(predict, [], ["a", "b", "c"])
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda x: np.ones((len(x), 2)), batches, ["a", "b", "c"])


def test_write_report_writes_pictures_text_and_summary(small, tmp_path):
    history = {"loss": [1.2, 0.8, 0.5], "val_loss": [1.3, 0.9, 0.7], "accuracy": [0.4, 0.6, 0.8],
               "val_accuracy": [0.35, 0.55, 0.7]}  # fmt: skip
    out = tmp_path / "artefact"
    written = write_report(small, out, history=history, title="demo v1")
    names = [p.name for p in written]
    assert names == ["confusion_matrix.png", "training_curves.png", "classification_report.txt", "report.md"]
    for path in written:
        assert path.parent == out and path.stat().st_size > 0
    for name in ("confusion_matrix.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "classification_report.txt").read_text() == small.report_text()
    markdown = (out / "report.md").read_text()
    assert "demo v1" in markdown
    assert "57.14%" in markdown  # accuracy 4/7
    assert "85.71%" in markdown  # top-3 6/7
    assert "| A | B | 1 |" in markdown
    assert "(confusion_matrix.png)" in markdown and "(training_curves.png)" in markdown

    # Without a history there is no curves picture, and the summary does not link one.
    plain = write_report(small, tmp_path / "plain")
    assert [p.name for p in plain] == ["confusion_matrix.png", "classification_report.txt", "report.md"]
    assert "training_curves" not in (tmp_path / "plain" / "report.md").read_text()


def test_write_report_with_190_classes_is_quick(tmp_path):
    rng = np.random.default_rng(1)
    labels = tuple(f"MAKER {i // 5} MODEL {i}" for i in range(190))
    y_true = rng.integers(0, 190, size=2000)
    probabilities = rng.random((2000, 190))
    probabilities[np.arange(2000), y_true] += 0.5
    start = time.perf_counter()
    written = write_report(Evaluation(labels, y_true, probabilities), tmp_path)
    assert time.perf_counter() - start < 15
    png = tmp_path / "confusion_matrix.png"
    assert png in written and png.read_bytes()[:8] == PNG_SIGNATURE
    assert len((tmp_path / "classification_report.txt").read_text().splitlines()) == 190 + 6


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        Evaluation(("a", "b"), np.array([0, 1]), np.ones((2, 3)))
    with pytest.raises(ValueError):
        Evaluation(("a", "b"), np.array([0, 2]), np.ones((2, 2)))


def test_import_training_stays_light():
    code = (
        "import sys, training\n"
        "from training import Evaluation, evaluate, write_report\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'matplotlib'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
