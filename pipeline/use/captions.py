"""Ground-truth captions of a dataset (COCO-captions JSON or a Parquet table), looked up per ingested image.

Accepted layouts (detected from the file's content, not its name):
- **COCO captions JSON**: ``{"images": [{"id", "file_name"}, ...],
  "annotations": [{"image_id", "caption"}, ...]}`` (``annotations[].image_id`` refers to ``images[].id``, COCO's
  own integer ids). Images are keyed by the basename of ``file_name``.
- **Parquet**: one key column or more among ``image_id`` (our ingest id), ``file_name`` (matched by basename)
  and ``path`` (matched as the full source path), plus either ``caption`` (string, one row per caption) or
  ``captions`` (list of strings, one row per image).

Lookup (:meth:`GTCaptions.lookup`) tries our ingest ``image_id`` first, then the basename of the source file
(for a tar member ``<tar>::<member>``, the member's basename), then the full source path. Captions come back
in file order, stripped, empty ones dropped; an image the file does not know gets ``[]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

TAR_MEMBER_SEP = "::"  # same separator as pipeline.core.sources' tar member sources
KEY_COLUMNS = ("image_id", "file_name", "path")


class CaptionFileError(ValueError):
    """The GT caption file has a layout we do not read; the message says what was found and what is
    expected."""


def _basename(source: str) -> str:
    member = source.rsplit(TAR_MEMBER_SEP, 1)[-1]  # a tar member's own name, not the tar's
    return os.path.basename(member.replace("\\", "/"))


def _norm_path(path: str) -> str:
    return os.path.normpath(path)


@dataclass
class GTCaptions:
    """Captions keyed three ways; each dict maps a key to its captions in file order (already cleaned)."""

    by_id: dict[str, list[str]] = field(default_factory=dict)
    by_basename: dict[str, list[str]] = field(default_factory=dict)
    by_path: dict[str, list[str]] = field(default_factory=dict)
    origin: str = ""

    def lookup(self, image_id: str, source: str) -> list[str]:
        """Captions of one ingested image: by ingest ``image_id``, else by the basename of ``source``, else by
        the full ``source`` path. Returns a new list (``[]`` when none matches)."""
        for table, key in (
            (self.by_id, image_id),
            (self.by_basename, _basename(source)),
            (self.by_path, _norm_path(source)),
        ):
            if key in table:
                return list(table[key])
        return []


def _clean(captions: Iterable[object]) -> list[str]:
    out = []
    for c in captions:
        if c is None:
            continue
        text = str(c).strip()
        if text:
            out.append(text)
    return out


def _add(table: dict[str, list[str]], key: str, captions: list[str]) -> None:
    # setdefault even for no captions: a known image with only empty captions still counts as matched.
    table.setdefault(key, []).extend(captions)


def _from_coco(data: object, origin: str) -> GTCaptions:
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CaptionFileError(
            f"{origin}: not a COCO captions JSON: expected top-level lists 'images' [{{id, file_name}}] and "
            f"'annotations' [{{image_id, caption}}], found {found}"
        )
    names: dict[object, str] = {}
    owner: dict[str, object] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise CaptionFileError(f"{origin}: images[{i}] needs 'id' and 'file_name', found {img!r:.200}")
        base = _basename(str(img["file_name"]))
        if owner.setdefault(base, img["id"]) != img["id"]:
            # Matching is by basename, so two images sharing one would get each other's captions.
            raise CaptionFileError(
                f"{origin}: images {owner[base]!r} and {img['id']!r} share the file name {base!r}; "
                "captions could not be matched unambiguously (use a Parquet file with a 'path' column)"
            )
        names[img["id"]] = base
    out = GTCaptions(origin=origin)
    for base in names.values():
        out.by_basename.setdefault(base, [])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise CaptionFileError(
                f"{origin}: annotations[{i}] needs 'image_id' and 'caption', found {ann!r:.200}"
            )
        if ann["image_id"] not in names:
            raise CaptionFileError(
                f"{origin}: annotations[{i}] refers to unknown image id {ann['image_id']!r}"
            )
        _add(out.by_basename, names[ann["image_id"]], _clean([ann["caption"]]))
    return out


def _from_parquet(path: Path, origin: str) -> GTCaptions:
    table = pq.read_table(path)
    cols = table.column_names
    keys = [c for c in KEY_COLUMNS if c in cols]
    text_cols = [c for c in ("caption", "captions") if c in cols]
    if not keys or len(text_cols) != 1:
        raise CaptionFileError(
            f"{origin}: a GT caption Parquet needs a key column ({' / '.join(KEY_COLUMNS)}) and exactly one "
            f"of 'caption' (string per row) or 'captions' (list per row); found columns {cols}"
        )
    text_col = text_cols[0]
    texts = table.column(text_col).to_pylist()
    key_values = {k: table.column(k).to_pylist() for k in keys}
    out = GTCaptions(origin=origin)
    targets = {"image_id": out.by_id, "file_name": out.by_basename, "path": out.by_path}
    convert = {
        "image_id": str,
        "file_name": lambda v: _basename(str(v)),
        "path": lambda v: _norm_path(str(v)),
    }
    for row, value in enumerate(texts):
        if text_col == "captions":
            if value is not None and not isinstance(value, list):
                raise CaptionFileError(f"{origin}: column 'captions' must hold lists of strings (row {row})")
            captions = _clean(value or [])
        else:
            captions = _clean([value])
        for k in keys:
            if key_values[k][row] is not None:
                _add(targets[k], convert[k](key_values[k][row]), captions)
    return out


def load_gt_captions(path: str | os.PathLike) -> GTCaptions:
    """Read a GT caption file (COCO captions JSON or Parquet; layouts in the module docstring).

    Raises :class:`CaptionFileError` naming the expected layout when the file is neither, and
    FileNotFoundError when it does not exist.
    """
    p = Path(path)
    origin = str(p)
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        return _from_parquet(p, origin)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptionFileError(
            f"{origin}: GT captions must be a COCO captions JSON ({{'images': [...], 'annotations': [...]}}) "
            f"or a Parquet file; this is neither ({exc.__class__.__name__}: {exc})"
        ) from exc
    return _from_coco(data, origin)
