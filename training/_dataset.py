"""Labelled photos on disk: find them, check them, split them once, and stream them to Keras.

The way from a folder of photos to a training run:

1. :func:`scan_folder` (a folder per class, the folder name is the label) or
   :func:`read_manifest` (a CSV ``path,label``) lists the :class:`Sample` s;
2. :func:`check_samples` decodes every file once with ``model.load_image`` and sets
   aside the ones that cannot be read, each with the reason (a corrupt photo is
   reported, never fatal);
3. :func:`stratified_split` cuts every class into train / validation / test,
   deterministically for a seed, and fingerprints the result;
4. :func:`save_split` writes that split to a CSV and :func:`load_split` reads it
   back, refusing it if a photo changed since: a rerun or a retrain evaluates on
   exactly the same test photos;
5. :func:`make_tf_dataset` streams a list of samples as a ``tf.data`` pipeline of
   ``(uint8 images, int32 labels)`` batches, decoded by the same ``load_image`` the
   worker uses, so training and serving cannot see a photo differently.

The split file is a CSV whose first line is a comment holding JSON metadata::

    # {"format": "carbot-split/1", "fingerprint": "<sha-256 hex>", "labels": ["FIAT ARGO", ...]}
    path,label,split
    FIAT ARGO/0001.jpg,FIAT ARGO,train
    ...

Paths are relative to the CSV's folder when they can be, absolute otherwise.

The fingerprint is a SHA-256 over the sorted rows (path relative to the samples'
common folder, label, split, file size, SHA-256 of the file's bytes), so it does
not depend on where the dataset lives, but changes when a photo is edited, added,
removed, relabelled or moved to another split.

Only :func:`make_tf_dataset` needs TensorFlow, and it imports it when called:
importing this module stays light (NumPy and Pillow).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model import IMAGE_SUFFIXES, ImageRejected, Preprocessing, load_image

if TYPE_CHECKING:
    import tensorflow as tf

SPLITS = ("train", "validation", "test")

_SPLIT_FORMAT = "carbot-split/1"
# Decoding and hashing release the GIL for most of their work, so threads do run in parallel.
_MAX_THREADS = min(32, (os.cpu_count() or 1) + 4)


class SplitChanged(ValueError):
    """A saved split no longer matches the photos on disk (one was edited, added, moved or removed)."""


@dataclass(frozen=True)
class Sample:
    """One labelled photo on disk."""

    path: Path
    label: str


@dataclass(frozen=True)
class Split:
    """Train / validation / test samples, the sorted class labels, and a fingerprint of it all."""

    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]
    labels: tuple[str, ...]
    fingerprint: str

    def parts(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


# --------------------------------------------------------------------------
# Listing samples


def scan_folder(root: Path) -> list[Sample]:
    """List the photos of a folder-per-class dataset: ``root/<label>/**/<photo>``, sorted by (label, path).

    A photo is a file whose extension (any case) is one of :data:`model.IMAGE_SUFFIXES`;
    hidden files and folders are skipped. Files directly in `root` have no class and are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if path.is_file() and not hidden and path.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(path, folder.name))
    return samples


def read_manifest(csv_path: Path) -> list[Sample]:
    """Read a CSV with the header ``path,label`` (other columns are ignored), in file order.

    Relative paths are relative to the CSV's folder. A row without a path or a label
    raises ``ValueError`` naming the file and the line.
    """
    csv_path = Path(csv_path)
    with csv_path.open(newline="", encoding="utf-8") as handle:
        lines = _skip_comments(handle)
        return [Sample(path, label) for path, label, _ in _read_rows(csv_path, lines, ("path", "label"))]


def _skip_comments(lines: Iterable[str]) -> Iterable[str]:
    """Blank out leading ``#`` comment lines (keeping the line count, so errors name the right line)."""
    in_header = True
    for line in lines:
        if in_header and line.startswith("#"):
            yield "\n"
            continue
        in_header = False
        yield line


def _read_rows(csv_path: Path, lines: Iterable[str], columns: Sequence[str]) -> list[tuple[Path, str, list[str]]]:
    """(resolved path, label, the other `columns`) for each row; raises on a malformed row."""
    reader = csv.reader(lines)
    header = next((row for row in reader if row), None)
    if header is None or any(column not in [h.strip() for h in header] for column in columns):
        raise ValueError(f"{csv_path}: expected a header with the columns {', '.join(columns)}, got {header}")
    index = {name.strip(): i for i, name in enumerate(header)}
    rows = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        line = reader.line_num
        if len(row) != len(header):
            raise ValueError(f"{csv_path}, line {line}: expected {len(header)} fields, got {len(row)}: {row}")
        values = {column: row[index[column]].strip() for column in columns}
        empty = [column for column, value in values.items() if not value]
        if empty:
            raise ValueError(f"{csv_path}, line {line}: empty {', '.join(empty)}: {row}")
        path = Path(values["path"])
        if not path.is_absolute():
            path = csv_path.parent / path
        rows.append((path, values["label"], [values[column] for column in columns[2:]]))
    return rows


# --------------------------------------------------------------------------
# Checking that every photo can be read


def check_samples(
    samples: Sequence[Sample], preprocessing: Preprocessing
) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """Decode every photo with ``model.load_image``; return (readable samples, [(unreadable sample, reason)]).

    Both lists keep the input order. The reason is ``ImageRejected``'s message or the
    ``OSError`` met while reading the file.
    """

    def problem(sample: Sample) -> str | None:
        try:
            load_image(sample.path.read_bytes(), preprocessing)
        except ImageRejected as exc:
            return str(exc)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    with ThreadPoolExecutor(max_workers=_MAX_THREADS) as pool:
        problems = list(pool.map(problem, samples))
    good = [sample for sample, reason in zip(samples, problems) if reason is None]
    bad = [(sample, reason) for sample, reason in zip(samples, problems) if reason is not None]
    return good, bad


# --------------------------------------------------------------------------
# Splitting


def stratified_split(
    samples: Iterable[Sample], *, validation: float = 0.15, test: float = 0.15, seed: int = 0
) -> Split:
    """Cut each class into train / validation / test by the given fractions.

    The result depends only on the set of samples and `seed`, not on their order:
    each class's photos are sorted, then shuffled by a generator keyed by
    (`seed`, label), so adding a class leaves the others' split unchanged. A class
    with at least 3 photos gets at least one validation and one test photo (for a
    fraction above 0) and keeps at least one for training; a smaller class trains only.
    """
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise ValueError(f"validation ({validation}) and test ({test}) must be in [0, 1) and sum to less than 1")
    by_label: dict[str, list[Path]] = defaultdict(list)
    seen: dict[Path, str] = {}
    for sample in samples:
        if sample.path in seen:
            raise ValueError(f"{sample.path} is listed twice (labels {seen[sample.path]!r} and {sample.label!r})")
        seen[sample.path] = sample.label
        by_label[sample.label].append(sample.path)
    if not by_label:
        raise ValueError("no samples to split")

    parts: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        paths = sorted(by_label[label])
        rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
        order = rng.permutation(len(paths))
        n_val, n_test = _split_sizes(len(paths), validation, test)
        chosen = [paths[i] for i in order]
        parts["validation"] += [Sample(p, label) for p in chosen[:n_val]]
        parts["test"] += [Sample(p, label) for p in chosen[n_val : n_val + n_test]]
        parts["train"] += [Sample(p, label) for p in chosen[n_val + n_test :]]
    for name in SPLITS:
        parts[name].sort(key=lambda s: (s.label, s.path))
    labels = tuple(sorted(by_label))
    return Split(**parts, labels=labels, fingerprint=split_fingerprint(parts))


def _split_sizes(n: int, validation: float, test: float) -> tuple[int, int]:
    if n < 3:
        return 0, 0
    n_val = max(1, round(n * validation)) if validation > 0 else 0
    n_test = max(1, round(n * test)) if test > 0 else 0
    while n_val + n_test > n - 1:  # keep one photo to train on, taking from the larger hold-out
        if n_val > n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def split_fingerprint(parts: dict[str, list[Sample]]) -> str:
    """SHA-256 over sorted (relative path, label, split, size, content SHA-256) rows; reads every file."""
    entries = [(sample, name) for name in SPLITS for sample in parts.get(name, [])]
    if not entries:
        return hashlib.sha256(b"").hexdigest()
    root = os.path.commonpath([str(sample.path.parent) for sample, _ in entries])
    with ThreadPoolExecutor(max_workers=_MAX_THREADS) as pool:
        contents = list(pool.map(_size_and_digest, [sample.path for sample, _ in entries]))
    rows = sorted(
        json.dumps([Path(os.path.relpath(sample.path, root)).as_posix(), sample.label, name, size, digest])
        for (sample, name), (size, digest) in zip(entries, contents)
    )
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _size_and_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# --------------------------------------------------------------------------
# Saving and loading a split


def save_split(split: Split, path: Path) -> None:
    """Write `split` as a ``path,label,split`` CSV with a first comment line of JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": _SPLIT_FORMAT, "fingerprint": split.fingerprint, "labels": list(split.labels)}
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        handle.write("# " + json.dumps(meta, ensure_ascii=False) + "\n")
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        for name, samples in split.parts().items():
            for sample in samples:
                writer.writerow([_relative_to(sample.path, path.parent), sample.label, name])
    tmp.replace(path)  # a crash mid-write never leaves half a split behind


def _relative_to(file: Path, folder: Path) -> str:
    try:
        return Path(os.path.relpath(file.resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive, on Windows
        return str(file.resolve())


def load_split(path: Path) -> Split:
    """Read a split written by :func:`save_split`, checking it against the photos on disk.

    Raises ``SplitChanged`` when the files no longer give the saved fingerprint
    (or one is missing), and ``ValueError`` for a file that is not a split.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        first = handle.readline()
        meta = _parse_meta(path, first)
        rows = _read_rows(path, _skip_comments([first, *handle]), ("path", "label", "split"))
    parts: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for file, label, (name,) in rows:
        if name not in parts:
            raise ValueError(f"{path}: unknown split {name!r} for {file}; expected one of {SPLITS}")
        parts[name].append(Sample(file, label))
    labels = tuple(meta["labels"])
    unknown = {s.label for samples in parts.values() for s in samples} - set(labels)
    if unknown:
        raise ValueError(f"{path}: labels {sorted(unknown)} are not in the header's labels")
    try:
        fingerprint = split_fingerprint(parts)
    except OSError as exc:
        raise SplitChanged(f"{path}: a photo of the split cannot be read any more ({exc})") from exc
    if fingerprint != meta["fingerprint"]:
        raise SplitChanged(
            f"{path}: the photos changed since this split was saved (fingerprint {fingerprint[:12]}... "
            f"instead of {meta['fingerprint'][:12]}...); make a new split, or restore the data"
        )
    return Split(**parts, labels=labels, fingerprint=fingerprint)


def _parse_meta(path: Path, first_line: str) -> dict[str, Any]:
    try:
        if not first_line.startswith("#"):
            raise ValueError("no metadata line")
        meta = json.loads(first_line[1:])
        if meta.get("format") != _SPLIT_FORMAT or not isinstance(meta.get("fingerprint"), str):
            raise ValueError(f"format {meta.get('format')!r}")
        if not isinstance(meta.get("labels"), list):
            raise ValueError("no labels")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: not a split file written by save_split ({exc})") from exc
    return meta


# --------------------------------------------------------------------------
# tf.data


def make_tf_dataset(
    samples: Sequence[Sample],
    labels: Sequence[str],
    preprocessing: Preprocessing,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool | str = False,
) -> tf.data.Dataset:
    """A ``tf.data`` pipeline of ``(uint8 images (N, S, S, 3), int32 label indices (N,))`` batches.

    Each file is read with ``tf.io.read_file`` and decoded by ``model.load_image`` (the
    worker's function) in parallel. `labels` gives each label's index. `cache` keeps the
    decoded images in memory (``True``) or in files with that prefix (a ``str``). With
    `shuffle`, the order changes every epoch (reproducibly for `seed`): the list of files is
    shuffled before decoding, or, when cached, the decoded images through a buffer of at
    most 2,048. Run :func:`check_samples` first: an unreadable photo stops the iteration.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if not samples:
        raise ValueError("no samples")
    index = {label: i for i, label in enumerate(labels)}
    missing = sorted({s.label for s in samples} - set(index))
    if missing:
        raise ValueError(f"labels {missing} are not in the list of labels")
    size = preprocessing.image_size

    def decode(data: bytes) -> np.ndarray:
        return load_image(bytes(data), preprocessing)

    def read(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.numpy_function(decode, [tf.io.read_file(path)], tf.uint8, stateful=False)
        image.set_shape((size, size, 3))
        return image, label

    paths = [str(s.path) for s in samples]
    indices = np.array([index[s.label] for s in samples], dtype=np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((paths, indices))
    if shuffle and cache is False:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(read, num_parallel_calls=tf.data.AUTOTUNE)
    if cache is not False:
        dataset = dataset.cache("" if cache is True else str(cache))
        if shuffle:
            dataset = dataset.shuffle(min(len(paths), 2048), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_fixed_parallelism())


def _fixed_parallelism() -> tf.data.Options:
    """Options that turn tf.data's autotuner off: AUTOTUNE maps then run one call per core.

    The autotuner starts a map at low parallelism and raises it as it learns. On 2 cores it
    often left the decoding map serial for a whole 600-photo epoch, so the same epoch took
    either 0.65 or 1.3 s from one run to the next; with a fixed call per core it is steady.
    Decoding is CPU work in Pillow (it releases the GIL), so one call per core is right.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options
