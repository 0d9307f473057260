"""Feedback photos for retraining, and the fixed slice of them that is never trained on.

This module is light on purpose (standard library only): the bots and the retrain job
build :class:`FeedbackPhoto` s and ask :func:`is_held_out` without importing TensorFlow.
The retraining itself is :func:`training.retrain` (``training._retrain``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# Mixed into the hash before it decides, so that the hold-out does not line up with any
# other use of the photo hash's leading digits (a photo store sharded by prefix, say).
_HOLDOUT_SALT = b"carbot-retrain-holdout/1:"


@dataclass(frozen=True)
class FeedbackPhoto:
    """One photo people gave a label to: 👍 kept the predicted label, a correction gave another one."""

    sha256: str  # the photo's SHA-256 (hex); decides whether it is held out
    path: Path  # where its bytes are on disk (the photo store)
    label: str  # the label people gave it; one the active model does not know is skipped and counted


def is_held_out(sha256: str, fraction: float = 0.2) -> bool:
    """Fixed hold-out slice: decided by the hash alone, so a photo held out once is held out in every retrain.

    The photo's hash, salted and hashed again, is read as a number ``u`` uniform in [0, 1);
    the photo is held out when ``u < fraction``. So about `fraction` of all photos are held
    out, the answer never changes for a photo, and raising `fraction` only adds photos to
    the hold-out (one held out at 0.2 stays held out at 0.3). Case and surrounding blanks
    of the hex digest do not matter.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], not {fraction}")
    digest = hashlib.sha256(_HOLDOUT_SALT + sha256.strip().lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
