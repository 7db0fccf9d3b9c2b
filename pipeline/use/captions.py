"""Ground-truth captions of a dataset (COCO-captions JSON or a Parquet table), bound to each ingested image by what
the image *is* (its ingest id, or its path relative to the images root), never by a file name it merely shares.

Accepted layouts (detected from the file's content, not its name):
- **COCO captions JSON**: ``{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}``
  (``annotations[].image_id`` refers to ``images[].id``, COCO's own integer ids). ``file_name`` is, as COCO defines
  it, the image's path relative to the images folder (``000000391895.jpg`` in ``train2017/``; ``dogs/0001.jpg``).
- **Parquet**: one key column or more among ``image_id`` (our ingest id), ``file_name`` (as COCO's) and ``path``
  (relative to the images root, or the full source path), plus either ``caption`` (string, one row per caption)
  or ``captions`` (list of strings, one row per image).

Matching (:meth:`GTCaptions.match`), for an image with ingest id ``image_id``, source ``source`` and path ``rel``
relative to the images root (a folder: the path under it; a tar: the member's name; a list: the path under the
list's folder; ``pipeline.core.sources.relative_name``):
1. by ingest id;
2. by path: a key equal to ``rel`` or to the full source path (both normalised: ``./``, ``//``, ``..`` resolved);
3. by bare name: a key without folders (COCO's usual ``file_name``) equal to the basename of ``rel`` — only when no
   other listed input of the dataset has that basename. When several do (``cats/0001.jpg`` and ``dogs/0001.jpg``
   for a key ``0001.jpg``), each of them is :attr:`Match.ambiguous`: the caller rejects it
   (``ambiguous_caption_match``) instead of handing it a caption that may be another image's.
A key with folders matches only that path (it never falls back to its basename). Captions come back in file order,
stripped, empty ones dropped; an image the file does not know gets ``[]``.

The file is read once per content: :func:`read_gt_captions` hashes its bytes (sha256) and parses them, and
:func:`check_gt_captions` (run on the setting before anything runs) validates it; a stage holding the digest it
was hashed with gets :class:`CaptionFileChanged` when the file now holds something else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

KEY_COLUMNS = ("image_id", "file_name", "path")
AMBIGUOUS_CAPTION_MATCH = "ambiguous_caption_match"  # reject reason of an image whose bare-name key is shared
SHOWN = 3  # same-named inputs named in an ambiguity detail


class CaptionFileError(ValueError):
    """The GT caption file has a layout we do not read; the message says what was found and what is
    expected."""


class CaptionFileChanged(CaptionFileError):
    """The GT caption file's content is not the one the stage was hashed with (edited during the run)."""


def norm_key(path: str) -> str:
    """A caption key or an image path in one comparable form: '/' separators, ``./`` and ``..`` resolved, no
    trailing '/'."""
    text = posixpath.normpath(str(path).replace("\\", "/"))
    return "" if text == "." else text


@dataclass(frozen=True)
class Match:
    """What a ground-truth file says about one image: its items (captions, boxes) in file order, or
    ``ambiguous`` (a detail naming the clash)."""

    items: list
    ambiguous: str | None = None

    @property
    def captions(self) -> list:
        return self.items


@dataclass
class KeyedTruth:
    """Ground truth of images (captions, boxes) keyed three ways; each dict maps a key to its items in file order.
    :meth:`match` binds an ingested image to its items as the module docstring says."""

    by_id: dict[str, list] = field(default_factory=dict)
    by_path: dict[str, list] = field(default_factory=dict)  # keys with folders, or full paths (norm_key)
    by_name: dict[str, list] = field(default_factory=dict)  # bare file names (no folder)
    origin: str = ""
    sha256: str = ""

    def match(self, image_id: str, source: str, rel: str, name_counts: Mapping[str, int] | None = None,
              same_names: Mapping[str, list[str]] | None = None) -> Match:
        """The items of one ingested image (see the module docstring). ``name_counts``: basename → how many
        listed inputs of the dataset have it (None: every basename is taken as unique); ``same_names``: basename →
        some of those inputs, for the detail."""
        if image_id in self.by_id:
            return Match(list(self.by_id[image_id]))
        rel_key = norm_key(rel)
        for key in (rel_key, norm_key(source)):
            if key in self.by_path:
                return Match(list(self.by_path[key]))
        name = posixpath.basename(rel_key)
        if name in self.by_name:
            count = (name_counts or {}).get(name, 1)
            if count > 1:
                others = ", ".join((same_names or {}).get(name, [])[:SHOWN])
                return Match([], ambiguous=(f"{self.origin} names {name!r} without a folder, and {count} inputs "
                                            f"have that name ({others}{', ...' if count > SHOWN else ''}): give "
                                            f"its path relative to the images root (file_name or path) instead"))
            return Match(list(self.by_name[name]))
        return Match([])

    def lookup(self, image_id: str, source: str, rel: str | None = None) -> list:
        """The items of one image when names are known to be unique (``match`` without counts)."""
        return self.match(image_id, source, source if rel is None else rel).items


class GTCaptions(KeyedTruth):
    """Captions (strings, already cleaned) keyed three ways (:class:`KeyedTruth`)."""


def _clean(captions: Iterable[object]) -> list[str]:
    out = []
    for c in captions:
        if c is None:
            continue
        text = str(c).strip()
        if text:
            out.append(text)
    return out


def _add_file_name(out: GTCaptions, file_name: str, captions: list[str]) -> None:
    key = norm_key(file_name)
    table = out.by_path if "/" in key else out.by_name
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
        key = norm_key(str(img["file_name"]))
        if not key:
            raise CaptionFileError(f"{origin}: images[{i}] has an empty file_name")
        if owner.setdefault(key, img["id"]) != img["id"]:
            raise CaptionFileError(
                f"{origin}: images {owner[key]!r} and {img['id']!r} have the same file_name {key!r}; captions "
                "could not be matched unambiguously"
            )
        names[img["id"]] = key
    captions: dict[object, list[str]] = {image_id: [] for image_id in names}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise CaptionFileError(
                f"{origin}: annotations[{i}] needs 'image_id' and 'caption', found {ann!r:.200}"
            )
        if ann["image_id"] not in names:
            raise CaptionFileError(
                f"{origin}: annotations[{i}] refers to unknown image id {ann['image_id']!r}"
            )
        captions[ann["image_id"]].extend(_clean([ann["caption"]]))
    out = GTCaptions(origin=origin)
    for image_id, key in names.items():
        _add_file_name(out, key, captions[image_id])
    return out


def _from_parquet(data: bytes, origin: str) -> GTCaptions:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        raise CaptionFileError(f"{origin}: not a readable Parquet file ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())})") from exc
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
    for row, value in enumerate(texts):
        if text_col == "captions":
            if value is not None and not isinstance(value, list):
                raise CaptionFileError(f"{origin}: column 'captions' must hold lists of strings (row {row})")
            captions = _clean(value or [])
        else:
            captions = _clean([value])
        for k in keys:
            key = key_values[k][row]
            if key is None:
                continue
            if k == "image_id":
                out.by_id.setdefault(str(key), []).extend(captions)
            elif k == "file_name":
                _add_file_name(out, str(key), captions)
            else:  # a path: relative to the images root, or a full source path; never matched by its basename
                out.by_path.setdefault(norm_key(str(key)), []).extend(captions)
    return out


def parse_gt_captions(data: bytes, origin: str) -> GTCaptions:
    """A GT caption file's bytes → :class:`GTCaptions` (layouts in the module docstring); CaptionFileError naming
    the expected layout otherwise."""
    if data[:4] == b"PAR1":
        out = _from_parquet(data, origin)
    else:
        try:
            parsed = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CaptionFileError(
                f"{origin}: GT captions must be a COCO captions JSON ({{'images': [...], 'annotations': [...]}}) "
                f"or a Parquet file; this is neither ({exc.__class__.__name__}: {exc})"
            ) from exc
        out = _from_coco(parsed, origin)
    out.sha256 = hashlib.sha256(data).hexdigest()
    return out


_PARSED: dict[tuple[str, str], GTCaptions] = {}  # (origin, sha256) → parsed: each content parsed once per process
_CHECKED: dict[str, str] = {}  # path → sha256 of the content validated by check_gt_captions


def read_gt_captions(path: str | os.PathLike) -> GTCaptions:
    """The GT caption file at ``path``, read once (bytes hashed, then parsed — once per content and process).
    Raises :class:`CaptionFileError` for a layout we do not read, OSError when it cannot be read."""
    origin = str(path)
    data = Path(path).read_bytes()
    key = (origin, hashlib.sha256(data).hexdigest())
    found = _PARSED.get(key)
    if found is None:
        if len(_PARSED) >= 4:
            _PARSED.clear()
        found = _PARSED[key] = parse_gt_captions(data, origin)
    return found


def load_gt_captions(path: str | os.PathLike, *, expect: str = "") -> GTCaptions:
    """``read_gt_captions``; with ``expect`` (a prefix of the sha256 the stage was hashed with),
    :class:`CaptionFileChanged` when the file's content is not that one any more."""
    try:
        captions = read_gt_captions(path)
    except OSError as exc:
        if not expect:
            raise
        raise CaptionFileChanged(f"{path} cannot be read any more ({type(exc).__name__}: {exc.strerror or exc}); it "
                                 f"was read when the run started") from None
    if expect and not captions.sha256.startswith(expect):
        raise CaptionFileChanged(
            f"{path} changed during the run: its sha256 was {expect}... when the run started and is "
            f"{captions.sha256[:len(expect)]}... now; the stage's folder holds captions of the first version only; "
            f"rerun: the new content makes a new folder")
    return captions


def name_index(rel_names: Iterable[str]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """(basename → how many of ``rel_names`` have it, basename → the first few of them) over every input the
    dataset lists (paths relative to the images root): what decides whether a bare-name key is ambiguous."""
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for rel in rel_names:
        name = posixpath.basename(norm_key(rel))
        counts[name] = counts.get(name, 0) + 1
        if counts[name] <= SHOWN:
            examples.setdefault(name, []).append(rel)
    return counts, examples


def check_gt_captions(value: str) -> None:
    """The ``[use] gt_captions`` setting's check, before anything runs: "" (none) or a readable caption file of a
    layout we read; ValueError with one line otherwise. Each path is validated once per process (later reads of
    the setting do not re-read it: a file edited during the run is the stage's :class:`CaptionFileChanged`)."""
    if not str(value).strip() or str(value) in _CHECKED:
        return
    try:
        _CHECKED[str(value)] = read_gt_captions(value).sha256
    except CaptionFileError as exc:
        raise ValueError(str(exc)) from None
    except OSError as exc:
        raise ValueError(f"{value}: cannot be read ({type(exc).__name__}: {exc.strerror or exc})") from None
