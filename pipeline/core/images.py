"""Image decoding and normalisation: the only place in pseudoseg where image bytes become pixels.

Every image, whatever its container or PIL mode, leaves :func:`decode_image` as an RGB ``uint8`` array of
shape ``[H, W, 3]`` (row, col, channel; C-contiguous), upright (EXIF orientation applied), first frame only,
no larger than ``max_side`` on its long side and no smaller than ``min_side`` on its short side (also after
the downsize). Anything that cannot become such an array raises
:class:`ImageRejected` with one of :data:`REJECT_CODES`, so callers record a reject row instead of crashing.

Conventions
- Sizes are ``width, height`` (x, y) as in PIL; arrays are ``[height, width, ...]`` (row, col) as in numpy.
- Alpha (modes LA, La, PA, P with transparency, RGBA, RGBa) is composited over WHITE: a fully transparent
  pixel becomes (255, 255, 255). White, not black, because transparent regions of photos/logos are usually
  meant as "paper", and black would read as a dark object to the segmenters.
- Integer modes ("I;16", "I;16B", "I;16L", "I;16N", "I") are scaled by their bit depth to 0..255, never
  clipped: ``v8 = round(v * 255 / (2**bits - 1))``. ``bits`` is the file's declared BitsPerSample for
  TIFFs of at most 16 bits (e.g. 12-bit data), 16 for the other 16-bit modes, and for the 32-bit
  container "I" 16 when every value fits in 0..65535 (the usual case: 16-bit data held in int32) and 32
  otherwise; negative values are clipped to 0.
- Float mode "F": NaN and -inf become 0, +inf the maximum. When all values lie in [0, 1] they are taken as
  normalised intensities and multiplied by 255; otherwise they are clipped to [0, 255]. Then rounded.
- Downsizing uses ``cv2.INTER_AREA`` so that the long side is exactly ``max_side``; the short side is
  rounded half up and is at least 1. Images are never upscaled.
- Deterministic: the same bytes give the same array (integer arithmetic, no randomness, no time).
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pseudoseg.pipeline.core.params import DecodeLimits
from pseudoseg.pipeline.core.transforms import Resize, fit_long_side

REJECT_CODES: tuple[str, ...] = (
    "empty_file",  # zero bytes
    "not_an_image",  # no image signature and PIL cannot identify it (text, HTML, random bytes)
    "unsupported_format",  # a real format we do not decode: not in allowed_formats, PDF, SVG, HEIF/AVIF, ...
    "truncated",  # the data ends before the pixels do
    "corrupt",  # an image signature, but the header or pixel data is broken
    "too_small",  # min(width, height) < min_side, before or after the downsize to max_side
    "decompression_bomb",  # width * height > max_pixels according to the header (nothing is allocated)
    "bad_dimensions",  # the header declares a zero width or height
)

DEFAULT_ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")

# PIL opens multi-picture JPEGs (most phone photos) as "MPO"; for us they are JPEGs (first picture).
_FORMAT_ALIASES = {"MPO": "JPEG"}

_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
    "GIF": "gif",
    "PPM": "ppm",
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Signatures of formats we decode. If PIL cannot identify data that starts with one of these, the file is
# a broken image (corrupt), not a non-image.
_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (_PNG_SIGNATURE, "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ImageRejected(Exception):
    """A file that cannot become an RGB image. ``code`` is one of REJECT_CODES; ``detail`` is for humans.

    ``str(e) == f"{code}: {detail}"``. Details never contain memory addresses or paths, so reject tables
    stay byte-identical across runs.
    """

    def __init__(self, code: str, detail: str) -> None:
        if code not in REJECT_CODES:
            raise ValueError(f"unknown reject code {code!r}; expected one of {REJECT_CODES}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    def __reduce__(self):
        # Default Exception pickling replays args=(message,), which does not fit __init__; workers in other
        # processes must be able to send rejects back.
        return (type(self), (self.code, self.detail))


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded, normalised image.

    rgb: np.uint8 [height, width, 3], C-contiguous, RGB order (not OpenCV's BGR).
    width, height: size of ``rgb`` in pixels.
    orig_width, orig_height: size after EXIF orientation, before downsizing.
    orig_mode: PIL mode of the file's first frame ("RGB", "L", "P", "RGBA", "CMYK", "I;16", "LA", ...).
    format: PIL format name ("JPEG", "PNG", ...; "MPO" is reported as "JPEG").
    exif_rotated: an EXIF orientation other than 1 was applied.
    resized: the image was downsized to fit max_side.

    ``eq=False``: comparing arrays with ``==`` is ambiguous; compare ``rgb`` with ``np.array_equal``.
    """

    rgb: np.ndarray
    width: int
    height: int
    orig_width: int
    orig_height: int
    orig_mode: str
    format: str
    exif_rotated: bool
    resized: bool


# PIL's decompression-bomb limit and truncated-image switch are module globals. We want *our* max_pixels
# to be the only limit, and truncation always to be an error, so we override both for the duration of a
# decode. A use count (not a plain lock around the decode) lets threads decode concurrently.
_pil_settings_lock = threading.Lock()
_pil_settings_users = 0
_pil_saved_settings: tuple[int | None, bool] | None = None


@contextlib.contextmanager
def _pil_settings_for_decoding() -> Iterator[None]:
    global _pil_settings_users, _pil_saved_settings
    with _pil_settings_lock:
        if _pil_settings_users == 0:
            _pil_saved_settings = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
            Image.MAX_IMAGE_PIXELS = None
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _pil_settings_users += 1
    try:
        yield
    finally:
        with _pil_settings_lock:
            _pil_settings_users -= 1
            if _pil_settings_users == 0 and _pil_saved_settings is not None:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = _pil_saved_settings
                _pil_saved_settings = None


def _clean_message(exc: BaseException) -> str:
    """The exception's message without object addresses (which differ per run)."""
    msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _sniff_unidentified(data: bytes) -> ImageRejected:
    """Classify bytes that PIL could not identify."""
    head = data[:1024]
    if head.startswith(_PNG_SIGNATURE):
        dims = _png_ihdr_dims(data)
        if dims is not None and (dims[0] == 0 or dims[1] == 0):
            return ImageRejected("bad_dimensions", f"PNG header declares {dims[0]}x{dims[1]}")
    for sig, name in _IMAGE_SIGNATURES:
        if head.startswith(sig):
            return ImageRejected("corrupt", f"{name} signature but the header cannot be parsed")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return ImageRejected("corrupt", "WEBP signature but the header cannot be parsed")
    if head.startswith(b"%PDF-"):
        # A document, not an image: we do not rasterise PDFs, so it is unsupported rather than non-image.
        return ImageRejected("unsupported_format", "PDF documents are not decoded")
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        # Vector graphics are images, but rasterising them is out of scope.
        return ImageRejected("unsupported_format", "SVG vector graphics are not rasterised")
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
        return ImageRejected("unsupported_format", f"HEIF/AVIF ({head[8:12].decode()}) is not decoded")
    if re.match(rb"P[1-7]\s", head):
        return ImageRejected("corrupt", "PPM signature but the header cannot be parsed")
    return ImageRejected("not_an_image", "no known image signature and PIL cannot identify the data")


def _png_ihdr_dims(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR chunk whose CRC is valid, else None."""
    ihdr = data[8 : 8 + 25]
    if len(ihdr) < 25 or ihdr[4:8] != b"IHDR" or int.from_bytes(ihdr[:4], "big") != 13:
        return None
    if zlib.crc32(ihdr[4:21]) != int.from_bytes(ihdr[21:25], "big"):
        return None
    return int.from_bytes(ihdr[8:12], "big"), int.from_bytes(ihdr[12:16], "big")


def _declared_bits(img: Image.Image) -> int | None:
    """BitsPerSample of a TIFF (e.g. 12 for 12-bit data in 16-bit words); None for other formats."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return None
    bits = tags.get(258)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and bits > 0 else None


def exif_orientation(img: Image.Image) -> int:
    """EXIF Orientation (1..8); 1 when absent or unreadable, since broken EXIF should not lose the pixels."""
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # malformed EXIF blocks raise all kinds of errors
        return 1


def _scale_to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers in 0..2**bits-1 → uint8 0..255, rounding half up; exact integer arithmetic."""
    maxv = (1 << bits) - 1
    v = np.clip(values.astype(np.int64), 0, maxv).astype(np.uint64)
    return ((v * 255 + maxv // 2) // maxv).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _to_rgb_array(img: Image.Image, declared_bits: int | None) -> np.ndarray:
    """Any PIL mode → np.uint8 [H, W, 3] RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("1", "L"):
        return _gray_to_rgb(np.asarray(img.convert("L"), dtype=np.uint8))
    if mode in ("LA", "La", "PA", "P", "RGBA", "RGBa"):
        # P without transparency converts to alpha 255 everywhere, so compositing leaves it unchanged.
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)
        rgb, alpha = rgba[:, :, :3], rgba[:, :, 3:4]
        over_white = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
        return over_white.astype(np.uint8)
    if mode.startswith("I;16"):
        bits = declared_bits if declared_bits is not None and 1 <= declared_bits <= 16 else 16
        gray = np.asarray(img)
        return _gray_to_rgb(_scale_to_uint8(gray, bits))
    if mode == "I":
        gray = np.asarray(img, dtype=np.int64)
        bits = 16 if gray.size == 0 or int(gray.max()) <= 0xFFFF else 32
        return _gray_to_rgb(_scale_to_uint8(gray, bits))
    if mode == "F":
        gray = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=0.0)
        finite = gray[np.isfinite(gray)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            gray = gray * 255.0
        gray = np.floor(np.clip(gray, 0.0, 255.0) + 0.5)
        return _gray_to_rgb(gray.astype(np.uint8))
    # CMYK, YCbCr, HSV, LAB, ...: PIL's own conversion.
    try:
        converted = img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported_format", f"PIL mode {mode!r} cannot be converted to RGB") from exc
    return np.asarray(converted, dtype=np.uint8)


def decode_image(
    data: bytes,
    *,
    max_side: int = DecodeLimits.max_side,
    min_side: int = DecodeLimits.min_side,
    max_pixels: int = DecodeLimits.max_pixels,
    allowed_formats: Sequence[str] = DEFAULT_ALLOWED_FORMATS,
) -> DecodedImage:
    """Decode image bytes into an upright RGB uint8 [H, W, 3] array no larger than max_side.

    Checks run cheapest first, and all size checks use the header only, so a decompression bomb or a
    1x1 pixel is rejected before any pixel memory is allocated. Raises ImageRejected (see REJECT_CODES).
    """
    if max_side < 1 or min_side < 1 or max_pixels < 1:
        raise ValueError("max_side, min_side and max_pixels must be >= 1")
    if not data:
        raise ImageRejected("empty_file", "the file has zero bytes")
    allowed = {_FORMAT_ALIASES.get(f.upper(), f.upper()) for f in allowed_formats}

    with _pil_settings_for_decoding():
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise _sniff_unidentified(data) from None
        except MemoryError:
            raise
        except Exception as exc:  # untrusted bytes: any parser failure is a reject
            code = "truncated" if isinstance(exc, EOFError) or "truncated" in str(exc) else "corrupt"
            raise ImageRejected(code, f"cannot open: {_clean_message(exc)}") from None

        with img:
            fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "unknown")
            if fmt not in allowed:
                raise ImageRejected("unsupported_format", f"{fmt} is not one of {sorted(allowed)}")
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageRejected("bad_dimensions", f"header declares {width}x{height}")
            if width * height > max_pixels:
                raise ImageRejected(
                    "decompression_bomb", f"{width}x{height} = {width * height} pixels > {max_pixels}"
                )
            if min(width, height) < min_side:
                raise ImageRejected("too_small", f"{width}x{height}: shorter side < {min_side}")
            # What is stored and handed to every later stage is the downsized image: a thin giant (20000x2) would
            # pass the check above and be stored 2048x1. fit_long_side rounds the short side the same way for
            # either orientation, so the header size decides it before any pixel is decoded.
            stored_h, stored_w = fit_long_side((height, width), max_side)
            if min(stored_w, stored_h) < min_side:
                raise ImageRejected("too_small", f"{width}x{height} is stored as {stored_w}x{stored_h} (long side "
                                                 f"fit to max_side {max_side}): shorter side < {min_side}")
            orig_mode = img.mode
            declared_bits = _declared_bits(img)

            try:
                # Multi-frame files (GIF, TIFF) are positioned on frame 0 after open; load() decodes only it.
                img.load()
                exif_rotated = exif_orientation(img) in (2, 3, 4, 5, 6, 7, 8)
                upright = ImageOps.exif_transpose(img) if exif_rotated else img
                rgb = _to_rgb_array(upright, declared_bits)
            except ImageRejected:
                raise
            except MemoryError:
                raise
            except Exception as exc:  # untrusted bytes: any decoder failure is a reject
                code = "truncated" if isinstance(exc, EOFError) or "truncated" in str(exc) else "corrupt"
                raise ImageRejected(code, _clean_message(exc)) from None

    orig_height, orig_width = rgb.shape[:2]
    if rgb.shape != (orig_height, orig_width, 3) or {orig_width, orig_height} != {width, height}:
        # PIL decoded something other than what its header announced.
        raise ImageRejected("corrupt", f"header says {width}x{height}, decoded {rgb.shape}")

    resized = max(orig_width, orig_height) > max_side
    if resized:
        frame = (orig_height, orig_width)
        rgb = Resize(frame, fit_long_side(frame, max_side)).apply_image(rgb)  # INTER_AREA: it only shrinks
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if not rgb.flags.writeable:  # np.asarray(PIL image) can be a read-only view; callers get an owned array
        rgb = rgb.copy()
    return DecodedImage(
        rgb=rgb,
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        orig_width=int(orig_width),
        orig_height=int(orig_height),
        orig_mode=orig_mode,
        format=fmt,
        exif_rotated=exif_rotated,
        resized=resized,
    )


PNG_COMPRESSION = 6  # fixed so that encoded bytes depend only on the pixels (and the OpenCV build)


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode np.uint8 [H, W, 3] RGB (or [H, W] single-channel, e.g. a label map) as PNG bytes.

    Lossless and deterministic for a given OpenCV build: fixed compression level, no metadata chunks.
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected uint8 [H, W, 3] or [H, W], got {arr.dtype} {arr.shape}")
    if arr.ndim == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ValueError("cv2.imencode failed to encode PNG")
    return buf.tobytes()


def decode_label_png(data: bytes) -> np.ndarray:
    """Single-channel 8-bit PNG (a label map, e.g. from encode_png) → np.uint8 [H, W], values unchanged.

    Mode "P" files are read as palette indices, not colours, so VOC-style palette label PNGs work too.
    Raises ValueError for anything else: label maps are our own artifacts, a mismatch is a bug, not a reject.
    """
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG" or img.mode not in ("L", "P"):
            raise ValueError(f"expected a single-channel 8-bit PNG label map, got {img.format} {img.mode}")
        return np.array(img, dtype=np.uint8)


def sniff_extension(format: str) -> str:
    """File extension (no dot) for a PIL format name: "JPEG" → "jpg", "PNG" → "png", "TIFF" → "tif"."""
    return _EXTENSIONS.get(format.upper(), format.lower())
