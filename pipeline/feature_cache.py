"""Feature caches (frozen-encoder tokens) and text embeddings for the two trainable heads. Pure logic: the CLIP and
DINOv2 encoders are role objects passed in (models/roles.py), never loaded here; image resizing goes through
pipeline/transforms.py. Stored layout and fields: schemas/features.py.

Two configurations ("purposes"):
- ``use`` (USE head, use-paper §3.2): every image is resized — squashed, aspect not kept — to one square, so all
  images share one g×g patch grid and batch by stacking (``models.training.collate_use``). CLIP gets ``S×S``
  (S = its native image_size by default, g = S / p_clip), DINOv2 ``g·p_dino`` square: both on the same grid. The
  grid spans the whole image, so a segment mask of the ORIGINAL image pools onto it by exact area
  (``models.heads.mask_pooling_weights(mask, (g, g))``) without any coordinate transform. The paper instead
  trains on random 0.5–2× rescaled 560×560 crops; a cache of frozen features cannot be augmented that way, so
  ``[train_use] features = online`` runs the same ``encode_use`` inside the training loop on such crops
  (``pipeline.transforms.random_scale_crop``; ``encode_use_batch``) instead of reading this cache.
- ``fmbseg`` (alignment block, fmbseg-paper §3.3): DINOv2 on the image resized keeping its aspect
  (``transforms.working_size``: short side, patch multiples, long side capped); the grid again spans the whole
  image, so ``pipeline.transforms.patch_labels(label_map, grid)`` reads the original-size label map directly.

Block specs (``resolve_blocks``): ``all`` | ``none`` | ``last:N`` | ``every:K`` (the last block and every K-th before
it) | an explicit comma list of indices (negative from the end).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.transforms import Resize, working_size
from pipeline.vocabularies import TEMPLATE_SETS

PURPOSES = ("use", "fmbseg")
FEATURE_DTYPE = np.float16  # on disk; encoders and heads compute in float32
ARRAY_NAMES = ("clip_patches", "clip_cls", "dino_patches", "dino_cls")  # = the sample keys collate_use reads
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
    with layers) — the keys and layout ``models.training.collate_use`` gives cached features."""
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


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


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
    once (headers only), then ``read`` seeks. Keys follow WebDataset (the file name up to its first dot), the
    first shard holding a key wins. Picklable (DataLoader workers reopen the files)."""

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

    def keys(self) -> list[str]:
        """In shard order, then stored order."""
        return list(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def members(self, key: str) -> tuple[str, ...]:
        return tuple(self._index[key][1])

    def read(self, key: str, ext: str) -> bytes:
        path, members = self._index[key]
        offset, size = members[ext]
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)


def read_features(store: TarStore, key: str, names: Sequence[str] | None = None
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(FEATURE_CACHE record, {name: float16 array}) of one image; ``names`` limits the arrays read."""
    meta = json.loads(store.read(key, "json"))
    wanted = [m.removesuffix(".npy") for m in meta["members"]]
    if names is not None:
        wanted = [n for n in wanted if n in names]
    arrays = {n: np.load(io.BytesIO(store.read(key, f"{n}.npy")), allow_pickle=False) for n in wanted}
    for n, a in arrays.items():
        if list(a.shape) != meta[f"{n}_shape"] or a.dtype != FEATURE_DTYPE:
            raise ValueError(f"{key}.{n}.npy is {a.dtype} {a.shape}, its record says {meta['dtype']} "
                             f"{meta[f'{n}_shape']}")
    return meta, arrays


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
