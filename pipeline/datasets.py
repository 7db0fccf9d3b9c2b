"""Readers for the standard semantic-segmentation evaluation layouts, and the evaluation protocol per dataset.

Every reader yields :class:`Sample` records ``(image_id, rgb uint8 [H, W, 3], gt uint8 [H, W])`` in sorted id
order, where ``gt`` holds evaluation label values ``0 .. K-1`` (index into ``class_names``) and ``255`` = ignore.
Label conversions (as mmsegmentation's configs):

| name            | folder layout under ``root``                                                          | GT conversion |
|-----------------|----------------------------------------------------------------------------------------|---------------|
| voc21           | ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette), ``ImageSets/Segmentation/<split>.txt`` | as is (0 = background) |
| voc20           | same as voc21                                                                          | 0 → 255, k → k-1 |
| context60       | ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png``, ``ImageSets/SegmentationContext/<split>.txt`` (mmseg's converted VOC2010) | as is (0 = background) |
| context59       | same as context60                                                                      | 0 → 255, k → k-1 |
| coco_stuff171   | ``images/<split>2017/<id>.jpg``, ``annotations/<split>2017/<id>_labelTrainIds.png``      | as is (255 ignore) |
| coco_object     | ``images/<split>2017/<id>.jpg``, ``annotations/<split>2017/<id>_instanceTrainIds.png`` (0 = background, k = k-th COCO thing class) | as is |
| ade150          | ``images/<validation>/<id>.jpg``, ``annotations/<validation>/<id>.png`` (ADEChallengeData2016) | 0 → 255, k → k-1 |
| cityscapes19    | ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``, ``gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png`` | as is |

A missing or incomplete folder raises :class:`DatasetError` naming the expected layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.vocabularies import load_vocabulary

IGNORE = 255


class DatasetError(FileNotFoundError):
    """A dataset folder that is missing or does not have the expected layout (the message shows the layout)."""


@dataclass(frozen=True)
class Sample:
    """image_id: file stem (Cityscapes: ``<city>/<stem>``); rgb: uint8 [H, W, 3]; gt: uint8 [H, W], 255 = ignore."""

    image_id: str
    rgb: np.ndarray
    gt: np.ndarray


@dataclass(frozen=True)
class Protocol:
    """Evaluation settings of one benchmark (fmbseg-paper §4.1 / common zero-shot protocol).

    short_side: the image is resized so its short side is this many pixels; crop/stride: sliding window (pixels
    of the resized image); background: "none" (no background class), "class" (background is an ordinary
    text class) or "threshold" (label 0 = background wherever the best class probability < bg_threshold).
    """

    dataset: str
    vocabulary: str
    short_side: int = 336
    crop: int = 224
    stride: int = 112
    background: str = "none"
    bg_threshold: float = 0.5


PROTOCOLS: dict[str, Protocol] = {
    "voc20": Protocol("voc20", "voc20"),
    "voc21": Protocol("voc21", "voc21", background="threshold"),
    "context59": Protocol("context59", "context59"),
    "context60": Protocol("context60", "context60", background="threshold"),
    "coco_stuff171": Protocol("coco_stuff171", "coco_stuff171", short_side=448),
    "coco_object": Protocol("coco_object", "coco_object81", background="threshold"),
    "ade150": Protocol("ade150", "ade150"),
    "cityscapes19": Protocol("cityscapes19", "cityscapes19", short_side=560),
}


def class_names(vocabulary: str) -> tuple[str, ...]:
    """Class names of a protocol vocabulary: the built-ins, plus context60 / coco_object81 (= "background" + the
    59 / 80 classes)."""
    if vocabulary == "context60":
        return ("background", *load_vocabulary("context59").classes)
    if vocabulary == "coco_object81":
        return ("background", *load_vocabulary("coco_object80").classes)
    return load_vocabulary(vocabulary).classes


def _shift_zero_to_ignore(gt: np.ndarray) -> np.ndarray:
    """0 → 255, k → k-1, 255 stays (mmseg's reduce_zero_label)."""
    out = gt.astype(np.int16) - 1
    out[(gt == 0) | (gt == IGNORE)] = IGNORE
    return out.astype(np.uint8)


def _identity(gt: np.ndarray) -> np.ndarray:
    return gt


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def read_label(path: Path) -> np.ndarray:
    """Label PNG → uint8 [H, W]: palette PNGs give their palette indices (VOC), greyscale PNGs their values."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise DatasetError(f"{path}: label PNG must be palette or greyscale, got mode {im.mode}")
        a = np.asarray(im)
    if a.max(initial=0) > 255:
        raise DatasetError(f"{path}: label values above 255")
    return a.astype(np.uint8)


@dataclass
class SegDataset:
    """A list of (image_id, image path, label path) with a GT conversion; iterate for :class:`Sample` records."""

    name: str
    root: Path
    class_names: tuple[str, ...]
    items: list[tuple[str, Path, Path]]
    convert: Callable[[np.ndarray], np.ndarray] = field(default=_identity, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Sample]:
        for image_id, img, lab in self.items:
            rgb, gt = read_rgb(img), self.convert(read_label(lab))
            if gt.shape != rgb.shape[:2]:
                raise DatasetError(f"{self.name}/{image_id}: label {gt.shape} and image {rgb.shape[:2]} differ")
            yield Sample(image_id, rgb, gt)

    @property
    def protocol(self) -> Protocol:
        return PROTOCOLS[self.name]


LAYOUTS = {
    "voc": "<root>/JPEGImages/<id>.jpg, <root>/SegmentationClass/<id>.png (palette), "
           "<root>/ImageSets/Segmentation/<split>.txt  (root = VOCdevkit/VOC2012)",
    "context": "<root>/JPEGImages/<id>.jpg, <root>/SegmentationClassContext/<id>.png, "
               "<root>/ImageSets/SegmentationContext/<split>.txt  (root = VOCdevkit/VOC2010 after mmseg's "
               "pascal_context.py conversion)",
    "coco_stuff171": "<root>/images/<split>2017/<id>.jpg, <root>/annotations/<split>2017/<id>_labelTrainIds.png "
                     "(mmseg's coco_stuff164k.py conversion)",
    "coco_object": "<root>/images/<split>2017/<id>.jpg, <root>/annotations/<split>2017/<id>_instanceTrainIds.png "
                   "(0 = background, k = k-th COCO thing class)",
    "ade": "<root>/images/validation/<id>.jpg, <root>/annotations/validation/<id>.png  (root = ADEChallengeData2016)",
    "cityscapes": "<root>/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png, "
                  "<root>/gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png (cityscapesscripts createTrainIdLabelImgs)",
}


def _missing(name: str, layout: str, what: Path) -> DatasetError:
    return DatasetError(f"dataset {name!r}: {what} not found. Expected layout: {LAYOUTS[layout]}")


def _list_split(name: str, layout: str, root: Path, split_file: Path, img_dir: Path, lab_dir: Path,
                img_ext: str) -> list[tuple[str, Path, Path]]:
    for p in (split_file, img_dir, lab_dir):
        if not p.exists():
            raise _missing(name, layout, p)
    ids = sorted({ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()})
    items = []
    for i in ids:
        img, lab = img_dir / f"{i}{img_ext}", lab_dir / f"{i}.png"
        for p in (img, lab):
            if not p.is_file():
                raise _missing(name, layout, p)
        items.append((i, img, lab))
    return items


def _list_pairs(name: str, layout: str, img_dir: Path, lab_dir: Path, img_suffix: str, lab_suffix: str,
                recursive: bool = False) -> list[tuple[str, Path, Path]]:
    for p in (img_dir, lab_dir):
        if not p.is_dir():
            raise _missing(name, layout, p)
    pattern = f"**/*{img_suffix}" if recursive else f"*{img_suffix}"
    items = []
    for img in sorted(img_dir.glob(pattern)):
        rel = img.relative_to(img_dir).as_posix()[: -len(img_suffix)]
        lab = lab_dir / f"{rel}{lab_suffix}"
        if not lab.is_file():
            raise _missing(name, layout, lab)
        items.append((rel, img, lab))
    if not items:
        raise _missing(name, layout, img_dir / pattern)
    return items


def open_dataset(name: str, root: str | Path, split: str = "val", limit: int = 0) -> SegDataset:
    """The evaluation set ``name`` (a key of :data:`PROTOCOLS`) under ``root``; ``limit`` > 0 keeps the first
    ``limit`` images (sorted ids)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(PROTOCOLS)}")
    root = Path(root).expanduser()
    names = class_names(PROTOCOLS[name].vocabulary)
    convert: Callable[[np.ndarray], np.ndarray] = _identity
    if name in ("voc20", "voc21"):
        items = _list_split(name, "voc", root, root / "ImageSets" / "Segmentation" / f"{split}.txt",
                            root / "JPEGImages", root / "SegmentationClass", ".jpg")
        convert = _shift_zero_to_ignore if name == "voc20" else _identity
    elif name in ("context59", "context60"):
        items = _list_split(name, "context", root, root / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                            root / "JPEGImages", root / "SegmentationClassContext", ".jpg")
        convert = _shift_zero_to_ignore if name == "context59" else _identity
    elif name == "coco_stuff171":
        items = _list_pairs(name, name, root / "images" / f"{split}2017", root / "annotations" / f"{split}2017",
                            ".jpg", "_labelTrainIds.png")
    elif name == "coco_object":
        items = _list_pairs(name, name, root / "images" / f"{split}2017", root / "annotations" / f"{split}2017",
                            ".jpg", "_instanceTrainIds.png")
    elif name == "ade150":
        sub = "validation" if split == "val" else split
        items = _list_pairs(name, "ade", root / "images" / sub, root / "annotations" / sub, ".jpg", ".png")
        convert = _shift_zero_to_ignore
    else:  # cityscapes19
        items = _list_pairs(name, "cityscapes", root / "leftImg8bit" / split, root / "gtFine" / split,
                            "_leftImg8bit.png", "_gtFine_labelTrainIds.png", recursive=True)
    if limit > 0:
        items = items[:limit]
    return SegDataset(name=name, root=root, class_names=names, items=items, convert=convert)
