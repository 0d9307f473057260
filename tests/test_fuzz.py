"""Mutated pictures through `model.load_image`, driven by Hypothesis: no crash, no hang, bounded memory.

Each example is a valid seed picture (every accepted format, with EXIF rotation,
alpha, palettes, 16-bit and float samples, animation) with a few mutations that
Hypothesis chooses and shrinks. `bench.fuzz.check` holds the promises: the
result is a `(32, 32, 3)` uint8 array or an `ImageRejected`, the call ends in time,
and the address space may not grow past a bound derived from the pixel limit
(RLIMIT_AS makes a runaway allocation fail at once). The pixel limit is lowered
to 4 megapixels so the bound is tight (192 MB); serving's 50 megapixels are what
`python -m bench fuzz --seconds N` runs with, for as long as one likes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import bench.fuzz as fuzz
from bench.fuzz import OPS, FuzzFailure, check, memory_bound, mutate, seed_pictures, watchdog
from model import Preprocessing

PREPROCESSING = Preprocessing(image_size=32, max_pixels=4_000_000)
SEEDS = sorted(seed_pictures())

# Headers (sizes, lengths, offsets) live in the first bytes: half the mutations land there.
positions = st.one_of(st.integers(0, 63), st.integers(0, 1 << 16))
mutations = st.lists(
    st.tuples(st.integers(0, len(OPS) - 1), positions, st.integers(0, 1 << 16)), min_size=1, max_size=8
)


def test_every_seed_is_a_valid_picture() -> None:
    """The mutations start from pictures the decoder accepts, so they reach deep into each decoder."""
    assert {name.split("-")[0] for name in SEEDS} == {"jpeg", "png", "gif", "webp", "bmp", "tiff"}
    for name in SEEDS:
        assert check(seed_pictures()[name], PREPROCESSING).outcome == "accepted", name


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the damaged EXIF/TIFF tags it skips
@settings(max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), changes=mutations)
def test_mutated_pictures_are_decoded_or_refused_in_bounded_time_and_memory(seed: str, changes: list) -> None:
    data = mutate(seed_pictures()[seed], changes)
    with watchdog(120):  # a hang inside C code ends the run with every thread's stack
        verdict = check(data, PREPROCESSING, time_limit_s=5.0)
    assert verdict.outcome == "accepted" or verdict.outcome.startswith("rejected:")
    assert verdict.peak_rss_growth_bytes <= memory_bound(PREPROCESSING)


def test_mutations_change_the_bytes_and_reach_every_outcome() -> None:
    """The fuzzer is not a no-op: across a few mutations of the seeds, pictures are accepted and refused."""
    outcomes = set()
    for index, name in enumerate(SEEDS * 20):
        changed = mutate(seed_pictures()[name], [(index % len(OPS), index * 7919, index * 31)])
        outcomes.add(check(changed, PREPROCESSING).outcome)
    assert "accepted" in outcomes and "rejected:not_an_image" in outcomes and "rejected:truncated" in outcomes


def test_the_checker_fails_on_a_wrong_exception_or_too_much_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The promises are checked for real: a decoder that raises something else, or uses too much memory, fails."""

    def broken(data: bytes, preprocessing: Preprocessing) -> None:
        raise KeyError("a bug in a decoder")

    monkeypatch.setattr(fuzz, "load_image", broken)
    with pytest.raises(FuzzFailure, match="KeyError"):
        check(b"anything", PREPROCESSING)
    monkeypatch.undo()

    # 4 megapixels of float samples need far more than 1 MB: with that bound the allocation itself fails.
    monkeypatch.setattr(fuzz, "BYTES_PER_PIXEL_BOUND", 0)
    monkeypatch.setattr(fuzz, "SLACK_BYTES", 2**20)
    buffer = io.BytesIO()
    Image.fromarray(np.ones((2000, 2000), dtype=np.float32)).save(buffer, format="TIFF")
    with pytest.raises(FuzzFailure, match="MB"):
        check(buffer.getvalue(), PREPROCESSING)


def test_a_big_float_tiff_costs_a_few_bytes_a_pixel_not_float64_copies() -> None:
    # 16 megapixels of float samples in a small, compressible file: what the fuzzer found, made bigger.
    pixels = np.tile(np.linspace(-3.0, 40.0, 1024, dtype=np.float32), (16384, 1))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "TIFF", compression="tiff_adobe_deflate")
    assert len(buffer.getvalue()) < Preprocessing().max_bytes // 4

    verdict = check(buffer.getvalue(), Preprocessing())

    assert verdict.outcome == "accepted"
    # Decoded, exported by Pillow, as float32, as bytes: about 17 a pixel here; float64 copies cost 35.
    assert verdict.peak_rss_growth_bytes < 22 * pixels.size, verdict.peak_rss_growth_bytes / pixels.size
