"""Synthetic labelled "photos" for a fresh, offline machine.

The real car dataset and its weights cannot be downloaded, yet the project must
show a model that really learns something, and the tests need a dataset they can
train on in seconds. This module draws one of a few geometric shapes on a busy
background. Each class is a *shape*; everything else is random and drawn the
same way for all classes: the shape's colour, size, position and rotation, and a
background that is a flat colour, a gradient or blotchy noise, half the time
crossed by clutter lines. The shape is always clearly lighter or darker than its
background (which one is chance), but its hue and the background's are free.
Colour therefore says nothing about the class, and a model has to look at
outlines, just as it would for a car.

Labels follow the car-model style (``MAKE MODEL`` in upper case) so that the
bots and reports format them like real ones: ``DEMO CIRCLE``, ``DEMO STAR``...

An image depends only on the random generator it is drawn with. The scene (the
background, then the shape's colour, place, size and angle) is drawn first and
the shape's own details last, so two labels drawn from generators in the same
state give the same scene with a different shape in it.

On disk, :func:`make_synthetic_dataset` writes the usual folder per class, and
the folder name *is* the label (spaces included), so any folder-per-class
reader gets the labels back unchanged.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "DEMO CIRCLE",
    "DEMO SQUARE",
    "DEMO TRIANGLE",
    "DEMO STAR",
    "DEMO CROSS",
    "DEMO RING",
)

# Shapes are drawn this many times larger and scaled down, which anti-aliases
# their edges the way a camera would; hard pixel edges would be a shortcut.
_SUPERSAMPLE = 4

# A scene is a dark background with a light shape, or the reverse: any hue, but
# the shape stands out in brightness, as a car does against the road and the sky.
# (With hue and brightness both free, a small network trained for a minute learns
# next to nothing; outlines it can learn.) Bands of luma, ITU-R 601, 0..255:
_DARK = (0.0, 65.0)
_LIGHT = (185.0, 255.0)

# --------------------------------------------------------------------------
# Backgrounds


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _colour_in(rng: np.random.Generator, band: tuple[float, float]) -> np.ndarray:
    """A colour of random hue whose luma lies in `band`."""
    # A fixed number of draws per colour keeps the generator's state independent of the result.
    candidates = rng.integers(0, 256, size=(64, 3)).astype(np.float32)
    luma = candidates @ _LUMA
    fits = np.flatnonzero((luma >= band[0]) & (luma <= band[1]))
    if len(fits):
        return candidates[fits[0]]
    return np.full(3, sum(band) / 2, dtype=np.float32)  # a grey of that brightness; rare


def _flat(rng: np.random.Generator, band: tuple[float, float], w: int, h: int) -> np.ndarray:
    return np.broadcast_to(_colour_in(rng, band), (h, w, 3)).copy()


def _gradient(rng: np.random.Generator, band: tuple[float, float], w: int, h: int) -> np.ndarray:
    start, end = _colour_in(rng, band), _colour_in(rng, band)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    return start + (end - start) * t[..., None]


def _blotches(rng: np.random.Generator, band: tuple[float, float], w: int, h: int) -> np.ndarray:
    # A coarse random grid blown up smoothly looks like out-of-focus scenery;
    # fine grain on top looks like sensor noise.
    rows, cols = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    grid = np.stack([_colour_in(rng, band) for _ in range(rows * cols)]).reshape(rows, cols, 3)
    coarse = Image.fromarray(grid.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(coarse, dtype=np.float32) + rng.normal(0, 10, size=(h, w, 3))


_BACKGROUNDS = (_flat, _gradient, _blotches)


def _clutter(rng: np.random.Generator, image: Image.Image) -> None:
    """Cross the background with thin straight lines of any colour."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(int(rng.integers(3, 12))):
        x0, x1 = rng.uniform(-0.2, 1.2, size=2) * w
        y0, y1 = rng.uniform(-0.2, 1.2, size=2) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))


def _background(rng: np.random.Generator, band: tuple[float, float], w: int, h: int) -> Image.Image:
    make = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    image = Image.fromarray(np.clip(make(rng, band, w, h), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        _clutter(rng, image)
    return image


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    return (int(colour[0]), int(colour[1]), int(colour[2]))


# --------------------------------------------------------------------------
# Shapes: each is drawn into a mask, filled white on black, around `centre`
# with outer radius `r` and rotated by `angle` radians.

Point = tuple[float, float]


def _polygon(centre: Point, radii: Sequence[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at equal angular steps, at the given distances from the centre."""
    cx, cy = centre
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
        for i, r in enumerate(radii)
    ]


def _circle(draw: ImageDraw.ImageDraw, centre: Point, r: float, angle: float, rng: np.random.Generator) -> None:
    cx, cy = centre
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _square(draw: ImageDraw.ImageDraw, centre: Point, r: float, angle: float, rng: np.random.Generator) -> None:
    draw.polygon(_polygon(centre, [r] * 4, angle), fill=255)


def _triangle(draw: ImageDraw.ImageDraw, centre: Point, r: float, angle: float, rng: np.random.Generator) -> None:
    draw.polygon(_polygon(centre, [r] * 3, angle), fill=255)


def _star(draw: ImageDraw.ImageDraw, centre: Point, r: float, angle: float, rng: np.random.Generator) -> None:
    inner = r * rng.uniform(0.38, 0.5)
    draw.polygon(_polygon(centre, [r, inner] * 5, angle), fill=255)


def _cross(draw: ImageDraw.ImageDraw, centre: Point, r: float, angle: float, rng: np.random.Generator) -> None:
    # A plus sign: twelve corners, arms of half-width `a` reaching out to `r`.
    a = r * rng.uniform(0.26, 0.36)
    corners = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
               (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]  # fmt: skip
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = centre
    draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners], fill=255)


def _ring(draw: ImageDraw.ImageDraw, centre: Point, r: float, angle: float, rng: np.random.Generator) -> None:
    cx, cy = centre
    inner = r * rng.uniform(0.5, 0.68)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)


_SHAPES = {
    "DEMO CIRCLE": _circle,
    "DEMO SQUARE": _square,
    "DEMO TRIANGLE": _triangle,
    "DEMO STAR": _star,
    "DEMO CROSS": _cross,
    "DEMO RING": _ring,
}
assert tuple(_SHAPES) == SYNTHETIC_CLASSES


def _shape_mask(
    label: str,
    rng: np.random.Generator,
    size: tuple[int, int],
    centre: Point,
    radius: float,
    angle: float,
) -> Image.Image:
    """An anti-aliased "L" mask of one shape, 255 inside."""
    try:
        draw_shape = _SHAPES[label]
    except KeyError:
        raise ValueError(f"unknown synthetic class {label!r}; expected one of {SYNTHETIC_CLASSES}") from None
    s = _SUPERSAMPLE
    big = Image.new("L", (size[0] * s, size[1] * s), 0)
    draw_shape(ImageDraw.Draw(big), (centre[0] * s, centre[1] * s), radius * s, angle, rng)
    return big.resize(size, Image.Resampling.BOX)


# --------------------------------------------------------------------------
# Public API


def synthetic_photo(label: str, rng: np.random.Generator, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """Draw one RGB image of class `label` (one of :data:`SYNTHETIC_CLASSES`), `size` = (width, height)."""
    if label not in _SHAPES:
        raise ValueError(f"unknown synthetic class {label!r}; expected one of {SYNTHETIC_CLASSES}")
    w, h = size
    ground, figure = (_DARK, _LIGHT) if rng.random() < 0.5 else (_LIGHT, _DARK)
    image = _background(rng, ground, w, h)

    # The scene: colour, size, place and angle, drawn the same way whatever the class.
    colour = _rgb(_colour_in(rng, figure))
    short = min(w, h)
    radius = short * rng.uniform(0.28, 0.42)
    # The centre keeps most of the shape inside the frame; a little cropping is realistic.
    margin = radius * 0.9
    centre = (rng.uniform(margin, w - margin), rng.uniform(margin, h - margin))
    angle = rng.uniform(0, 2 * math.pi)
    outline = _rgb(_colour_in(rng, ground)) if rng.random() < 0.3 else None

    # The shape's own details (a star's depth, a ring's width) come from a generator of their own,
    # so every class consumes `rng` alike and the same state gives the same scene for any label.
    details = np.random.default_rng(rng.integers(2**63))
    mask = _shape_mask(label, details, size, centre, radius, angle)
    if outline is not None:
        # A thin rim in the background's brightness, like a sticker's edge: a slightly larger copy below.
        rim = mask.filter(ImageFilter.MaxFilter(3))
        image.paste(Image.new("RGB", size, outline), (0, 0), rim)
    image.paste(Image.new("RGB", size, colour), (0, 0), mask)

    # A touch of lighting and grain over everything, so the shape is not one flat colour.
    pixels = np.asarray(image, dtype=np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 1.0 + rng.uniform(-0.15, 0.15) * (xs / w - 0.5) + rng.uniform(-0.15, 0.15) * (ys / h - 0.5)
    pixels = pixels * light[..., None] + rng.normal(0, 4, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def synthetic_jpeg(label: str, seed: int, size: tuple[int, int] = (320, 240), quality: int = 90) -> bytes:
    """One synthetic photo of `label` as JPEG bytes, fully determined by `seed`.

    The same seed with another label gives the same picture with another shape in it.
    """
    image = synthetic_photo(label, np.random.default_rng(seed), size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_synthetic_dataset(
    root: Path,
    *,
    per_class: int = 60,
    size: tuple[int, int] = (160, 120),
    seed: int = 0,
    classes: Sequence[str] = SYNTHETIC_CLASSES,
) -> Path:
    """Write `per_class` JPEGs per class as ``root/<label>/<nnnn>.jpg`` and return `root`.

    The folder name is the label itself. The same arguments always write the same
    bytes; each image's generator is keyed by (seed, label, index), so adding or
    removing a class leaves the other classes' images unchanged.
    """
    unknown = [label for label in classes if label not in _SHAPES]
    if unknown:
        raise ValueError(f"unknown synthetic classes {unknown}; expected some of {SYNTHETIC_CLASSES}")
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, not {per_class}")
    root = Path(root)
    for label in classes:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        label_key = zlib.crc32(label.encode("utf-8"))
        for index in range(per_class):
            rng = np.random.default_rng([seed, label_key, index])
            synthetic_photo(label, rng, size).save(folder / f"{index:04d}.jpg", format="JPEG", quality=90)
    return root
