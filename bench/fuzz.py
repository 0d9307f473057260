"""Fuzzing the first code that touches a stranger's bytes: `model.load_image` on mutated pictures.

Valid seed pictures (JPEG with EXIF orientation, progressive JPEG, PNG with alpha,
16-bit PNG, animated GIF, WebP, BMP, TIFF) are mutated (bytes flipped, set,
inserted, deleted, repeated, cut short, header fields set to huge values) and fed
to `load_image`. Each call must:

- end with the right kind of outcome: a `(size, size, 3)` uint8 array, or
  `ImageRejected` (anything else, or a `MemoryError` hidden behind a rejection, is a
  failure);
- end in bounded time (`time_limit_s`; a true hang is caught by a watchdog that
  dumps every thread's stack and exits);
- stay within bounded memory: the address space may grow by at most
  `memory_bound(preprocessing)` during the call (enforced with RLIMIT_AS, so a
  runaway allocation fails at once instead of swapping), and the resident peak
  it reached (Linux's VmHWM, reset before each call) is reported.

`tests/test_fuzz.py` drives `check` with Hypothesis for a bounded number of
examples; `python -m bench fuzz --seconds N` drives it with random mutations for as long as
asked and saves any failing input.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import random
import resource
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model import ImageRejected, Preprocessing, load_image

# What a mutation does; a mutation is (op index, position, value), each taken modulo what fits.
OPS = ("flip", "set", "insert", "delete", "repeat", "truncate", "huge")
# Every array or copy load_image makes of a picture costs at most this many bytes per pixel at once
# (RGBA on white: 4 decoded + 4 + 4 composited + 3 as RGB; a float TIFF: 4 decoded + 4 exported by
# Pillow + 4 as float32 + 1 + 1 as 8-bit grey), plus the interpreter's slack.
BYTES_PER_PIXEL_BOUND = 24
SLACK_BYTES = 64 * 2**20
Mutation = tuple[int, int, int]


class FuzzFailure(AssertionError):
    """`load_image` broke one of its promises on this input."""


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "accepted" or "rejected:<reason>"
    seconds: float
    peak_rss_growth_bytes: int


def memory_bound(preprocessing: Preprocessing) -> int:
    """The most one photo may add to the process's memory, given the pixel limit."""
    return preprocessing.max_pixels * BYTES_PER_PIXEL_BOUND + SLACK_BYTES


@lru_cache(maxsize=1)
def seed_pictures() -> dict[str, bytes]:
    """Small valid pictures of every accepted format, with the features that have their own code paths."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    pixels[10:30, 20:40] = (200, 30, 30)  # some structure, not only noise
    rgb = Image.fromarray(pixels)
    seeds: dict[str, bytes] = {}

    def save(name: str, image: Image.Image, fmt: str, **options: Any) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        seeds[name] = buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: exif_transpose runs
    save("jpeg-exif", rgb, "JPEG", quality=85, exif=exif.tobytes())
    save("jpeg-progressive", rgb, "JPEG", quality=70, progressive=True)
    save("jpeg-cmyk", rgb.convert("CMYK"), "JPEG")
    save("png-alpha", rgb.convert("RGBA"), "PNG")
    save("png-16bit", Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257), "PNG")
    save("png-palette", rgb.convert("P"), "PNG", transparency=0)
    frames = [rgb.convert("P"), Image.fromarray(255 - pixels).convert("P")]
    save("gif-animated", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("webp", rgb, "WEBP", quality=80)
    save("bmp", rgb, "BMP")
    save("tiff-float", Image.fromarray(pixels[:, :, 1].astype(np.float32) / 255.0), "TIFF")
    return seeds


def mutate(data: bytes, mutations: Sequence[Mutation]) -> bytes:
    """Apply each (op, position, value) to `data` in turn; positions and values wrap to what fits."""
    buffer = bytearray(data)
    for op_index, position, value in mutations:
        op = OPS[op_index % len(OPS)]
        if not buffer:
            buffer = bytearray([value & 0xFF])
            continue
        at = position % len(buffer)
        if op == "flip":
            buffer[at] ^= 1 << (value % 8)
        elif op == "set":
            buffer[at] = value & 0xFF
        elif op == "insert":
            buffer[at:at] = bytes([value & 0xFF]) * (1 + value % 16)
        elif op == "delete":
            del buffer[at : at + 1 + value % 64]
        elif op == "repeat":  # a chunk twice: duplicated markers, chunks, frames
            chunk = buffer[at : at + 1 + value % 256]
            buffer[at:at] = chunk
        elif op == "truncate":
            del buffer[max(1, at) :]
        elif op == "huge":  # two bytes of 0xFF: width/height/length fields become enormous
            buffer[at : at + 2] = b"\xff\xff"
    return bytes(buffer)


def check(data: bytes, preprocessing: Preprocessing, *, time_limit_s: float = 10.0) -> Verdict:
    """Run `load_image` on `data` under the memory bound; raise `FuzzFailure` if a promise is broken."""
    bound = memory_bound(preprocessing)
    baseline = _reset_peak_rss()
    started = time.perf_counter()
    try:
        with _address_space_limit(bound):
            array = load_image(data, preprocessing)
    except ImageRejected as exc:
        if _caused_by(exc, MemoryError):
            raise FuzzFailure(
                f"needed more than {bound / 2**20:.0f} MB (rejected only because memory ran out)"
            ) from exc
        outcome = f"rejected:{exc.reason}"
    except MemoryError as exc:
        raise FuzzFailure(f"needed more than {bound / 2**20:.0f} MB of address space") from exc
    except Exception as exc:
        raise FuzzFailure(f"raised {type(exc).__name__} instead of ImageRejected: {exc}") from exc
    else:
        size = preprocessing.image_size
        if not (isinstance(array, np.ndarray) and array.shape == (size, size, 3) and array.dtype == np.uint8):
            raise FuzzFailure(
                f"returned {type(array).__name__} {getattr(array, 'shape', '')} "
                f"{getattr(array, 'dtype', '')}, not ({size}, {size}, 3) uint8"
            )
        outcome = "accepted"
    seconds = time.perf_counter() - started
    if seconds > time_limit_s:
        raise FuzzFailure(f"took {seconds:.1f} s (limit {time_limit_s:g} s)")
    growth = max(0, _peak_rss() - baseline)
    if growth > bound:
        raise FuzzFailure(f"resident memory grew by {growth / 2**20:.0f} MB (bound {bound / 2**20:.0f} MB)")
    return Verdict(outcome, seconds, growth)


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """A hang that `check` cannot time (stuck in C) dumps every stack and ends the process after `seconds`."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_fuzz(
    seconds: float,
    *,
    preprocessing: Preprocessing | None = None,
    seed: int = 0,
    save_dir: Path | None = None,
    time_limit_s: float = 10.0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Random mutations of the seed pictures for `seconds`; returns counts, the slowest call, the largest
    memory peak, and the failures (each input saved in `save_dir` when given)."""
    preprocessing = preprocessing or Preprocessing()
    # Pillow warns about every damaged EXIF/TIFF tag it skips; thousands of those would bury the report.
    warnings.filterwarnings("ignore", category=UserWarning)
    rng = random.Random(seed)
    seeds = seed_pictures()
    names = sorted(seeds)
    outcomes: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    slowest, largest, calls = 0.0, 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        name = names[calls % len(names)]
        mutations = [
            (
                rng.randrange(len(OPS)),
                rng.randrange(1 << 20) if rng.random() < 0.5 else rng.randrange(64),
                rng.randrange(1 << 16),
            )
            for _ in range(rng.randint(1, 8))
        ]
        data = mutate(seeds[name], mutations)
        calls += 1
        try:
            with watchdog(max(60.0, 6 * time_limit_s)):
                verdict = check(data, preprocessing, time_limit_s=time_limit_s)
        except FuzzFailure as exc:
            failure = {"seed": name, "mutations": mutations, "error": str(exc)}
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                path = save_dir / f"failure-{len(failures):03d}-{name}.bin"
                path.write_bytes(data)
                failure["input"] = str(path)
            failures.append(failure)
            outcomes["FAILURE"] += 1
            continue
        outcomes[verdict.outcome] += 1
        slowest, largest = max(slowest, verdict.seconds), max(largest, verdict.peak_rss_growth_bytes)
        if verbose and calls % 50000 == 0:
            print(f"[fuzz] {calls} inputs, {len(failures)} failures", flush=True)
    results = {
        "seconds": seconds,
        "inputs": calls,
        "inputs_per_s": round(calls / max(seconds, 1e-9), 1),
        "outcomes": dict(sorted(outcomes.items())),
        "failures": failures,
        "slowest_call_ms": round(slowest * 1000, 1),
        "largest_peak_rss_growth_mb": round(largest / 2**20, 1),
        "memory_bound_mb": round(memory_bound(preprocessing) / 2**20),
        "max_pixels": preprocessing.max_pixels,
    }
    if verbose:
        print(format_report(results), flush=True)
    return results


def format_report(results: dict[str, Any]) -> str:
    outcomes = ", ".join(f"{name} {count}" for name, count in results["outcomes"].items())
    return (
        f"python -m bench fuzz: {results['inputs']} mutated pictures in {results['seconds']:g} s "
        f"({results['inputs_per_s']}/s): {outcomes}\n"
        f"slowest call {results['slowest_call_ms']} ms; largest resident peak per call "
        f"{results['largest_peak_rss_growth_mb']} MB (bound {results['memory_bound_mb']} MB for "
        f"{results['max_pixels']:,} pixels); failures {len(results['failures'])}"
    )


# -- memory ------------------------------------------------------------------------------------------------------


def _reset_peak_rss() -> int:
    """Reset the process's resident high-water mark (Linux) and return the resident size now."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def _peak_rss() -> int:
    # Elsewhere than Linux: the lifetime peak (kB), coarser but still an upper bound's witness.
    return (_status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def _address_space_limit(extra_bytes: int) -> Iterator[None]:
    """Let the address space grow by at most `extra_bytes` inside the block (RLIMIT_AS)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    current = _status_kb("VmSize") * 1024
    if not current:
        yield
        return
    limit = current + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
