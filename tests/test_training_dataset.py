"""Datasets: listing, checking, splitting once and for all, and the tf.data pipeline."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model import Preprocessing, load_image
from training import (
    SYNTHETIC_CLASSES,
    Sample,
    SplitChanged,
    check_samples,
    load_split,
    make_synthetic_dataset,
    make_tf_dataset,
    read_manifest,
    save_split,
    scan_folder,
    stratified_split,
)

PER_CLASS = 8
PREPROCESSING = Preprocessing(image_size=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("photos"), per_class=PER_CLASS, size=(64, 48), seed=3)


@pytest.fixture
def fresh_dataset(tmp_path: Path) -> Path:
    """A dataset this test may modify."""
    return make_synthetic_dataset(tmp_path / "photos", per_class=4, size=(64, 48), seed=5)


def test_scan_folder_finds_every_photo_with_its_label(dataset: Path) -> None:
    (dataset / "README.txt").write_text("not a class")
    (dataset / SYNTHETIC_CLASSES[0] / "notes.txt").write_text("not a photo")
    samples = scan_folder(dataset)
    assert len(samples) == PER_CLASS * len(SYNTHETIC_CLASSES)
    for label in SYNTHETIC_CLASSES:
        assert sorted(s.path for s in samples if s.label == label) == sorted((dataset / label).glob("*.jpg"))
    assert samples == sorted(samples, key=lambda s: (s.label, s.path))


def test_manifest_round_trip(dataset: Path, tmp_path: Path) -> None:
    samples = scan_folder(dataset)
    manifest = tmp_path / "manifest.csv"
    lines = ["path,label"]
    for i, sample in enumerate(samples):
        # Half relative to the CSV's folder, half absolute.
        lines.append(f"{Path('..') / sample.path.relative_to(dataset.parent) if i % 2 else sample.path},{sample.label}")
    manifest.write_text("\n".join(lines) + "\n")
    read = read_manifest(manifest)
    assert [(s.path.resolve(), s.label) for s in read] == [(s.path.resolve(), s.label) for s in samples]


def test_malformed_manifest_row_names_its_line(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\na.jpg,FIAT ARGO\nb.jpg,\n")
    with pytest.raises(ValueError, match="line 3"):
        read_manifest(manifest)
    manifest.write_text("file,class\na.jpg,FIAT ARGO\n")
    with pytest.raises(ValueError, match="path, label"):
        read_manifest(manifest)


def test_unreadable_photos_are_reported_and_skipped(fresh_dataset: Path) -> None:
    folder = fresh_dataset / SYNTHETIC_CLASSES[1]
    truncated = folder / "0000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-600])  # the header survives, the pixels do not
    (folder / "text.jpg").write_text("this is not a photo\n")
    (folder / "empty.png").write_bytes(b"")
    samples = scan_folder(fresh_dataset)
    samples.append(Sample(folder / "gone.jpg", SYNTHETIC_CLASSES[1]))

    good, bad = check_samples(samples, PREPROCESSING)

    reasons = {sample.path.name: reason for sample, reason in bad}
    assert set(reasons) == {"0000.jpg", "text.jpg", "empty.png", "gone.jpg"}
    assert "incomplete or damaged" in reasons["0000.jpg"]
    assert "not a picture" in reasons["text.jpg"]
    assert "empty" in reasons["empty.png"]
    assert "FileNotFoundError" in reasons["gone.jpg"]
    rejected = {sample.path for sample, _ in bad}
    assert good == [s for s in samples if s.path not in rejected]
    assert len(good) == 4 * len(SYNTHETIC_CLASSES) - 1


def test_split_is_deterministic_stratified_disjoint_and_complete(dataset: Path) -> None:
    samples = scan_folder(dataset)
    split = stratified_split(samples, seed=7)
    shuffled = samples[::-1]
    random.Random(1).shuffle(shuffled)
    assert stratified_split(shuffled, seed=7) == split
    assert stratified_split(samples, seed=7) == split
    assert stratified_split(samples, seed=8) != split

    assert split.labels == tuple(sorted(SYNTHETIC_CLASSES))
    parts = [split.train, split.validation, split.test]
    for part in parts:
        assert {s.label for s in part} == set(SYNTHETIC_CLASSES)
    paths = [s.path for part in parts for s in part]
    assert len(paths) == len(set(paths))  # disjoint
    assert set(paths) == {s.path for s in samples}  # complete
    for label in SYNTHETIC_CLASSES:  # 8 photos, 15 % each: 1 validation, 1 test, 6 train
        assert [sum(s.label == label for s in part) for part in parts] == [6, 1, 1]


def test_small_classes_and_bad_fractions() -> None:
    tiny = [Sample(Path(f"/x/{label}/{i}.jpg"), label) for label, n in (("A", 3), ("B", 2)) for i in range(n)]
    with pytest.raises(ValueError, match="sum to less than 1"):
        stratified_split(tiny, validation=0.5, test=0.5)
    with pytest.raises(ValueError, match="listed twice"):
        stratified_split([tiny[0], Sample(tiny[0].path, "B")])


def test_class_of_three_gets_one_of_each_and_class_of_two_trains(fresh_dataset: Path) -> None:
    samples = scan_folder(fresh_dataset)
    a, b = SYNTHETIC_CLASSES[:2]
    few = [s for s in samples if s.label == a][:3] + [s for s in samples if s.label == b][:2]
    split = stratified_split(few)
    assert [len(split.train), len(split.validation), len(split.test)] == [3, 1, 1]
    assert {s.label for s in split.validation} == {s.label for s in split.test} == {a}


def test_save_and_load_keep_the_split_and_its_fingerprint(dataset: Path, tmp_path: Path) -> None:
    split = stratified_split(scan_folder(dataset), seed=1)
    path = tmp_path / "splits" / "split.csv"
    save_split(split, path)
    assert path.read_text().splitlines()[1] == "path,label,split"
    loaded = load_split(path)
    assert loaded.fingerprint == split.fingerprint
    assert loaded.labels == split.labels
    for name in ("train", "validation", "test"):
        assert [(s.path.resolve(), s.label) for s in getattr(loaded, name)] == [
            (s.path.resolve(), s.label) for s in getattr(split, name)
        ]


def test_a_changed_photo_makes_load_split_fail(fresh_dataset: Path, tmp_path: Path) -> None:
    split = stratified_split(scan_folder(fresh_dataset))
    path = tmp_path / "split.csv"
    save_split(split, path)
    photo = split.test[0].path
    original = photo.read_bytes()
    photo.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(SplitChanged, match="changed"):
        load_split(path)
    photo.write_bytes(original)
    assert load_split(path).fingerprint == split.fingerprint
    photo.unlink()
    with pytest.raises(SplitChanged, match="cannot be read"):
        load_split(path)


def test_a_relabelled_row_makes_load_split_fail(fresh_dataset: Path, tmp_path: Path) -> None:
    split = stratified_split(scan_folder(fresh_dataset))
    path = tmp_path / "split.csv"
    save_split(split, path)
    lines = path.read_text().splitlines()
    row, part = lines[2].rsplit(",", 1)
    lines[2] = f"{row},{'test' if part == 'train' else 'train'}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SplitChanged):
        load_split(path)


def test_tf_dataset_yields_the_worker_preprocessing(dataset: Path) -> None:
    samples = scan_folder(dataset)[::3]  # 16 photos of every class
    labels = SYNTHETIC_CLASSES
    ds = make_tf_dataset(samples, labels, PREPROCESSING, batch_size=5)
    images, indices = [], []
    for batch_images, batch_labels in ds:
        assert batch_images.dtype.name == "uint8" and batch_labels.dtype.name == "int32"
        assert batch_images.shape[1:] == (32, 32, 3)
        images.append(batch_images.numpy())
        indices.append(batch_labels.numpy())
    assert [len(i) for i in indices] == [5, 5, 5, 1]
    expected = np.stack([load_image(s.path.read_bytes(), PREPROCESSING) for s in samples])
    np.testing.assert_array_equal(np.concatenate(images), expected)
    assert np.concatenate(indices).tolist() == [labels.index(s.label) for s in samples]
    # A fixed decoding call per core: the autotuner left decoding serial for whole epochs on 2 cores.
    assert ds.options().autotune.enabled is False


def test_tf_dataset_shuffles_reproducibly_and_caches(dataset: Path, tmp_path: Path) -> None:
    samples = scan_folder(dataset)[:12]
    labels = SYNTHETIC_CLASSES

    def epoch(ds: object) -> np.ndarray:
        return np.concatenate([images.numpy() for images, _ in ds])  # type: ignore[attr-defined]

    plain = epoch(make_tf_dataset(samples, labels, PREPROCESSING, batch_size=4))
    shuffled = make_tf_dataset(samples, labels, PREPROCESSING, batch_size=4, shuffle=True, seed=2)
    first = epoch(shuffled)
    assert not np.array_equal(first, plain)
    assert sorted(map(bytes, first)) == sorted(map(bytes, plain))  # the same images, in another order
    again = epoch(make_tf_dataset(samples, labels, PREPROCESSING, batch_size=4, shuffle=True, seed=2))
    np.testing.assert_array_equal(again, first)

    cached = make_tf_dataset(samples, labels, PREPROCESSING, batch_size=4, cache=str(tmp_path / "cache"))
    np.testing.assert_array_equal(epoch(cached), plain)
    np.testing.assert_array_equal(epoch(cached), plain)  # second epoch from the cache files
    assert list(tmp_path.glob("cache*"))
    with pytest.raises(ValueError, match="not in the list of labels"):
        make_tf_dataset(samples, labels[1:], PREPROCESSING)


def test_importing_the_datasets_does_not_import_tensorflow() -> None:
    code = (
        "import sys\n"
        "from training import scan_folder, stratified_split, load_split, make_tf_dataset\n"
        "sys.exit(1 if any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules) else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
