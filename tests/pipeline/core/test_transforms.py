"""pipeline/core/transforms.py: property tests (hypothesis) for every coordinate map FMbSeg relies on — windows cover
every pixel, round trips, odd sizes — stitching of known synthetic feature fields, and the USE training crop
(rescale + fixed-size crop): masks drawn from known geometry land on the pixels showing that geometry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pseudoseg.pipeline.core.transforms import (
    PAD_VALUE,
    Resize,
    ScaleCrop,
    SlidingWindows,
    cell_centers_xy,
    flat_to_rowcol,
    grid_cells_to_original_xy,
    pixel_cell_index,
    pixel_cells,
    random_scale_crop,
    upsample_grid,
    window_starts,
    working_size,
)

FAST = settings(max_examples=60, deadline=None)
sizes = st.integers(min_value=2, max_value=1500)


@st.composite
def windows(draw) -> SlidingWindows:
    """Random valid layouts: patch p, crop S = k*p, stride = m*p, image sides >= S, all patch multiples."""
    p = draw(st.sampled_from([1, 2, 7, 14, 16]))
    k = draw(st.integers(1, 8))
    s, stride = p * k, p * draw(st.integers(1, k))
    h = s + p * draw(st.integers(0, 20))
    w = s + p * draw(st.integers(0, 20))
    return SlidingWindows((h, w), s, stride, p)


@FAST
@given(length=st.integers(1, 3000), window=st.integers(1, 600), stride=st.integers(1, 700))
def test_window_starts_cover_every_pixel_and_stay_inside(length, window, stride):
    if not length >= window >= stride:
        with pytest.raises(ValueError):
            window_starts(length, window, stride)
        return
    starts = window_starts(length, window, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s <= length - window
        covered[s : s + window] = True
    assert covered.all()
    assert starts == sorted(set(starts)) and starts[0] == 0 and starts[-1] + window == length
    assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


def test_window_starts_example():
    assert window_starts(592, 224, 112) == [0, 112, 224, 336, 368]
    assert window_starts(224, 224, 112) == [0]


@FAST
@given(win=windows())
def test_sliding_windows_cover_every_pixel_on_the_patch_grid(win):
    h, w = win.image_hw
    covered = np.zeros((h, w), np.int64)
    for x0, y0, x1, y1 in win.boxes_xyxy:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and x1 - x0 == y1 - y0 == win.crop
        assert x0 % win.patch == 0 and y0 % win.patch == 0  # crops sit on the global patch grid
        covered[y0:y1, x0:x1] += 1
    assert (covered >= 1).all()
    # Grid coverage is the pixel coverage sampled per cell.
    np.testing.assert_array_equal(win.coverage(), covered[:: win.patch, :: win.patch])
    # Row-major crop order: y0 non-decreasing, x0 increasing within a band.
    o = win.offsets_xy
    assert (np.diff(o[:, 1]) >= 0).all()


@FAST
@given(win=windows(), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_stitching_crops_of_a_field_reproduces_it(win, d, seed):
    field = np.random.default_rng(seed).standard_normal((*win.grid_hw, d)).astype(np.float32)
    crops = np.stack([field[win.crop_cells(i)] for i in range(len(win))])
    np.testing.assert_allclose(win.stitch(crops), field, atol=1e-5)
    # cut() agrees with crop_cells(): cutting an image whose pixels carry their cell id gives those cells.
    cell_id = np.arange(np.prod(win.grid_hw)).reshape(win.grid_hw)
    image = np.repeat(np.repeat(cell_id, win.patch, 0), win.patch, 1)[..., None]
    for i, crop in enumerate(win.cut(image)):
        np.testing.assert_array_equal(crop[:: win.patch, :: win.patch, 0], cell_id[win.crop_cells(i)])


@FAST
@given(win=windows(), seed=st.integers(0, 2**16))
def test_stitching_averages_overlaps(win, seed):
    """Crop i sees field + c_i: each stitched cell is field + the mean c over the crops that cover it."""
    rng = np.random.default_rng(seed)
    field = rng.standard_normal((*win.grid_hw, 2)).astype(np.float32)
    offsets = rng.standard_normal(len(win)).astype(np.float32)
    crops = np.stack([field[win.crop_cells(i)] + offsets[i] for i in range(len(win))])
    total, count = np.zeros(win.grid_hw), np.zeros(win.grid_hw)
    for i in range(len(win)):
        total[win.crop_cells(i)] += offsets[i]
        count[win.crop_cells(i)] += 1
    np.testing.assert_allclose(win.stitch(crops), field + (total / count)[..., None], atol=1e-5)


def test_stitching_overlap_by_hand():
    # 2 × 3 grid, crops of 2 × 2 cells every cell: column 1 is covered by both crops.
    win = SlidingWindows((2, 3), crop=2, stride=1, patch=1)
    assert win.offsets_xy.tolist() == [[0, 0], [1, 0]]
    crops = np.stack([np.full((2, 2, 1), 1.0), np.full((2, 2, 1), 3.0)])
    np.testing.assert_array_equal(win.stitch(crops)[..., 0], [[1, 2, 3], [1, 2, 3]])


def test_windows_reject_off_grid_layouts():
    with pytest.raises(ValueError):
        SlidingWindows((448, 592), 224, 100, 16)  # stride not a patch multiple
    with pytest.raises(ValueError):
        SlidingWindows((200, 592), 224, 112, 16)  # image smaller than a crop
    with pytest.raises(ValueError):
        SlidingWindows((448, 600), 224, 112, 16)  # width not a patch multiple
    with pytest.raises(ValueError):
        SlidingWindows((448, 592), 224, 240, 16)  # stride > crop: gaps


@FAST
@given(h=sizes, w=sizes, short=st.integers(16, 900), p=st.sampled_from([8, 14, 16]), k=st.integers(1, 24))
def test_working_size_is_on_the_grid_and_keeps_the_aspect(h, w, short, p, k):
    crop = p * k
    rh, rw = working_size((h, w), short_side=short, multiple=p, min_side=crop)
    assert rh % p == 0 and rw % p == 0 and rh >= crop and rw >= crop
    # One scale for both axes up to the rounding to a patch multiple (unless raised to the crop side).
    scale = short / min(h, w)
    for got, orig in ((rh, h), (rw, w)):
        assert got == crop or abs(got - orig * scale) <= p / 2 + 1e-6 or got == p and orig * scale < p


def test_working_size_examples():
    assert working_size((375, 500), short_side=448, multiple=16, min_side=224) == (448, 592)
    assert working_size((373, 499), short_side=448, multiple=16, min_side=224) == (448, 592)
    assert working_size((373, 499), short_side=448, multiple=14, min_side=336) == (448, 602)
    assert working_size((100, 4000), short_side=448, multiple=16, min_side=224, max_long_side=1792) == (224, 1792)


@FAST
@given(h=sizes, w=sizes, nh=sizes, nw=sizes, seed=st.integers(0, 2**16))
def test_resize_round_trips_points_and_boxes(h, w, nh, nw, seed):
    r = Resize((h, w), (nh, nw))
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, (7, 2)) * [w, h]  # (x, y) original
    np.testing.assert_allclose(r.invert_coords(r.apply_coords(pts)), pts, rtol=1e-9, atol=1e-9)
    work = r.apply_coords(pts)
    assert (work[:, 0] <= nw + 1e-9).all() and (work[:, 1] <= nh + 1e-9).all()  # x scales with width
    boxes = np.concatenate([pts[:3], pts[3:6]], axis=1)
    np.testing.assert_allclose(r.invert_boxes(r.apply_boxes(boxes)), boxes, rtol=1e-9, atol=1e-9)
    # The image corners map to the corners: (W, H) → (w, h).
    np.testing.assert_allclose(r.apply_coords([[w, h]]), [[nw, nh]])


def test_resize_image_shape_and_identity():
    img = np.random.default_rng(0).integers(0, 256, (373, 499, 3), dtype=np.uint8)
    r = Resize((373, 499), (448, 592))
    assert r.apply_image(img).shape == (448, 592, 3)
    np.testing.assert_array_equal(Resize((373, 499), (373, 499)).apply_image(img), img)
    with pytest.raises(ValueError):
        r.apply_image(img[:-1])


@FAST
@given(h=st.integers(5, 700), w=st.integers(5, 700), p=st.sampled_from([8, 14, 16]), k=st.integers(1, 30))
def test_cell_centres_and_pixel_cells_are_inverse(h, w, p, k):
    """A cell's centre, taken to original pixels, lies in a pixel whose centre maps back to that cell (whenever a
    cell spans at least one original pixel per axis)."""
    rh, rw = working_size((h, w), short_side=p * k, multiple=p, min_side=p)
    r = Resize((h, w), (rh, rw))
    gh, gw = rh // p, rw // p
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    xy = grid_cells_to_original_xy(rows, cols, p, r)  # [gh, gw, 2] (x, y)
    assert (xy[..., 0] > 0).all() and (xy[..., 0] < w).all() and (xy[..., 1] > 0).all() and (xy[..., 1] < h).all()
    row_of_y, col_of_x = pixel_cells(r, p)
    assert row_of_y.shape == (h,) and col_of_x.shape == (w,)
    assert (np.diff(row_of_y) >= 0).all() and (np.diff(col_of_x) >= 0).all()
    if p * h / rh >= 1:
        np.testing.assert_array_equal(row_of_y[np.floor(xy[:, 0, 1]).astype(int)], np.arange(gh))
    if p * w / rw >= 1:
        np.testing.assert_array_equal(col_of_x[np.floor(xy[0, :, 0]).astype(int)], np.arange(gw))


def test_cell_centres_by_hand():
    # Cell (row 1, col 2) of a 16-px grid: working centre (x, y) = (40, 24); original at half size = (20, 12).
    np.testing.assert_array_equal(cell_centers_xy(np.array(1), np.array(2), 16), [40.0, 24.0])
    r = Resize((224, 224), (448, 448))
    np.testing.assert_array_equal(grid_cells_to_original_xy(np.array([1]), np.array([2]), 16, r), [[20.0, 12.0]])
    rows, cols = flat_to_rowcol(np.array([0, 5, 37]), (7, 6))
    assert rows.tolist() == [0, 0, 6] and cols.tolist() == [0, 5, 1]
    with pytest.raises(ValueError):
        flat_to_rowcol(np.array([42]), (7, 6))


def test_upsample_grid_matches_pixel_cell_index():
    r = Resize((373, 499), (448, 592))
    grid = np.arange(28 * 37).reshape(28, 37)
    up = upsample_grid(grid, r, 16)
    assert up.shape == (373, 499)
    np.testing.assert_array_equal(up, pixel_cell_index(r, 16))
    assert up[0, 0] == 0 and up[-1, -1] == grid[-1, -1]


# ----------------------------------------------------------------------------------------------------- training crop
def _shape_distance(kind: str, params: tuple, xy: np.ndarray) -> np.ndarray:
    """Signed distance (original pixels, negative inside) of points (x, y) [..., 2] to a rectangle or a disk."""
    x, y = xy[..., 0], xy[..., 1]
    if kind == "rect":
        x0, y0, x1, y1 = params
        dx, dy = np.maximum(x0 - x, x - x1), np.maximum(y0 - y, y - y1)
        outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
        return np.where((dx <= 0) & (dy <= 0), np.maximum(dx, dy), outside)
    cx, cy, r = params
    return np.hypot(x - cx, y - cy) - r


@FAST
@given(h=st.integers(20, 320), w=st.integers(20, 320), crop=st.sampled_from([56, 112, 140]),
       seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["rect", "disk"]))
def test_scale_crop_keeps_masks_on_their_pixels(h, w, crop, seed, kind) -> None:
    """A red shape drawn at known (continuous) geometry and its mask (pixel centres inside the shape) go through the
    same random rescale + crop: the crop's mask is the shape up to the original raster (pixels whose centre, mapped
    back, is within 0.71 original px of the boundary), and every crop pixel clearly inside / outside the mask shows
    red / not red in the crop's image (cv2 resampling, an independent implementation)."""
    rng = np.random.default_rng(seed)
    if kind == "rect":
        x0, x1 = np.sort(rng.uniform(-0.2 * w, 1.2 * w, 2))
        y0, y1 = np.sort(rng.uniform(-0.2 * h, 1.2 * h, 2))
        params = (x0, y0, x1, y1)
    else:
        params = (rng.uniform(0, w), rng.uniform(0, h), rng.uniform(2, 0.6 * max(h, w)))
    centres = np.stack(np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5), -1)  # [H, W, 2] (x, y)
    mask = _shape_distance(kind, params, centres) < 0
    image = np.full((h, w, 3), 90, np.uint8)
    image[mask] = (255, 0, 0)
    geo = random_scale_crop((h, w), crop, (0.5, 2.0), rng)
    assert geo.crop_hw == (crop, crop) and geo.valid_hw[0] >= 1 and geo.valid_hw[1] >= 1
    out_mask, out_image = geo.apply_masks(mask[None])[0], geo.apply_image(image)
    assert out_mask.shape == (crop, crop) and out_image.shape == (crop, crop, 3) and out_image.dtype == np.uint8
    vh, vw = geo.valid_hw
    assert not out_mask[vh:].any() and not out_mask[:, vw:].any()  # padding: no mask, pad colour
    assert (out_image[vh:] == PAD_VALUE).all() and (out_image[:, vw:] == PAD_VALUE).all()
    # crop pixel centres back in the original frame through the public coordinate maps
    crop_xy = np.stack(np.meshgrid(np.arange(vw) + 0.5, np.arange(vh) + 0.5), -1)
    orig_xy = geo.resize.invert_coords(crop_xy + np.array(geo.offset_xy))
    np.testing.assert_allclose(geo.apply_coords(orig_xy), crop_xy, atol=1e-9)
    dist = _shape_distance(kind, params, orig_xy)
    got = out_mask[:vh, :vw]
    assert not (got != (dist < 0))[np.abs(dist) > 0.71].any()  # geometry: wrong only at the raster's boundary
    sx, sy = geo.resize.scale_xy
    far = np.abs(dist) > 1.5 + 0.5 / min(sx, sy)  # beyond the resampling kernel of the image (linear / area)
    red = (out_image[:vh, :vw, 0] > 200) & (out_image[:vh, :vw, 1] < 60)
    assert (red[far] == got[far]).all()
    assert got[far].any() or not (dist < -(1.5 + 0.5 / min(sx, sy))).any()


def test_scale_crop_identity_scale_is_a_slice_and_small_images_pad() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = rng.random((3, 40, 60)) > 0.5
    geo = ScaleCrop((40, 60), (40, 60), (12, 5), (28, 28))
    np.testing.assert_array_equal(geo.apply_image(image), image[5:33, 12:40])
    np.testing.assert_array_equal(geo.apply_masks(mask), mask[:, 5:33, 12:40])
    small = ScaleCrop((40, 60), (20, 30), (0, 0), (28, 28))  # 0.5×: the window is larger than the image
    assert small.valid_hw == (20, 28)
    out = small.apply_masks(mask)
    np.testing.assert_array_equal(out[:, :20, :28], mask[:, 1::2, 1:57:2])  # centre of 2×2 blocks → odd pixel
    assert not out[:, 20:].any()
    with pytest.raises(ValueError):
        geo.apply_masks(mask[:, :30])


def test_random_scale_crop_draws_the_paper_range() -> None:
    """use-paper §4.2: scale factor 0.5–2, 560×560 crops. Scale relative to the crop-fitting size; offsets inside."""
    rng = np.random.default_rng(1)
    scales = []
    for _ in range(300):
        geo = random_scale_crop((480, 640), 560, (0.5, 2.0), rng)
        h, w = geo.scaled_hw
        scales.append(w / 560)  # 640 is the long side: fitted to 560, then × s
        x0, y0 = geo.offset_xy
        assert 0 <= x0 <= max(0, w - 560) and 0 <= y0 <= max(0, h - 560)
        assert abs(h / w - 480 / 640) < 0.01
    assert 0.5 <= min(scales) < 0.55 and 1.95 < max(scales) <= 2.0
    a = random_scale_crop((480, 640), 560, (0.5, 2.0), np.random.default_rng(7))
    assert a == random_scale_crop((480, 640), 560, (0.5, 2.0), np.random.default_rng(7))  # seeded
