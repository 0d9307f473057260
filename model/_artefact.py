"""The on-disk model artefact: one directory per version, readable without TensorFlow.

A version directory holds:

- ``model.weights.h5``: the Keras weights (``Model.save_weights``);
- ``labels.json``: the class labels, a JSON list of strings, in output order;
- ``model.json``: how to rebuild the network and what it was trained on (see `write_metadata`);
- ``ood.npz`` (optional): the fitted out-of-distribution score (see ``_ood``), whose threshold
  and calibration ``model.json`` records under ``"ood"``;
- ``checksum.sha256``: ``sha256sum``-style lines for the files above, written last,
  so that a half-written or tampered artefact is never served.

Bots and ``carbot status`` read artefacts through this module; building and loading the
Keras model lives in ``_saving``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ._ood import OOD_FILE
from ._preprocess import Preprocessing

FORMAT = 1
WEIGHTS_FILE = "model.weights.h5"
LABELS_FILE = "labels.json"
META_FILE = "model.json"
CHECKSUM_FILE = "checksum.sha256"
CHECKED_FILES = (WEIGHTS_FILE, LABELS_FILE, META_FILE)
# Files an artefact may have; when present they are checksummed like the others.
OPTIONAL_FILES = (OOD_FILE,)

# A version name is also a directory name: no separators, no leading dot, no "..".
_VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ArtefactCorrupt(Exception):
    """An artefact directory that is incomplete, altered, or not in a format this code reads."""


@dataclass(frozen=True)
class Artefact:
    """A model version on disk, as described by its ``labels.json`` and ``model.json``."""

    path: Path
    version: str
    labels: tuple[str, ...]
    meta: dict[str, Any]

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.meta.get("metrics") or {})

    @property
    def ood(self) -> dict[str, Any] | None:
        """The out-of-distribution score's threshold and calibration, or None for a version without one."""
        ood = self.meta.get("ood")
        return dict(ood) if isinstance(ood, dict) else None

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.meta["created"])

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE


def check_version_name(version: str) -> str:
    """Return `version` if it is a safe version name, else raise ValueError."""
    if not isinstance(version, str) or not _VERSION_PATTERN.fullmatch(version):
        raise ValueError(
            f"invalid version name {version!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return version


def read_artefact(directory: Path, *, verify: bool = True) -> Artefact:
    """Read the artefact in `directory`; with `verify`, check every file against its checksum first.

    Raises FileNotFoundError if `directory` does not exist and ArtefactCorrupt if it is not
    a complete, unaltered artefact of a format this code reads.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no artefact directory at {directory}")
    if verify:
        verify_checksums(directory)
    labels = _read_labels(directory)
    meta = _read_meta(directory)
    if meta.get("ood") is not None and not (directory / OOD_FILE).is_file():
        raise ArtefactCorrupt(f"{directory / META_FILE} describes an out-of-distribution score; {OOD_FILE} is missing")
    if meta["num_classes"] != len(labels):
        raise ArtefactCorrupt(
            f"{directory / META_FILE} says {meta['num_classes']} classes but {LABELS_FILE} has {len(labels)} labels"
        )
    return Artefact(path=directory, version=meta["version"], labels=labels, meta=meta)


def verify_checksums(directory: Path) -> None:
    """Raise ArtefactCorrupt naming the first file that is missing or does not match its checksum."""
    expected = _read_checksums(directory)
    # An optional file counts once it is listed or present: dropping one in, or deleting a listed one, is an alteration.
    optional = tuple(name for name in OPTIONAL_FILES if name in expected or (directory / name).exists())
    for name in CHECKED_FILES + optional:
        if name not in expected:
            raise ArtefactCorrupt(f"{directory / CHECKSUM_FILE} does not cover {name}")
        path = directory / name
        if not path.is_file():
            raise ArtefactCorrupt(f"{path} is missing")
        if sha256_of(path) != expected[name]:
            raise ArtefactCorrupt(f"{path} does not match its checksum")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def write_labels(directory: Path, labels: Sequence[str]) -> None:
    _write_json(Path(directory) / LABELS_FILE, list(labels))


def write_metadata(directory: Path, meta: dict[str, Any]) -> None:
    _write_json(Path(directory) / META_FILE, meta)


def write_checksums(directory: Path) -> None:
    """Write ``checksum.sha256`` for the other files; call it last, once they are complete."""
    directory = Path(directory)
    names = CHECKED_FILES + tuple(name for name in OPTIONAL_FILES if (directory / name).is_file())
    lines = [f"{sha256_of(directory / name)}  {name}\n" for name in names]
    write_text_atomic(directory / CHECKSUM_FILE, "".join(lines))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old content or the new, never a part."""
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _read_checksums(directory: Path) -> dict[str, str]:
    path = directory / CHECKSUM_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtefactCorrupt(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtefactCorrupt(f"{path} cannot be read: {exc}") from exc
    checksums = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        # sha256sum writes "<hex>  <name>", or "<hex> *<name>" in binary mode.
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if match is None:
            raise ArtefactCorrupt(f"{path} has a malformed line: {line!r}")
        checksums[match.group(2)] = match.group(1).lower()
    return checksums


def _read_labels(directory: Path) -> tuple[str, ...]:
    labels = _read_json(directory / LABELS_FILE)
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ArtefactCorrupt(f"{directory / LABELS_FILE} is not a JSON list of strings")
    if len(set(labels)) != len(labels):
        raise ArtefactCorrupt(f"{directory / LABELS_FILE} has duplicate labels")
    return tuple(labels)


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise ArtefactCorrupt(f"{path} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise ArtefactCorrupt(f"{path} has format {meta.get('format')!r}; this code reads format {FORMAT}")
    required = ("version", "backbone", "num_classes", "image_size", "preprocessing", "created")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ArtefactCorrupt(f"{path} lacks {', '.join(missing)}")
    try:
        check_version_name(meta["version"])
        Preprocessing.from_dict(meta["preprocessing"])
        datetime.fromisoformat(meta["created"])
    except (TypeError, ValueError) as exc:
        raise ArtefactCorrupt(f"{path} is invalid: {exc}") from exc
    return meta


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtefactCorrupt(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtefactCorrupt(f"{path} cannot be read: {exc}") from exc


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=_plain) + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    # Metrics often arrive as NumPy scalars or arrays, which json cannot write.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
