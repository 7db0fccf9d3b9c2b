"""torch Datasets of the two trainers over the stored shards: they only wire stored pieces (feature tars, segment
RLEs, label maps, text embeddings) to the heads' functions (mask pooling weights, patch labels); the random choices
per item come from ``pipeline.features.cache.sample_rng`` (seed, epoch, index), so an epoch is reproducible.
Items and batches follow ``models.training.trainer``'s collate formats."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pseudoseg.models.training.heads import mask_pooling_weights
from pseudoseg.models.training.trainer import BatchBuffers, Collated, collate_alignment, epoch_index
from pseudoseg.pipeline.core.ingest import read_ingested_image
from pseudoseg.pipeline.core.masks import decode_rle, row_rle
from pseudoseg.pipeline.core.transforms import random_scale_crop
from pseudoseg.pipeline.core.vocabularies import UNLABELLED
from pseudoseg.pipeline.features.cache import (
    ARRAY_NAMES,
    FEATURE_DTYPE,
    PatchLabeler,
    TarStore,
    crop_cells,
    npy_header,
    read_features,
    read_npy_batch,
    read_npy_into,
    rle_pooling_weights,
    sample_rng,
)
from pseudoseg.pipeline.use.pairs import draw_segment_texts, segment_texts
from pseudoseg.pipeline.use.params import TEXT_CHOICES

# Bytes of per-item derived arrays (pooling weights, patch labels) a dataset keeps between epochs, each.
DERIVED_CACHE_BYTES = 1 << 30
# Batch buffers a dataset keeps for reuse: the batches in flight of a ThreadBatchLoader (2 threads × 2 ahead + the
# one being trained on ≈ 6 USE batches of 190 MB at the papers' sizes).
BATCH_BUFFER_BYTES = 3 << 30


class DerivedCache:
    """Epoch-independent arrays derived from an item's stored pieces (a USE image's pooling weights, an
    alignment image's patch labels), kept between epochs up to ``max_bytes``, compactly (``pack`` / ``unpack``
    must give the computed array back bit for bit). Once full, new arrays are computed and not kept (a shuffled
    epoch visits every item once: evicting would only churn). Thread-safe; each process keeps its own."""

    def __init__(self, max_bytes: int, pack: Callable[[np.ndarray], tuple[np.ndarray, ...]],
                 unpack: Callable[[tuple[np.ndarray, ...]], np.ndarray]) -> None:
        self.max_bytes, self.pack, self.unpack, self.nbytes = int(max_bytes), pack, unpack, 0
        self._items: dict[Any, tuple[np.ndarray, ...]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        packed = self._items.get(key)
        if packed is not None:
            return self.unpack(packed)
        value = compute()
        if self.max_bytes > 0:
            packed = self.pack(value)
            size = sum(a.nbytes for a in packed) + 64 * len(packed)
            with self._lock:
                if key not in self._items and self.nbytes + size <= self.max_bytes:
                    self._items[key], self.nbytes = packed, self.nbytes + size
        return value

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker starts with what the parent had
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _pack_sparse(a: np.ndarray) -> tuple[np.ndarray, ...]:
    """float32 [S, N] weights (mostly zeros) → (shape, flat indices of the non-zeros, their values)."""
    flat = a.reshape(-1)
    nz = np.flatnonzero(flat)
    return np.asarray(a.shape, np.int64), nz.astype(np.int32 if flat.size < 2**31 else np.int64), flat[nz]


def _unpack_sparse(packed: tuple[np.ndarray, ...]) -> np.ndarray:
    shape, nz, values = packed
    out = np.zeros(int(np.prod(shape)), values.dtype)
    out[nz] = values
    return out.reshape(tuple(int(v) for v in shape))


def _pack_small_int(a: np.ndarray) -> tuple[np.ndarray, ...]:
    """int64 labels → the narrowest signed integer dtype holding them (``_unpack_small_int``: int64 again)."""
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for dtype in (np.int8, np.int16, np.int32):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return (a.astype(dtype),)
    return (a.copy(),)


def _unpack_small_int(packed: tuple[np.ndarray, ...]) -> np.ndarray:
    return packed[0].astype(np.int64)


def use_items(image_ids: list[str], segments: dict[str, list[dict]], text_index: dict[str, int],
              kinds: tuple[str, ...]) -> list[tuple[str, list[tuple[dict, list[int]]]]]:
    """(image_id, [(segment RLE, its text ids)]) of the images with at least one non-empty segment with a text, in
    ``image_ids`` order; a segment's texts are ``pipeline.use.pairs.segment_texts`` of the ``kinds`` wanted."""
    items = []
    for image_id in image_ids:
        segs = []
        for s in sorted(segments.get(image_id, []), key=lambda r: r["segment_id"]):
            texts = segment_texts(s["texts"], kinds)
            missing = [t for t in texts if t not in text_index]
            if missing:
                raise ValueError(f"{image_id} segment {s['segment_id']}: no embedding for {missing[:3]}; the use_text "
                                 "stage embeds every phrase and expression (an artifact from another run?)")
            if texts and s["area"] > 0:
                segs.append((row_rle(s), [text_index[t] for t in texts]))
        if segs:
            items.append((image_id, segs))
    return items


class UseSegmentDataset(Dataset):
    """One item per image with segments: its cached features, the segments' pooling weights at the feature grid
    (``rle_pooling_weights`` of the original-size masks, straight from their RLEs: the grid spans the whole image)
    and, per segment, one of its texts drawn for this epoch (use-paper §3.2; ``draw_segment_texts``, uniform over
    the segment's distinct phrases and expressions). Items follow ``collate_use``'s sample format.

    Epoch-indexed (``models.training.trainer.EpochSampler``): an item may be asked for as ``(epoch, index)``. A batch
    (``__getitems__``) is read straight into one float16 tensor per array, with no per-sample copy; it equals
    ``collate_use`` of the items. ``thread_batches``: with workers, batches are built by threads of the training
    process (``models.training.trainer.ThreadBatchLoader``; the reads release the GIL). The pooling weights depend
    on the item alone: computed once, then kept (sparse) for later epochs up to ``cache_bytes``."""

    epoch_indexed = True
    thread_batches = True

    def __init__(self, features: TarStore, segments: dict[str, list[dict]], text_index: dict[str, int],
                 text_emb: np.ndarray, seed: int, kinds: tuple[str, ...] = TEXT_CHOICES["both"],
                 cache_bytes: int = DERIVED_CACHE_BYTES) -> None:
        self.features, self.text_emb, self.seed, self.epoch = features, text_emb, seed, 0
        self.items = use_items(features.keys(), segments, text_index, kinds)
        self.weights_cache = DerivedCache(cache_bytes, _pack_sparse, _unpack_sparse)
        self.buffers = BatchBuffers(BATCH_BUFFER_BYTES)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _segments(self, epoch: int, i: int, grid: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
        segs = self.items[i][1]
        weights = self.weights_cache.get((i, grid), lambda: rle_pooling_weights([rle for rle, _ in segs], grid)[0])
        return torch.from_numpy(weights), draw_segment_texts([o for _, o in segs], sample_rng(self.seed, epoch, i))

    def __getitem__(self, index: Any) -> dict[str, Any]:
        epoch, i = epoch_index(index, self.epoch)
        meta, arrays = read_features(self.features, self.items[i][0])
        weights, ids = self._segments(epoch, i, (meta["grid_height"], meta["grid_width"]))
        return {**{k: torch.from_numpy(v) for k, v in arrays.items()}, "weights": weights,
                "text_emb": torch.from_numpy(self.text_emb[ids]), "text_ids": torch.from_numpy(ids)}

    def will_need(self, indices: list[Any]) -> None:
        """Read-ahead hint for a batch that is queued (``TarStore.will_need`` of its feature members)."""
        for x in indices:
            self.features.will_need(self.items[epoch_index(x, self.epoch)[1]][0])

    def __getitems__(self, indices: list[Any]) -> Collated:
        pairs = [epoch_index(x, self.epoch) for x in indices]
        keys = [self.items[i][0] for _, i in pairs]
        names = [n for n in ARRAY_NAMES if f"{n}.npy" in self.features.members(keys[0])]
        batch = Collated()
        for name in names:
            _, shape, _ = npy_header(self.features, keys[0], name)
            batch[name] = self.buffers.empty((len(keys), *shape), torch.float16)
        # one read per member, in file order; checks dtype and shape
        read_npy_batch(self.features, keys, {name: batch[name].numpy() for name in names})
        patches = next(batch[n] for n in names if n.endswith("_patches"))  # [B, L, g, g, C]: the shared grid
        grid = (int(patches.shape[2]), int(patches.shape[3]))
        weights, ids = zip(*(self._segments(e, i, grid) for e, i in pairs), strict=True)
        batch["weights"] = torch.cat(weights)
        batch["image_index"] = torch.cat([torch.full((len(w),), b, dtype=torch.long) for b, w in enumerate(weights)])
        all_ids = np.concatenate(ids)
        batch["text_emb"] = torch.from_numpy(self.text_emb[all_ids]).float()
        batch["text_ids"] = torch.from_numpy(all_ids).long()
        return batch


class UseOnlineDataset(Dataset):
    """One item per image with segments, for online encoding (``use_step(encode=...)``): the image and the
    segments' pooling weights on the ``grid × grid`` patch grid of the encoder input, texts as in
    ``UseSegmentDataset`` (same draw, same stream: the first numbers of ``sample_rng(seed, epoch, index)``).

    crop > 0 (the paper's augmentation): a ``random_scale_crop`` of the image (scale ``scale_range`` of the
    crop-fitting size, ``crop × crop`` window, padded), the masks through the same ``ScaleCrop``; segments that
    leave the crop are dropped with their texts. crop = 0: the whole image as ingested (the encoder squashes it to
    the cache's square) and the original masks, exactly what the cache mode pools. Epoch-indexed
    (``models.training.trainer.EpochSampler``)."""

    epoch_indexed = True

    def __init__(self, images: TarStore, segments: dict[str, list[dict]], text_index: dict[str, int],
                 text_emb: np.ndarray, seed: int, kinds: tuple[str, ...], *, grid: int, crop: int = 0,
                 scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        self.images, self.text_emb, self.seed, self.epoch = images, text_emb, seed, 0
        self.grid, self.crop, self.scale_range = grid, crop, scale_range
        self.items = use_items(images.keys(), segments, text_index, kinds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: Any) -> dict[str, Any]:
        epoch, i = epoch_index(index, self.epoch)
        image_id, segs = self.items[i]
        rgb = read_ingested_image(self.images, image_id)
        rng = sample_rng(self.seed, epoch, i)
        ids = draw_segment_texts([opts for _, opts in segs], rng)
        if self.crop > 0:
            masks = np.stack([decode_rle(rle) for rle, _ in segs])
            geometry = random_scale_crop(rgb.shape[:2], self.crop, self.scale_range, rng)
            rgb = geometry.apply_image(rgb)
            weights, valid = mask_pooling_weights(geometry.apply_masks(masks), (self.grid, self.grid),
                                                  return_valid=True)
            weights, ids = weights[valid], ids[valid.numpy()]
        else:  # the original masks on the whole image: the cache mode's weights, from the RLEs
            weights = torch.from_numpy(rle_pooling_weights([rle for rle, _ in segs], (self.grid, self.grid))[0])
        return {"image": rgb, "weights": weights, "text_emb": torch.from_numpy(self.text_emb[ids]),
                "text_ids": torch.from_numpy(ids)}


class AlignmentDataset(Dataset):
    """One item per (image with a pseudo-label map, repeat): the image's DINOv2 tokens [gh, gw, C] of one stored
    block and its patch labels (``patch_labels`` of the original-size map at the token grid; −1 = ignore),
    optionally a random crop of the grid. Items follow ``collate_alignment``'s sample format.

    Epoch-indexed (``models.training.trainer.EpochSampler``). A batch (``__getitems__``) reads only the wanted block of
    each image straight into one float16 batch tensor (padded as ``collate_alignment`` pads mixed grids); it
    equals ``collate_alignment`` of the items. ``thread_batches`` as ``UseSegmentDataset``'s (label PNGs decode
    with the GIL released too). Patch labels depend on the image alone: computed once, then kept (narrowest
    integer type) for later epochs up to ``cache_bytes``."""

    epoch_indexed = True
    thread_batches = True

    def __init__(self, features: TarStore, labels: TarStore, *, block: int, mode: str, crop: int, repeats: int,
                 seed: int, cache_bytes: int = DERIVED_CACHE_BYTES) -> None:
        self.features, self.labels = features, labels
        self.block, self.mode, self.crop, self.repeats, self.seed, self.epoch = block, mode, crop, repeats, seed, 0
        self.ids = [k for k in features.keys() if k in labels]
        self.labels_cache = DerivedCache(cache_bytes, _pack_small_int, _unpack_small_int)
        self.buffers = BatchBuffers(BATCH_BUFFER_BYTES)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids) * max(1, self.repeats)

    def _labels(self, image_id: str, grid: tuple[int, int]) -> np.ndarray:
        if getattr(self, "_labeler", None) is None:
            self._labeler = PatchLabeler(self.mode, void=UNLABELLED)
        labeler = self._labeler
        return self.labels_cache.get((image_id, tuple(grid)),
                                     lambda: labeler(labeler.decode_png(self.labels.read(image_id, "png")), grid))

    def __getitem__(self, index: Any) -> dict[str, Any]:
        epoch, i = epoch_index(index, self.epoch)
        image_id = self.ids[i % len(self.ids)]
        _, shape, _ = npy_header(self.features, image_id, "dino_patches")
        tokens = np.empty(shape[1:], FEATURE_DTYPE)  # [gh, gw, C] of the stored block
        read_npy_into(self.features, image_id, "dino_patches", tokens, index=self.block)
        labels = self._labels(image_id, tokens.shape[:2])
        if self.crop > 0:
            rows, cols = crop_cells(tokens.shape[:2], self.crop, sample_rng(self.seed, epoch, i))
            tokens, labels = tokens[rows, cols], labels[rows, cols]
        return {"tokens": torch.from_numpy(np.ascontiguousarray(tokens)), "labels": torch.from_numpy(labels)}

    def will_need(self, indices: list[Any]) -> None:
        """Read-ahead hint for a batch that is queued: its token members and label maps (a map already turned into
        patch labels is not read again; hinting its few KB costs less than finding out)."""
        for x in indices:
            image_id = self.ids[epoch_index(x, self.epoch)[1] % len(self.ids)]
            self.features.will_need(image_id, ["dino_patches.npy"])
            self.labels.will_need(image_id, ["png"])

    def __getitems__(self, indices: list[Any]) -> Collated:
        if self.crop > 0:  # windows of the stored grid: no contiguous bytes to read in place
            return Collated(collate_alignment([self[x] for x in indices]))
        pairs = [epoch_index(x, self.epoch) for x in indices]
        keys = [self.ids[i % len(self.ids)] for _, i in pairs]
        headers = [npy_header(self.features, k, "dino_patches") for k in keys]  # read once per member
        shapes = [h[1] for h in headers]
        sizes = [s[1] * s[2] for s in shapes]
        n, channels, same = max(sizes), shapes[0][-1], len(set(sizes)) == 1
        tokens = self.buffers.empty((len(keys), n, channels), torch.float16)
        labels = torch.full((len(keys), n), -1, dtype=torch.long)
        if not same:
            tokens[:, min(sizes):].zero_()  # padding (``collate_alignment`` pads with zeros)
        for b, (key, header, size) in enumerate(zip(keys, headers, sizes, strict=True)):
            shape = header[1]
            read_npy_into(self.features, key, "dino_patches", tokens[b, :size].numpy().reshape(shape[1:]),
                          index=self.block, header=header)
            labels[b, :size] = torch.from_numpy(self._labels(key, shape[1:3]).reshape(-1))
        batch = Collated(tokens=tokens, labels=labels)
        if not same:
            batch["padding_mask"] = torch.arange(n)[None, :] >= torch.tensor(sizes)[:, None]
        return batch
