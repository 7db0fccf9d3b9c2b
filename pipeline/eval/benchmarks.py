"""Readers for the standard semantic-segmentation evaluation layouts (:data:`BENCHMARKS`: which classes each
scores), and the evaluation protocol of each seed paper per benchmark (:data:`PAPER_PROTOCOLS`,
:func:`protocol_for`: resolution, sliding window, background rule, each row naming its source).

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
| coco_object80   | same as coco_object                                                                    | 0 → 255, k → k-1 |
| ade150          | ``images/<validation>/<id>.jpg``, ``annotations/<validation>/<id>.png`` (ADEChallengeData2016) | 0 → 255, k → k-1 |
| cityscapes19    | ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``, ``gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png`` | as is |

A missing or incomplete folder raises :class:`DatasetError` naming the expected layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pseudoseg.pipeline.core.vocabularies import Vocabulary, load_vocabulary
from pseudoseg.pipeline.eval.metrics import IGNORE


class DatasetError(FileNotFoundError):
    """A dataset folder that is missing or does not have the expected layout (the message shows the layout)."""


@dataclass(frozen=True)
class Sample:
    """image_id: file stem (Cityscapes: ``<city>/<stem>``); rgb: uint8 [H, W, 3]; gt: uint8 [H, W], 255 = ignore."""

    image_id: str
    rgb: np.ndarray
    gt: np.ndarray


# --------------------------------------------------------------------------------------------- benchmarks
@dataclass(frozen=True)
class Benchmark:
    """What a benchmark scores: its class vocabulary (label value = index, see :func:`class_names`) and, in words,
    which classes enter the mean IoU (report.md prints it)."""

    name: str
    vocabulary: str
    scored: str


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("voc20", "voc20", "the 20 Pascal VOC object classes; background pixels are not scored"),
    Benchmark("voc21", "voc21", "the 20 Pascal VOC object classes + background (21)"),
    Benchmark("context59", "context59", "the 59 Pascal Context classes; background ('other') pixels are not scored"),
    Benchmark("context60", "context60", "the 59 Pascal Context classes + background (60)"),
    Benchmark("coco_stuff171", "coco_stuff171", "the 80 COCO object + 91 stuff classes of COCO-Stuff (171)"),
    Benchmark("coco_object", "coco_object81", "the 80 COCO object classes + background (81: every stuff class "
              "merged into background; CaR's and TCL's COCO Object)"),
    Benchmark("coco_object80", "coco_object80", "the 80 COCO object classes only; background (stuff) pixels are "
              "not scored (fmbseg-paper's CO-80)"),
    Benchmark("ade150", "ade150", "the 150 ADE20K classes; 'other' pixels are not scored"),
    Benchmark("cityscapes19", "cityscapes19", "the 19 Cityscapes train ids; void pixels are not scored"),
)}


def benchmark_vocabulary(vocabulary: str) -> Vocabulary:
    """The built-in vocabulary `vocabulary`, or context60 / coco_object81 = "background" + context59 /
    coco_object80 (background is prompted as the word "background" where a protocol prompts it at all)."""
    base = {"context60": "context59", "coco_object81": "coco_object80"}.get(vocabulary)
    if base is None:
        return load_vocabulary(vocabulary)
    v = load_vocabulary(base)
    return Vocabulary(vocabulary, ("background", *v.classes), (("background",), *v.prompts))


def class_names(vocabulary: str) -> tuple[str, ...]:
    """Class names of a benchmark vocabulary (label value = index), see :func:`benchmark_vocabulary`."""
    return benchmark_vocabulary(vocabulary).classes


COCO_THINGS = 80  # coco_stuff171: train ids 0..79 are the object classes, 80..170 the 91 stuff classes


def coco_stuff_classes() -> Vocabulary:
    """The 91 COCO-Stuff stuff classes (coco_stuff171 ids 80..170) with their prompt names: the extra classes
    that predict background under the "stuff" background rule."""
    v = load_vocabulary("coco_stuff171")
    return Vocabulary("coco_stuff91", v.classes[COCO_THINGS:], v.prompts[COCO_THINGS:])


# --------------------------------------------------------------------------------------------- protocols
BACKGROUND_RULES = ("none", "class", "threshold", "stuff", "uncovered")
UNLABELLED_RULES = ("wrong", "ignored")


@dataclass(frozen=True)
class Protocol:
    """How one method's paper evaluates one benchmark; `source` names the paper section / released config.

    short_side: the image is resized so its short side is this many pixels (0 = original resolution), the long
    side then capped at max_long_side (0 = no cap); crop/stride: sliding window in pixels of the resized image
    (0 = the whole image at once). background (for benchmarks with a background class, label 0):
    "none" (the benchmark has none), "class" (prompted as the text "background"; pixels no segment covers are
    background too), "threshold" (label 0 where the best foreground probability < bg_threshold), "stuff" (the 91
    COCO-Stuff stuff classes are prompted with the foreground classes; a pixel whose best class is a stuff class
    is background) or "uncovered" (pixels no kept mask covers are background: CaR). unlabelled: what a predicted
    255 (no class) on a scored pixel counts as: "wrong" (a miss of its GT class) or "ignored" (left out, as
    CaR's ``semantic_iou(ignore_background=True)`` drops the background row and column).
    """

    benchmark: str
    paper: str
    source: str
    short_side: int = 0
    max_long_side: int = 0
    crop: int = 0
    stride: int = 0
    background: str = "none"
    bg_threshold: float = 0.0
    unlabelled: str = "wrong"

    def __post_init__(self) -> None:
        if self.background not in BACKGROUND_RULES or self.unlabelled not in UNLABELLED_RULES:
            raise ValueError(f"{self.paper}/{self.benchmark}: background {self.background!r} (one of "
                             f"{BACKGROUND_RULES}), unlabelled {self.unlabelled!r} (one of {UNLABELLED_RULES})")
        has_bg = class_names(self.vocabulary)[0] == "background"
        if has_bg == (self.background == "none"):
            raise ValueError(f"{self.paper}/{self.benchmark}: background rule {self.background!r} for a benchmark "
                             f"{'with' if has_bg else 'without'} a background class")

    @property
    def vocabulary(self) -> str:
        return BENCHMARKS[self.benchmark].vocabulary

    def content(self) -> dict:
        """The settings that change predictions or scores (everything but `source`): part of Evaluate's hash."""
        d = asdict(self)
        d.pop("source")
        return d

    def describe(self) -> str:
        """One line for report.md."""
        size = (f"short side {self.short_side}" + (f" (long side <= {self.max_long_side})" if self.max_long_side
                                                   else "")) if self.short_side else "original resolution"
        window = f"sliding window {self.crop}/{self.stride}" if self.crop else "whole image"
        bg = {"none": "no background class", "class": "background prompted as a class",
              "threshold": f"background where the best class probability < {self.bg_threshold}",
              "stuff": "background = pixels whose best class is one of the 91 COCO-Stuff stuff classes",
              "uncovered": "background = pixels no kept mask covers"}[self.background]
        return f"{size}; {window}; {bg}; unlabelled predictions {self.unlabelled}"


# TCL's released evaluation (kakaobrain/tcl; stored copy: khanrc/tcl): every
# segmentation/configs/_base_/datasets/*.py has img_scale=(2048, 448) with keep_ratio (short side 448, long side
# <= 2048) and test_cfg=dict(mode="slide", stride=(224, 224), crop_size=(448, 448)); configs/eval.yml: bg_thresh
# 0.4 for the datasets with a background class, PAMR on (FMbSeg: "We don't apply any post-refinement").
_TCL = "fmbseg-paper §4 'Metrics' (follows TCL's protocol): TCL segmentation/configs/_base_/datasets/{}"
_TCL_BG = " + TCL configs/eval.yml bg_thresh 0.4"


def _fmbseg(benchmark: str, config: str, source: str = "", **kw) -> Protocol:
    return Protocol(benchmark, "fmbseg-paper", _TCL.format(config) + source, short_side=448, max_long_side=2048,
                    crop=448, stride=224, **kw)


# CaR's official evaluation (google-research clip_as_rnn/evaluate.py): the image is read from its file at its
# original size (inference_car), the label map is scored at the GT's size; assign_label starts from 0, so pixels
# no kept mask covers are background; with ignore_background (configs: VOC-20, PC-59, ADE-150) semantic_iou drops
# the background row AND column of the confusion matrix (pixels predicted background are not scored).
_CAR = "car-paper §4 'Datasets' + clip_as_rnn/evaluate.py (original resolution, assign_label){}"
_CAR_IGNORE = "; background ignored as semantic_iou(ignore_background=True)"


def _car(benchmark: str, source: str, **kw) -> Protocol:
    return Protocol(benchmark, "car-paper", _CAR.format(source), **kw)


_USE = ("use-paper §4.3: SAM automatic masks from a regular point grid on the image as given (SAM resizes "
        "internally), mask NMS, softmax over the class texts, pixel voting{}")


def _use(benchmark: str, source: str, **kw) -> Protocol:
    return Protocol(benchmark, "use-paper", _USE.format(source), **kw)


_NOT_REPORTED = "; {} not reported by the paper: its general setting"
PAPER_PROTOCOLS: dict[str, dict[str, Protocol]] = {
    "fmbseg-paper": {p.benchmark: p for p in (
        _fmbseg("voc20", "pascal_voc12_20.py"),
        _fmbseg("voc21", "pascal_voc12.py", "; background: fmbseg-paper §4 'Datasets' ('For PV-21, we add "
                "different Stuff categories to predict the background class'; which ones is not printed: the 91 "
                "COCO-Stuff stuff classes)", background="stuff"),
        _fmbseg("context59", "pascal_context59.py"),
        _fmbseg("context60", "pascal_context.py", _TCL_BG + _NOT_REPORTED.format("PC-60"),
                background="threshold", bg_threshold=0.4),
        _fmbseg("coco_stuff171", "stuff.py"),
        _fmbseg("coco_object", "coco.py", _TCL_BG + "; fmbseg-paper's CO-80 is coco_object80",
                background="threshold", bg_threshold=0.4),
        _fmbseg("coco_object80", "coco.py", "; classes: fmbseg-paper §4 'Datasets' ('object categories only "
                "(CO-80)')"),
        _fmbseg("ade150", "ade20k.py"),
        _fmbseg("cityscapes19", "cityscapes.py"),
    )},
    "car-paper": {p.benchmark: p for p in (
        _car("voc21", ", configs/voc.yaml (n_class 21)", background="uncovered"),
        _car("voc20", ", App. A.2 Table J" + _CAR_IGNORE, unlabelled="ignored"),
        _car("context60", ", configs/pascal_context.yaml (n_class 60)", background="uncovered"),
        _car("context59", ", App. A.2 Table J" + _CAR_IGNORE, unlabelled="ignored"),
        _car("coco_object", ", configs/coco.yaml (n_class 81: 80 things + background)", background="uncovered"),
        _car("ade150", ", configs/ade_150.yaml (n_class 151)" + _CAR_IGNORE, unlabelled="ignored"),
        _car("coco_object80", _CAR_IGNORE + _NOT_REPORTED.format("CO-80"), unlabelled="ignored"),
        _car("coco_stuff171", _CAR_IGNORE + _NOT_REPORTED.format("COCO-Stuff"), unlabelled="ignored"),
        _car("cityscapes19", _CAR_IGNORE + _NOT_REPORTED.format("Cityscapes"), unlabelled="ignored"),
    )},
    "use-paper": {p.benchmark: p for p in (
        _use("ade150", " (Table 2, ADE-150)"),
        _use("context59", " (Table 2, PC-59)"),
        *(_use(b, _NOT_REPORTED.format(b)) for b in ("voc20", "coco_stuff171", "coco_object80", "cityscapes19")),
        *(_use(b, _NOT_REPORTED.format(b) + "; pseudoseg prompts 'background' as a class",
               background="class") for b in ("voc21", "context60", "coco_object")),
    )},
}
# The paper whose protocol a method of ours follows ("pseudo" = FMbSeg's Stage-1 label maps).
METHOD_PAPER: dict[str, str] = {"fmbseg": "fmbseg-paper", "pseudo": "fmbseg-paper", "car": "car-paper",
                                "use_sam": "use-paper"}


def protocol_for(method: str, benchmark: str) -> Protocol:
    """The evaluation protocol of `method` (a key of METHOD_PAPER) on `benchmark` (a key of BENCHMARKS)."""
    if method not in METHOD_PAPER:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHOD_PAPER)}")
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {sorted(BENCHMARKS)}")
    return PAPER_PROTOCOLS[METHOD_PAPER[method]][benchmark]


def prompt_vocabulary(protocol: Protocol) -> Vocabulary:
    """Every class a method prompts CLIP with under `protocol`, with its prompt names: the benchmark's classes,
    plus the 91 COCO-Stuff stuff classes under the "stuff" background rule."""
    vocab = benchmark_vocabulary(protocol.vocabulary)
    return vocab + coco_stuff_classes() if protocol.background == "stuff" else vocab


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
    def benchmark(self) -> Benchmark:
        return BENCHMARKS[self.name]


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
    """The evaluation set ``name`` (a key of :data:`BENCHMARKS`) under ``root``; ``limit`` > 0 keeps the first
    ``limit`` images (sorted ids)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(BENCHMARKS)}")
    root = Path(root).expanduser()
    names = class_names(BENCHMARKS[name].vocabulary)
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
    elif name in ("coco_object", "coco_object80"):
        items = _list_pairs(name, "coco_object", root / "images" / f"{split}2017",
                            root / "annotations" / f"{split}2017", ".jpg", "_instanceTrainIds.png")
        convert = _shift_zero_to_ignore if name == "coco_object80" else _identity
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
