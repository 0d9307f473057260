"""Typed model names are matched against the label set, whatever the case, accents, spacing or small typos."""

from __future__ import annotations

import pytest

from bots._labels import match_label, normalise

LABELS = ("FIAT ARGO", "VW GOL", "CHEVROLET ONIX", "HYUNDAI HB20", "CITROËN C3")


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("FIAT ARGO", "FIAT ARGO"),
        ("fiat argo", "FIAT ARGO"),
        ("  Fiat   Argo ", "FIAT ARGO"),
        ("fíat árgo", "FIAT ARGO"),
        ("vw-gol", "VW GOL"),
        ("vwgol", "VW GOL"),
        ("citroen c3", "CITROËN C3"),
        ("hyundai hb 20", "HYUNDAI HB20"),
    ],
)
def test_exact_matches_ignore_case_accents_punctuation_and_spacing(typed, expected):
    assert match_label(typed, LABELS) == (expected, [])


def test_small_typos_give_candidates_not_a_silent_guess():
    label, candidates = match_label("chevrolet onyx", LABELS)
    assert label is None
    assert candidates[0] == "CHEVROLET ONIX"


def test_unknown_names_match_nothing():
    assert match_label("tesla cybertruck", LABELS) == (None, [])
    assert match_label("   ", LABELS) == (None, [])


def test_normalise():
    assert normalise("  Citroën  C3! ") == "citroen c3"
