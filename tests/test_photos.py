"""The photo files kept for retraining: content addressing, safe names, atomic writes, retention."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from carbot.photos import PhotoStore, PhotoStoreError

DAY_S = 86400


@pytest.fixture
def photos(tmp_path: Path) -> PhotoStore:
    return PhotoStore(tmp_path / "photos", retention_days=30)


def age(path: Path, days: float) -> None:
    then = time.time() - days * DAY_S
    os.utime(path, (then, then))


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def test_a_photo_is_stored_under_its_sha256(photos: PhotoStore) -> None:
    sha = photos.put(b"jpeg bytes")

    assert sha == hashlib.sha256(b"jpeg bytes").hexdigest()
    assert photos.path(sha) == photos.root / sha[:2] / sha[2:4] / f"{sha}.img"
    assert files_under(photos.root) == [photos.path(sha)]
    assert photos.get(sha) == b"jpeg bytes"


def test_storing_again_writes_nothing_but_restarts_the_clock(photos: PhotoStore) -> None:
    sha = photos.put(b"same photo")
    age(photos.path(sha), 29)
    inode = photos.path(sha).stat().st_ino

    assert photos.put(b"same photo") == sha
    assert photos.path(sha).stat().st_ino == inode
    assert time.time() - photos.path(sha).stat().st_mtime < 60
    assert photos.purge_expired(datetime.now(UTC) + timedelta(days=29)) == 0


@pytest.mark.parametrize(
    "name",
    [
        "../" * 10 + "etc/passwd",
        "/etc/passwd",
        "ab/../" + "c" * 58,
        "A" * 64,  # hexdigest() is lowercase; anything else did not come from here
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "a" * 63 + "\n",
        "",
    ],
)
def test_names_that_are_not_a_sha256_are_refused(photos: PhotoStore, name: str) -> None:
    for method in (photos.path, photos.get, photos.delete):
        with pytest.raises(ValueError):
            method(name)


def test_missing_photos(photos: PhotoStore) -> None:
    absent = "0" * 64
    assert photos.get(absent) is None
    assert photos.delete(absent) is False


def test_delete(photos: PhotoStore) -> None:
    sha = photos.put(b"bye")
    assert photos.delete(sha) is True
    assert photos.get(sha) is None
    assert photos.delete(sha) is False


def test_a_damaged_file_is_not_served(photos: PhotoStore) -> None:
    sha = photos.put(b"original")
    photos.path(sha).write_bytes(b"truncat")
    assert photos.get(sha) is None


def test_purge_deletes_only_photos_past_retention(photos: PhotoStore) -> None:
    old, recent = photos.put(b"old"), photos.put(b"recent")
    age(photos.path(old), 31)
    age(photos.path(recent), 29)

    assert photos.purge_expired() == 1
    assert photos.get(old) is None and photos.get(recent) == b"recent"
    assert photos.purge_expired(datetime.now(UTC) + timedelta(days=2)) == 1
    assert files_under(photos.root) == []


def test_purge_clears_temporary_files_left_by_a_crash(photos: PhotoStore) -> None:
    sha = photos.put(b"kept")
    stale = photos.path(sha).parent / ".crashed.tmp"
    fresh = photos.path(sha).parent / ".writing-now.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    age(stale, 1)

    assert photos.purge_expired() == 0
    assert files_under(photos.root) == sorted([photos.path(sha), fresh])


def test_purge_of_an_empty_or_missing_folder(tmp_path: Path) -> None:
    assert PhotoStore(tmp_path / "never-created", retention_days=1).purge_expired() == 0


def test_retention_zero_keeps_nothing(tmp_path: Path) -> None:
    keeping = PhotoStore(tmp_path / "photos", retention_days=30)
    earlier = keeping.put(b"from before the setting changed")
    photos = PhotoStore(tmp_path / "photos", retention_days=0)

    sha = photos.put(b"a photo")
    assert sha == hashlib.sha256(b"a photo").hexdigest()
    assert photos.get(sha) is None
    assert photos.purge_expired() == 1
    assert keeping.get(earlier) is None


def test_negative_retention_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PhotoStore(tmp_path, retention_days=-1)


def test_a_full_disk_is_a_clear_error_and_leaves_no_debris(photos: PhotoStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(PhotoStoreError) as caught:
        photos.put(b"does not fit")

    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert "could not store photo" in str(caught.value)
    assert files_under(photos.root) == []


def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "photos"
    blocker.write_bytes(b"a file where the folder should be")
    with pytest.raises(PhotoStoreError):
        PhotoStore(blocker, retention_days=1).put(b"photo")
