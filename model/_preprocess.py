"""Turn the bytes of an uploaded photo into the square RGB array the classifier reads.

This is the one preprocessing function: the worker calls it on every photo and training
calls it on every example, so a photo is seen the same way in both. It is also the first
code that touches untrusted bytes, so it refuses anything odd with an `ImageRejected`
whose message can be shown to the person who sent the photo.

It imports Pillow and NumPy only (no TensorFlow), so bots may use it to check a photo.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageOps

RESIZE_POLICIES = ("stretch", "pad", "crop")

# Formats a phone or a chat app actually sends. Naming them keeps Pillow's rarer, less
# hardened decoders away from untrusted bytes. (The JPEG opener also opens phones' MPO files.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# File name suffixes of those formats, as Pillow registers them (".jpg", ".jpeg", ".png", ".tif", ...): what
# counts as an image file wherever a file is picked by its name (datasets, the shell, attachments). HEIC is not
# among them: the decoder refuses it.
IMAGE_SUFFIXES = tuple(sorted(suffix for suffix, name in Image.registered_extensions().items()
                              if name in ACCEPTED_FORMATS))  # fmt: skip

# Transparent areas become white: a cut-out car on a web page is usually on white.
_BACKGROUND = (255, 255, 255)
# Letterbox bars are mid-grey, close to the mean pixel that ImageNet backbones subtract,
# so the bars carry as little signal as possible.
PAD_COLOUR = (128, 128, 128)

_MESSAGES = {
    "empty": "The file is empty; please send the picture again.",
    "too_large": "This file is too large; please send a smaller picture.",
    "not_an_image": "This file is not a picture I can read (JPEG, PNG, WebP, GIF, BMP, TIFF).",
    "truncated": "This picture is incomplete or damaged; please send it again.",
    "too_many_pixels": "This picture has too many pixels; please send a smaller one.",
    "unsupported": "This picture uses a format or colour mode I cannot read; please send a JPEG or PNG.",
}


class ImageRejected(ValueError):
    """A photo that cannot be used; `reason` is a short code, `str()` a sentence for a person."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        if reason not in _MESSAGES:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message or _MESSAGES[reason])
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would call ImageRejected(message) and lose the reason.
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the network's input; stored in every model artefact."""

    image_size: int = 224
    # "stretch": plain resize to a square, as the original study did.
    # "pad": fit the long side, letterbox with mid-grey. "crop": centre crop of the short side.
    resize: str = "stretch"
    max_bytes: int = 25 * 2**20
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, not {self.resize!r}")
        for name in ("image_size", "max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        # Unknown keys are ignored so that an artefact written by a newer version still loads.
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in known})


def load_image(data: bytes, preprocessing: Preprocessing = Preprocessing()) -> np.ndarray:
    """Decode a photo and return it as an (image_size, image_size, 3) uint8 RGB array.

    The result is upright (EXIF orientation applied), the first frame of an animation,
    with transparency on white. Raises `ImageRejected` for anything that is not a
    readable picture within the size limits.
    """
    _check_byte_size(data, preprocessing)
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            _check_pixel_count(img, preprocessing)
            _request_draft(img, preprocessing)
            _decode(img)
            # Resize inside the block: the decoded pixels may belong to `img`, closed on exit.
            resized = _resize(_to_8bit(_upright(img)), preprocessing).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_many_pixels") from exc
    except ImageRejected:
        raise
    except Exception as exc:
        # Pillow reports malformed input with many exception types (OSError, SyntaxError,
        # struct.error, ...); for a person they all mean the same thing.
        raise ImageRejected("not_an_image") from exc
    return np.array(resized, dtype=np.uint8)


# Reducing a photo pays only when it is much larger than the network's input: a 320x240 Telegram photo (about
# 18 KB) costs the bot 1.4 ms to reduce to a 147 KB BMP and the worker 1.1 ms to decode as it came; a phone's
# 12-megapixel JPEG costs the worker 26 ms and Redis megabytes. Photos of at most this many times the input's
# pixels, and no more bytes than its BMP, are queued as they came (bench/serving.py measures both mixes).
REDUCE_ABOVE_INPUT_PIXELS = 4


def reduce_for_queue(data: bytes, preprocessing: Preprocessing = Preprocessing()) -> bytes:
    """The photo to queue: the network's input as an uncompressed BMP, or the photo itself when that is cheaper.

    `load_image` of the result gives exactly `load_image(data)`: a reduced photo is already
    upright, RGB, square and at `image_size`, so the worker resizes nothing again. A phone's
    12-megapixel JPEG becomes 150 KB (at 224 px) that Redis holds and the worker reads in a
    fraction of a millisecond; the bot pays the decoding instead, with JPEG draft mode, off its
    event loop. A photo already about the input's size (`REDUCE_ABOVE_INPUT_PIXELS`) is returned
    as it is, after a look at its header. Raises `ImageRejected` as `load_image` does, so a bad
    photo (one it decodes, or whose header is unreadable) is refused before it is queued.
    """
    _check_byte_size(data, preprocessing)
    input_pixels = preprocessing.image_size**2
    small = 0 < pixel_count(data) <= REDUCE_ABOVE_INPUT_PIXELS * input_pixels
    if small and len(data) <= 3 * input_pixels:  # and no bigger than its BMP would be
        return data
    pixels = load_image(data, preprocessing)
    out = io.BytesIO()
    # BMP, not PNG: the bytes sit in Redis for about a second, and with a fast runtime the milliseconds
    # matter more than the bytes. At 224 px PNG (compress level 1) took 3.8 ms to write and 1.6 ms to
    # read where BMP takes 0.1 and 0.15, for 150 KB against 65 KB (bench/serving.py measures it).
    Image.fromarray(pixels).save(out, format="BMP")
    return out.getvalue()


def covering_size(size: tuple[int, int], image_size: int) -> tuple[int, int]:
    """`size` scaled, its shape kept, until its shorter side is `image_size`: the smallest copy that covers the input.

    A bot that can fetch a resized copy of a large photo (Discord's media proxy) asks for this size.
    """
    width, height = size
    shorter = min(width, height)
    return (-(-width * image_size // shorter), -(-height * image_size // shorter))  # rounded up: still covering


# EXIF orientations (TIFF tag 274) that turn a picture a quarter: upright, its width and height swap.
_QUARTER_TURNS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


def upright_size(data: bytes) -> tuple[int, int] | None:
    """The picture's width and height once upright, as `load_image` sees it (its header only); None if unreadable.

    Only the accepted formats are read. A copy of a photo made elsewhere (a platform's resized
    copy) can be checked against the original by this without decoding either.
    """
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(_ORIENTATION_TAG)
            except Exception:
                orientation = None  # a broken EXIF block: `load_image` leaves the pixels as they are too
    except Exception:
        return None
    if width < 1 or height < 1:
        return None
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def pixel_count(data: bytes) -> int:
    """How many pixels the picture in `data` says it has (its header only), 0 when that cannot be read.

    Only the accepted formats are read: a picture in another one has 0, as `load_image` refuses it.
    """
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            width, height = img.size
    except Exception:
        return 0  # load_image will say what is wrong with it
    return max(0, width) * max(0, height)


def _check_byte_size(data: bytes, preprocessing: Preprocessing) -> None:
    if len(data) == 0:
        raise ImageRejected("empty")
    if len(data) > preprocessing.max_bytes:
        limit_mb = preprocessing.max_bytes / 2**20
        raise ImageRejected("too_large", f"This file is too large; please send a picture under {limit_mb:.0f} MB.")


def _check_pixel_count(img: Image.Image, preprocessing: Preprocessing) -> None:
    # Pillow has read only the header so far: this is the cheap moment to refuse a
    # decompression bomb, whatever Image.MAX_IMAGE_PIXELS happens to be set to.
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageRejected("not_an_image")
    if width * height > preprocessing.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"This picture has too many pixels ({width}x{height}); please send a smaller one.",
        )


def _request_draft(img: Image.Image, preprocessing: Preprocessing) -> None:
    """Let the JPEG decoder scale down by 2, 4 or 8 while decoding (much faster for big photos)."""
    if img.format not in ("JPEG", "MPO"):
        return
    img.draft("RGB", _draft_size(img.size, preprocessing))


def _draft_size(size: tuple[int, int], preprocessing: Preprocessing) -> tuple[int, int]:
    # Pillow's draft keeps both sides at least as large as the size asked for. Stretch and
    # crop need both sides >= image_size; pad only needs the long side to reach it.
    target = preprocessing.image_size
    if preprocessing.resize != "pad":
        return (target, target)
    width, height = size
    long_side = max(width, height)
    return (max(1, -(-width * target // long_side)), max(1, -(-height * target // long_side)))


def _decode(img: Image.Image) -> None:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except OSError as exc:
        if "decoder" in str(exc) and "not available" in str(exc):
            raise ImageRejected("unsupported") from exc
        raise ImageRejected("truncated") from exc
    except Exception as exc:
        raise ImageRejected("truncated") from exc


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        # A broken EXIF block should not cost the person their answer; the pixels are fine.
        return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """8-bit pixels: RGB, or L for a greyscale picture, which becomes RGB only once resized (a third of the memory)."""
    mode = img.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        return _on_background(img)
    if mode in ("RGB", "L"):
        return img
    # Wide greyscale samples (16-bit PNG, integer or float TIFF) are brought to 8 bits at full size,
    # so every array made on the way costs at most 4 bytes a pixel: a 33-megapixel float TIFF
    # needs about 550 MB in all, not the gigabyte float64 copies did.
    if mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    if mode == "I":
        return Image.fromarray(_scale_wide_ints(np.asarray(img)))
    if mode == "F":
        return Image.fromarray(_scale_floats(np.array(img, dtype=np.float32)))
    try:
        # 1, P, CMYK (Pillow already undoes Adobe's inverted CMYK), YCbCr, ...
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageRejected("unsupported") from exc


def _on_background(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_wide_ints(values: np.ndarray) -> np.ndarray:
    # Mode "I" almost always holds 16-bit samples (16-bit PNG or TIFF); map that range to 8 bits.
    if values.size and values.min() >= 0 and values.max() <= 0xFFFF:
        return (values >> 8).astype(np.uint8)
    return _stretch_to_bytes(values.astype(np.float32))


def _scale_floats(values: np.ndarray) -> np.ndarray:
    """float32 samples (changed in place) as uint8: [0, 1] scaled to [0, 255], any other range stretched."""
    np.nan_to_num(values, copy=False)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values *= 255.0
        return np.rint(values, out=values).astype(np.uint8)
    return _stretch_to_bytes(values)


def _stretch_to_bytes(values: np.ndarray) -> np.ndarray:
    """float32 samples (changed in place) stretched from their own min and max to uint8."""
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scale = 255.0 / (high - low)
    # Scaled before shifted: float32 samples near its limits would overflow the other way round.
    values *= scale
    values -= low * scale
    np.clip(np.rint(values, out=values), 0, 255, out=values)
    return values.astype(np.uint8)


def _resize(img: Image.Image, preprocessing: Preprocessing) -> Image.Image:
    size = preprocessing.image_size
    if preprocessing.resize == "stretch":
        return _scaled(img, (size, size))
    if preprocessing.resize == "crop":
        return _scaled(img, (size, size), box=_centre_square(img.size))
    return _letterboxed(img, size)


def _scaled(img: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> Image.Image:
    # Pillow's BILINEAR widens its support when shrinking, so this is antialiased; the
    # reducing gap first shrinks by an integer factor, which makes big photos fast.
    return img.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)


def _centre_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return (left, top, left + side, top + side)


def _letterboxed(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    scale = size / max(width, height)
    inner = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new("RGB", (size, size), PAD_COLOUR)
    canvas.paste(_scaled(img, inner), ((size - inner[0]) // 2, (size - inner[1]) // 2))
    return canvas
