"""Photos unlike any training class: what the out-of-distribution score is measured on.

A person sends the bot a dog, a screenshot, a landscape. No such photo is in a car
dataset, and none can be downloaded here, so this module draws four kinds of them,
the same for every model (a car model or the demo's shapes):

- ``scenes``: landscapes, a sky over hills and ground, with trees and clouds;
- ``noise``: pixel noise, at one scale or several, grey or coloured;
- ``text``: lines of words on a plain page, like a screenshot or a document;
- ``textures``: natural-looking surfaces: clouds or marble (fractal noise), wood rings,
  grass strokes, gravel.

Every image depends only on (kind, seed, index), so a report's numbers can be measured
again on the very same photos.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

UNLIKE_KINDS: tuple[str, ...] = ("scenes", "noise", "text", "textures")

_TEXT = (
    "the quick brown fox jumps over lazy dog invoice total amount settings wifi battery "
    "hello world meeting tomorrow lunch agenda click here download update password account "
    "ola tudo bem amanha reuniao conta senha preco obrigado"
)
_WORDS = tuple(_TEXT.split(" "))


def _fractal(rng: np.random.Generator, w: int, h: int, octaves: int = 5) -> np.ndarray:
    """Smooth 1/f noise in 0..1: random grids of growing resolution, blown up and summed."""
    total = np.zeros((h, w), dtype=np.float32)
    weight_sum = 0.0
    for octave in range(octaves):
        cells = 2 ** (octave + 1)
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        layer = np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        weight = 0.5**octave
        total += weight * layer
        weight_sum += weight
    total /= weight_sum
    return (total - total.min()) / max(float(np.ptp(total)), 1e-6)


def _palette(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Map 0..1 values onto a gradient between two random colours."""
    a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    return a + (b - a) * t[..., None]


def _scene(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    sky_top, sky_bottom = np.array([40, 90, 200]) + rng.integers(-30, 30, 3), np.array([170, 200, 240])
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(sky_top + (sky_bottom - sky_top) * ys, (h, w, 3)).astype(np.float32).copy()
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):  # clouds: clusters of pale blobs
        cx, cy = rng.uniform(0, w), rng.uniform(0, h * 0.4)
        for _ in range(5):
            r = rng.uniform(0.03, 0.08) * w
            x, y = cx + rng.uniform(-2, 2) * r, cy + rng.uniform(-0.5, 0.5) * r
            grey = int(rng.integers(215, 256))
            draw.ellipse([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=(grey, grey, grey))
    for layer in range(int(rng.integers(2, 4))):  # hills, farther ones paler
        base = h * (0.45 + 0.12 * layer + rng.uniform(-0.05, 0.05))
        phase, freq, amp = rng.uniform(0, 6.3), rng.uniform(1, 4), rng.uniform(0.03, 0.12) * h
        points = [(x, base + amp * math.sin(phase + freq * 2 * math.pi * x / w)) for x in range(0, w + 8, 8)]
        green = np.array([40, 110 - 20 * layer, 40]) + rng.integers(-25, 25, 3) + 40 * (2 - layer)
        draw.polygon([*points, (w, h), (0, h)], fill=tuple(int(c) for c in np.clip(green, 0, 255)))
    for _ in range(int(rng.integers(2, 9))):  # trees: a trunk and a crown
        x, ground = rng.uniform(0, w), rng.uniform(0.7, 0.95) * h
        size = rng.uniform(0.04, 0.1) * h
        draw.rectangle([x - size * 0.12, ground - size * 1.6, x + size * 0.12, ground], fill=(90, 60, 30))
        shade = tuple(int(c) for c in np.array([20, 90, 30]) + rng.integers(-15, 15, 3))
        draw.ellipse([x - size * 0.7, ground - size * 2.6, x + size * 0.7, ground - size * 1.1], fill=shade)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32)
    return _finish(rng, pixels)


def _noise(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    style = int(rng.integers(4))
    if style == 0:  # uniform colour noise
        pixels = rng.integers(0, 256, size=(h, w, 3)).astype(np.float32)
    elif style == 1:  # grey Gaussian noise around a random level
        pixels = np.repeat(rng.normal(rng.uniform(60, 200), rng.uniform(20, 70), size=(h, w, 1)), 3, axis=2)
    elif style == 2:  # blocky noise: a coarse random grid, blown up without smoothing
        cells = int(rng.integers(4, 24))
        grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(grid, "RGB").resize((w, h), Image.Resampling.NEAREST), np.float32)
    else:  # salt and pepper over a flat colour
        pixels = np.broadcast_to(rng.integers(0, 256, 3), (h, w, 3)).astype(np.float32).copy()
        salt = rng.random((h, w)) < rng.uniform(0.05, 0.3)
        pixels[salt] = rng.choice([0.0, 255.0], size=(int(salt.sum()), 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _text(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    dark_mode = rng.random() < 0.3
    page = (30, 30, 35) if dark_mode else tuple(int(c) for c in rng.integers(225, 256, 3))
    ink = (230, 230, 230) if dark_mode else tuple(int(c) for c in rng.integers(0, 80, 3))
    image = Image.new("RGB", (w, h), page)
    draw = ImageDraw.Draw(image)
    size = max(6, int(h * rng.uniform(0.05, 0.1)))
    font = ImageFont.load_default(size=size)
    y = rng.uniform(0.02, 0.08) * h
    if rng.random() < 0.5:  # a title bar, as in a screenshot
        bar = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle([0, 0, w, size * 1.8], fill=bar)
        y = size * 2.4
    while y < h:
        line = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 9))))
        draw.text((rng.uniform(0.02, 0.08) * w, y), line, fill=ink, font=font)
        y += size * rng.uniform(1.3, 1.8)
    return _finish(rng, np.asarray(image, dtype=np.float32), grain=2)


def _texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    style = int(rng.integers(4))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if style == 0:  # clouds / marble: fractal noise, sometimes veined
        t = _fractal(rng, w, h)
        if rng.random() < 0.5:
            t = 0.5 + 0.5 * np.sin(xs / w * rng.uniform(4, 12) + 8 * t)
        pixels = _palette(rng, t)
    elif style == 1:  # wood: rings around a far centre, warped by noise
        cx, cy = rng.uniform(-2, 3) * w, rng.uniform(-2, 3) * h
        rings = np.sqrt((xs - cx) ** 2 + ((ys - cy) * 0.3) ** 2) / w * rng.uniform(10, 30)
        t = 0.5 + 0.5 * np.sin(rings + 4 * _fractal(rng, w, h))
        light = np.array([200, 150, 100]) + rng.integers(-30, 30, 3)
        pixels = light * (0.55 + 0.45 * t[..., None])
    elif style == 2:  # grass: many short, mostly upright green strokes
        image = Image.new("RGB", (w, h), tuple(int(c) for c in np.array([50, 100, 30]) + rng.integers(-20, 20, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(w * h // 12):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            length, tilt = rng.uniform(0.04, 0.12) * h, rng.normal(0, 0.3)
            colour = tuple(int(c) for c in np.array([60, 140, 40]) + rng.integers(-40, 40, 3))
            draw.line([(x, y), (x + length * math.sin(tilt), y - length * math.cos(tilt))], fill=colour, width=1)
        pixels = np.asarray(image, dtype=np.float32)
    else:  # gravel: many small stones of earthy colours, blurred a little
        image = Image.new("RGB", (w, h), (110, 100, 90))
        draw = ImageDraw.Draw(image)
        for _ in range(w * h // 30):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.01, 0.03) * w
            grey = rng.uniform(70, 200)
            colour = tuple(int(c) for c in np.clip(grey + rng.integers(-20, 20, 3), 0, 255))
            draw.ellipse([x - r, y - r * rng.uniform(0.6, 1), x + r, y + r], fill=colour)
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
    return _finish(rng, pixels)


def _finish(rng: np.random.Generator, pixels: np.ndarray, grain: float = 4) -> Image.Image:
    """A camera's touch: a little sensor grain."""
    pixels = pixels + rng.normal(0, grain, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


_DRAW = {"scenes": _scene, "noise": _noise, "text": _text, "textures": _texture}
assert tuple(_DRAW) == UNLIKE_KINDS


def unlike_photo(kind: str, seed: int, index: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """One photo of `kind` (one of :data:`UNLIKE_KINDS`), `size` = (width, height), fixed by (seed, index)."""
    if kind not in _DRAW:
        raise ValueError(f"unknown kind {kind!r}; expected one of {UNLIKE_KINDS}")
    rng = np.random.default_rng([seed, zlib.crc32(kind.encode()), index])
    return _DRAW[kind](rng, *size)


def unlike_photos(
    per_kind: int = 50, *, seed: int = 0, size: tuple[int, int] = (160, 120)
) -> Iterator[tuple[str, Image.Image]]:
    """`per_kind` photos of every kind, as ``(kind, image)``, kinds in :data:`UNLIKE_KINDS` order."""
    for kind in UNLIKE_KINDS:
        for index in range(per_kind):
            yield kind, unlike_photo(kind, seed, index, size)
