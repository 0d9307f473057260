"""How good a trained classifier is on the test photos, and the report that goes into its artefact.

:func:`evaluate` runs a model's ``predict`` over ``(images, labels)`` batches (a
``tf.data`` dataset as NumPy, for instance) and keeps every true label and
probability row in an :class:`Evaluation`. From those it computes:

- top-1 and top-3 accuracy;
- the confusion matrix (rows: true class, columns: predicted class);
- per-class precision, recall, F1 and support with their macro and weighted
  averages: the numbers scikit-learn's ``classification_report`` gives (with
  ``zero_division=0``), computed here with NumPy, so the project needs no
  scikit-learn;
- the most-confused pairs of classes.

:func:`write_report` writes them into an artefact directory: ``confusion_matrix.png``,
``training_curves.png`` (when a Keras ``History.history`` is given),
``classification_report.txt`` and a short ``report.md``.

Importing this module needs NumPy only: matplotlib is imported by
:func:`write_report` when it draws, and TensorFlow is never imported here (the
caller's ``predict`` brings it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Above these class counts the confusion matrix drops the per-cell numbers, then the tick labels.
_ANNOTATE_MAX_CLASSES = 30
_TICK_LABELS_MAX_CLASSES = 80


@dataclass
class Evaluation:
    """The true labels and predicted probabilities of a test set, and the metrics derived from them.

    ``y_true`` holds class indices (shape ``(n,)``), ``probabilities`` one row per
    sample and one column per class of ``labels`` (shape ``(n, len(labels))``).
    """

    labels: tuple[str, ...]
    y_true: np.ndarray
    probabilities: np.ndarray

    def __post_init__(self) -> None:
        self.labels = tuple(str(label) for label in self.labels)
        self.y_true = np.asarray(self.y_true, dtype=np.int64).reshape(-1)
        probabilities = np.asarray(self.probabilities, dtype=np.float64)
        if probabilities.size == 0:
            probabilities = probabilities.reshape(0, len(self.labels))
        self.probabilities = probabilities
        if probabilities.ndim != 2 or probabilities.shape[1] != len(self.labels):
            raise ValueError(f"probabilities must have shape (n, {len(self.labels)}), got {probabilities.shape}")
        if probabilities.shape[0] != self.y_true.shape[0]:
            raise ValueError(f"{self.y_true.shape[0]} labels but {probabilities.shape[0]} probability rows")
        if self.y_true.size and (self.y_true.min() < 0 or self.y_true.max() >= len(self.labels)):
            raise ValueError(f"labels must be class indices in [0, {len(self.labels)})")

    # -- basic quantities ---------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def num_samples(self) -> int:
        return int(self.y_true.shape[0])

    @property
    def y_pred(self) -> np.ndarray:
        """The top-1 class index of every sample (ties go to the lower index, as ``argmax``)."""
        return np.argmax(self.probabilities, axis=1) if self.num_samples else np.zeros(0, dtype=np.int64)

    @property
    def accuracy(self) -> float:
        if not self.num_samples:
            return 0.0
        return float(np.mean(self.y_pred == self.y_true))

    @property
    def top_k(self) -> int:
        return min(3, self.num_classes)

    @property
    def top3_accuracy(self) -> float:
        """Share of samples whose true class is among the ``min(3, classes)`` most probable.

        A sample counts when fewer than ``k`` classes have a strictly higher
        probability than its true class (so ties are resolved in its favour).
        """
        if not self.num_samples:
            return 0.0
        rows = np.arange(self.num_samples)
        true_p = self.probabilities[rows, self.y_true]
        higher = np.sum(self.probabilities > true_p[:, None], axis=1)
        return float(np.mean(higher < self.top_k))

    def confusion_matrix(self) -> np.ndarray:
        """Counts, ``[i, j]`` = samples of true class ``i`` predicted as class ``j``."""
        n = self.num_classes
        flat = self.y_true * n + self.y_pred
        return np.bincount(flat, minlength=n * n).reshape(n, n)

    # -- per-class metrics --------------------------------------------------------------------

    def classification_report(self) -> dict[str, Any]:
        """Per-class ``precision``, ``recall``, ``f1-score``, ``support``, plus averages and accuracy.

        Same layout and numbers as ``sklearn.metrics.classification_report(y_true,
        y_pred, labels=range(n), target_names=labels, output_dict=True,
        zero_division=0)``: every class of ``labels`` is listed (also one with no
        test sample), a ratio whose denominator is zero is 0.0, and the keys
        ``"accuracy"``, ``"macro avg"`` and ``"weighted avg"`` follow the classes.
        """
        cm = self.confusion_matrix().astype(np.float64)
        tp = np.diag(cm)
        predicted = cm.sum(axis=0)
        support = cm.sum(axis=1)
        precision = _safe_divide(tp, predicted)
        recall = _safe_divide(tp, support)
        f1 = _safe_divide(2 * tp, predicted + support)

        report: dict[str, Any] = {}
        for i, label in enumerate(self.labels):
            report[label] = {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1-score": float(f1[i]),
                "support": int(support[i]),
            }
        total = int(support.sum())
        report["accuracy"] = self.accuracy
        report["macro avg"] = {
            "precision": float(precision.mean()) if self.num_classes else 0.0,
            "recall": float(recall.mean()) if self.num_classes else 0.0,
            "f1-score": float(f1.mean()) if self.num_classes else 0.0,
            "support": total,
        }
        weights = support / total if total else np.zeros_like(support)
        report["weighted avg"] = {
            "precision": float(np.sum(precision * weights)),
            "recall": float(np.sum(recall * weights)),
            "f1-score": float(np.sum(f1 * weights)),
            "support": total,
        }
        return report

    def report_text(self, digits: int = 2) -> str:
        """The report as scikit-learn's ``classification_report`` prints it."""
        report = self.classification_report()
        headers = ["precision", "recall", "f1-score", "support"]
        width = max([len(label) for label in self.labels] + [len("weighted avg")])
        head_fmt = "{:>{width}s} " + " {:>9}" * len(headers)
        row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
        text = head_fmt.format("", *headers, width=width) + "\n\n"
        for label in self.labels:
            row = report[label]
            text += row_fmt.format(
                label, row["precision"], row["recall"], row["f1-score"], row["support"], width=width, digits=digits
            )
        text += "\n"
        accuracy_fmt = "{:>{width}s} " + " {:>9}" * 2 + " {:>9.{digits}f}" + " {:>9}\n"
        text += accuracy_fmt.format(
            "accuracy", "", "", report["accuracy"], report["macro avg"]["support"], width=width, digits=digits
        )
        for name in ("macro avg", "weighted avg"):
            row = report[name]
            text += row_fmt.format(
                name, row["precision"], row["recall"], row["f1-score"], row["support"], width=width, digits=digits
            )
        return text

    def most_confused(self, n: int = 10) -> list[tuple[str, str, int]]:
        """The ``n`` largest off-diagonal cells: ``(true label, predicted label, count)``, largest first.

        Pairs with equal counts keep the confusion matrix's row-major order; empty
        cells are never listed.
        """
        cm = self.confusion_matrix().copy()
        np.fill_diagonal(cm, 0)
        flat = cm.reshape(-1)
        order = np.argsort(-flat, kind="stable")
        pairs = []
        for index in order[: max(n, 0)]:
            count = int(flat[index])
            if count == 0:
                break
            i, j = divmod(int(index), self.num_classes)
            pairs.append((self.labels[i], self.labels[j], count))
        return pairs

    def metrics(self) -> dict[str, float | int]:
        """The headline numbers, for the artefact's ``model.json``."""
        report = self.classification_report()
        return {
            "accuracy": self.accuracy,
            "top3_accuracy": self.top3_accuracy,
            "macro_f1": report["macro avg"]["f1-score"],
            "weighted_f1": report["weighted avg"]["f1-score"],
            "test_images": self.num_samples,
        }


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0.0 where the denominator is 0 (and no warning)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def evaluate(
    predict: Callable[[np.ndarray], Any],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    labels: Sequence[str],
) -> Evaluation:
    """Run ``predict`` over every ``(images, int labels)`` batch and collect an :class:`Evaluation`.

    ``predict`` maps a batch of uint8 images to class probabilities, for instance
    ``lambda x: keras_model.predict_on_batch(x)``; ``batches`` is e.g.
    ``make_tf_dataset(...).as_numpy_iterator()``. Raises :class:`ValueError` when
    there is no sample at all or a batch's shapes do not match.
    """
    labels = tuple(labels)
    truths: list[np.ndarray] = []
    probabilities: list[np.ndarray] = []
    for images, y in batches:
        y = np.asarray(y).reshape(-1)
        p = np.asarray(predict(images), dtype=np.float64)
        if p.ndim != 2 or p.shape != (y.shape[0], len(labels)):
            raise ValueError(f"predict returned shape {p.shape} for a batch of {y.shape[0]} ({len(labels)} classes)")
        truths.append(y)
        probabilities.append(p)
    if not truths or not sum(len(y) for y in truths):
        raise ValueError("no test samples to evaluate")
    return Evaluation(labels, np.concatenate(truths), np.concatenate(probabilities))


# -- the written report -------------------------------------------------------------------------


def write_report(
    evaluation: Evaluation,
    directory: Path,
    *,
    history: dict[str, list[float]] | None = None,
    title: str = "",
) -> list[Path]:
    """Write the evaluation into an artefact ``directory`` (created if needed); return the written paths.

    Files: ``confusion_matrix.png``, ``training_curves.png`` (only when ``history``,
    a Keras ``History.history``, has at least one series), ``classification_report.txt``
    and ``report.md``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    confusion_png = directory / "confusion_matrix.png"
    _plot_confusion_matrix(evaluation, confusion_png, title=title)
    written.append(confusion_png)

    curves_png: Path | None = None
    if history and any(len(values) for values in history.values()):
        curves_png = directory / "training_curves.png"
        _plot_training_curves(history, curves_png, title=title)
        written.append(curves_png)

    report_txt = directory / "classification_report.txt"
    report_txt.write_text(evaluation.report_text(), encoding="utf-8")
    written.append(report_txt)

    report_md = directory / "report.md"
    report_md.write_text(_markdown(evaluation, title, curves_png is not None), encoding="utf-8")
    written.append(report_md)
    return written


def _markdown(evaluation: Evaluation, title: str, with_curves: bool) -> str:
    metrics = evaluation.metrics()
    lines = [
        f"# {title or 'Evaluation'}",
        "",
        f"{metrics['test_images']} test images, {evaluation.num_classes} classes.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {metrics['accuracy']:.2%} |",
        f"| top-{evaluation.top_k} accuracy | {metrics['top3_accuracy']:.2%} |",
        f"| macro F1 | {metrics['macro_f1']:.4f} |",
        f"| weighted F1 | {metrics['weighted_f1']:.4f} |",
        "",
        "## Most confused",
        "",
    ]
    pairs = evaluation.most_confused(10)
    if pairs:
        lines += ["| true | predicted as | count |", "|---|---|---|"]
        lines += [f"| {_md_cell(t)} | {_md_cell(p)} | {c} |" for t, p, c in pairs]
    else:
        lines.append("No confusions: every test image was classified correctly.")
    lines += [
        "",
        "## Details",
        "",
        "- [Per-class precision, recall and F1](classification_report.txt)",
        "",
        "![Confusion matrix](confusion_matrix.png)",
    ]
    if with_curves:
        lines += ["", "![Training curves](training_curves.png)"]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _plot_confusion_matrix(evaluation: Evaluation, path: Path, *, title: str) -> None:
    from matplotlib.figure import Figure  # a Figure with no pyplot: Agg canvas, no global state

    cm = evaluation.confusion_matrix()
    n = evaluation.num_classes
    support = cm.sum(axis=1, keepdims=True)
    share = np.zeros(cm.shape, dtype=np.float64)
    np.divide(cm, support, out=share, where=support != 0)  # colour: share of the true class

    side = float(min(max(6.0, 0.4 * n + 3.0), 24.0))
    figure = Figure(figsize=(side, side), dpi=100)
    axes = figure.add_subplot()
    image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    headline = f"accuracy {evaluation.accuracy:.1%}, {evaluation.num_samples} images"
    axes.set_title(f"{title}\n{headline}" if title else headline)

    if n <= _TICK_LABELS_MAX_CLASSES:
        fontsize = 8 if n <= _ANNOTATE_MAX_CLASSES else 4
        ticks = np.arange(n)
        axes.set_xticks(ticks, labels=evaluation.labels, rotation=90, fontsize=fontsize)
        axes.set_yticks(ticks, labels=evaluation.labels, fontsize=fontsize)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    if n <= _ANNOTATE_MAX_CLASSES:
        for i, j in zip(*np.nonzero(cm)):
            axes.text(
                j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                color="white" if share[i, j] > 0.5 else "black",
            )  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, format="png")


def _plot_training_curves(history: dict[str, list[float]], path: Path, *, title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    losses = {k: v for k, v in history.items() if "loss" in k and len(v)}
    others = {k: v for k, v in history.items() if "loss" not in k and k not in ("lr", "learning_rate") and len(v)}
    panels = [(name, series) for name, series in (("loss", losses), ("accuracy", others)) if series]

    figure = Figure(figsize=(6 * len(panels), 4.5), dpi=100)
    for index, (name, series) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for key, values in sorted(series.items()):
            epochs = np.arange(1, len(values) + 1)
            validation = key.startswith("val_")
            label = f"validation {key[4:]}" if validation else f"train {key}"
            axes.plot(epochs, values, marker="o", markersize=3, linestyle="--" if validation else "-", label=label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.grid(True, alpha=0.3)
        axes.legend()
        axes.set_title(name)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png")
