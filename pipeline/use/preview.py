"""Human previews of USE segments: coloured mask overlays with their expressions, and a static HTML gallery.

Conventions
- Images are RGB ``uint8`` ``[H, W, 3]`` (row, col, channel). Masks are ``bool`` ``[H, W]`` decoded from the
  SEGMENTS ``rle_counts``; points are ``(x, y) = (column, row)`` pixels as OpenCV draws them.
- The overlay is drawn at preview size: the image is first downscaled (never upscaled) so its long side is
  at most ``max_side``; every mask and point is mapped into that frame by a ``pipeline.core.transforms.Resize``
  (``preview_frame``): transforms.py owns all scaling.
- Colours: segment ``k`` (its ``segment_id``) gets ``imgviz.label_colormap()[1 + k % 255]`` (index 0, black,
  is skipped), so the same segment has the same colour in every run.
- What changes: pixels of a mask are blended with its colour (``alpha``; where masks overlap, the smaller
  mask is on top), the mask's boundary pixels take its full colour (1-pixel contour *inside* the mask),
  and each label is a filled dark box. Every other pixel is exactly the downscaled input.
- Labels are drawn with DejaVu Sans (the TrueType font matplotlib ships), so any UTF-8 text renders as itself;
  the HTML gallery lists the full, HTML-escaped texts.
- Deterministic: same inputs → same bytes (for a given OpenCV build); no randomness, no time.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np

from pseudoseg.pipeline.core.artifacts import atomic_write_bytes
from pseudoseg.pipeline.core.images import encode_png
from pseudoseg.pipeline.core.ingest import iter_ingested_images
from pseudoseg.pipeline.core.masks import decode_rle, row_rle
from pseudoseg.pipeline.core.transforms import Resize, fit_long_side

FONT_PX = 11  # label font size in pixels
LABEL_PAD = 2  # pixels around the text inside its box
LABEL_MAX_CHARS = 40
LABEL_BG = (16, 16, 16)
LABEL_FG = (255, 255, 255)
SWATCH_W = 4  # a strip of the segment's colour at the label's left edge

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@functools.cache
def _palette() -> np.ndarray:
    import imgviz  # imported on first use: heavy-ish, and only previews need it

    return np.asarray(imgviz.label_colormap(), dtype=np.uint8)  # [256, 3] RGB


def segment_color(segment_id: int) -> tuple[int, int, int]:
    """RGB colour of a segment: fixed per ``segment_id``, never black."""
    r, g, b = _palette()[1 + int(segment_id) % 255]
    return int(r), int(g), int(b)


def preview_frame(height: int, width: int, max_side: int) -> Resize:
    """The map from the source image to the preview (long side <= ``max_side``), owned by pipeline.core.transforms."""
    return Resize((height, width), fit_long_side((height, width), max_side))


def segment_expressions(segment: Mapping[str, Any]) -> list[str]:
    """Unique expressions of a SEGMENTS row, in ``texts`` order."""
    return list(dict.fromkeys(str(t["expression"]) for t in (segment.get("texts") or [])))


def _label_text(text: str) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= LABEL_MAX_CHARS else text[: LABEL_MAX_CHARS - 1] + "…"


@functools.cache
def _font():
    """DejaVu Sans from matplotlib's data (a project dependency): Latin, Greek, Cyrillic and many symbols."""
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), FONT_PX)


def _rects_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Rects as (x0, y0, x1, y1), end exclusive."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _draw_label(
    canvas: np.ndarray,
    lines: Sequence[str],
    anchor_xy: tuple[int, int],
    color: tuple[int, int, int],
    placed: list[tuple[int, int, int, int]],
) -> None:
    """Draw ``lines`` in a dark box whose top-left is near ``anchor_xy`` (preview ``(x, y)``), moved down (then
    kept) to avoid earlier labels, and clamped inside the canvas. Appends the box to ``placed``."""
    from PIL import Image, ImageDraw

    out_h, out_w = canvas.shape[:2]
    font = _font()
    ascent, descent = font.getmetrics()
    line_h = ascent + descent
    box_w = min(out_w, SWATCH_W + 2 * LABEL_PAD + max(int(np.ceil(font.getlength(line))) for line in lines))
    box_h = min(out_h, len(lines) * line_h + 2 * LABEL_PAD)

    def clamp(x: int, y: int) -> tuple[int, int, int, int]:
        x0 = min(max(x, 0), out_w - box_w)
        y0 = min(max(y, 0), out_h - box_h)
        return x0, y0, x0 + box_w, y0 + box_h

    rect = clamp(*anchor_xy)
    for step in range(8):
        candidate = clamp(anchor_xy[0], anchor_xy[1] + step * box_h)
        if not any(_rects_overlap(candidate, p) for p in placed):
            rect = candidate
            break
    placed.append(rect)
    x0, y0, x1, y1 = rect
    # Draw on a copy of the box region, so glyphs (antialiasing, descenders) never change pixels outside it.
    box = Image.new("RGB", (x1 - x0, y1 - y0), LABEL_BG)
    draw = ImageDraw.Draw(box)
    draw.rectangle((0, 0, SWATCH_W - 1, y1 - y0 - 1), fill=tuple(int(c) for c in color))
    for i, line in enumerate(lines):
        draw.text((SWATCH_W + LABEL_PAD, LABEL_PAD + i * line_h), line, font=font, fill=LABEL_FG)
    canvas[y0:y1, x0:x1] = np.asarray(box)


def render_overlay(
    rgb: np.ndarray,
    segments: Sequence[Mapping[str, Any]],
    *,
    max_side: int = 768,
    alpha: float = 0.5,
    max_expressions: int = 2,
) -> np.ndarray:
    """Overlay of SEGMENTS rows on their image: RGB ``uint8`` ``[h, w, 3]`` with ``max(h, w) <= max_side``.

    ``rgb``: the ingested image, RGB ``uint8`` ``[H, W, 3]``; every segment's ``height``/``width`` must be
    ``H``/``W``. Each mask is tinted (``alpha`` of its colour) with a 1-pixel contour; each segment gets a label
    with its first ``max_expressions`` unique expressions (``#<segment_id>`` when it has none; no labels when
    ``max_expressions`` is 0), placed at its bbox top-left ``(x, y)``, clamped inside the image.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected RGB uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    height, width = rgb.shape[:2]
    frame = preview_frame(height, width, max_side)
    base = frame.apply_image(rgb)

    # Smaller masks are painted last (on top), so a whole-image segment never hides the others.
    decoded = []
    for seg in segments:
        h, w = int(seg["height"]), int(seg["width"])
        if (h, w) != (height, width):
            raise ValueError(
                f"segment {seg.get('segment_id')} of image {seg.get('image_id')!r} is {h}x{w} (HxW), "
                f"image is {height}x{width}"
            )
        mask = decode_rle(row_rle(seg))
        decoded.append((int(mask.sum()), int(seg["segment_id"]), seg, frame.apply_mask(mask)))
    decoded.sort(key=lambda d: (-d[0], d[1]))

    # top[y, x] = index into `decoded` of the topmost mask at that preview pixel, -1 where none.
    top = np.full(frame.new_hw, -1, dtype=np.int32)
    for i, (_, _, _, small) in enumerate(decoded):
        top[small] = i
    colors = np.array([segment_color(d[1]) for d in decoded] or [(0, 0, 0)], dtype=np.float64)
    canvas = base.copy()
    covered = top >= 0
    blended = (1.0 - alpha) * base[covered].astype(np.float64) + alpha * colors[top[covered]]
    canvas[covered] = np.clip(np.floor(blended + 0.5), 0, 255).astype(np.uint8)

    for _, segment_id, _, small in decoded:
        contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        if contours:
            # thickness 1 through consecutive boundary pixels: stays on mask pixels.
            cv2.drawContours(canvas, contours, -1, segment_color(segment_id), 1, cv2.LINE_8)

    if max_expressions > 0:
        placed: list[tuple[int, int, int, int]] = []
        for _, segment_id, seg, _ in decoded:
            lines = [_label_text(e) for e in segment_expressions(seg)[:max_expressions]] or [f"#{segment_id}"]
            x, y = float(seg["bbox"][0]), float(seg["bbox"][1])  # COCO xywh: (x, y) = (column, row)
            _draw_label(canvas, lines, frame.apply_pixel(x, y), segment_color(segment_id), placed)
    return canvas


def _check_name(image_id: str) -> str:
    if not _SAFE_NAME.match(image_id):
        raise ValueError(f"image_id {image_id!r} cannot be used as a file name in a gallery")
    return image_id


def _page_head(title: str, banner: str | None) -> list[str]:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>",
        "body{font-family:sans-serif;margin:1em;background:#fafafa}",
        "figure{display:inline-block;vertical-align:top;margin:0.5em;max-width:784px}",
        "img{max-width:100%;border:1px solid #ccc}",
        "figcaption ul{margin:0.2em 0;padding-left:1.2em;font-size:90%}",
        ".banner{background:#fff3cd;border:1px solid #e0c060;padding:0.5em 1em}",
        "</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if banner:
        parts.append(f'<p class="banner">{esc(banner)}</p>')
    return parts


def gallery_html(title: str, entries: Sequence[tuple[str, Sequence[str], str]], *, banner: str | None = None) -> str:
    """The ``index.html`` of a gallery: ``entries`` are ``(png file name, texts, heading)`` (heading: e.g. the
    source file's name); ``banner`` an optional notice above the images; everything escaped."""
    esc = html.escape
    parts = [*_page_head(title, banner), f"<p>{len(entries)} images</p>"]
    for name, texts, heading in entries:
        href = esc(quote(name), quote=True)
        parts.append(f'<figure id="{esc(name, quote=True)}">')
        parts.append(f'<a href="{href}"><img src="{href}" alt="{esc(heading, quote=True)}" loading="lazy"></a>')
        parts.append(f"<figcaption><strong>{esc(heading)}</strong> <code>{esc(name)}</code><ul>")
        parts.extend(f"<li>{esc(t)}</li>" for t in texts)
        parts.append("</ul></figcaption>")
        parts.append("</figure>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def index_html(title: str, shards: Sequence[tuple[str, str, int]], *, banner: str | None = None) -> str:
    """One page over every shard's gallery: ``shards`` are ``(relative href, label, image count)``."""
    esc = html.escape
    total = sum(n for _, _, n in shards)
    parts = [*_page_head(title, banner), f"<p>{total} images in {len(shards)} shards</p>", "<ul>"]
    parts += [f'<li><a href="{esc(quote(href), quote=True)}">{esc(label)}</a> ({n} images)</li>'
              for href, label, n in shards]
    parts += ["</ul>", "</body>", "</html>", ""]
    return "\n".join(parts)


def write_gallery(
    out_dir: str | Path,
    items: Iterable[tuple[str, bytes, Sequence[str]] | tuple[str, bytes, Sequence[str], str]],
    *,
    title: str,
    banner: str | None = None,
) -> Path:
    """Write ``<image_id>.png`` per item and then ``index.html`` (relative ``<img src>``, texts listed below
    each image, HTML-escaped). ``items`` is ``(image_id, png_bytes, texts[, heading])`` (heading defaults to the
    image id), shown in the given order; it may be a generator (each PNG is written as it arrives). Every file is written atomically and ``index.html``
    last, so its presence means the gallery is complete. Returns the path of ``index.html``.

    Raises ``ValueError`` for a duplicate image id or one that is not a plain file name
    (``[A-Za-z0-9_][A-Za-z0-9_.-]*``). Files of earlier galleries in ``out_dir`` are left alone.
    """
    out_dir = Path(out_dir)
    entries: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for image_id, png, texts, *heading in items:
        image_id = _check_name(str(image_id))
        if image_id in seen:
            raise ValueError(f"duplicate image_id {image_id!r} in gallery items")
        seen.add(image_id)
        name = f"{image_id}.png"
        atomic_write_bytes(out_dir / name, bytes(png))
        entries.append((name, [str(t) for t in texts], str(heading[0]) if heading else image_id))
    index = out_dir / "index.html"
    atomic_write_bytes(index, gallery_html(title, entries, banner=banner).encode("utf-8"))
    return index


def segment_caption_lines(segments: Sequence[Mapping[str, Any]]) -> list[str]:
    """One gallery line per segment, in ``segment_id`` order: ``#<id>: expr1 | expr2 | ...``."""
    lines = []
    for seg in sorted(segments, key=lambda s: int(s["segment_id"])):
        exprs = segment_expressions(seg)
        lines.append(f"#{int(seg['segment_id'])}: " + (" | ".join(exprs) if exprs else "(no text)"))
    return lines or ["(no segments)"]


def preview_shard(
    tar_path: str | Path,
    segment_rows: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    title: str,
    max_side: int = 768,
    alpha: float = 0.5,
    max_images: int | None = None,
    banner: str | None = None,
) -> Path:
    """Gallery of one shard: images of the ingest tar (manifest order) with their SEGMENTS rows overlaid.

    Images without segments are shown as they are; each is headed by its source file's name. ``max_images``
    keeps the first N images. Raises
    ``ValueError`` (before ``index.html`` is written) when a segment's image is not in the tar — checked only
    when every image was read. Returns the path of ``index.html``.
    """
    by_image: dict[str, list[Mapping[str, Any]]] = {}
    for row in segment_rows:
        by_image.setdefault(str(row["image_id"]), []).append(row)
    seen: set[str] = set()

    def items() -> Iterable[tuple[str, bytes, list[str], str]]:
        for n, (image_id, rgb, meta) in enumerate(iter_ingested_images(str(tar_path))):
            if max_images is not None and n >= max_images:
                return
            seen.add(image_id)
            segs = sorted(by_image.get(image_id, []), key=lambda s: int(s["segment_id"]))
            overlay = render_overlay(rgb, segs, max_side=max_side, alpha=alpha)
            source = str(meta.get("source", image_id))
            name = source.rsplit("::", 1)[-1].rsplit("/", 1)[-1]  # of a path or a tar member
            yield image_id, encode_png(overlay), segment_caption_lines(segs), name
        missing = sorted(set(by_image) - seen)
        if missing:  # raised before index.html is written: no gallery claims to be complete
            raise ValueError(f"{len(missing)} images have segments but are not in {tar_path}: {missing[:5]}")

    return write_gallery(out_dir, items(), title=title, banner=banner)
