"""Coordinate transforms: the ONE module that maps between the original image, the working (resized) image, the
sliding-window crops and the ViT patch grid (the role segment-anything's ``ResizeLongestSide`` plays there).

Frames and conventions (every function below names the frame and the order it uses)
- **original**: the ingested image, ``[H, W]`` pixels. SAM prompts, masks and label maps live here.
- **working**: the original resized so that its short side is ``short_side`` (see :func:`working_size`), ``[h, w]``
  with ``h`` and ``w`` multiples of the patch size ``p`` and at least the crop side ``S``.
- **crop**: a ``S × S`` window of the working image; its patch grid is ``[S/p, S/p]``.
- **grid**: the full working image's patch grid ``[h/p, w/p]``; cell ``(row, col)`` covers working rows
  ``row*p:(row+1)*p`` and columns ``col*p:(col+1)*p``.
- **training crop** (:class:`ScaleCrop`, USE augmentation): the original rescaled, then a fixed-size window of it,
  padded at the bottom/right where the window passes the rescaled image's edge.
- Points are **(x, y)** = (column, row) and continuous: pixel ``(col, row)`` spans ``[col, col+1) × [row, row+1)``,
  so its centre is ``(col + 0.5, row + 0.5)``. Scaling a point multiplies x by the width ratio and y by the height
  ratio (as SAM's ``apply_coords``). Grid/array indices are **(row, col)** and always say so.
- Boxes are ``xyxy`` = (x0, y0, x1, y1), continuous, end-exclusive for integer boxes (a crop at ``(x0, y0)`` of side
  ``S`` is ``(x0, y0, x0 + S, y0 + S)``).
- Sizes are ``(H, W)`` tuples (rows first), as numpy shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


# ----------------------------------------------------------------------------------------------------- resizing
def working_size(
    orig_hw: tuple[int, int], *, short_side: int, multiple: int, min_side: int = 0, max_long_side: int = 0
) -> tuple[int, int]:
    """(h, w) of the working image for an original of ``orig_hw = (H, W)``.

    One scale ``short_side / min(H, W)`` for both axes (lowered so the long side stays <= ``max_long_side`` when
    that is > 0), then each side is rounded to the nearest multiple of ``multiple`` (the patch size) and raised to
    at least ``min_side`` (the crop side), itself rounded up to a multiple. Rounding changes the aspect ratio by
    less than ``multiple / 2`` pixels per side; :class:`Resize` keeps separate x and y scales, so coordinates stay
    exact. Example: (375, 500), short_side 448, multiple 16 → (448, 592).
    """
    h0, w0 = (int(v) for v in orig_hw)
    if h0 <= 0 or w0 <= 0 or multiple <= 0 or short_side <= 0:
        raise ValueError(f"bad working size request: orig {orig_hw}, short_side {short_side}, multiple {multiple}")
    scale = short_side / min(h0, w0)
    if max_long_side > 0:
        scale = min(scale, max_long_side / max(h0, w0))
    floor = -(-max(int(min_side), multiple) // multiple) * multiple

    def side(n: int) -> int:
        return max(floor, int(round(n * scale / multiple)) * multiple)

    return side(h0), side(w0)


def fit_long_side(orig_hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(h, w) with the long side = ``max_side`` (aspect kept, short side rounded half up, at least 1), or
    ``orig_hw`` unchanged when it already fits: never upscales. Used for decode-time downsizing and previews."""
    h, w = (int(v) for v in orig_hw)
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if max(h, w) <= max_side:
        return h, w
    if w >= h:
        return max(1, (h * max_side * 2 + w) // (2 * w)), max_side
    return max_side, max(1, (w * max_side * 2 + h) // (2 * h))


def short_side_size(orig_hw: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(h, w) with min(h, w) = ``short_side``, aspect kept (rounded, at least 1): the evaluation protocols' resize."""
    h, w = (int(v) for v in orig_hw)
    f = short_side / min(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def resize_label_map(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 label map [h0, w0] → [h, w] by nearest neighbour (labels never blend)."""
    label = np.asarray(label, np.uint8)
    if label.shape == tuple(hw):
        return label
    return cv2.resize(label, (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_NEAREST)


def resize_bicubic_pil(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` → ``[h, w, 3]`` with PIL's bicubic filter (antialiased when shrinking): the resize
    of torchvision's ``Resize`` on PIL images, which OpenAI CLIP's and CaR's preprocessing use."""
    from PIL import Image

    image = np.ascontiguousarray(image, np.uint8)
    if tuple(image.shape[:2]) == tuple(hw):
        return image.copy()
    return np.asarray(Image.fromarray(image).resize((int(hw[1]), int(hw[0])), Image.BICUBIC))


def patch_multiple_size(orig_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """(h, w) = each side rounded UP to a multiple of ``patch``: how CaR's official code (CLIP-ES) feeds the mask
    proposal CLIP an image at its own resolution and aspect (e.g. (375, 500), 16 → (384, 512))."""
    h, w = (int(v) for v in orig_hw)
    return -(-h // patch) * patch, -(-w // patch) * patch


def clip_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """OpenAI CLIP's preprocess geometry: short side → ``size`` (bicubic, long side truncated as torchvision's
    ``Resize(size)``), then the centred ``size × size`` crop (offsets rounded as torchvision's ``CenterCrop``).
    uint8 RGB ``[H, W, 3]`` → ``[size, size, 3]``."""
    h, w = image.shape[:2]
    if h <= w:
        new_hw = (size, int(size * w / h))
    else:
        new_hw = (int(size * h / w), size)
    resized = resize_bicubic_pil(image, new_hw)
    top = int(round((new_hw[0] - size) / 2.0))
    left = int(round((new_hw[1] - size) / 2.0))
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


@dataclass(frozen=True)
class Resize:
    """The map between the original frame ``orig_hw = (H, W)`` and the working frame ``new_hw = (h, w)``.

    x scales by ``w / W`` and y by ``h / H`` (two scales: the working size is rounded to patch multiples).
    """

    orig_hw: tuple[int, int]
    new_hw: tuple[int, int]

    @property
    def scale_xy(self) -> tuple[float, float]:
        """(sx, sy) = (w / W, h / H): working pixels per original pixel along x (columns) and y (rows)."""
        return self.new_hw[1] / self.orig_hw[1], self.new_hw[0] / self.orig_hw[0]

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``[H, W, C]`` (original) → uint8 ``[h, w, C]`` (working). INTER_AREA when shrinking both
        axes (no aliasing), bilinear otherwise."""
        image = np.asarray(image)
        if tuple(image.shape[:2]) != tuple(self.orig_hw):
            raise ValueError(f"image is {image.shape[:2]}, this Resize expects {self.orig_hw}")
        if tuple(self.new_hw) == tuple(self.orig_hw):
            return image.copy()
        shrink = self.new_hw[0] <= self.orig_hw[0] and self.new_hw[1] <= self.orig_hw[1]
        return cv2.resize(image, (self.new_hw[1], self.new_hw[0]),
                          interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """bool ``[H, W]`` (original) → bool ``[h, w]`` (working), nearest neighbour."""
        mask = np.asarray(mask, dtype=bool)
        if tuple(self.new_hw) == tuple(self.orig_hw):
            return mask
        small = cv2.resize(mask.astype(np.uint8), (self.new_hw[1], self.new_hw[0]), interpolation=cv2.INTER_NEAREST)
        return small.astype(bool)

    def apply_pixel(self, x: float, y: float) -> tuple[int, int]:
        """Original pixel ``(x, y) = (column, row)`` → the working pixel containing it, clamped inside."""
        sx, sy = self.scale_xy
        px, py = int(np.floor(float(x) * sx)), int(np.floor(float(y) * sy))
        return min(max(px, 0), self.new_hw[1] - 1), min(max(py, 0), self.new_hw[0] - 1)

    def apply_coords(self, points_xy: np.ndarray) -> np.ndarray:
        """float ``[..., 2]`` (x, y) original → (x, y) working."""
        sx, sy = self.scale_xy
        return np.asarray(points_xy, np.float64) * np.array([sx, sy])

    def invert_coords(self, points_xy: np.ndarray) -> np.ndarray:
        """float ``[..., 2]`` (x, y) working → (x, y) original."""
        sx, sy = self.scale_xy
        return np.asarray(points_xy, np.float64) / np.array([sx, sy])

    def apply_boxes(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """float ``[N, 4]`` xyxy original → xyxy working."""
        return self.apply_coords(np.asarray(boxes_xyxy, np.float64).reshape(-1, 2, 2)).reshape(-1, 4)

    def invert_boxes(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """float ``[N, 4]`` xyxy working → xyxy original."""
        return self.invert_coords(np.asarray(boxes_xyxy, np.float64).reshape(-1, 2, 2)).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------------- training crop
PAD_VALUE = 128  # pixel value of padding in a training crop (detectron2's FixedSizeCrop default)


@dataclass(frozen=True)
class ScaleCrop:
    """Rescale, then a fixed-size window: the USE training augmentation (use-paper §4.2: "random image resizing with
    a scaling factor from 0.5 to 2 and random cropping with a size of 560×560"; see :func:`random_scale_crop`).

    The original ``orig_hw = (H, W)`` is resized to ``scaled_hw = (h, w)`` (x by w/W, y by h/H, as :class:`Resize`);
    the crop is the window of that image with top-left corner ``offset_xy = (x0, y0)`` (scaled pixels) and size
    ``crop_hw``. Where the window passes the scaled image's bottom or right edge it holds padding (``valid_hw`` is
    the part holding image pixels, top-left aligned). A point maps as ``x_crop = x · w/W − x0`` (continuous, pixel
    centres at +0.5), so the image and every mask go through the same map.
    """

    orig_hw: tuple[int, int]
    scaled_hw: tuple[int, int]
    offset_xy: tuple[int, int]
    crop_hw: tuple[int, int]

    def __post_init__(self) -> None:
        (h, w), (x0, y0) = self.scaled_hw, self.offset_xy
        if min(*self.orig_hw, h, w, *self.crop_hw) < 1 or not (0 <= x0 < w and 0 <= y0 < h):
            raise ValueError(f"bad ScaleCrop {self}")

    @property
    def resize(self) -> Resize:
        return Resize(tuple(self.orig_hw), tuple(self.scaled_hw))

    @property
    def valid_hw(self) -> tuple[int, int]:
        """(rows, cols) of the crop's top-left part that holds image pixels (the rest is padding)."""
        (h, w), (x0, y0) = self.scaled_hw, self.offset_xy
        return min(self.crop_hw[0], h - y0), min(self.crop_hw[1], w - x0)

    def apply_image(self, image: np.ndarray, pad_value: int = PAD_VALUE) -> np.ndarray:
        """uint8 ``[H, W, C]`` original → uint8 ``[ch, cw, C]`` crop (:meth:`Resize.apply_image`, then the window)."""
        scaled = self.resize.apply_image(image)
        out = np.full((*self.crop_hw, *scaled.shape[2:]), pad_value, dtype=scaled.dtype)
        (vh, vw), (x0, y0) = self.valid_hw, self.offset_xy
        out[:vh, :vw] = scaled[y0 : y0 + vh, x0 : x0 + vw]
        return out

    def source_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """(row_of_y int64 ``[vh]``, col_of_x int64 ``[vw]``): the original pixel whose square holds the centre of
        each valid crop pixel — crop pixel (x, y) shows original pixel (col_of_x[x], row_of_y[y])."""
        (vh, vw), (x0, y0) = self.valid_hw, self.offset_xy
        sx, sy = self.resize.scale_xy
        rows = np.floor((np.arange(vh) + y0 + 0.5) / sy).astype(np.int64)
        cols = np.floor((np.arange(vw) + x0 + 0.5) / sx).astype(np.int64)
        return np.clip(rows, 0, self.orig_hw[0] - 1), np.clip(cols, 0, self.orig_hw[1] - 1)

    def apply_masks(self, masks: np.ndarray) -> np.ndarray:
        """bool ``[S, H, W]`` (or ``[H, W]``) original → bool ``[S, ch, cw]`` crop, nearest by pixel centre (the
        same centre convention as the image's resize); padding is False. Costs one gather over the crop only,
        whatever the scale."""
        m = np.asarray(masks, dtype=bool)
        single = m.ndim == 2
        m = m[None] if single else m
        if m.shape[1:] != tuple(self.orig_hw):
            raise ValueError(f"masks are {m.shape[1:]}, this ScaleCrop expects {self.orig_hw}")
        rows, cols = self.source_pixels()
        out = np.zeros((m.shape[0], *self.crop_hw), dtype=bool)
        out[:, : len(rows), : len(cols)] = m[:, rows[:, None], cols[None, :]]
        return out[0] if single else out

    def apply_coords(self, points_xy: np.ndarray) -> np.ndarray:
        """float ``[..., 2]`` (x, y) original → (x, y) crop pixels (may fall outside the crop)."""
        return self.resize.apply_coords(points_xy) - np.array(self.offset_xy, np.float64)


def random_scale_crop(orig_hw: tuple[int, int], crop: int, scale_range: tuple[float, float],
                      rng: np.random.Generator) -> ScaleCrop:
    """A random :class:`ScaleCrop` of an ``orig_hw = (H, W)`` image into a ``crop × crop`` window.

    Large-scale jitter (detectron2's ``ResizeScale`` + ``FixedSizeCrop``, the recipe of Mask2Former-style
    trainers): the image is first fitted inside ``crop × crop`` (aspect kept), then scaled by s ~ U(scale_range),
    sides rounded; the window's offset is uniform over the positions that keep it inside the scaled image, each
    axis on its own (detectron2 draws one fraction for both); a scaled side shorter than ``crop`` is padded.
    Draws exactly three numbers from ``rng`` (s, then the y and x fractions)."""
    lo, hi = (float(v) for v in scale_range)
    if crop < 1 or not 0 < lo <= hi:
        raise ValueError(f"bad crop {crop} or scale range {scale_range}")
    h0, w0 = (int(v) for v in orig_hw)
    s = float(rng.uniform(lo, hi))
    fy, fx = rng.uniform(0.0, 1.0, 2)
    f = s * min(crop / h0, crop / w0)
    h, w = max(1, int(round(h0 * f))), max(1, int(round(w0 * f)))
    y0, x0 = int(round(max(0, h - crop) * fy)), int(round(max(0, w - crop) * fx))
    return ScaleCrop((h0, w0), (h, w), (x0, y0), (crop, crop))


# ----------------------------------------------------------------------------------------------------- windows
def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` pixels every ``stride`` along an axis of ``length`` pixels.

    ``0, stride, 2*stride, ...`` while the window fits, then one more window flush with the far edge
    (``length - window``) if the last regular one stops short of it, so every pixel is covered. Requires
    ``length >= window >= stride >= 1`` (a stride longer than the window would skip pixels).
    Example: (592, 224, 112) → [0, 112, 224, 336, 368].
    """
    if not length >= window >= stride >= 1:
        raise ValueError(f"need length >= window >= stride >= 1, got {length=}, {window=}, {stride=}")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


@dataclass(frozen=True)
class SlidingWindows:
    """``S × S`` crops over a working image ``image_hw = (h, w)`` every ``stride`` pixels, on its patch grid.

    ``h``, ``w``, ``S`` and ``stride <= S`` must be multiples of ``patch``, so every crop's patch cells coincide with
    cells of the full-image grid (stitching needs no interpolation). Crops are ordered row-major: all crops of
    the top band left to right, then the next band down.
    """

    image_hw: tuple[int, int]
    crop: int
    stride: int
    patch: int

    def __post_init__(self) -> None:
        h, w = self.image_hw
        for name, v in (("height", h), ("width", w), ("crop", self.crop), ("stride", self.stride)):
            if v <= 0 or v % self.patch:
                raise ValueError(f"{name} {v} must be a positive multiple of the patch size {self.patch}")
        if h < self.crop or w < self.crop:
            raise ValueError(f"working image {self.image_hw} is smaller than the crop {self.crop}")
        if self.stride > self.crop:
            raise ValueError(f"stride {self.stride} > crop {self.crop} would leave pixels without features")

    @property
    def grid_hw(self) -> tuple[int, int]:
        """(rows, cols) of the full-image patch grid = (h / p, w / p)."""
        return self.image_hw[0] // self.patch, self.image_hw[1] // self.patch

    @property
    def crop_grid(self) -> int:
        """Patch cells per crop side, S / p."""
        return self.crop // self.patch

    @property
    def offsets_xy(self) -> np.ndarray:
        """int64 ``[C, 2]``: (x0, y0) working pixels of each crop's top-left corner, row-major crop order."""
        ys = window_starts(self.image_hw[0], self.crop, self.stride)
        xs = window_starts(self.image_hw[1], self.crop, self.stride)
        return np.array([(x, y) for y in ys for x in xs], np.int64)

    @property
    def boxes_xyxy(self) -> np.ndarray:
        """int64 ``[C, 4]``: (x0, y0, x1, y1) working pixels of each crop (end-exclusive)."""
        o = self.offsets_xy
        return np.concatenate([o, o + self.crop], axis=1)

    def __len__(self) -> int:
        return len(self.offsets_xy)

    def cut(self, image: np.ndarray) -> np.ndarray:
        """Working image ``[h, w, C]`` → crops ``[N, S, S, C]`` (same dtype), row-major crop order."""
        image = np.asarray(image)
        if tuple(image.shape[:2]) != tuple(self.image_hw):
            raise ValueError(f"image is {image.shape[:2]}, windows were laid out for {self.image_hw}")
        s = self.crop
        return np.stack([image[y : y + s, x : x + s] for x, y in self.offsets_xy])

    def crop_cells(self, index: int) -> tuple[slice, slice]:
        """(row slice, col slice) of the full-image grid that crop ``index`` covers."""
        x, y = (int(v) // self.patch for v in self.offsets_xy[index])
        g = self.crop_grid
        return slice(y, y + g), slice(x, x + g)

    def coverage(self) -> np.ndarray:
        """int64 ``[rows, cols]``: how many crops cover each grid cell (>= 1 everywhere)."""
        out = np.zeros(self.grid_hw, np.int64)
        for i in range(len(self)):
            out[self.crop_cells(i)] += 1
        return out

    def stitch(self, crop_features: np.ndarray) -> np.ndarray:
        """Per-crop patch features ``[N, S/p, S/p, D]`` (crop order, cell (row, col)) → full grid
        ``[h/p, w/p, D]`` float32: each cell the plain average of the crops covering it (no renormalisation)."""
        f = np.asarray(crop_features, np.float32)
        g = self.crop_grid
        if f.ndim != 4 or f.shape[0] != len(self) or f.shape[1:3] != (g, g):
            raise ValueError(f"expected [{len(self)}, {g}, {g}, D] crop features, got {f.shape}")
        total = np.zeros((*self.grid_hw, f.shape[-1]), np.float64)
        for i in range(len(self)):
            total[self.crop_cells(i)] += f[i]
        return (total / self.coverage()[..., None]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- patch grid
def cell_centers_xy(rows: np.ndarray, cols: np.ndarray, patch: int) -> np.ndarray:
    """Grid cells given as (row, col) index arrays (same shape ``[...]``) → float64 ``[..., 2]`` (x, y) of their
    centres in the frame the grid tiles (working image for the full grid, crop pixels for a crop's grid)."""
    rows, cols = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    return np.stack([(cols + 0.5) * patch, (rows + 0.5) * patch], axis=-1)


def flat_to_rowcol(flat: np.ndarray, grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row-major flat cell indices ``[...]`` of a ``(rows, cols)`` grid → (row ``[...]``, col ``[...]``)."""
    rows, cols = np.divmod(np.asarray(flat, np.int64), int(grid_hw[1]))
    if np.any(rows >= grid_hw[0]) or np.any(rows < 0):
        raise ValueError(f"flat index outside a {grid_hw} grid")
    return rows, cols


def grid_cells_to_original_xy(rows: np.ndarray, cols: np.ndarray, patch: int, resize: Resize) -> np.ndarray:
    """Full-grid cells (row, col) ``[...]`` → float64 ``[..., 2]`` (x, y) of their centres in ORIGINAL pixels."""
    return resize.invert_coords(cell_centers_xy(rows, cols, patch))


def pixel_cells(resize: Resize, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """For every original pixel, the full-grid cell its centre falls in, per axis.

    Returns (row_of_y int64 ``[H]``, col_of_x int64 ``[W]``): pixel ``(x, y)`` of the original lies in grid cell
    ``(row_of_y[y], col_of_x[x])`` — i.e. a nearest-cell upsampling of the grid to the original frame. Indices
    are clipped into the grid.
    """
    (h0, w0), (h, w) = resize.orig_hw, resize.new_hw
    sx, sy = resize.scale_xy
    row = np.floor((np.arange(h0) + 0.5) * sy / patch).astype(np.int64)
    col = np.floor((np.arange(w0) + 0.5) * sx / patch).astype(np.int64)
    return np.clip(row, 0, h // patch - 1), np.clip(col, 0, w // patch - 1)


def pixel_cell_index(resize: Resize, patch: int) -> np.ndarray:
    """int64 ``[H, W]``: row-major flat full-grid cell index of every original pixel (see :func:`pixel_cells`)."""
    row, col = pixel_cells(resize, patch)
    return row[:, None] * (resize.new_hw[1] // patch) + col[None, :]


def upsample_grid(grid: np.ndarray, resize: Resize, patch: int) -> np.ndarray:
    """Grid values ``[rows, cols, ...]`` → ``[H, W, ...]`` original frame, nearest cell (by :func:`pixel_cells`)."""
    row, col = pixel_cells(resize, patch)
    return np.asarray(grid)[row[:, None], col[None, :]]


def patch_labels(label_map: np.ndarray, grid: tuple[int, int], mode: str = "majority", *, void: int = 255,
                 ignore: int = -1) -> np.ndarray:
    """Per-patch training labels from a pixel label map (pseudo labels or GT).

    label_map: int [H, W] (class ids, `void` = unlabelled); grid: (h, w) patches. The grid spans the whole map;
    cell (i, j) covers rows round(i·H/h)..round((i+1)·H/h) and likewise columns (cells differ by at most a pixel
    when H is not a multiple of h).
    mode "majority": the most frequent value in the cell, void included as a candidate — a cell mostly unlabelled
        becomes `ignore` rather than taking the label of a small labelled corner (pseudo labels leave large
        areas void); ties go to the smaller value, so a class beats void on a tie.
    mode "centre": the value at the cell's centre pixel (row floor((i+½)·H/h)); cheaper and sharper at
        boundaries, but one pixel decides (noisy for thin structures).
    Returns int64 [h, w], `ignore` where the chosen value is void.
    """
    lm = np.asarray(label_map)
    if lm.ndim != 2:
        raise ValueError(f"label_map must be [H, W], got {lm.shape}")
    h, w = int(grid[0]), int(grid[1])
    hh, ww = lm.shape
    lm = lm.astype(np.int64)
    if mode == "centre":
        rows = np.floor((np.arange(h) + 0.5) * hh / h).astype(np.int64)
        cols = np.floor((np.arange(w) + 0.5) * ww / w).astype(np.int64)
        out = lm[rows[:, None], cols[None, :]]
    elif mode == "majority":
        ys = np.linspace(0, hh, h + 1).round().astype(np.int64)
        xs = np.linspace(0, ww, w + 1).round().astype(np.int64)
        row_cell = np.searchsorted(ys[1:], np.arange(hh), side="right")
        col_cell = np.searchsorted(xs[1:], np.arange(ww), side="right")
        cell = row_cell[:, None] * w + col_cell[None, :]
        n_vals = int(lm.max()) + 1 if lm.size else 1
        if lm.size and lm.min() < 0:
            raise ValueError("label_map has negative values")
        counts = np.bincount((cell * n_vals + lm).ravel(), minlength=h * w * n_vals).reshape(h * w, n_vals)
        out = counts.argmax(1).reshape(h, w)
        out[counts.sum(1).reshape(h, w) == 0] = void  # a cell with no pixel (more cells than pixels)
    else:
        raise ValueError(f"mode must be 'majority' or 'centre', got {mode!r}")
    return np.where(out == void, ignore, out).astype(np.int64)
