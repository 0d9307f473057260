"""Feedback photos for retraining: which votes enter a retrain, with what weight, and the fixed hold-out.

A public bot cannot trust its annotators the way a labelling tool does: one person, or a
handful, must not be able to steer a retrain. :func:`choose_feedback` decides what enters:

- **per-person caps**: of each person's labelled votes, only their latest
  ``photos_per_person`` enter a retrain, and of those at most ``corrections_per_person``
  corrections (a 👎 naming another label). 200 corrections from one account are 25 at most;
- **trust**: each person's votes are weighted by how far they agree with other people
  (the label most others gave the same photo) and with the model's confident answers
  (top-1 probability at least ``confident``): ``trust = (agreements + 1) / (checks + 2)``,
  0.5 for someone with no record either way. Whoever's trust is under ``min_trust`` is left
  out; above it a person counts ``min(1, trust / 0.5)`` of a vote;
- **per photo**: the label with the most weighted support wins, and the photo's weight is
  that support minus everyone else's (at most 1): a photo people disagree on weighs
  little, and one under ``min_weight`` is left out. The retrain repeats a photo in
  proportion to its weight;
- **more than one voice**: a label that only corrections gave a photo enters only when at
  least ``min_correctors`` people corrected photos to that label: one account alone cannot
  teach the model that photos are of a class.

What was left out, and why, is counted for the run's record. This module is light on
purpose (standard library only): the retrain job's parent process and the bots import it
without TensorFlow. The retraining itself is :func:`training.retrain` (``training._fine_tune``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
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
    weight: float = 1.0  # in (0, 1]: how far people agree on it and are trusted (see choose_feedback)


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


# -- which votes enter a retrain ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vote:
    """One person's labelled verdict on one photo, as the feedback table and its prediction say it."""

    person: int  # who (people.id)
    sha256: str  # the photo
    label: str  # the label they gave: the predicted one for a 👍, theirs for a correction
    correction: bool  # a 👎 naming another label
    model_label: str | None  # the prediction's top-1
    model_probability: float  # its probability
    updated: datetime


@dataclass(frozen=True)
class FeedbackPolicy:
    """The limits :func:`choose_feedback` applies (see the module's docstring)."""

    photos_per_person: int = 100
    corrections_per_person: int = 25
    confident: float = 0.9  # a prediction this sure is evidence against whoever contradicts it
    min_trust: float = 0.2
    min_weight: float = 0.25
    min_correctors: int = 2  # a label is taught by corrections only when this many people corrected to it

    def __post_init__(self) -> None:
        if self.photos_per_person < 1 or self.corrections_per_person < 0:
            raise ValueError("photos_per_person must be at least 1 and corrections_per_person at least 0")


@dataclass(frozen=True)
class ChosenPhoto:
    """A photo that enters the retrain: its hash, the label it trains with, and its weight in (0, 1]."""

    sha256: str
    label: str
    weight: float


_NEUTRAL_TRUST = 0.5  # the trust of someone with no record: a full vote


def choose_feedback(
    votes: Iterable[Vote], policy: FeedbackPolicy | None = None
) -> tuple[list[ChosenPhoto], dict[str, int]]:
    """The photos that enter a retrain, each with its label and weight, sorted by hash; and what was left out.

    Counts (of votes unless said): ``feedback_capped`` (over a person's caps), ``feedback_untrusted``
    (by a person whose trust is under ``min_trust``), ``feedback_low_weight`` (photos, whose winning
    label's support minus the others' stays under ``min_weight``), ``feedback_single_source``
    (photos whose label only corrections gave, and fewer than ``min_correctors`` people corrected any
    photo to that label), ``feedback_people`` (people whose votes were read), ``feedback_people_untrusted``.
    """
    policy = policy or FeedbackPolicy()
    votes = _latest_per_person_and_photo(votes)
    trust = person_trust(votes, policy.confident)
    counts = {"feedback_capped": 0, "feedback_untrusted": 0, "feedback_low_weight": 0, "feedback_single_source": 0,
              "feedback_people": len(trust),
              "feedback_people_untrusted": sum(value < policy.min_trust for value in trust.values())}  # fmt: skip

    by_person: dict[int, list[Vote]] = {}
    for vote in votes:
        by_person.setdefault(vote.person, []).append(vote)
    support: dict[str, Counter[str]] = {}
    latest: dict[tuple[str, str], datetime] = {}
    corrected: set[tuple[str, str]] = set()  # (photo, label) that some correction gave
    correctors: dict[str, set[int]] = {}  # label -> the people whose corrections entered with it
    for person, theirs in by_person.items():
        if trust[person] < policy.min_trust:
            counts["feedback_untrusted"] += len(theirs)
            continue
        weight = min(1.0, trust[person] / _NEUTRAL_TRUST)
        corrections = 0
        # Their latest votes first: what they said last is what the caps keep.
        for rank, vote in enumerate(sorted(theirs, key=lambda v: (v.updated, v.sha256), reverse=True)):
            if rank >= policy.photos_per_person or (vote.correction and corrections >= policy.corrections_per_person):
                counts["feedback_capped"] += 1
                continue
            corrections += vote.correction
            if vote.correction:
                corrected.add((vote.sha256, vote.label))
                correctors.setdefault(vote.label, set()).add(person)
            support.setdefault(vote.sha256, Counter())[vote.label] += weight
            key = (vote.sha256, vote.label)
            latest[key] = max(vote.updated, latest.get(key, vote.updated))

    chosen = []
    for sha, labels in support.items():
        # The best supported label; on a tie the one given last (the photo then weighs nothing, see below).
        label = max(labels, key=lambda name: (labels[name], latest[sha, name]))
        weight = min(1.0, labels[label] - (sum(labels.values()) - labels[label]))
        if weight < policy.min_weight:
            counts["feedback_low_weight"] += 1
            continue
        if (sha, label) in corrected and len(correctors[label]) < policy.min_correctors:
            # Only one account says photos are of this class: that is not enough to teach it.
            counts["feedback_single_source"] += 1
            continue
        chosen.append(ChosenPhoto(sha, label, round(weight, 4)))
    return sorted(chosen, key=lambda photo: photo.sha256), counts


def person_trust(votes: Iterable[Vote], confident: float = 0.9) -> dict[int, float]:
    """Each person's trust in [0, 1]: ``(agreements + 1) / (checks + 2)`` over two kinds of check.

    A vote is checked against the model when its prediction was confident (top-1 probability at
    least `confident`): it agrees when it gives the top-1 label. It is checked against the other
    people who labelled the same photo when they have a single most given label: it agrees when
    it is that label.
    """
    votes = _latest_per_person_and_photo(votes)
    by_photo: dict[str, list[Vote]] = {}
    for vote in votes:
        by_photo.setdefault(vote.sha256, []).append(vote)
    agreed: Counter[int] = Counter()
    checked: Counter[int] = Counter()
    for vote in votes:
        checked[vote.person] += 0  # everyone who voted has a trust, checked or not
        if vote.model_label is not None and vote.model_probability >= confident:
            checked[vote.person] += 1
            agreed[vote.person] += vote.label == vote.model_label
        others = Counter(other.label for other in by_photo[vote.sha256] if other.person != vote.person)
        ranked = others.most_common(2)
        if ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]):
            checked[vote.person] += 1
            agreed[vote.person] += vote.label == ranked[0][0]
    return {person: (agreed[person] + 1) / (checked[person] + 2) for person in checked}


def _latest_per_person_and_photo(votes: Iterable[Vote]) -> list[Vote]:
    # The same photo sent twice is two predictions: its sender's two votes on it are still one voice.
    latest: dict[tuple[int, str], Vote] = {}
    for vote in votes:
        key = (vote.person, vote.sha256)
        if key not in latest or vote.updated >= latest[key].updated:
            latest[key] = vote
    return list(latest.values())
