"""Matching what a person typed against the model's label set.

People type "fiat argo", "Fiat  Argo", "FÍAT ARGO" or "fiat agro"; all of them
mean `FIAT ARGO`. Matching ignores case, accents, punctuation and spacing, and
tolerates small typos.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Sequence

# How similar (0..1, difflib's ratio) a typed name must be to count as a candidate.
_CUTOFF = 0.75


def normalise(name: str) -> str:
    """Lower case, no accents, words separated by single spaces."""
    decomposed = unicodedata.normalize("NFKD", name)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(re.sub(r"[^0-9a-z]+", " ", plain.casefold()).split())


def match_label(typed: str, labels: Sequence[str], *, limit: int = 3) -> tuple[str | None, list[str]]:
    """(the label `typed` names exactly, or None; and up to `limit` close candidates, best first)."""
    wanted = normalise(typed)
    if not wanted:
        return None, []
    by_form: dict[str, str] = {}
    for label in labels:
        by_form.setdefault(normalise(label), label)
        by_form.setdefault(normalise(label).replace(" ", ""), label)
    for form in (wanted, wanted.replace(" ", "")):
        if form in by_form:
            return by_form[form], []
    close = difflib.get_close_matches(wanted, list(by_form), n=limit * 2, cutoff=_CUTOFF)
    candidates = list(dict.fromkeys(by_form[form] for form in close))[:limit]
    return None, candidates
