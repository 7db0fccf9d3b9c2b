"""Human box–text pairs as USE boxes (use-paper §4.1: Visual Genome's region descriptions are turned into segments
by SAM, beside the caption-grounded boxes). Bound to each ingested image the way ground-truth captions are
(``pipeline.use.captions.KeyedTruth``: ingest id, path relative to the images root, or an unambiguous bare name).

Accepted layouts (detected from the content):
- **Visual Genome** ``region_descriptions.json``: ``[{"id": <image id>, "regions": [{"x", "y", "width", "height",
  "phrase", ...}, ...]}, ...]``; an image is known by VG's file name ``<id>.jpg`` (a bare name: VG's images sit in
  ``VG_100K/`` and ``VG_100K_2/``, each id once).
- **Parquet**: a key column among ``image_id`` (our ingest id), ``file_name`` (as COCO's) and ``path``; a box as
  ``x``, ``y``, ``width``, ``height`` (VG's) or ``x0``, ``y0``, ``x1``, ``y1``; and ``phrase``. One row per box.

Boxes are in pixels of the image as shown (EXIF orientation applied, before any downsizing), as VG's are; the
stage maps them to the stored image (``pipeline.core.transforms.Resize``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pseudoseg.pipeline.use.captions import KEY_COLUMNS, KeyedTruth, norm_key

AMBIGUOUS_BOX_MATCH = "ambiguous_box_match"  # reject reason of an image whose bare-name key is shared
BAD_REGION = "bad_region"  # reject reason of a region with no area inside its image, or without a phrase
SOURCE = "gt_boxes"  # the PHRASE_COLUMNS source of a human box–text pair
# box_index of region k: GT_BOX_BASE + k, apart from the caption-grounded boxes of the same image (0, 1, ...), so
# UseBoxMasks takes both kinds of box and every mask still names its box
GT_BOX_BASE = 1_000_000


class GTBoxFileError(ValueError):
    """The GT box file has a layout we do not read; the message says what was found and what is expected."""


class GTBoxFileChanged(GTBoxFileError):
    """The GT box file's content is not the one the stage was hashed with (edited during the run)."""


@dataclass(frozen=True)
class Region:
    """One human box–text pair: ``box_xyxy`` in pixels of the image as shown, and its phrase."""

    box_xyxy: tuple[float, float, float, float]
    phrase: str


class GTBoxes(KeyedTruth):
    """Regions (:class:`Region`) keyed three ways (:class:`KeyedTruth`)."""


def _number(value: object, where: str, origin: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise GTBoxFileError(f"{origin}: {where} must be a finite number, found {value!r:.50}")
    return float(value)


def _from_visual_genome(data: object, origin: str) -> GTBoxes:
    out = GTBoxes(origin=origin)
    for i, image in enumerate(data):
        if not isinstance(image, dict) or "regions" not in image or not isinstance(image["regions"], list):
            raise GTBoxFileError(f"{origin}: item [{i}] needs 'regions' (a list) and 'id', found {image!r:.200}")
        image_id = image.get("id", image.get("image_id"))
        if image_id is None:
            raise GTBoxFileError(f"{origin}: item [{i}] has no 'id'")
        regions = []
        for k, region in enumerate(image["regions"]):
            if not isinstance(region, dict):
                raise GTBoxFileError(f"{origin}: [{i}].regions[{k}] must be an object, found {region!r:.100}")
            x, y, w, h = (_number(region.get(c), f"[{i}].regions[{k}].{c}", origin)
                          for c in ("x", "y", "width", "height"))
            regions.append(Region((x, y, x + w, y + h), str(region.get("phrase") or "").strip()))
        out.by_name.setdefault(f"{image_id}.jpg", []).extend(regions)
    return out


def _from_parquet(data: bytes, origin: str) -> GTBoxes:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        raise GTBoxFileError(f"{origin}: not a readable Parquet file ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())})") from exc
    cols = table.column_names
    keys = [c for c in KEY_COLUMNS if c in cols]
    box_cols = next((c for c in (("x", "y", "width", "height"), ("x0", "y0", "x1", "y1")) if set(c) <= set(cols)), None)
    if not keys or box_cols is None or "phrase" not in cols:
        raise GTBoxFileError(
            f"{origin}: a GT box Parquet needs a key column ({' / '.join(KEY_COLUMNS)}), a box (x, y, width, height "
            f"or x0, y0, x1, y1, pixels) and 'phrase'; found columns {cols}")
    values = {c: table.column(c).to_pylist() for c in (*keys, *box_cols, "phrase")}
    out = GTBoxes(origin=origin)
    for row in range(table.num_rows):
        a, b, c, d = (_number(values[col][row], f"row {row} {col}", origin) for col in box_cols)
        box = (a, b, a + c, b + d) if box_cols[0] == "x" else (a, b, c, d)
        region = Region(box, str(values["phrase"][row] or "").strip())
        for k in keys:
            key = values[k][row]
            if key is None:
                continue
            if k == "image_id":
                out.by_id.setdefault(str(key), []).append(region)
            elif k == "file_name" and "/" not in norm_key(str(key)):
                out.by_name.setdefault(norm_key(str(key)), []).append(region)
            else:
                out.by_path.setdefault(norm_key(str(key)), []).append(region)
    return out


def parse_gt_boxes(data: bytes, origin: str) -> GTBoxes:
    """A GT box file's bytes → :class:`GTBoxes` (layouts in the module docstring); GTBoxFileError naming the
    expected layout otherwise."""
    if data[:4] == b"PAR1":
        out = _from_parquet(data, origin)
    else:
        try:
            parsed = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GTBoxFileError(
                f"{origin}: GT boxes must be Visual Genome's region_descriptions.json ([{{'id', 'regions': [...]}}]) "
                f"or a Parquet file; this is neither ({exc.__class__.__name__}: {exc})") from exc
        if not isinstance(parsed, list):
            raise GTBoxFileError(f"{origin}: Visual Genome's region_descriptions.json is a list of images "
                                 f"[{{'id', 'regions': [...]}}], found a {type(parsed).__name__}")
        out = _from_visual_genome(parsed, origin)
    out.sha256 = hashlib.sha256(data).hexdigest()
    return out


_PARSED: dict[tuple[str, str], GTBoxes] = {}
_CHECKED: dict[str, str] = {}


def read_gt_boxes(path: str | os.PathLike) -> GTBoxes:
    """The GT box file at ``path``, parsed once per content and process."""
    origin = str(path)
    data = Path(path).read_bytes()
    key = (origin, hashlib.sha256(data).hexdigest())
    found = _PARSED.get(key)
    if found is None:
        if len(_PARSED) >= 4:
            _PARSED.clear()
        found = _PARSED[key] = parse_gt_boxes(data, origin)
    return found


def load_gt_boxes(path: str | os.PathLike, *, expect: str = "") -> GTBoxes:
    """``read_gt_boxes``; with ``expect`` (a prefix of the sha256 the stage was hashed with), GTBoxFileChanged when
    the file holds something else now."""
    try:
        boxes = read_gt_boxes(path)
    except OSError as exc:
        if not expect:
            raise
        raise GTBoxFileChanged(f"{path} cannot be read any more ({type(exc).__name__}: {exc.strerror or exc}); it "
                               "was read when the run started") from None
    if expect and not boxes.sha256.startswith(expect):
        raise GTBoxFileChanged(f"{path} changed during the run: its sha256 was {expect}... when the run started; "
                               "rerun: the new content makes a new folder")
    return boxes


def check_gt_boxes(value: str) -> None:
    """The ``[use] gt_boxes`` setting's check, before anything runs: "" (none) or a readable box file of a layout
    we read; ValueError with one line otherwise."""
    if not str(value).strip() or str(value) in _CHECKED:
        return
    try:
        _CHECKED[str(value)] = read_gt_boxes(value).sha256
    except GTBoxFileError as exc:
        raise ValueError(str(exc)) from None
    except OSError as exc:
        raise ValueError(f"{value}: cannot be read ({type(exc).__name__}: {exc.strerror or exc})") from None


def region_rows(image_id: str, regions: list[Region], orig_hw: tuple[int, int], stored_hw: tuple[int, int]
                ) -> tuple[list[dict], list[tuple[int, str]]]:
    """(BOXES rows, (region index, why) of each region refused) of one image's regions: boxes mapped from the
    image as shown (``orig_hw``) to the stored one (``stored_hw``) and clipped to it; a region with no area inside
    the image, or without a phrase, is refused (``bad_region``)."""
    from pseudoseg.pipeline.core.transforms import Resize

    resize = Resize(tuple(orig_hw), tuple(stored_hw))
    h, w = stored_hw
    rows, refused = [], []
    for k, region in enumerate(regions):
        x0, y0, x1, y1 = resize.apply_boxes(np.asarray([region.box_xyxy]))[0]
        x0, x1 = float(np.clip(x0, 0, w)), float(np.clip(x1, 0, w))
        y0, y1 = float(np.clip(y0, 0, h)), float(np.clip(y1, 0, h))
        if not region.phrase:
            refused.append((k, "the region has no phrase"))
        elif x1 - x0 < 1 or y1 - y0 < 1:
            refused.append((k, f"box {list(region.box_xyxy)} has no area inside the {orig_hw[1]}x{orig_hw[0]} image"))
        else:
            rows.append({"image_id": image_id, "box_index": GT_BOX_BASE + k, "caption_index": -1, "source": SOURCE,
                         "phrase_index": k, "phrase": region.phrase, "expression": region.phrase,
                         "box_xyxy": [x0, y0, x1, y1], "score": 1.0})
    return rows, refused
