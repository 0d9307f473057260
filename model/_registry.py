"""The model registry: a folder of artefact versions and the one file that names the active one.

Layout under ``root``::

    root/<version>/   one artefact per version (see _artefact)
    root/ACTIVE       the active version's name; workers poll it and reload when it changes
    root/PREVIOUS     the version that was active before, for a rollback

Every change is a rename, so a worker reading the registry at any moment sees either the
old state or the new one. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._artefact import Artefact, ArtefactCorrupt, check_version_name, read_artefact, write_text_atomic

log = logging.getLogger(__name__)

ACTIVE_FILE = "ACTIVE"
PREVIOUS_FILE = "PREVIOUS"


class ModelRegistry:
    """Versions of the model under `root`, and which one is active."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.root)!r})"

    def path_for(self, version: str) -> Path:
        return self.root / check_version_name(version)

    def exists(self, version: str) -> bool:
        return self.path_for(version).is_dir()

    def versions(self, *, verify: bool = True) -> list[Artefact]:
        """All readable versions, oldest first; corrupt ones are logged and left out."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                found.append(read_artefact(path, verify=verify))
            except (ArtefactCorrupt, OSError) as exc:
                log.warning("skipping model version %s: %s", path.name, exc)
        return sorted(found, key=lambda artefact: (artefact.created, artefact.version))

    def active_version(self) -> str | None:
        return self._read_pointer(ACTIVE_FILE)

    def previous_version(self) -> str | None:
        return self._read_pointer(PREVIOUS_FILE)

    def active(self, *, verify: bool = True) -> Artefact | None:
        """The active artefact, or None if none was activated.

        Raises ArtefactCorrupt (or FileNotFoundError) if the active version cannot be read:
        a caller serving the old model should keep it rather than serve nothing.
        """
        version = self.active_version()
        if version is None:
            return None
        return read_artefact(self.path_for(version), verify=verify)

    def activate(self, version: str) -> None:
        """Make `version` the active one, after checking it is complete and unaltered."""
        artefact = read_artefact(self.path_for(version), verify=True)
        if artefact.version != version:
            raise ArtefactCorrupt(f"{artefact.path} holds version {artefact.version!r}, not {version!r}")
        previous = self.active_version()
        if previous is not None and previous != version:
            write_text_atomic(self.root / PREVIOUS_FILE, previous + "\n")
        write_text_atomic(self.root / ACTIVE_FILE, version + "\n")
        log.info("model version %s is now active (was %s)", version, previous)

    def rollback(self) -> str:
        """Activate the previously active version again and return its name."""
        previous = self.previous_version()
        if previous is None:
            raise LookupError("no previous model version to roll back to")
        self.activate(previous)
        return previous

    @contextmanager
    def staging(self, version: str) -> Iterator[Path]:
        """Yield an empty directory to save the artefact of `version` into.

        On a clean exit the artefact is verified and moved into place, replacing a version
        of the same name; on an exception (or if it does not verify) it is deleted.
        """
        check_version_name(version)
        self.root.mkdir(parents=True, exist_ok=True)
        # Inside root, so the final move is a rename on one file system; the leading dot
        # keeps it out of versions().
        staged = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=self.root))
        try:
            yield staged
            artefact = read_artefact(staged, verify=True)
            if artefact.version != version:
                raise ArtefactCorrupt(f"staged artefact is version {artefact.version!r}, not {version!r}")
            os.chmod(staged, 0o755)  # mkdtemp makes it private to this user
            self._move_into_place(staged, version)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def _move_into_place(self, staged: Path, version: str) -> None:
        target = self.path_for(version)
        if not target.exists():
            os.rename(staged, target)
            return
        # POSIX cannot swap two directories in one rename: move the old one aside first.
        # A reader in the short gap between the renames finds no such version and retries.
        old = Path(tempfile.mkdtemp(prefix=f".old-{version}-", dir=self.root))
        os.rename(target, old / version)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(old / version, target)
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _read_pointer(self, name: str) -> str | None:
        try:
            text = (self.root / name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not text:
            return None
        try:
            return check_version_name(text)
        except ValueError:
            log.warning("ignoring %s: it does not hold a valid version name", self.root / name)
            return None
