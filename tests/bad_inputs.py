"""Catalog of bad and good image inputs, generated in code, for fault-injection tests.

``BAD_INPUTS``: name → (factory returning the file's bytes, reject code that ``decode_image`` must raise
with its default settings). ``GOOD_VARIANTS``: name → ``GoodVariant(make, shape, mode)``: bytes factory,
expected ``DecodedImage.rgb.shape`` with default settings (max_side=2048), expected ``orig_mode``.

Factories are deterministic (seeded noise, no timestamps) and cheap (the largest, the decompression bomb,
is ~1.6 MB built in well under a second), so tests and the demo can call them freely. Other test modules
import this one; keep names stable.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------------
# Building blocks


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 [height, width, 3]: smooth gradients plus noise (so codecs do real work)."""
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.int32)
    y = np.arange(height, dtype=np.int32)
    wave = (128 + 127 * np.sin(np.arange(width + height) / 17.0)).astype(np.int16)  # indexed by x + y
    base = np.empty((height, width, 3), dtype=np.int16)
    base[:, :, 0] = (x * 255 // max(width - 1, 1))[None, :]
    base[:, :, 1] = (y * 255 // max(height - 1, 1))[:, None]
    base[:, :, 2] = wave[y[:, None] + x[None, :]]
    # Small-integer noise keeps this cheap for the 3000x1000 variant.
    base += rng.integers(-24, 25, size=base.shape, dtype=np.int16)
    return np.clip(base, 0, 255).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    """RGB uint8 [H, W, 3] → baseline JPEG via OpenCV (deterministic for a given build)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def pil_bytes(img: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC over type+payload."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_ihdr(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of all-black pixels, built without holding the raw pixels in memory.

    Each scanline is a filter byte (0) plus ``width`` zero bytes, so the whole raw stream is zeros. The
    deflate stream is a repeated, independently decodable segment: after Z_FULL_FLUSH the compressor's
    state is reset and its output byte-aligned, so ``segment * n`` is valid deflate. The zlib trailer is
    the Adler-32 of n zero bytes, which is ``(n mod 65521) << 16 | 1``.
    """
    rows_per_segment = 64
    row = width + 1
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; we write the zlib header ourselves
    full_segments, rest_rows = divmod(height, rows_per_segment)
    parts = [b"\x78\xda"]  # zlib header: deflate, 32K window, level 9 (header checksum valid)
    if full_segments:
        segment = comp.compress(bytes(row * rows_per_segment)) + comp.flush(zlib.Z_FULL_FLUSH)
        parts.append(segment * full_segments)
    if rest_rows:
        parts.append(comp.compress(bytes(row * rest_rows)) + comp.flush(zlib.Z_FULL_FLUSH))
    parts.append(comp.flush(zlib.Z_FINISH))
    total = row * height
    parts.append(struct.pack(">I", ((total % 65521) << 16) | 1))
    idat = b"".join(parts)
    return PNG_SIGNATURE + png_ihdr(width, height) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def exif_jpeg(rgb: np.ndarray, orientation: int | None, quality: int = 95) -> bytes:
    """JPEG of ``rgb`` as stored pixels, with an EXIF Orientation tag (None: no EXIF at all).

    Same pixels and quality with or without the tag, so the decoded stored pixels are identical.
    """
    kwargs: dict = {"quality": quality, "subsampling": 0}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    return pil_bytes(Image.fromarray(rgb), "JPEG", **kwargs)


def exif_png(rgb: np.ndarray, orientation: int) -> bytes:
    """Lossless PNG with an eXIf chunk holding the Orientation tag: for exact orientation checks."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(Image.fromarray(rgb), "PNG", exif=exif.tobytes())


def gray16_gradient(height: int = 8, width: int = 512) -> np.ndarray:
    """uint16 [height, width]: a horizontal ramp covering 0..65535 exactly (both ends included)."""
    ramp = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.repeat(ramp[None, :], height, axis=0)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


@functools.cache
def _base_jpeg() -> bytes:
    return jpeg_bytes(photo_like(120, 160, seed=1))


@functools.cache
def _base_png() -> bytes:
    # Noise-heavy so that IDAT dominates the file and a 60% cut lands inside the pixel data.
    return pil_bytes(Image.fromarray(photo_like(120, 160, seed=2)), "PNG")


def _jpeg_scan_start(data: bytes) -> int:
    """Offset of the first entropy-coded byte: just after the SOS segment."""
    sos = data.index(b"\xff\xda")
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    return sos + 2 + length


def truncated_jpeg() -> bytes:
    data = _base_jpeg()
    return data[: int(len(data) * 0.6)]


def truncated_png() -> bytes:
    data = _base_png()
    return data[: int(len(data) * 0.6)]


def corrupt_jpeg() -> bytes:
    """Valid JPEG headers (SOI, DQT, SOF, DHT, SOS) and EOI, but the scan data is garbage.

    Random bytes alone usually, but not always, make libjpeg fail; stray SOI markers inside the scan are
    always fatal ("broken data stream"), so we splice one in every 256 bytes.
    """
    data = _base_jpeg()
    start = _jpeg_scan_start(data)
    n = len(data) - 2 - start
    garbage = bytearray(np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes())
    for i in range(0, n - 1, 256):
        garbage[i : i + 2] = b"\xff\xd8"
    return data[:start] + bytes(garbage) + b"\xff\xd9"


def png_bad_ihdr_crc() -> bytes:
    """PNG signature, but the IHDR chunk's CRC does not match (here: flipped bits in the width)."""
    data = bytearray(_base_png())
    data[16] ^= 0x5A  # first byte of IHDR width; CRC left as it was
    return bytes(data)


def png_zero_width() -> bytes:
    """A well-formed PNG header (valid CRCs) that declares a 0 x 16 image."""
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return PNG_SIGNATURE + png_ihdr(0, 16) + idat + png_chunk(b"IEND", b"")


def ico_image() -> bytes:
    """ICO: PIL opens it, but it is not in the default allowed_formats."""
    return pil_bytes(Image.fromarray(photo_like(32, 32, seed=3)), "ICO", sizes=[(32, 32)])


SVG_TEXT = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64" fill="red"/></svg>\n'
)
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
PDF_HEADER = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
PLAIN_TEXT = b"This is not a photo, just a text file with a .jpg extension.\n"

BOMB_SIDE = 40000  # 1.6e9 pixels > default max_pixels (178,956,970); the PNG itself is ~1.6 MB


BAD_INPUTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "zero_bytes": (lambda: b"", "empty_file"),
    "truncated_jpeg": (truncated_jpeg, "truncated"),
    "truncated_png": (truncated_png, "truncated"),
    "text_named_jpg": (lambda: PLAIN_TEXT, "not_an_image"),
    "html_page": (lambda: HTML_PAGE, "not_an_image"),
    "random_bytes": (
        lambda: np.random.default_rng(11).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "not_an_image",
    ),
    # Documents and vector graphics are recognised formats we choose not to rasterise → unsupported_format.
    "pdf_header": (lambda: PDF_HEADER, "unsupported_format"),
    "svg_text": (lambda: SVG_TEXT, "unsupported_format"),
    "ico_not_allowed": (ico_image, "unsupported_format"),
    "png_1x1": (lambda: pil_bytes(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "too_small"),
    "png_1x64_thin": (lambda: pil_bytes(Image.new("RGB", (1, 64), (10, 200, 10)), "PNG"), "too_small"),
    "png_bomb_40000x40000": (
        functools.cache(lambda: png_of_zeros(BOMB_SIDE, BOMB_SIDE)),
        "decompression_bomb",
    ),
    "corrupt_jpeg_scan": (corrupt_jpeg, "corrupt"),
    "png_bad_ihdr_crc": (png_bad_ihdr_crc, "corrupt"),
    "png_zero_width": (png_zero_width, "bad_dimensions"),
}


# ---------------------------------------------------------------------------------------------------------
# Good variants


class GoodVariant(NamedTuple):
    make: Callable[[], bytes]
    shape: tuple[int, int, int]  # expected DecodedImage.rgb.shape with max_side=2048
    mode: str  # expected DecodedImage.orig_mode


def _gif_two_frames() -> bytes:
    first = Image.fromarray(photo_like(30, 40, seed=4)).convert("P")
    second = Image.fromarray(photo_like(30, 40, seed=5)).convert("P")
    return pil_bytes(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def _rgba_png() -> bytes:
    rgba = np.dstack([photo_like(30, 40, seed=6), np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))])
    rgba[0, 0, 3] = 0  # one fully transparent pixel: must come out white
    return pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")


def _cmyk_jpeg() -> bytes:
    cmyk = Image.fromarray(photo_like(30, 40, seed=8)).convert("CMYK")
    return pil_bytes(cmyk, "JPEG", quality=95)


GOOD_VARIANTS: dict[str, GoodVariant] = {
    "rgb_jpeg": GoodVariant(lambda: jpeg_bytes(photo_like(48, 64)), (48, 64, 3), "RGB"),
    "gray_L_png": GoodVariant(
        lambda: pil_bytes(Image.fromarray(photo_like(48, 64)[:, :, 0]), "PNG"), (48, 64, 3), "L"
    ),
    "gray_alpha_LA_png": GoodVariant(
        lambda: pil_bytes(Image.fromarray(photo_like(48, 64)[:, :, :2].copy(), "LA"), "PNG"),
        (48, 64, 3),
        "LA",
    ),
    "palette_P_png": GoodVariant(
        lambda: pil_bytes(Image.fromarray(photo_like(48, 64)).convert("P"), "PNG"), (48, 64, 3), "P"
    ),
    "rgba_png": GoodVariant(_rgba_png, (30, 40, 3), "RGBA"),
    "cmyk_jpeg": GoodVariant(_cmyk_jpeg, (30, 40, 3), "CMYK"),
    "gray16_png": GoodVariant(
        lambda: pil_bytes(Image.fromarray(gray16_gradient()), "PNG"), (8, 512, 3), "I;16"
    ),
    # Stored 40 high x 60 wide; orientation 6 (rotate 90° clockwise to display) → displayed 60 x 40.
    "exif_orientation_6_jpeg": GoodVariant(
        lambda: exif_jpeg(photo_like(40, 60, seed=9), 6), (60, 40, 3), "RGB"
    ),
    # 3000 wide x 1000 high → long side 2048, short side round(1000 * 2048 / 3000) = round(682.67) = 683.
    "large_3000x1000_jpeg": GoodVariant(
        lambda: jpeg_bytes(photo_like(1000, 3000), quality=85), (683, 2048, 3), "RGB"
    ),
    "gif_two_frames": GoodVariant(_gif_two_frames, (30, 40, 3), "P"),
    "bmp_rgb": GoodVariant(lambda: pil_bytes(Image.fromarray(photo_like(20, 30)), "BMP"), (20, 30, 3), "RGB"),
    "tiff_rgb": GoodVariant(
        lambda: pil_bytes(Image.fromarray(photo_like(20, 30)), "TIFF"), (20, 30, 3), "RGB"
    ),
    "webp_rgb": GoodVariant(
        lambda: pil_bytes(Image.fromarray(photo_like(20, 30)), "WEBP", lossless=True), (20, 30, 3), "RGB"
    ),
    "ppm_rgb": GoodVariant(lambda: pil_bytes(Image.fromarray(photo_like(20, 30)), "PPM"), (20, 30, 3), "RGB"),
    "png_2x2_min_side": GoodVariant(
        lambda: pil_bytes(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG"), (2, 2, 3), "RGB"
    ),
}
