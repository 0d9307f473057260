"""The model registry: a folder of artefact versions and the one file that names the active one.

Layout under ``root``::

    root/<version>/   one artefact per version (see _artefact)
    root/ACTIVE       the active version's name on its first line; workers poll it and reload when it
                      changes. A second line, ``previous <name>``, names the version that was active
                      before, for a rollback.

Every change is a rename, so a worker reading the registry at any moment sees either the
old state or the new one. The active and the previous version are one file, written by one
rename: a crash can never leave them out of step (older registries kept the previous version
in a file ``PREVIOUS`` of its own; it is still read until the next activation). Changes that
read the state first (activate, roll back, discard) take an exclusive lock on the registry
folder, so two of them, in any processes on this host, never interleave. Nothing here
imports TensorFlow.
"""

from __future__ import annotations

import fcntl
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
LEGACY_PREVIOUS_FILE = "PREVIOUS"  # registries written before ACTIVE carried the previous version
_PREVIOUS_PREFIX = "previous "


class RegistryConflict(RuntimeError):
    """The registry is not in the state a change expected (another change came first); nothing was changed."""


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
        return self._pointers()[0]

    def previous_version(self) -> str | None:
        return self._pointers()[1]

    def active(self, *, verify: bool = True) -> Artefact | None:
        """The active artefact, or None if none was activated.

        Raises ArtefactCorrupt (or FileNotFoundError) if the active version cannot be read:
        a caller serving the old model should keep it rather than serve nothing.
        """
        version = self.active_version()
        if version is None:
            return None
        return read_artefact(self.path_for(version), verify=verify)

    def activate(self, version: str, *, expect_active: str | None | object = ...) -> None:
        """Make `version` the active one, after checking it is complete and unaltered.

        With `expect_active`, only if that is still the active version (None: none is): otherwise
        `RegistryConflict`, and nothing changes. The check and the change hold the registry's lock.
        """
        with self.lock():
            current, previous = self._pointers()
            if expect_active is not ... and current != expect_active:
                raise RegistryConflict(f"the active version is {current!r}, not {expect_active!r}")
            self._activate_locked(version, current, previous)

    def rollback(self) -> str:
        """Activate the previously active version again and return its name."""
        with self.lock():
            current, previous = self._pointers()
            if previous is None:
                raise LookupError("no previous model version to roll back to")
            self._activate_locked(previous, current, None)
            return previous

    def discard(self, version: str) -> bool:
        """Delete the inactive version `version`; False (nothing deleted) if it is active, or the previous one.

        Under the registry's lock: a promotion of the same version cannot slip in between the check and the delete.
        """
        path = self.path_for(version)
        with self.lock():
            if version in self._pointers():
                return False
            shutil.rmtree(path, ignore_errors=True)
            return True

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the registry's exclusive lock (an advisory lock on its folder, released if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _activate_locked(self, version: str, current: str | None, previous: str | None) -> None:
        artefact = read_artefact(self.path_for(version), verify=True)
        if artefact.version != version:
            raise ArtefactCorrupt(f"{artefact.path} holds version {artefact.version!r}, not {version!r}")
        if current is not None and current != version:
            previous = current  # re-activating the active version keeps its previous one
        text = version + "\n" + (f"{_PREVIOUS_PREFIX}{previous}\n" if previous is not None else "")
        write_text_atomic(self.root / ACTIVE_FILE, text)  # both names in one rename
        (self.root / LEGACY_PREVIOUS_FILE).unlink(missing_ok=True)  # now superseded by ACTIVE's second line
        log.info("model version %s is now active (was %s)", version, current)

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
            with self.lock():  # not while a discard of the same name is deleting it
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

    def _pointers(self) -> tuple[str | None, str | None]:
        """(active, previous) as ACTIVE says them; a name that is not a valid version name reads as None."""
        try:
            lines = (self.root / ACTIVE_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return None, None
        active = self._valid(lines[0].strip() if lines else "", ACTIVE_FILE)
        previous_lines = [line.strip() for line in lines[1:] if line.startswith(_PREVIOUS_PREFIX)]
        if previous_lines:
            previous = self._valid(previous_lines[0].removeprefix(_PREVIOUS_PREFIX).strip(), ACTIVE_FILE)
        else:
            try:
                legacy = (self.root / LEGACY_PREVIOUS_FILE).read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                legacy = ""
            previous = self._valid(legacy, LEGACY_PREVIOUS_FILE)
        return active, previous if previous != active else None

    def _valid(self, text: str, source: str) -> str | None:
        if not text:
            return None
        try:
            return check_version_name(text)
        except ValueError:
            log.warning("ignoring %s: it does not hold a valid version name", self.root / source)
            return None
