"""Photos kept for retraining: content-addressed files on disk, forgotten after the retention period.

A photo's name is the SHA-256 of its bytes, so the same photo sent twice is
stored once, and the name in a `Prediction` row finds it again. Files live at
`<root>/ab/cd/<sha>.img` (two fan-out levels keep directories small). The
retention clock runs from a photo's last use: storing it again refreshes it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path

logger = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DAY_S = 86400
_SUFFIX = ".img"
_TEMP_SUFFIX = ".tmp"
# A temporary file this old was left by a process that died mid-write.
_STALE_TEMP_S = 3600


def photo_name(data: bytes) -> str:
    """The name a photo is stored and recorded under, everywhere: the SHA-256 of its bytes, in hex."""
    return hashlib.sha256(data).hexdigest()


class PhotoStoreError(OSError):
    """A photo could not be written (disk full, permissions...). The caller can carry on without it."""


class PhotoStore:
    """Content-addressed photo files under `root`, kept `retention_days` after their last use (0: none kept)."""

    def __init__(self, root: Path, retention_days: int) -> None:
        if retention_days < 0:
            raise ValueError("retention_days must be 0 or more")
        self.root = Path(root)
        self.retention_days = retention_days

    def put(self, data: bytes) -> str:
        """Store `data` and return its SHA-256 (hex). With retention 0 nothing is written, the name is still returned.

        Raises `PhotoStoreError` when the disk refuses the write.
        """
        sha = photo_name(data)
        if self.retention_days == 0:
            return sha
        target = self.path(sha)
        try:
            if not self._touch(target):
                _write_atomically(target, data)
        except OSError as exc:
            message = f"could not store photo {sha[:12]} under {self.root}: {exc.strerror or exc}"
            raise (PhotoStoreError(exc.errno, message) if exc.errno else PhotoStoreError(message)) from exc
        return sha

    def path(self, sha: str) -> Path:
        """Where the photo named `sha` lives. Anything but 64 lowercase hex digits is refused (no path tricks)."""
        if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
            raise ValueError(f"not a SHA-256 hex digest: {sha!r}")
        return self.root / sha[:2] / sha[2:4] / f"{sha}{_SUFFIX}"

    def get(self, sha: str) -> bytes | None:
        """The photo's bytes, or None when it is not stored (never kept, expired, forgotten or damaged)."""
        try:
            data = self.path(sha).read_bytes()
        except FileNotFoundError:
            return None
        if photo_name(data) != sha:
            # A damaged file must not end up in a training set under the wrong label.
            logger.warning("Photo %s is damaged on disk; ignoring it", sha[:12])
            return None
        return data

    def delete(self, sha: str) -> bool:
        """Remove the photo; True if there was one."""
        try:
            self.path(sha).unlink()
        except FileNotFoundError:
            return False
        return True

    def purge_expired(self, now: datetime | None = None) -> int:
        """Delete photos unused for longer than the retention period; returns how many were deleted."""
        now_s = now.timestamp() if now is not None else time.time()
        # Retention 0 keeps nothing, even a photo written this very second.
        cutoff = math.inf if self.retention_days == 0 else now_s - self.retention_days * _DAY_S
        deleted = 0
        for path in self.root.glob(f"*/*/*{_SUFFIX}"):
            if _remove_if_older(path, cutoff):
                deleted += 1
        for path in self.root.glob(f"*/*/.*{_TEMP_SUFFIX}"):
            _remove_if_older(path, now_s - _STALE_TEMP_S)
        if deleted:
            logger.info("Deleted %d photo(s) past the %d-day retention", deleted, self.retention_days)
        return deleted

    @staticmethod
    def _touch(target: Path) -> bool:
        """Refresh an existing photo's mtime so its retention restarts; False when it is not there."""
        try:
            os.utime(target)
        except FileNotFoundError:
            return False
        return True


def _write_atomically(target: Path, data: bytes) -> None:
    # Readers see either no file or the whole photo: write a temporary file beside it, then rename.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            # Without it a crash soon after the rename can leave an empty file under the photo's name.
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _remove_if_older(path: Path, cutoff_s: float) -> bool:
    try:
        if path.stat().st_mtime >= cutoff_s:
            return False
        path.unlink()
    except FileNotFoundError:  # deleted meanwhile by someone else
        return False
    return True
