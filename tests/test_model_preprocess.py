"""load_image and Preprocessing: odd, broken and hostile photos, made with Pillow on the fly."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from model import ImageRejected, Preprocessing, load_image, reduce_for_queue, upright_size
from tests.conftest import PNG_SIGNATURE, png_chunk

REPO = Path(__file__).resolve().parents[1]
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
SMALL = Preprocessing(image_size=32)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def halves(size: tuple[int, int], left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half is `right`."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height 1-bit pixels but carries almost no data: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * 64)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def assert_close(pixel: np.ndarray, colour: tuple, tolerance: int = 8) -> None:
    assert np.abs(pixel.astype(int) - np.array(colour)).max() <= tolerance, (pixel, colour)


def test_import_model_does_not_import_tensorflow() -> None:
    code = (
        "import sys, model\n"
        "from model import (BACKBONES, Artefact, ArtefactCorrupt, ImageRejected, ModelRegistry,\n"
        "                   Preprocessing, load_image, read_artefact)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_output_is_square_uint8_rgb() -> None:
    out = load_image(encode(Image.new("RGB", (80, 50), GREEN), "PNG"), SMALL)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert_close(out[16, 16], GREEN, 0)


def test_default_preprocessing_is_the_studys_224_stretch() -> None:
    assert Preprocessing() == Preprocessing(image_size=224, resize="stretch")
    assert load_image(encode(Image.new("RGB", (300, 200)), "JPEG")).shape == (224, 224, 3)


def test_preprocessing_round_trips_and_ignores_unknown_keys() -> None:
    p = Preprocessing(image_size=64, resize="pad", max_bytes=1000, max_pixels=10_000)
    assert Preprocessing.from_dict({**p.to_dict(), "from_the_future": 1}) == p


@pytest.mark.parametrize("bad", [{"resize": "zoom"}, {"image_size": 0}, {"max_bytes": -1}, {"max_pixels": 1.5}])
def test_preprocessing_rejects_bad_settings(bad: dict) -> None:
    with pytest.raises(ValueError):
        Preprocessing(**bad)


def test_empty_file() -> None:
    with pytest.raises(ImageRejected) as caught:
        load_image(b"", SMALL)
    assert caught.value.reason == "empty"


def test_oversize_file_is_refused_before_decoding() -> None:
    data = encode(Image.new("RGB", (64, 64)), "BMP")
    with pytest.raises(ImageRejected) as caught:
        load_image(data, Preprocessing(image_size=32, max_bytes=len(data) - 1))
    assert caught.value.reason == "too_large"


def test_text_file_named_jpg_is_not_an_image() -> None:
    with pytest.raises(ImageRejected) as caught:
        load_image(b"Dear bot, here is my car.\n" * 20, SMALL)
    assert caught.value.reason == "not_an_image"
    message = str(caught.value)
    assert "JPEG" in message and "PIL" not in message and "identify" not in message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageRejected) as caught:
        load_image(data[: len(data) // 2], SMALL)
    assert caught.value.reason == "truncated"


def test_rejection_survives_pickling() -> None:
    copy = pickle.loads(pickle.dumps(ImageRejected("truncated")))
    assert copy.reason == "truncated" and str(copy) == str(ImageRejected("truncated"))


def test_png_alpha_is_composited_on_white() -> None:
    img = halves((64, 64), (0, 0, 0, 0), RED + (255,), mode="RGBA")
    out = load_image(encode(img, "PNG"), SMALL)
    assert_close(out[16, 4], WHITE)
    assert_close(out[16, 28], RED)


def test_palette_transparency_is_composited_on_white() -> None:
    img = halves((64, 64), 0, 1, mode="P")
    img.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    out = load_image(encode(img, "PNG", transparency=0), SMALL)
    assert_close(out[16, 4], WHITE)
    assert_close(out[16, 28], BLUE)


def test_grey_with_alpha() -> None:
    img = halves((64, 64), (0, 0), (100, 255), mode="LA")
    out = load_image(encode(img, "PNG"), SMALL)
    assert_close(out[16, 4], WHITE)
    assert_close(out[16, 28], (100, 100, 100))


@pytest.mark.parametrize("mode, value, expected", [("L", 77, 77), ("1", 1, 255)])
def test_grey_and_bilevel(mode: str, value: int, expected: int) -> None:
    out = load_image(encode(Image.new(mode, (40, 40), value), "PNG"), SMALL)
    assert_close(out[16, 16], (expected,) * 3, 0)


def test_cmyk_jpeg() -> None:
    red_in_cmyk = (0, 255, 255, 0)
    out = load_image(encode(Image.new("CMYK", (48, 48), red_in_cmyk), "JPEG", quality=95), SMALL)
    assert_close(out[16, 16], RED, 12)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0).repeat(16, axis=1)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = load_image(encode(img, "PNG"), Preprocessing(image_size=64))
    assert [int(out[32, x, 0]) for x in (8, 24, 40, 56)] == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_32_bit_integer_tiff_is_scaled_as_16_bit() -> None:
    img = Image.fromarray(np.full((32, 32), 32768, dtype=np.int32))
    assert img.mode == "I"
    assert_close(load_image(encode(img, "TIFF"), SMALL)[8, 8], (128, 128, 128), 0)


def test_float_tiff_in_unit_range() -> None:
    img = Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32))
    assert img.mode == "F"
    assert_close(load_image(encode(img, "TIFF"), SMALL)[8, 8], (128, 128, 128), 1)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (48, 48), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert_close(load_image(data, SMALL)[16, 16], RED)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_other_accepted_formats(fmt: str) -> None:
    out = load_image(encode(halves((64, 48), RED, BLUE), fmt), SMALL)
    assert_close(out[16, 4], RED, 12)
    assert_close(out[16, 28], BLUE, 12)


def test_decompression_bomb_is_refused_without_decoding() -> None:
    data = png_header_only(30_000, 30_000)
    assert len(data) < 200
    started = time.perf_counter()
    with pytest.raises(ImageRejected) as caught:
        load_image(data, SMALL)
    assert time.perf_counter() - started < 0.5
    assert caught.value.reason == "too_many_pixels"


def test_own_pixel_limit_applies_below_pillows() -> None:
    data = png_header_only(8_000, 8_000)  # 64 Mpx: under Pillow's own limit, over ours (50 Mpx)
    with pytest.raises(ImageRejected) as caught:
        load_image(data, SMALL)
    assert caught.value.reason == "too_many_pixels"
    assert "8000x8000" in str(caught.value)
    with pytest.raises(ImageRejected, match="too many pixels"):
        load_image(encode(Image.new("RGB", (200, 200)), "PNG"), Preprocessing(image_size=32, max_pixels=39_999))


@pytest.mark.parametrize("orientation, stored_turn", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)])
def test_exif_rotated_photo_is_answered_upright(orientation: int, stored_turn: Image.Transpose) -> None:
    upright = halves((64, 48), RED, BLUE)
    stored = upright.transpose(stored_turn)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = load_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), SMALL)
    assert_close(out[16, 4], RED, 12)
    assert_close(out[16, 28], BLUE, 12)


@pytest.mark.parametrize("orientation, upright", [(1, (64, 48)), (3, (64, 48)), (6, (48, 64)), (8, (48, 64))])
def test_upright_size_reads_the_header_as_load_image_turns_the_picture(
    orientation: int, upright: tuple[int, int]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.new("RGB", (64, 48)), "JPEG", exif=exif.tobytes())
    assert upright_size(data) == upright
    assert upright_size(encode(Image.new("RGB", (64, 48)), "PNG")) == (64, 48)
    assert upright_size(data[:20]) is None  # no header to read
    assert upright_size(b"%PDF-1.7 not a picture") is None


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
def test_large_jpeg_is_decoded_at_reduced_scale(monkeypatch: pytest.MonkeyPatch, resize: str) -> None:
    decoded_sizes = []
    original_load = JpegImagePlugin.JpegImageFile.load

    def spy_load(self):
        decoded_sizes.append(self.size)
        return original_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy_load)
    data = encode(halves((4000, 3000), RED, BLUE), "JPEG", quality=80)
    out = load_image(data, Preprocessing(image_size=64, resize=resize))
    # 4000x3000 for a 64 px input: the decoder scales by 1/8 while decoding.
    assert decoded_sizes and set(decoded_sizes) == {(500, 375)}
    assert out.shape == (64, 64, 3)


def test_resize_policies() -> None:
    # 128x64: red | green (the centre square) | blue
    img = Image.new("RGB", (128, 64), GREEN)
    img.paste(Image.new("RGB", (32, 64), RED), (0, 0))
    img.paste(Image.new("RGB", (32, 64), BLUE), (96, 0))
    data = encode(img, "PNG")

    stretch = load_image(data, Preprocessing(image_size=32, resize="stretch"))
    assert_close(stretch[16, 2], RED)
    assert_close(stretch[16, 16], GREEN)
    assert_close(stretch[16, 30], BLUE)

    crop = load_image(data, Preprocessing(image_size=32, resize="crop"))
    assert_close(crop[16, 2], GREEN)
    assert_close(crop[16, 29], GREEN)

    pad = load_image(data, Preprocessing(image_size=32, resize="pad"))
    grey = (128, 128, 128)
    assert_close(pad[2, 16], grey, 0)
    assert_close(pad[29, 16], grey, 0)
    assert_close(pad[16, 2], RED)
    assert_close(pad[16, 16], GREEN)
    assert_close(pad[16, 30], BLUE)


@pytest.mark.parametrize("resize", ["stretch", "pad", "crop"])
@pytest.mark.parametrize(
    ("size", "fmt", "mode"),
    [((4032, 3024), "JPEG", "RGB"), ((640, 480), "JPEG", "L"), ((300, 900), "PNG", "RGBA"), ((224, 224), "GIF", "P")],
)
def test_the_reduced_photo_gives_the_network_exactly_the_same_pixels(resize, size, fmt, mode) -> None:
    """What a bot queues instead of the original: the worker's decoding of it is the original's, pixel for pixel."""
    rng = np.random.default_rng(sum(size))
    noise = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size)
    img = noise.convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90°": the reduced photo must be upright already, and not turned a second time
    params = {"exif": exif.tobytes(), "quality": 90} if fmt == "JPEG" else {}
    original = encode(img, fmt, **params)
    preprocessing = Preprocessing(image_size=96, resize=resize)

    reduced = reduce_for_queue(original, preprocessing)

    np.testing.assert_array_equal(load_image(reduced, preprocessing), load_image(original, preprocessing))
    if size[0] * size[1] > 1_000_000:
        assert len(reduced) * 20 < len(original)  # what Redis holds and the worker decodes


def test_a_photo_about_the_input_size_is_queued_as_it_came_and_a_larger_or_heavier_one_reduced() -> None:
    """Reducing pays for a phone's photo, not for one Telegram already shrank: that one is queued as it came."""
    preprocessing = Preprocessing(image_size=96)
    rng = np.random.default_rng(5)

    def photo(size: tuple[int, int], fmt: str, blocky: bool = True) -> bytes:
        shape = (size[1] // 8, size[0] // 8, 3) if blocky else (size[1], size[0], 3)
        return encode(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).resize(size), fmt)

    telegram_like = photo((160, 120), "JPEG")  # 19,200 pixels: at most 4 times the input's 9,216
    assert reduce_for_queue(telegram_like, preprocessing) == telegram_like

    for original in (
        photo((320, 240), "JPEG"),  # 76,800 pixels: more than 4 times the input
        photo((160, 120), "PNG", blocky=False),  # few pixels, but more bytes than its BMP (27 KB)
    ):
        reduced = reduce_for_queue(original, preprocessing)
        assert Image.open(io.BytesIO(reduced)).format == "BMP"
        np.testing.assert_array_equal(load_image(reduced, preprocessing), load_image(original, preprocessing))


def test_a_bad_photo_is_refused_before_it_is_reduced() -> None:
    with pytest.raises(ImageRejected) as refused:
        reduce_for_queue(b"GIF89a, but then not really")
    assert refused.value.reason == "not_an_image"


def test_every_image_suffix_names_a_file_the_decoder_reads(tmp_path: Path) -> None:
    """`IMAGE_SUFFIXES` is the one list of image file names: each decodes, and HEIC (refused) is not in it."""
    from model import IMAGE_SUFFIXES

    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= set(IMAGE_SUFFIXES)
    assert ".heic" not in IMAGE_SUFFIXES
    formats = Image.registered_extensions()
    for suffix in IMAGE_SUFFIXES:
        path = tmp_path / f"photo{suffix}"
        Image.new("RGB", (40, 30), (200, 30, 30)).save(path, format=formats[suffix])
        pixels = load_image(path.read_bytes(), Preprocessing(image_size=16))
        assert pixels.shape == (16, 16, 3) and pixels[8, 8, 0] > 150, suffix


def test_the_dataset_scanner_and_the_shell_take_exactly_the_image_suffixes(tmp_path: Path) -> None:
    from bots._terminal import _looks_like_path
    from model import IMAGE_SUFFIXES
    from training import scan_folder

    (tmp_path / "FIAT UNO").mkdir()
    for suffix in (*IMAGE_SUFFIXES, ".heic", ".txt"):
        Image.new("RGB", (8, 8)).save(tmp_path / "FIAT UNO" / f"a{suffix}", format="PNG")
    assert sorted(sample.path.suffix for sample in scan_folder(tmp_path)) == sorted(IMAGE_SUFFIXES)
    assert all(_looks_like_path(f"car{suffix.upper()}") for suffix in IMAGE_SUFFIXES)
    assert not _looks_like_path("car.heic")
