"""Trainer input (issue 12): batch reads straight from the feature tars, RLE pooling weights, the epoch sampler
and persistent workers — each equal to the per-item path it replaces, and resumable bit for bit."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pseudoseg.models.training.heads import AlignmentBlock, mask_pooling_weights
from pseudoseg.models.training.params import TrainAlignmentParams
from pseudoseg.models.training.trainer import (
    EpochSampler,
    TrainConfig,
    _epoch_seed,
    alignment_step,
    collate_alignment,
    collate_use,
    epoch_index,
    train,
)
from pseudoseg.pipeline.core.artifacts import TarSpool
from pseudoseg.pipeline.core.images import decode_label_png, encode_png
from pseudoseg.pipeline.core.masks import encode_rle, rle_area
from pseudoseg.pipeline.core.transforms import patch_labels
from pseudoseg.pipeline.features.cache import (
    PatchLabeler,
    TarStore,
    _rle_counts,
    feature_sample,
    read_features,
    read_npy_into,
    rle_pooling_weights,
    sample_rng,
)


def test_rle_pooling_weights_equal_mask_pooling_weights() -> None:
    rng = np.random.default_rng(0)
    for t in range(150):
        hh, ww = (int(v) for v in rng.integers(1, 70, 2))
        grid = (int(rng.integers(1, 25)), int(rng.integers(1, 25)))
        masks = rng.random((3, hh, ww)) < rng.random()
        masks[0] = False if t % 4 == 0 else masks[0]
        masks[1] = True if t % 5 == 0 else masks[1]
        rles = [encode_rle(m) for m in masks]
        assert all(_rle_counts(r).sum() == hh * ww for r in rles)
        got, valid = rle_pooling_weights(rles, grid)
        want, want_valid = mask_pooling_weights(masks, grid, return_valid=True)
        assert got.dtype == np.float32 and got.shape == (3, grid[0] * grid[1])
        assert np.array_equal(valid, want_valid.numpy())
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


def test_patch_labeler_equals_patch_labels_and_decodes_label_pngs() -> None:
    rng = np.random.default_rng(1)
    labeler = PatchLabeler("majority", void=255)
    for t in range(100):
        hh, ww = (int(v) for v in rng.integers(1, 60, 2))
        grid = (int(rng.integers(1, 30)), int(rng.integers(1, 30)))
        lm = rng.integers(0, 5, (hh, ww)).astype(np.uint8)
        lm[rng.random((hh, ww)) < 0.4] = 255
        if t % 3 == 0:
            lm[:] = rng.integers(0, 256)
        assert np.array_equal(labeler(lm, grid), patch_labels(lm, grid, "majority", void=255))
        png = encode_png(lm)
        assert np.array_equal(labeler.decode_png(png), decode_label_png(png))


# ------------------------------------------------------------------------------------------------ cache reads
def _caches(root: Path, align_grids: list[tuple[int, int]]) -> dict:
    """Tiny USE and alignment caches in the stored format (mixed alignment grids)."""
    rng = np.random.default_rng(2)
    hh, ww, g = 30, 40, 4

    def meta(purpose: str, grid, parts: dict) -> dict:
        m = {"purpose": purpose, "height": hh, "width": ww, "resize": "squash", "grid_height": grid[0],
             "grid_width": grid[1]}
        for p in ("clip", "dino"):
            shape = parts.get(p)
            m.update({f"{p}_model": p if shape else "", f"{p}_patch_size": 14, f"{p}_input_hw": [],
                      f"{p}_layers": list(range(shape[0])) if shape else [],
                      f"{p}_patches_shape": list(shape) if shape else [],
                      f"{p}_cls_shape": [shape[0], shape[-1]] if shape else []})
        return m

    def sample(key: str, purpose: str, grid, parts: dict) -> dict:
        arrays = {}
        for p, shape in parts.items():
            arrays[f"{p}_patches"] = rng.standard_normal(shape).astype(np.float32)
            arrays[f"{p}_cls"] = rng.standard_normal((shape[0], shape[-1])).astype(np.float32)
        return feature_sample(key, arrays, meta(purpose, grid, parts))[0]

    def write(name: str, samples: list[dict]) -> str:
        target = root / f"{name}.tar"
        with TarSpool(target) as spool:
            for s in samples:
                spool.write(s)
        spool.path.rename(target)
        return str(target)

    use = write("use", [sample(f"u{i}", "use", (g, g), {"clip": (2, g, g, 6), "dino": (1, g, g, 5)}) for i in range(5)])
    align = write("align", [sample(f"a{i}", "fmbseg", gr, {"dino": (2, *gr, 6)}) for i, gr in enumerate(align_grids)])
    labels = []
    for i in range(len(align_grids)):
        lab = np.full((hh, ww), 255, np.uint8)
        lab[rng.integers(0, 15) :, rng.integers(0, 20) : 35] = rng.integers(0, 4)
        labels.append({"__key__": f"a{i}", "png": encode_png(lab)})
    texts = [f"t{k}" for k in range(9)]
    segments = {}
    for i in range(5):
        rows = []
        for s in range(3):
            m = np.zeros((hh, ww), np.uint8)
            cv2.ellipse(m, (int(rng.integers(0, ww)), int(rng.integers(0, hh))), (6 + s, 4 + i), 0, 0, 360, 1, -1)
            rle = encode_rle(m.astype(bool))
            rows.append({"segment_id": s, "height": hh, "width": ww, "rle_counts": rle["counts"],
                         "area": rle_area(rle), "texts": [{"phrase": texts[s + i], "expression": texts[s]}]})
        segments[f"u{i}"] = rows
    return {"use": TarStore([use]), "align": TarStore([align]), "labels": TarStore([write("labels", labels)]),
            "segments": segments, "text_index": {t: k for k, t in enumerate(texts)},
            "text_emb": rng.standard_normal((len(texts), 7)).astype(np.float32)}


def _equal_batches(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("grids", [[(3, 4)] * 4, [(3, 4), (4, 3), (2, 5), (3, 4)]])
def test_batch_reads_equal_collated_items(tmp_path: Path, grids) -> None:
    from pseudoseg.models.training.datasets import AlignmentDataset, UseSegmentDataset

    c = _caches(tmp_path, grids)
    use = UseSegmentDataset(c["use"], c["segments"], c["text_index"], c["text_emb"], seed=3)
    for idx in ([(0, 3), (0, 0), (0, 4)], [(2, 1), (2, 2)]):
        _equal_batches(collate_use([use[i] for i in idx]), collate_use(use.__getitems__(idx)))
    use.set_epoch(2)  # a plain int index takes the dataset's epoch
    _equal_batches(collate_use([use[1]]), collate_use(use.__getitems__([(2, 1)])))
    item = use[(0, 2)]
    meta, arrays = read_features(c["use"], "u2")
    assert torch.equal(item["clip_patches"], torch.from_numpy(arrays["clip_patches"]))
    assert item["weights"].shape == (3, meta["grid_height"] * meta["grid_width"])
    for crop in (0, 2):
        align = AlignmentDataset(c["align"], c["labels"], block=-1, mode="majority", crop=crop, repeats=2, seed=3)
        for idx in ([(0, 0), (0, 5), (0, 2)], [(1, 3), (1, 1), (1, 6), (1, 7)]):
            a, b = collate_alignment([align[i] for i in idx]), collate_alignment(align.__getitems__(idx))
            _equal_batches(a, b)
            assert ("padding_mask" in b) == (crop == 0 and len({grids[i % len(grids)] for _, i in idx}) > 1)


def test_tar_store_reads_in_place_checks_shapes_and_pickles(tmp_path: Path) -> None:
    c = _caches(tmp_path, [(3, 4)])
    store = c["align"]
    _, arrays = read_features(store, "a0")
    block = np.empty((3, 4, 6), np.float16)
    read_npy_into(store, "a0", "dino_patches", block, index=-1)
    assert np.array_equal(block, arrays["dino_patches"][1])
    with pytest.raises(ValueError, match="batch slot"):
        read_npy_into(store, "a0", "dino_patches", np.empty((3, 4, 5), np.float16), index=0)
    with pytest.raises(ValueError, match="no index"):
        read_npy_into(store, "a0", "dino_patches", block, index=2)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read("a0", "json") == store.read("a0", "json")
    buf = bytearray(10)
    store.read_into("a0", "json", [buf], start=1)
    assert bytes(buf) == store.read("a0", "json")[1:11]


# ------------------------------------------------------------------------------------------------ sampler, workers
def test_epoch_sampler_gives_the_shuffled_dataloader_order() -> None:
    g = torch.Generator()
    loader = DataLoader(list(range(23)), batch_size=4, shuffle=True, generator=g)
    sampler = EpochSampler(23, seed=7)
    for epoch in range(3):
        g.manual_seed(_epoch_seed(7, epoch))
        sampler.set_epoch(epoch)
        assert [(epoch, int(i)) for b in loader for i in b] == list(sampler)
    assert list(EpochSampler(3, 0, shuffle=False)) == [(0, 0), (0, 1), (0, 2)]
    assert epoch_index((4, 2), 0) == (4, 2) and epoch_index(2, 4) == (4, 2)


class EpochNoise(torch.utils.data.Dataset):
    """Alignment items whose noise comes from (seed, epoch, index) alone: epoch-indexed, persistent workers."""

    epoch_indexed = True

    def __init__(self, n: int = 12) -> None:
        rng = np.random.default_rng(0)
        self.tokens = rng.standard_normal((n, 4, 4, 8)).astype(np.float32)
        self.labels = rng.integers(-1, 3, (n, 4, 4))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index) -> dict:
        epoch, i = epoch_index(index, self.epoch)
        noise = sample_rng(5, epoch, i).standard_normal(self.tokens[i].shape).astype(np.float32) * 0.1
        return dict(tokens=self.tokens[i] + noise, labels=self.labels[i])


def _trains_and_resumes_like_no_workers(tmp_path: Path, make_dataset) -> None:
    """Training over ``make_dataset()`` with 2 loader workers, whole or stopped after one epoch and resumed, ends with the
    weights of a run without workers, bit for bit."""
    protos = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)

    def run(out: Path, workers: int, stop: int | None = None) -> dict:
        torch.manual_seed(0)
        model = AlignmentBlock(8, 6, variant="block", width=16, num_heads=2, dropout=0.1)
        cfg = TrainConfig.alignment_paper(epochs=3, batch_size=4, lr=0.05, num_workers=workers, seed=7)
        train(model, alignment_step(protos, TrainAlignmentParams()), make_dataset(), cfg, out,
              collate_fn=collate_alignment, stop_after_epochs=stop)
        return model.state_dict()

    reference = run(tmp_path / "ref", 0)
    run(tmp_path / "split", 2, stop=1)
    resumed = run(tmp_path / "split", 2)
    whole = run(tmp_path / "full", 2)
    for other in (resumed, whole):
        assert all(torch.equal(reference[k], other[k]) for k in reference)


@pytest.mark.slow  # DataLoader worker processes, three trainings
def test_persistent_workers_train_and_resume_bit_identical_to_no_workers(tmp_path: Path) -> None:
    _trains_and_resumes_like_no_workers(tmp_path, EpochNoise)


def test_tar_store_keeps_a_bounded_number_of_shards_open(tmp_path: Path, monkeypatch) -> None:
    import pseudoseg.pipeline.features.cache as fc

    monkeypatch.setattr(fc, "MAX_OPEN_SHARDS", 2)
    paths = []
    for s in range(4):
        target = tmp_path / f"shard-{s}.tar"
        with TarSpool(target) as spool:
            spool.write({"__key__": f"k{s}", "txt": f"v{s}".encode()})
        spool.path.rename(target)
        paths.append(str(target))
    store = TarStore(paths)
    for _ in range(2):
        assert [store.read(f"k{s}", "txt") for s in range(4)] == [f"v{s}".encode() for s in range(4)]
    assert len(store._fds) == 2
    store.close()
    assert store.read("k0", "txt") == b"v0"


def test_read_npy_batch_equals_per_member_reads_and_checks_like_them(tmp_path: Path) -> None:
    from pseudoseg.pipeline.features.cache import read_npy_batch

    c = _caches(tmp_path, [(3, 4), (3, 4), (4, 3), (3, 4)])
    store = c["align"]
    keys = ["a3", "a0", "a1"]
    want = np.stack([read_features(store, k)[1]["dino_patches"] for k in keys])
    want_cls = np.stack([read_features(store, k)[1]["dino_cls"] for k in keys])
    got, got_cls = np.full_like(want, np.nan), np.full_like(want_cls, np.nan)
    read_npy_batch(store, keys, {"dino_patches": got, "dino_cls": got_cls})
    assert np.array_equal(got, want) and np.array_equal(got_cls, want_cls)
    with pytest.raises(ValueError, match="batch slot"):  # a member of another shape: read_npy_into's check
        read_npy_batch(store, ["a0", "a2"], {"dino_patches": np.empty((2, *want.shape[1:]), np.float16)})
    with pytest.raises(ValueError, match="batch slot"):
        read_npy_batch(store, ["a0"], {"dino_patches": np.empty((1, *want.shape[1:]), np.float32)})


def test_tar_store_threads_keep_their_own_descriptors(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    c = _caches(tmp_path, [(3, 4)] * 3)
    store = c["align"]
    want = {k: store.read(k, "json") for k in store.keys()}
    with ThreadPoolExecutor(3) as ex:
        got = list(ex.map(lambda k: store.read(k, "json"), list(want) * 20))
    assert got == list(want.values()) * 20
    assert len(store._tables) >= 2
    with ThreadPoolExecutor(1) as ex:  # a new thread closes what the pool's ended threads had open
        assert ex.submit(store.read, "a1", "json").result() == want["a1"]
    assert sum(len(f) for _, f in store._tables) == 2  # this thread's and the last pool thread's
    store.close()
    assert all(not f for _, f in store._tables) and store.read("a0", "json") == want["a0"]


@pytest.mark.parametrize("grids", [[(3, 4)] * 4, [(3, 4), (4, 3), (2, 5), (3, 4)]])
def test_derived_caches_give_the_computed_batches(tmp_path: Path, grids) -> None:
    from pseudoseg.models.training.datasets import AlignmentDataset, UseSegmentDataset

    c = _caches(tmp_path, grids)
    use = [UseSegmentDataset(c["use"], c["segments"], c["text_index"], c["text_emb"], seed=3, cache_bytes=b)
           for b in (0, 1 << 20)]
    for epoch in range(3):  # the cached dataset computes in epoch 0, reads its cache after
        for idx in ([(epoch, 3), (epoch, 0), (epoch, 4)], [(epoch, 1), (epoch, 2)]):
            _equal_batches(collate_use(use[0].__getitems__(idx)), collate_use(use[1].__getitems__(idx)))
            _equal_batches(collate_use([use[0][i] for i in idx]), collate_use([use[1][i] for i in idx]))
    assert len(use[0].weights_cache) == 0 and len(use[1].weights_cache) == 5
    for crop in (0, 2):
        align = [AlignmentDataset(c["align"], c["labels"], block=-1, mode="majority", crop=crop, repeats=2, seed=3,
                                  cache_bytes=b) for b in (0, 1 << 20)]
        for epoch in range(3):
            for idx in ([(epoch, 0), (epoch, 5), (epoch, 2)], [(epoch, 3), (epoch, 1), (epoch, 6), (epoch, 7)]):
                _equal_batches(collate_alignment(align[0].__getitems__(idx)),
                               collate_alignment(align[1].__getitems__(idx)))
        assert len(align[0].labels_cache) == 0 and len(align[1].labels_cache) == len(grids)
    small = AlignmentDataset(c["align"], c["labels"], block=-1, mode="majority", crop=0, repeats=1, seed=3,
                             cache_bytes=100)  # room for one map: the others are computed every time
    ref = AlignmentDataset(c["align"], c["labels"], block=-1, mode="majority", crop=0, repeats=1, seed=3,
                           cache_bytes=0)
    for _ in range(2):
        _equal_batches(collate_alignment(ref.__getitems__([0, 1, 2, 3])),
                       collate_alignment(small.__getitems__([0, 1, 2, 3])))
    assert len(small.labels_cache) == 1 and small.labels_cache.nbytes <= 100


def test_derived_cache_packing_is_exact() -> None:
    from pseudoseg.models.training.datasets import (
        _pack_small_int,
        _pack_sparse,
        _unpack_small_int,
        _unpack_sparse,
    )

    rng = np.random.default_rng(4)
    w = rng.random((5, 12)).astype(np.float32) * (rng.random((5, 12)) < 0.3)
    w[2] = 0
    got = _unpack_sparse(_pack_sparse(w))
    assert got.dtype == w.dtype and np.array_equal(got.view(np.uint32), w.view(np.uint32))
    for lab in (rng.integers(-1, 100, (3, 4)), rng.integers(-1, 1000, (3, 4)), np.array([[-1, 2**40]]),
                np.zeros((0, 3), np.int64)):
        packed = _pack_small_int(lab)
        assert _unpack_small_int(packed).dtype == np.int64 and np.array_equal(_unpack_small_int(packed), lab)


class ThreadedEpochNoise(EpochNoise):
    """EpochNoise with a batch read and ``thread_batches``: ``make_loader`` gives it a ThreadBatchLoader."""

    thread_batches = True

    def __getitems__(self, indices: list) -> dict:
        return [self[x] for x in indices]


def test_thread_batch_loader_gives_the_dataloader_batches(tmp_path: Path) -> None:
    from pseudoseg.models.training.datasets import AlignmentDataset, UseSegmentDataset
    from pseudoseg.models.training.trainer import ThreadBatchLoader, make_loader

    c = _caches(tmp_path, [(3, 4), (4, 3), (2, 5), (3, 4)])
    use = UseSegmentDataset(c["use"], c["segments"], c["text_index"], c["text_emb"], seed=3)
    align = AlignmentDataset(c["align"], c["labels"], block=-1, mode="majority", crop=0, repeats=3, seed=3)
    for ds, collate in ((use, collate_use), (align, collate_alignment)):
        for drop_last in (False, True):
            cfg = TrainConfig.alignment_paper(batch_size=2, num_workers=0, seed=5, drop_last=drop_last)
            ref, _ = make_loader(ds, cfg, collate, torch.device("cpu"))
            threads, _ = make_loader(ds, TrainConfig.alignment_paper(batch_size=2, num_workers=2, seed=5,
                                                                     drop_last=drop_last),
                                     collate, torch.device("cpu"))
            assert isinstance(ref, DataLoader) and isinstance(threads, ThreadBatchLoader)
            for epoch in range(2):
                ref.sampler.set_epoch(epoch)
                threads.sampler.set_epoch(epoch)
                want, got = list(ref), list(threads)
                assert len(got) == len(want) == len(threads) == len(ref)
                for a, b in zip(want, got, strict=True):
                    _equal_batches(a, b)
            it = iter(threads)  # an epoch cut short stops its threads
            next(it)
            it.close()


def test_thread_batch_loader_trains_and_resumes_bit_identical_to_no_workers(tmp_path: Path) -> None:
    _trains_and_resumes_like_no_workers(tmp_path, ThreadedEpochNoise)


def test_thread_batch_loader_hints_the_batches_ahead_in_order(tmp_path: Path, monkeypatch) -> None:
    """Read-ahead: the kernel is told (posix_fadvise WILLNEED, over exactly each member's bytes) what every batch
    will read, batch after batch in the epoch's order; the batches are unchanged (``_equal_batches`` against the
    loader without workers)."""
    import os

    from pseudoseg.models.training.datasets import AlignmentDataset, UseSegmentDataset
    from pseudoseg.models.training.trainer import make_loader

    c = _caches(tmp_path, [(3, 4), (4, 3), (2, 5), (3, 4)])
    hints: list[tuple] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd, offset, size, advice):
        hints.append((os.readlink(f"/proc/self/fd/{fd}"), offset, size, advice))
        return real_fadvise(fd, offset, size, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    use = UseSegmentDataset(c["use"], c["segments"], c["text_index"], c["text_emb"], seed=3)
    align = AlignmentDataset(c["align"], c["labels"], block=-1, mode="majority", crop=0, repeats=2, seed=3)
    for ds, collate, members in ((use, collate_use, lambda key: [(c["use"], m) for m in c["use"].members(key)]),
                                 (align, collate_alignment,
                                  lambda key: [(c["align"], "dino_patches.npy"), (c["labels"], "png")])):
        cfg = TrainConfig.alignment_paper(batch_size=2, num_workers=2, seed=5)
        loader, _ = make_loader(ds, cfg, collate, torch.device("cpu"))
        reference, _ = make_loader(ds, TrainConfig.alignment_paper(batch_size=2, num_workers=0, seed=5), collate,
                                   torch.device("cpu"))
        for epoch in range(2):
            hints.clear()
            loader.sampler.set_epoch(epoch)
            reference.sampler.set_epoch(epoch)
            for a, b in zip(reference, loader, strict=True):
                _equal_batches(a, b)
            keys = [ds.items[i][0] if ds is use else ds.ids[i % len(ds.ids)] for _, i in loader.sampler]
            want = [(store.member(key, m)[:3], os.POSIX_FADV_WILLNEED) for key in keys for store, m in members(key)]
            assert [((path, offset, size), advice) for path, offset, size, advice in hints] == want
        loader.close()


def test_batch_buffers_are_reused_only_once_nothing_refers_to_them() -> None:
    import gc

    from pseudoseg.models.training.trainer import BatchBuffers

    buffers = BatchBuffers(max_bytes=3 * 4 * 6 * 2)  # room for three float16 [4, 6] buffers
    a = buffers.empty((4, 6), torch.float16)
    b = buffers.empty((4, 6), torch.float16)
    assert a.data_ptr() != b.data_ptr()  # a is alive: b is another buffer
    ptr_a = a.data_ptr()
    view = a[1:]  # a view keeps a's buffer busy after a itself is gone
    del a
    gc.collect()
    c = buffers.empty((4, 6), torch.float16)
    assert c.data_ptr() not in (ptr_a, b.data_ptr())
    del view
    d = buffers.empty((4, 6), torch.float16)
    assert d.data_ptr() == ptr_a and d.dtype == torch.float16 and d.shape == (4, 6)  # free again: reused
    e = buffers.empty((4, 6), torch.float16)  # over max_bytes: fresh memory, not kept
    del e
    assert buffers.empty((4, 6), torch.float16).data_ptr() not in (ptr_a, b.data_ptr(), c.data_ptr())
    assert buffers.empty((2, 6), torch.float16).shape == (2, 6)  # another shape: its own buffers
    clone = pickle.loads(pickle.dumps(buffers))  # a DataLoader worker starts with none
    assert clone.nbytes == 0 and clone.max_bytes == buffers.max_bytes


def test_use_online_augmentation_is_the_papers():
    """use-paper §4.2: "random rescaling in the range of [0.5, 2]" and crops of 560 × 560 pixels: the defaults of
    [train_use] (crop_size, scale_min, scale_max) draw crops of that size at scales in that range."""
    from pseudoseg.models.training.params import TrainUseParams
    from pseudoseg.pipeline.core.transforms import random_scale_crop

    p = TrainUseParams()
    assert (p.crop_size, p.scale_min, p.scale_max) == (560, 0.5, 2.0)
    rng = np.random.default_rng(0)
    scales = []
    for _ in range(200):
        geo = random_scale_crop((480, 640), p.crop_size, (p.scale_min, p.scale_max), rng)
        assert geo.crop_hw == (560, 560)
        scales.append(geo.resize.scale_xy[0] * 640 / 560)  # relative to the crop-fitting size
    assert 0.5 <= min(scales) < 0.6 and 1.9 < max(scales) <= 2.0
