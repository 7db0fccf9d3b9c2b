"""Feature caches (frozen-encoder tokens) and text embeddings for the two trainable heads. Pure logic: the CLIP and
DINOv2 encoders are role objects passed in (models/roles.py), never loaded here; image resizing goes through
pipeline/core/transforms.py. Stored layout and fields: schemas/features.py.

Two configurations ("purposes"):
- ``use`` (USE head, use-paper §3.2): every image is resized — squashed, aspect not kept — to one square, so all
  images share one g×g patch grid and batch by stacking (``models.training.trainer.collate_use``). CLIP gets ``S×S``
  (S = its native image_size by default, g = S / p_clip), DINOv2 ``g·p_dino`` square: both on the same grid. The
  grid spans the whole image, so a segment mask of the ORIGINAL image pools onto it by exact area
  (``models.training.heads.mask_pooling_weights(mask, (g, g))``) without any coordinate transform. The paper instead
  trains on random 0.5–2× rescaled 560×560 crops; a cache of frozen features cannot be augmented that way, so
  ``[train_use] features = online`` runs the same ``encode_use`` inside the training loop on such crops
  (``pipeline.core.transforms.random_scale_crop``; ``encode_use_batch``) instead of reading this cache.
- ``fmbseg`` (alignment block, fmbseg-paper §3.3): DINOv2 on the image resized keeping its aspect
  (``transforms.working_size``: short side, patch multiples, long side capped); the grid again spans the whole
  image, so ``pipeline.core.transforms.patch_labels(label_map, grid)`` reads the original-size label map directly.

Block specs (``resolve_blocks``): ``all`` | ``none`` | ``last:N`` | ``every:K`` (the last block and every K-th before
it) | an explicit comma list of indices (negative from the end).
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pseudoseg.pipeline.core.npy import npy_bytes
from pseudoseg.pipeline.core.transforms import Resize, working_size
from pseudoseg.pipeline.core.vocabularies import TEMPLATE_SETS

PURPOSES = ("use", "fmbseg")
FEATURE_DTYPE = np.float16  # on disk; encoders and heads compute in float32
ARRAY_NAMES = ("clip_patches", "clip_cls", "dino_patches", "dino_cls")  # = the sample keys collate_use reads
MAX_OPEN_SHARDS = 128  # tar descriptors a TarStore keeps open per process (oldest closed first)
NPY_HEADER_READ = 4096  # bytes read to parse an .npy header (numpy pads headers to 64 bytes; shapes are short)
NPY_HEADER_BYTES = 128  # numpy's .npy v1 header for 1-4-D float16 arrays of realistic shapes (64-byte aligned)

# use-paper §4.2: "4 prompt templates including: a photo of {}, This is a photo of {}, There is {} in the scene,
# and a photo of {} in the scene" — each expression's embedding is the mean over them (L2-normalised).
USE_TEMPLATES = ("a photo of {}", "This is a photo of {}", "There is {} in the scene", "a photo of {} in the scene")
TEXT_TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"use4": USE_TEMPLATES, **TEMPLATE_SETS}

# Disk budget the default configuration is held to: both caches of a COCO train2017-sized run in 1 TB.
COCO_TRAIN_IMAGES = 118_287
DISK_BUDGET_BYTES = 10**12


def text_templates(name: str) -> tuple[str, ...]:
    """'use4' (use-paper §4.2), 'single' ("a photo of a {}.", FMbSeg) or 'imagenet80'."""
    try:
        return TEXT_TEMPLATE_SETS[name.strip()]
    except KeyError:
        raise ValueError(f"unknown template set {name!r}; known: {sorted(TEXT_TEMPLATE_SETS)}") from None


def resolve_blocks(spec: str, num_layers: int) -> tuple[int, ...]:
    """Block spec (module docstring) → ascending 0-based block indices of a model with ``num_layers`` blocks.

    Examples for 24 blocks: 'all' → 0..23; 'last:2' → (22, 23); 'every:8' → (7, 15, 23); '-1,11' → (11, 23).
    """
    s = spec.strip().lower()
    if s in ("", "none"):
        return ()
    if s == "all":
        return tuple(range(num_layers))
    kind, _, arg = s.partition(":")
    if kind in ("last", "every") and arg.strip().isdigit() and int(arg) > 0:
        n = int(arg)
        if kind == "last":
            return tuple(range(max(0, num_layers - n), num_layers))
        return tuple(sorted(range(num_layers - 1, -1, -n)))
    try:
        idx = [int(v) for v in s.split(",")]
    except ValueError:
        raise ValueError(f"block spec {spec!r}: expected all | none | last:N | every:K | comma list") from None
    out = sorted({i + num_layers if i < 0 else i for i in idx})
    if any(not 0 <= i < num_layers for i in out):
        raise ValueError(f"block spec {spec!r}: indices outside a {num_layers}-block model")
    return tuple(out)


# ----------------------------------------------------------------------------------------------------- encoding
def _backbone_meta(prefix: str, name: str, patch: int, input_hw: Sequence[int], layers: Sequence[int],
                   patches: np.ndarray | None, cls: np.ndarray | None) -> dict[str, Any]:
    return {f"{prefix}_model": name, f"{prefix}_patch_size": int(patch),
            f"{prefix}_input_hw": [int(v) for v in input_hw], f"{prefix}_layers": [int(v) for v in layers],
            f"{prefix}_patches_shape": [] if patches is None else [int(v) for v in patches.shape],
            f"{prefix}_cls_shape": [] if cls is None else [int(v) for v in cls.shape]}


_NO_BACKBONE = {"name": "", "patch": 0, "input_hw": (), "layers": (), "patches": None, "cls": None}


def use_grid(input_size: int, patch: int) -> int:
    """Patch rows (= columns) of the USE square: input_size / patch (input_size must be a multiple)."""
    if input_size <= 0 or input_size % patch:
        raise ValueError(f"USE input size {input_size} must be a positive multiple of the patch size {patch}")
    return input_size // patch


def use_input_sides(*, clip=None, dense=None, clip_layers: Sequence[int] = (), dino_layers: Sequence[int] = (),
                    input_size: int) -> dict[str, int]:
    """The square side each backbone with layers gets for the USE features: ``{"clip": g·p_clip, "dino": g·p_dino}``
    with g = input_size / p_clip (without CLIP layers: input_size / p_dino), so both share the g×g grid."""
    if not clip_layers and not dino_layers:
        raise ValueError("USE features need CLIP or DINOv2 blocks")
    g = use_grid(input_size, clip.patch_size if clip_layers else dense.patch_size)
    sides = {}
    if clip_layers:
        sides["clip"] = g * clip.patch_size
    if dino_layers:
        sides["dino"] = g * dense.patch_size
    return sides


def use_inputs(image: np.ndarray, sides: dict[str, int]) -> dict[str, np.ndarray]:
    """``image`` (uint8 ``[H, W, 3]``) squashed to each backbone's square (:func:`use_input_sides`): the host half of
    :func:`encode_use` (thread-safe)."""
    return {name: Resize(image.shape[:2], (side, side)).apply_image(image) for name, side in sides.items()}


def encode_use(
    images: Sequence[np.ndarray], *, clip=None, dense=None, clip_layers: Sequence[int] = (),
    dino_layers: Sequence[int] = (), input_size: int, clip_name: str = "", dino_name: str = "",
    prepared: Sequence[dict[str, np.ndarray]] | None = None,
) -> list[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """USE features of ``images`` (uint8 ``[H, W, 3]`` each, sizes may differ), encoded as one batch.

    Each image is squashed to ``input_size²`` for CLIP (grid g = input_size / p_clip) and to ``(g·p_dino)²`` for
    DINOv2, so both backbones share the g×g grid (without CLIP, g = input_size / p_dino). Returns per image
    (arrays float32 {clip_patches [Lc, g, g, Cc], clip_cls [Lc, Cc], dino_patches [Ld, g, g, Cd], dino_cls
    [Ld, Cd]} — only the backbones with layers — and the partial FEATURE_CACHE record). prepared: the images'
    :func:`use_inputs`, if computed ahead.
    """
    sides = use_input_sides(clip=clip, dense=dense, clip_layers=clip_layers, dino_layers=dino_layers,
                            input_size=input_size)
    g = use_grid(input_size, clip.patch_size if clip_layers else dense.patch_size)
    inputs = list(prepared) if prepared is not None else [use_inputs(im, sides) for im in images]
    out_arrays: list[dict[str, np.ndarray]] = [{} for _ in images]
    parts = {"clip": dict(_NO_BACKBONE), "dino": dict(_NO_BACKBONE)}
    if clip_layers:
        side = sides["clip"]
        cls, patches = clip.encode_image_blocks(np.stack([x["clip"] for x in inputs]), clip_layers)
        for a, c, p in zip(out_arrays, cls, patches, strict=True):
            a["clip_patches"], a["clip_cls"] = p, c
        parts["clip"] = {"name": clip_name, "patch": clip.patch_size, "input_hw": (side, side),
                         "layers": clip_layers}
    if dino_layers:
        side = sides["dino"]
        feats = dense.encode(np.stack([x["dino"] for x in inputs]), dino_layers)
        for a, c, p in zip(out_arrays, feats.cls, feats.patches, strict=True):
            a["dino_patches"], a["dino_cls"] = p, c
        parts["dino"] = {"name": dino_name, "patch": dense.patch_size, "input_hw": (side, side),
                         "layers": feats.layers}
    results = []
    for im, arrays in zip(images, out_arrays, strict=True):
        meta = {"purpose": "use", "height": int(im.shape[0]), "width": int(im.shape[1]), "resize": "squash",
                "grid_height": g, "grid_width": g}
        for prefix, info in parts.items():
            meta.update(_backbone_meta(prefix, info["name"], info["patch"], info["input_hw"], info["layers"],
                                       arrays.get(f"{prefix}_patches"), arrays.get(f"{prefix}_cls")))
        results.append((arrays, meta))
    return results


def encode_use_batch(images: Sequence[np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """:func:`encode_use` for the online trainer: the arrays of all images stacked, float32 ``{clip_patches
    [B, Lc, g, g, Cc], clip_cls [B, Lc, Cc], dino_patches [B, Ld, g, g, Cd], dino_cls [B, Ld, Cd]}`` (the backbones
    with layers) — the keys and layout ``models.training.trainer.collate_use`` gives cached features."""
    encoded = encode_use(images, **kwargs)
    return {name: np.stack([arrays[name] for arrays, _ in encoded]) for name in ARRAY_NAMES if name in encoded[0][0]}


def fmbseg_input(image: np.ndarray, *, patch_size: int, short_side: int, max_long_side: int = 0
                 ) -> tuple[Resize, np.ndarray]:
    """The host half of :func:`encode_fmbseg` (thread-safe): the resize keeping the aspect (short side
    ``short_side``, sides rounded to patch multiples, long side at most ``max_long_side``, 0 = no cap) and the
    resized uint8 image."""
    resize = Resize(image.shape[:2], working_size(image.shape[:2], short_side=short_side, multiple=patch_size,
                                                  max_long_side=max_long_side))
    return resize, resize.apply_image(image)


def encode_fmbseg_batch(
    images: Sequence[np.ndarray], *, dense, dino_layers: Sequence[int], short_side: int, max_long_side: int = 0,
    dino_name: str = "", prepared: Sequence[tuple[Resize, np.ndarray]] | None = None,
) -> list[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """:func:`encode_fmbseg` of several images whose inputs have ONE size (e.g. all 640×480), in one DINOv2
    forward. prepared: their :func:`fmbseg_input`, if computed ahead."""
    if not dino_layers:
        raise ValueError("FMbSeg features need DINOv2 blocks")
    p = dense.patch_size
    inputs = list(prepared) if prepared is not None else [
        fmbseg_input(im, patch_size=p, short_side=short_side, max_long_side=max_long_side) for im in images]
    if len({x[1].shape for x in inputs}) > 1:
        raise ValueError(f"encode_fmbseg_batch needs inputs of one size, got {sorted({x[1].shape for x in inputs})}")
    feats = dense.encode(np.stack([x[1] for x in inputs]), dino_layers)
    results = []
    for k, (image, (resize, _)) in enumerate(zip(images, inputs, strict=True)):
        arrays = {"dino_patches": feats.patches[k], "dino_cls": feats.cls[k]}
        gh, gw = arrays["dino_patches"].shape[1:3]
        meta = {"purpose": "fmbseg", "height": int(image.shape[0]), "width": int(image.shape[1]),
                "resize": "short_side", "grid_height": int(gh), "grid_width": int(gw),
                **_backbone_meta("clip", "", 0, (), (), None, None),
                **_backbone_meta("dino", dino_name, p, resize.new_hw, feats.layers, arrays["dino_patches"],
                                 arrays["dino_cls"])}
        results.append((arrays, meta))
    return results


def encode_fmbseg(
    image: np.ndarray, *, dense, dino_layers: Sequence[int], short_side: int, max_long_side: int = 0,
    dino_name: str = "",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """DINOv2 tokens of one image (uint8 ``[H, W, 3]``) resized keeping its aspect: short side ``short_side``,
    sides rounded to patch multiples, long side at most ``max_long_side`` (0 = no cap).
    Returns (arrays float32 {dino_patches [Ld, gh, gw, Cd], dino_cls [Ld, Cd]}, partial FEATURE_CACHE record)."""
    return encode_fmbseg_batch([image], dense=dense, dino_layers=dino_layers, short_side=short_side,
                               max_long_side=max_long_side, dino_name=dino_name)[0]


def feature_sample(image_id: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(WebDataset sample {__key__, <name>.npy (float16), json}, the full FEATURE_CACHE record)."""
    payload = {f"{name}.npy": npy_bytes(arrays[name].astype(FEATURE_DTYPE)) for name in ARRAY_NAMES
               if name in arrays}
    record = {"image_id": image_id, **meta, "dtype": np.dtype(FEATURE_DTYPE).name, "members": list(payload),
              "feature_bytes": sum(len(v) for v in payload.values())}
    sample = {"__key__": image_id, **payload,
              "json": json.dumps(record, sort_keys=True, separators=(",", ":")).encode()}
    return sample, record


def finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in arrays.values())


def estimate_feature_bytes(shapes: Sequence[Sequence[int]], itemsize: int = 2) -> int:
    """Bytes of the ``.npy`` members with these shapes (payload + header each): one image's disk cost."""
    return sum(int(np.prod(s)) * itemsize + NPY_HEADER_BYTES for s in shapes)


# ----------------------------------------------------------------------------------------------------- reading
class TarStore:
    """Random access to the WebDataset samples of tar shards, without extracting: every member's offset is indexed
    once (headers only), then ``read`` / ``read_into`` fetch a member with one ``os.pread`` (no seek, no per-read
    ``open``: each process keeps its shards' descriptors open). Keys follow WebDataset (the file name up to its
    first dot), the first shard holding a key wins. Picklable (DataLoader workers reopen the files)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self._index: dict[str, tuple[str, dict[str, tuple[int, int]]]] = {}
        for path in paths:
            seen: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    folder, _, base = m.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    seen.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext] = (m.offset_data, m.size)
            for key, members in seen.items():
                self._index.setdefault(key, (str(path), members))
        self._reset()

    def _reset(self) -> None:
        # descriptors per thread (a thread closing its oldest shard never pulls one from under another's read)
        self._local, self._tables, self._lock, self._pid = threading.local(), [], threading.Lock(), os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"_index": self._index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._index = state["_index"]
        self._reset()

    def __del__(self) -> None:
        self.close()

    @property
    def _fds(self) -> dict[str, int]:
        """The calling thread's open descriptors, by tar path."""
        if self._pid != os.getpid():  # forked: the parent's descriptors share its file offsets; pread needs none,
            self._reset()  # but open our own so closing never touches the parent's
        fds = getattr(self._local, "fds", None)
        if fds is None:
            fds = self._local.fds = {}
            with self._lock:  # a new thread: close what threads that ended had open
                for old in [f for t, f in self._tables if not t.is_alive()]:
                    for fd in old.values():
                        os.close(fd)
                self._tables = [(t, f) for t, f in self._tables if t.is_alive()]
                self._tables.append((threading.current_thread(), fds))
        return fds

    def close(self) -> None:
        """Close the descriptors this process opened, in every thread (reopened on the next read); only while no
        other thread reads."""
        if getattr(self, "_pid", None) != os.getpid():
            return
        with self._lock:
            for _, fds in self._tables:
                for fd in fds.values():
                    os.close(fd)
                fds.clear()

    def _fd(self, path: str) -> int:
        fds = self._fds
        fd = fds.get(path)
        if fd is None:
            if len(fds) >= MAX_OPEN_SHARDS:  # many small shards: stay far below the descriptor limit
                os.close(fds.pop(next(iter(fds))))
            fd = fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return fd

    def keys(self) -> list[str]:
        """In shard order, then stored order."""
        return list(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def members(self, key: str) -> tuple[str, ...]:
        return tuple(self._index[key][1])

    def member(self, key: str, ext: str) -> tuple[str, int, int]:
        """(tar path, byte offset of the member's data, its size)."""
        path, members = self._index[key]
        offset, size = members[ext]
        return path, offset, size

    def read(self, key: str, ext: str) -> bytes:
        path, offset, size = self.member(key, ext)
        data = os.pread(self._fd(path), size, offset)
        if len(data) != size:
            raise OSError(f"{path}: member {key}.{ext} cut short ({len(data)} of {size} bytes)")
        return data

    def will_need(self, key: str, exts: Sequence[str] | None = None) -> None:
        """Tell the kernel the members ``exts`` of ``key`` (default: all) will be read soon
        (``posix_fadvise(WILLNEED)``): it starts reading them into the page cache in the background, so the reads
        of a batch queued behind others overlap with them instead of each waiting for the disk in turn. A hint
        only: no effect where the OS has no posix_fadvise, and nothing is read that was not asked for."""
        if not hasattr(os, "posix_fadvise"):
            return
        path, members = self._index[key]
        fd = self._fd(path)
        for ext in members if exts is None else exts:
            offset, size = members[ext]
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)

    def read_into(self, key: str, ext: str, buffers: Sequence[Any], start: int = 0) -> None:
        """Fill ``buffers`` (writable buffers: bytearray, memoryview, C-contiguous arrays), in order, with the
        member's bytes from ``start`` on — one ``os.preadv``, straight into the caller's memory."""
        path, offset, size = self.member(key, ext)
        views = [memoryview(b).cast("B") for b in buffers]
        want = sum(v.nbytes for v in views)
        if start + want > size:
            raise ValueError(f"{key}.{ext}: {want} bytes from {start} wanted, the member has {size}")
        fd, pos, done = self._fd(path), offset + start, 0
        while views:
            n = os.preadv(fd, views, pos)
            if n <= 0:
                raise OSError(f"{path}: member {key}.{ext} cut short at byte {start + done} of {size}")
            done, pos = done + n, pos + n
            while views and n >= views[0].nbytes:  # a short read: continue where it stopped
                n -= views[0].nbytes
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(raw: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran order) of an .npy header's bytes; parsed once per distinct header (a cache holds a
    few shapes: parsing — a Python literal — costs more than reading)."""
    buf = io.BytesIO(raw)
    version = np.lib.format.read_magic(buf)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(buf)
    return np.dtype(dtype), tuple(int(v) for v in shape), bool(fortran)


def _npy_header(store: TarStore, key: str, name: str) -> tuple[np.dtype, tuple[int, ...], int, bytes]:
    """``npy_header`` and the header's raw bytes (magic to the start of the data)."""
    _, _, size = store.member(key, f"{name}.npy")
    first = bytearray(min(size, NPY_HEADER_READ))
    store.read_into(key, f"{name}.npy", [first])
    if first[:6] == b"\x93NUMPY" and len(first) >= 12 and first[6] in (1, 2, 3):
        start = 10 if first[6] == 1 else 12  # header length: uint16 in v1, uint32 in v2/v3
        end = start + int.from_bytes(first[8:start], "little")
    else:
        end = len(first)  # not an .npy member: read_magic raises
    raw = bytes(first[:end])
    dtype, shape, fortran = _parse_npy_header(raw)
    if fortran:
        raise ValueError(f"{key}.{name}.npy is stored in Fortran order; feature caches are C order")
    return dtype, shape, end, raw


def npy_header(store: TarStore, key: str, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset within the member) of ``<key>.<name>.npy``, from its header alone (C order)."""
    return _npy_header(store, key, name)[:3]


def read_npy_into(store: TarStore, key: str, name: str, out: np.ndarray, *, index: int | None = None,
                  header: tuple[np.dtype, tuple[int, ...], int] | None = None) -> None:
    """Read ``<key>.<name>.npy`` (or, with ``index``, its sub-array ``[index]`` along the first axis) straight
    into ``out`` (C-contiguous, of the stored dtype and that shape): the payload goes from the file to ``out``
    with no intermediate copy. Raises ValueError when the stored dtype or shape differ from ``out``'s.
    ``header``: the member's ``npy_header``, if the caller already read it (not read again)."""
    dtype, shape, data_offset = npy_header(store, key, name) if header is None else header
    want = shape if index is None else shape[1:]
    if index is not None:
        if not shape or not -shape[0] <= index < shape[0]:
            raise ValueError(f"{key}.{name}.npy {shape}: no index {index} along its first axis")
        index %= shape[0]
    if dtype != out.dtype or tuple(out.shape) != want or not out.flags.c_contiguous:
        raise ValueError(f"{key}.{name}.npy{'' if index is None else f'[{index}]'} is {dtype} {list(want)}, "
                         f"the batch slot {out.dtype} {list(out.shape)}")
    start = data_offset + (0 if index is None else index * out.nbytes)
    store.read_into(key, f"{name}.npy", [out.reshape(-1).view(np.uint8)], start)


def read_npy_batch(store: TarStore, keys: Sequence[str], outs: Mapping[str, np.ndarray]) -> None:
    """``read_npy_into(store, key, name, outs[name][b])`` for every ``keys[b]`` and every ``name``, with one read
    per member: each name's header is parsed once (from ``keys[0]``); every member is then read header and
    payload together (one ``os.preadv``: the header into a scratch buffer, the payload straight into its slot)
    and its header bytes compared with the first's afterwards — equal bytes mean equal dtype, shape and data
    offset. A member with another header (or too short for it) is read again through ``read_npy_into``, which
    checks it and raises as it does. Members are read in file order: item by item in (tar, offset) order, each
    item's members in stored order (contiguous bytes; the batch order does not change what lands where)."""
    for name, out in outs.items():
        if len(out) != len(keys):
            raise ValueError(f"{len(keys)} keys for a {name} batch of {len(out)}")
    if not keys or not outs:
        return
    headers = {name: _npy_header(store, keys[0], name) for name in outs}
    scratch = {name: bytearray(h[2]) for name, h in headers.items()}

    def place(b: int, name: str) -> tuple[str, int]:
        path, offset, _ = store.member(keys[b], f"{name}.npy")
        return path, offset

    jobs = sorted(((b, name) for b in range(len(keys)) for name in outs), key=lambda j: place(*j))
    for b, name in jobs:
        key, slot = keys[b], outs[name][b]
        dtype, shape, offset, raw = headers[name]
        _, _, size = store.member(key, f"{name}.npy")
        if (dtype == slot.dtype and tuple(slot.shape) == shape and slot.flags.c_contiguous
                and size >= offset + slot.nbytes):
            store.read_into(key, f"{name}.npy", [scratch[name], slot.reshape(-1).view(np.uint8)])
            if scratch[name] == raw:
                continue
        read_npy_into(store, key, name, slot)


def read_features(store: TarStore, key: str, names: Sequence[str] | None = None
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(FEATURE_CACHE record, {name: float16 array}) of one image; ``names`` limits the arrays read. Each array is
    read straight into its own (writable) buffer."""
    meta = json.loads(store.read(key, "json"))
    wanted = [m.removesuffix(".npy") for m in meta["members"]]
    if names is not None:
        wanted = [n for n in wanted if n in names]
    arrays = {}
    for n in wanted:
        a = np.empty(meta[f"{n}_shape"], FEATURE_DTYPE)
        try:
            read_npy_into(store, key, n, a)
        except ValueError:
            dtype, shape, _ = npy_header(store, key, n)
            raise ValueError(f"{key}.{n}.npy is {dtype} {shape}, its record says {meta['dtype']} "
                             f"{meta[f'{n}_shape']}") from None
        arrays[n] = a
    return meta, arrays


def _rle_counts(rle: Mapping[str, Any]) -> np.ndarray:
    """Uncompressed COCO RLE counts (int64: alternating 0- and 1-runs in column-major order, starting with 0s) of
    an RLE whose ``counts`` is the compressed string (or already a list), decoded as pycocotools' rleFrString."""
    counts = rle["counts"]
    if not isinstance(counts, (str, bytes)):
        return np.asarray(counts, np.int64)
    s = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else counts, np.uint8).astype(np.int64) - 48
    if not len(s):
        return np.zeros(0, np.int64)
    ends = np.flatnonzero((s & 0x20) == 0)  # the last character of each number
    starts = np.concatenate([[0], ends[:-1] + 1])
    digit = np.arange(len(s)) - np.repeat(starts, ends - starts + 1)
    x = np.add.reduceat((s & 0x1F) << (5 * digit), starts)
    neg = (s[ends] & 0x10) != 0
    x = np.where(neg, x | np.left_shift(-1, 5 * (ends - starts + 1)), x)
    out = x.copy()
    out[1::2] = np.cumsum(x[1::2])  # cnts[m] += cnts[m - 2] for m > 2: two interleaved running sums
    out[2::2] = np.cumsum(x[2::2])
    return out


def rle_pooling_weights(rles: Sequence[Mapping[str, Any]], grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``models.training.heads.mask_pooling_weights`` of COCO RLE masks, computed from the runs without decoding a pixel.

    Each mask spans the whole ``grid`` (h, w); a patch's weight is the exact area of the mask inside it (pixels
    straddling a patch border count fractionally), normalised to sum 1 per mask. Areas are integers after
    scaling by h·w, summed exactly, then divided once in float64: float32 ``[S, h*w]`` (an empty mask: a zero row)
    and bool ``[S]`` "not empty". Equal to ``mask_pooling_weights`` of the decoded masks up to its float32
    rounding (≤ 1e-6), independent of thread count and summation order."""
    h, w = int(grid[0]), int(grid[1])
    out = np.zeros((len(rles), h * w), np.float32)
    valid = np.zeros(len(rles), bool)
    bands_h = np.arange(h, dtype=np.int64)
    bands_w = np.arange(w, dtype=np.int64)
    for k, rle in enumerate(rles):
        hh, ww = int(rle["size"][0]), int(rle["size"][1])
        cnts = _rle_counts(rle)
        pos = np.concatenate([[0], np.cumsum(cnts)])
        if pos[-1] != hh * ww:
            raise ValueError(f"RLE of {pos[-1]} pixels for a {hh}x{ww} mask")
        begin, length = pos[1:-1:2], cnts[1::2]
        begin, length = begin[length > 0], length[length > 0]
        if not len(begin):
            continue
        end = begin + length  # [begin, end) in column-major pixel order
        col0, col1 = begin // hh, (end - 1) // hh
        n = col1 - col0 + 1  # columns each run touches
        run = np.repeat(np.arange(len(begin)), n)
        col = col0[run] + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        y0 = np.where(col == col0[run], begin[run] % hh, 0)
        y1 = np.where(col == col1[run], (end[run] - 1) % hh + 1, hh)
        # rows [y0, y1) of column `col` against band i = [i·H/h, (i+1)·H/h), in units of 1/h pixel (integers)
        ov = np.clip(np.minimum(y1[:, None] * h, (bands_h + 1) * hh) - np.maximum(y0[:, None] * h, bands_h * hh),
                     0, None)
        first = np.flatnonzero(np.diff(col, prepend=-1))  # runs are column-ordered: one group per column
        per_col = np.add.reduceat(ov, first, axis=0)  # [U, h]
        cols = col[first]
        cw = np.clip(np.minimum((cols[:, None] + 1) * w, (bands_w + 1) * ww) - np.maximum(cols[:, None] * w,
                                                                                             bands_w * ww), 0, None)
        cover = per_col.T.astype(np.float64) @ cw.astype(np.float64)  # exact: integers far below 2**53
        total = cover.sum()
        if total > 0:
            out[k] = (cover / total).reshape(-1)
            valid[k] = True
    return out, valid


class PatchLabeler:
    """``pipeline.core.transforms.patch_labels`` for uint8 label maps (PNG label maps), with the per-pixel cell index
    of each map size computed once: equal output (int64 [h, w], ``ignore`` where void wins), ~3× faster. Other
    dtypes and ``mode="centre"`` go to ``patch_labels`` itself. Also decodes label PNGs: 8-bit grayscale through
    OpenCV, anything else (palette PNGs) through ``pipeline.core.images.decode_label_png``."""

    def __init__(self, mode: str = "majority", *, void: int = 255, ignore: int = -1) -> None:
        self.mode, self.void, self.ignore = mode, int(void), int(ignore)
        self._cells: dict[tuple[int, int, int, int], np.ndarray] = {}

    @staticmethod
    def decode_png(data: bytes) -> np.ndarray:
        import cv2

        from pseudoseg.pipeline.core.images import decode_label_png

        # IHDR: bit depth at byte 24, colour type at 25 (0 = grayscale); OpenCV keeps such a PNG as uint8 [H, W]
        if len(data) > 25 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[24] == 8 and data[25] == 0:
            out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if out is not None and out.ndim == 2 and out.dtype == np.uint8:
                return out
        return decode_label_png(data)

    def _cell(self, hh: int, ww: int, h: int, w: int) -> np.ndarray:
        key = (hh, ww, h, w)
        cell = self._cells.get(key)
        if cell is None:
            ys = np.linspace(0, hh, h + 1).round().astype(np.int64)  # the same cell borders as patch_labels
            xs = np.linspace(0, ww, w + 1).round().astype(np.int64)
            row = np.searchsorted(ys[1:], np.arange(hh), side="right")
            col = np.searchsorted(xs[1:], np.arange(ww), side="right")
            cell = self._cells[key] = ((row[:, None] * w + col[None, :]) * 256).astype(np.int32).ravel()
        return cell

    def __call__(self, label_map: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        from pseudoseg.pipeline.core.transforms import patch_labels

        lm = np.asarray(label_map)
        h, w = int(grid[0]), int(grid[1])
        if self.mode != "majority" or lm.dtype != np.uint8 or lm.ndim != 2 or not lm.size:
            return patch_labels(lm, (h, w), self.mode, void=self.void, ignore=self.ignore)
        counts = np.bincount(self._cell(*lm.shape, h, w) + lm.ravel(), minlength=h * w * 256).reshape(h * w, 256)
        out = counts.argmax(1)  # ties: the smaller value, as patch_labels
        out[counts.sum(1) == 0] = self.void  # a cell with no pixel
        return np.where(out == self.void, self.ignore, out).astype(np.int64).reshape(h, w)


# ----------------------------------------------------------------------------------------------------- text
def embed_texts(clip, texts: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """float32 ``[N, D]``: each text put into every template ("a photo of {}"), the embeddings averaged per text
    and L2-normalised (prompt ensembling)."""
    texts, templates = list(texts), list(templates)
    if not texts:
        return np.zeros((0, int(clip.embed_dim)), np.float32)
    prompts = [t.format(x) for x in texts for t in templates]
    emb = np.concatenate([clip.encode_text(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)])
    mean = emb.astype(np.float32).reshape(len(texts), len(templates), -1).mean(1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def text_rows(texts: Sequence[str], embeddings: np.ndarray, *, kind: str, template_set: str,
              class_indices: Sequence[int] | None = None, as_phrase: Sequence[bool] | None = None,
              as_expression: Sequence[bool] | None = None) -> list[dict[str, Any]]:
    """TEXT_EMBEDDINGS rows (one per text, in the given order); flags default to False (classes)."""
    emb = np.asarray(embeddings, np.float32)
    n = len(texts)
    idx = list(class_indices) if class_indices is not None else [-1] * n
    phrase = list(as_phrase) if as_phrase is not None else [False] * n
    expression = list(as_expression) if as_expression is not None else [False] * n
    return [{"text": t, "kind": kind, "as_phrase": bool(p), "as_expression": bool(x), "class_index": int(c),
             "template_set": template_set, "embedding": e.tolist(), "dim": int(emb.shape[1])}
            for t, p, x, c, e in zip(texts, phrase, expression, idx, emb, strict=True)]


def text_matrix(tables: Sequence[Any]) -> tuple[dict[str, int], np.ndarray]:
    """TEXT_EMBEDDINGS tables (pyarrow) → ({text: row}, float32 [T, D]), deduplicated by text (first wins)."""
    index: dict[str, int] = {}
    rows: list[np.ndarray] = []
    for table in tables:
        if table.num_rows == 0:
            continue
        dim = int(table.column("dim")[0].as_py())
        emb = np.asarray(table.column("embedding").combine_chunks().flatten(), np.float32).reshape(-1, dim)
        for text, vec in zip(table.column("text").to_pylist(), emb, strict=True):
            if text not in index:
                index[text] = len(rows)
                rows.append(vec)
    return index, (np.stack(rows) if rows else np.zeros((0, 0), np.float32))


# ----------------------------------------------------------------------------------------------------- sampling
def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one dataset item in one epoch: independent of load order and worker count, so an
    interrupted and resumed training run draws exactly what an uninterrupted one does."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def crop_cells(grid_hw: tuple[int, int], crop: int, rng: np.random.Generator) -> tuple[slice, slice]:
    """A random ``crop × crop`` window of a (rows, cols) patch grid (clipped to the grid): (row slice, col slice)."""
    ch, cw = min(crop, grid_hw[0]), min(crop, grid_hw[1])
    y = int(rng.integers(0, grid_hw[0] - ch + 1))
    x = int(rng.integers(0, grid_hw[1] - cw + 1))
    return slice(y, y + ch), slice(x, x + cw)
