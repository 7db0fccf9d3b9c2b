"""Tests for pipeline.core.images: every bad input is rejected with its code, every good variant normalised."""

from __future__ import annotations

import pickle
import re
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageFile

from pseudoseg.pipeline.core.images import (
    REJECT_CODES,
    DecodedImage,
    ImageRejected,
    decode_image,
    encode_png,
    sniff_extension,
)
from tests.bad_inputs import (
    BAD_INPUTS,
    GOOD_VARIANTS,
    exif_jpeg,
    exif_png,
    gray16_gradient,
    jpeg_bytes,
    photo_like,
    pil_bytes,
    png_of_zeros,
)

# Displayed image from stored pixels for each EXIF orientation (TIFF/EXIF spec), in numpy terms.
ORIENTATION_TO_NUMPY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a, k=-1)[::-1, :],
    8: lambda a: np.rot90(a, k=1),
}


# --- bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_rejected_with_expected_code(name: str) -> None:
    make, code = BAD_INPUTS[name]
    assert code in REJECT_CODES
    with pytest.raises(ImageRejected) as info:
        decode_image(make())
    assert info.value.code == code, str(info.value)
    assert str(info.value) == f"{code}: {info.value.detail}"
    assert not re.search(r"0x[0-9a-fA-F]{6,}", info.value.detail)  # no object addresses: reproducible rejects


def test_catalog_covers_every_reject_code() -> None:
    assert {code for _, code in BAD_INPUTS.values()} == set(REJECT_CODES)


def test_bomb_rejected_without_allocating_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    data = BAD_INPUTS["png_bomb_40000x40000"][0]()  # built before tracing: only decode_image is measured

    def no_load(self):  # pixel memory is allocated by load(); it must never be reached
        raise AssertionError("load() called on a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    monkeypatch.setattr(Image.Image, "load", no_load)
    tracemalloc.start()
    try:
        with pytest.raises(ImageRejected) as info:
            decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "decompression_bomb"
    assert peak < 50 * 2**20


def test_zero_png_generator_makes_valid_pngs() -> None:
    # The bomb factory's construction, at a size that decodes: proves the bomb is a real PNG.
    decoded = decode_image(png_of_zeros(300, 200))
    assert decoded.rgb.shape == (200, 300, 3) and not decoded.rgb.any()
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        decode_image(png_of_zeros(300, 200), max_pixels=300 * 200 - 1)
    assert decode_image(png_of_zeros(300, 200), max_pixels=300 * 200).width == 300


def test_our_pixel_limit_replaces_pils_global(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse a 40x30 image
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # and would accept truncated files
    assert decode_image(jpeg_bytes(photo_like(30, 40))).rgb.shape == (30, 40, 3)
    with pytest.raises(ImageRejected, match="^truncated"):
        decode_image(BAD_INPUTS["truncated_jpeg"][0]())
    assert Image.MAX_IMAGE_PIXELS == 100 and ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_concurrent_decodes_restore_pil_settings() -> None:
    before = Image.MAX_IMAGE_PIXELS
    payloads = [v.make() for v in GOOD_VARIANTS.values()] + [f() for f, _ in BAD_INPUTS.values()]

    def attempt(data: bytes) -> str:
        try:
            return decode_image(data).format
        except ImageRejected as e:
            return e.code

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(attempt, payloads * 2))
    assert results[: len(payloads)] == results[len(payloads) :]
    assert Image.MAX_IMAGE_PIXELS == before


def test_allowed_formats_and_min_side_are_parameters() -> None:
    png = pil_bytes(Image.fromarray(photo_like(4, 5)), "PNG")
    with pytest.raises(ImageRejected, match="^unsupported_format"):
        decode_image(png, allowed_formats=("JPEG",))
    with pytest.raises(ImageRejected, match="^too_small"):
        decode_image(png, min_side=5)
    assert decode_image(png, min_side=4).rgb.shape == (4, 5, 3)


def test_a_thin_giant_is_too_small_by_its_stored_size() -> None:
    # 20000x2 passes min_side before the downsize; stored at max_side 2048 it would be 2048x1, which every later
    # stage would refuse. The check runs on the header, before any pixel is decoded.
    thin = pil_bytes(Image.new("RGB", (20000, 2), (90, 120, 150)), "PNG")
    with pytest.raises(ImageRejected, match="^too_small") as info:
        decode_image(thin)
    assert info.value.detail == ("20000x2 is stored as 2048x1 (long side fit to max_side 2048): shorter side < 2")
    assert decode_image(thin, max_side=20000).rgb.shape == (2, 20000, 3)  # stored as is: kept
    assert decode_image(thin, min_side=1).rgb.shape == (1, 2048, 3)


def test_reject_is_picklable_and_validates_code() -> None:
    err = pickle.loads(pickle.dumps(ImageRejected("corrupt", "bad scan")))
    assert (err.code, err.detail, str(err)) == ("corrupt", "bad scan", "corrupt: bad scan")
    with pytest.raises(ValueError):
        ImageRejected("no_such_code", "x")


# --- good variants ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOOD_VARIANTS))
def test_good_variant_decodes_to_rgb_uint8(name: str) -> None:
    variant = GOOD_VARIANTS[name]
    data = variant.make()
    decoded = decode_image(data)
    assert isinstance(decoded, DecodedImage)
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.flags.c_contiguous and decoded.rgb.flags.writeable
    assert decoded.rgb.shape == variant.shape
    assert (decoded.height, decoded.width) == variant.shape[:2]
    assert decoded.orig_mode == variant.mode
    assert decoded.resized == (max(decoded.orig_width, decoded.orig_height) > 2048)
    again = decode_image(data)  # determinism: same bytes → identical array
    assert np.array_equal(decoded.rgb, again.rgb)


def test_exif_orientation_6_rotates_clockwise() -> None:
    stored = photo_like(40, 60, seed=9)
    rotated = decode_image(exif_jpeg(stored, 6))
    plain = decode_image(exif_jpeg(stored, None))  # same JPEG pixel data, no EXIF
    assert rotated.exif_rotated and not plain.exif_rotated
    assert (plain.orig_width, plain.orig_height) == (60, 40)
    assert (rotated.orig_width, rotated.orig_height) == (40, 60)  # width and height swapped
    assert np.array_equal(rotated.rgb, np.rot90(plain.rgb, k=-1))


@pytest.mark.parametrize("orientation", sorted(ORIENTATION_TO_NUMPY))
def test_every_exif_orientation_matches_numpy(orientation: int) -> None:
    stored = photo_like(5, 7, seed=orientation)  # non-square, so transposes are visible
    decoded = decode_image(exif_png(stored, orientation))
    assert np.array_equal(decoded.rgb, ORIENTATION_TO_NUMPY[orientation](stored))
    assert decoded.exif_rotated == (orientation != 1)


def test_gray16_maps_to_full_range_monotonically() -> None:
    gray = gray16_gradient()
    decoded = decode_image(pil_bytes(Image.fromarray(gray), "PNG"))
    assert decoded.orig_mode == "I;16"
    row = decoded.rgb[0, :, 0].astype(int)
    assert row.min() == 0 and row.max() == 255
    assert np.all(np.diff(row) >= 0)
    assert np.array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])  # gray stays gray
    # Scaled (v * 255 / 65535, i.e. v / 257), not clipped: multiples of 257 map exactly.
    exact = np.arange(256, dtype=np.uint16)[None, :].repeat(2, 0) * 257
    assert np.array_equal(decode_image(pil_bytes(Image.fromarray(exact), "PNG")).rgb[0, :, 0], np.arange(256))


def test_int32_and_float_tiffs_scale_documented() -> None:
    gray = gray16_gradient(4, 64)
    as_int32 = decode_image(pil_bytes(Image.fromarray(gray.astype(np.int32)), "TIFF"))
    assert as_int32.orig_mode == "I"
    assert as_int32.rgb[0, 0, 0] == 0 and as_int32.rgb[0, -1, 0] == 255  # 16-bit data in an int32 container
    unit = decode_image(pil_bytes(Image.fromarray(gray.astype(np.float32) / 65535), "TIFF"))
    assert unit.orig_mode == "F"
    assert unit.rgb[0, 0, 0] == 0 and unit.rgb[0, -1, 0] == 255  # [0, 1] floats scaled by 255
    wide = np.array([[-5.0, 0.0, 100.4, 300.0]] * 2, dtype=np.float32)
    assert decode_image(pil_bytes(Image.fromarray(wide), "TIFF")).rgb[0, :, 0].tolist() == [0, 0, 100, 255]


def test_alpha_composited_over_white() -> None:
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 100, 200)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # fully transparent
    rgba[0, 1, 3] = 128  # half
    decoded = decode_image(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded.rgb[0, 0].tolist() == [255, 255, 255]
    assert decoded.rgb[1, 1].tolist() == [10, 100, 200]  # opaque pixels untouched
    expected_half = [round((c * 128 + 255 * 127) / 255) for c in (10, 100, 200)]
    assert decoded.rgb[0, 1].tolist() == expected_half
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[..., 0] = 30
    la[0, 0, 1] = 255
    out = decode_image(pil_bytes(Image.fromarray(la, "LA"), "PNG")).rgb
    assert out[0, 0].tolist() == [30, 30, 30] and out[1, 1].tolist() == [255, 255, 255]


def test_transparent_gif_palette_over_white() -> None:
    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([0, 0, 0, 200, 50, 25] + [0] * 762)
    pal.putpixel((0, 0), 0)
    out = decode_image(pil_bytes(pal, "GIF", transparency=0)).rgb
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [200, 50, 25]


@pytest.mark.parametrize(
    ("height", "width", "max_side"), [(1000, 3000, 2048), (1000, 3000, 999), (3000, 1000, 2048)]
)
def test_giant_image_downsized_to_max_side(height: int, width: int, max_side: int) -> None:
    decoded = decode_image(jpeg_bytes(photo_like(height, width), quality=80), max_side=max_side)
    assert decoded.resized and max(decoded.width, decoded.height) == max_side
    assert (decoded.orig_width, decoded.orig_height) == (width, height)
    scale = max_side / max(width, height)
    assert abs(decoded.width - width * scale) <= 1 and abs(decoded.height - height * scale) <= 1


def test_small_images_never_upscaled_and_thin_ones_keep_one_pixel() -> None:
    small = decode_image(pil_bytes(Image.fromarray(photo_like(20, 30)), "PNG"), max_side=4096)
    assert not small.resized and small.rgb.shape == (20, 30, 3)
    thin_png = pil_bytes(Image.fromarray(photo_like(2, 600)), "PNG")
    thin = decode_image(thin_png, max_side=100, min_side=1)
    assert thin.rgb.shape == (1, 100, 3)  # 2 * 100 / 600 rounds to 0 → at least 1
    with pytest.raises(ImageRejected, match="^too_small: 600x2 is stored as 100x1"):
        decode_image(thin_png, max_side=100)  # below the default min_side once stored


def test_sniff_extension() -> None:
    assert [sniff_extension(f) for f in ("JPEG", "PNG", "TIFF", "WEBP", "MPO", "GIF", "BMP", "PPM")] == [
        "jpg",
        "png",
        "tif",
        "webp",
        "jpg",
        "gif",
        "bmp",
        "ppm",
    ]


# --- encode_png ------------------------------------------------------------------------------------------


def test_encode_png_deterministic_and_lossless_for_label_maps() -> None:
    rgb = photo_like(17, 23)
    assert encode_png(rgb) == encode_png(rgb.copy())
    label = (np.arange(17 * 23) % 256).astype(np.uint8).reshape(17, 23)
    assert np.array_equal(
        cv2.imdecode(np.frombuffer(encode_png(label), np.uint8), cv2.IMREAD_UNCHANGED), label
    )
    with pytest.raises(ValueError):
        encode_png(rgb.astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(2, 24), st.integers(2, 24), st.just(3))))
def test_png_round_trip_is_exact(rgb: np.ndarray) -> None:
    decoded = decode_image(encode_png(rgb))
    assert decoded.format == "PNG" and decoded.orig_mode == "RGB"
    assert np.array_equal(decoded.rgb, rgb)
