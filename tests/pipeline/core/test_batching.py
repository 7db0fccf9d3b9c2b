"""Batching across images never changes outputs beyond float rounding: every batched model path against its
one-at-a-time path on the tiny random models (CPU, float32), and the batching/overlap helpers (packing rows across
items, decoding ahead, post-processing behind, device-side mask reductions) against their sequential meaning."""

from __future__ import annotations

import dataclasses
import threading
import time

import cv2
import numpy as np
import pytest
import torch

from pseudoseg.models.registry import ModelSettings, load_role
from pseudoseg.models.roles import Sampling
from pseudoseg.pipeline.core.masks import stability_score
from pseudoseg.pipeline.core.overlap import Behind, HostCopy, Outcome, packed_batches, prefetch
from pseudoseg.pipeline.features.cache import encode_fmbseg, encode_fmbseg_batch, encode_use
from pseudoseg.pipeline.fmbseg import pseudo_labels as F
from pseudoseg.pipeline.fmbseg.params import FmbsegDenseParams
from pseudoseg.pipeline.use.pairs import choose_by_stability

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def settings(tiny_cache) -> ModelSettings:
    return ModelSettings(preset="tiny", cache_dir=str(tiny_cache), device="cpu", keep_loaded=0)


def photos(n: int, seed: int = 0, sizes=((48, 64), (64, 48), (40, 70))) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [cv2.GaussianBlur(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8), (5, 5), 0)
            for i in range(n)]


# ----------------------------------------------------------------------------------------------------- models
def test_sam_embed_batch_equals_one_image_at_a_time(settings):
    seg = load_role("segmenter", settings)
    images = photos(3)
    batch = seg.embed_batch(images, [seg.prepare(im) for im in images])
    for image, got in zip(images, batch, strict=True):
        want = seg.embed(image)
        assert got.original_size == want.original_size and got.input_size == want.input_size
        assert got.features.shape == want.features.shape == (1, 256, 64, 64)
        torch.testing.assert_close(got.features, want.features, rtol=1e-5, atol=1e-6)


def test_clip_crops_packed_across_images_equal_each_image_alone(settings):
    """FmbsegDense packs the crops of consecutive images into its batches (`packed_batches`): same dense grid and CLS
    per image as `clip_dense_features` one image at a time, for batches that split images anywhere."""
    clip = load_role("clip", settings)
    images = photos(3)
    cfg = dataclasses.replace(FmbsegDenseParams(), short_side=112)
    crops = [F.dense_crops(im, cfg, image_size=clip.image_size, patch_size=clip.patch_size) for im in images]
    assert {len(c.crops) for c in crops} != {1}  # several crops per image, so batches cut through images

    def encode(rows):
        f = clip.encode_image(rows)
        return f.patch, f.cls

    for batch_size in (1, 3, 7, 64):
        packed = list(packed_batches(((k, c.crops) for k, c in enumerate(crops)), encode, batch_size))
        assert [k for k, _ in packed] == [0, 1, 2]
        for (_, outcome), image, c in zip(packed, images, crops, strict=True):
            got = F.stitch_dense(c, *outcome.get())
            want = F.clip_dense_features(clip, image, dataclasses.replace(cfg, clip_batch_size=1))
            np.testing.assert_allclose(got.dense, want.dense, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.cls, want.cls, rtol=1e-5, atol=1e-6)


def test_dino_batches_equal_one_image_at_a_time(settings):
    dense = load_role("dense", settings)
    clip = load_role("clip", settings)
    same_size = photos(3, sizes=((48, 64),))
    batch = encode_fmbseg_batch(same_size, dense=dense, dino_layers=(1, 2), short_side=56)
    for image, (arrays, meta) in zip(same_size, batch, strict=True):
        want_arrays, want_meta = encode_fmbseg(image, dense=dense, dino_layers=(1, 2), short_side=56)
        assert meta == want_meta
        for name, array in arrays.items():
            np.testing.assert_allclose(array, want_arrays[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one size"):
        encode_fmbseg_batch(photos(2), dense=dense, dino_layers=(2,), short_side=56)
    images = photos(3)
    kw = dict(clip=clip, dense=dense, clip_layers=(0, 1), dino_layers=(2,), input_size=56)
    for (arrays, meta), image in zip(encode_use(images, **kw), images, strict=True):
        ((want_arrays, want_meta),) = encode_use([image], **kw)
        assert meta == want_meta
        for name, array in arrays.items():
            np.testing.assert_allclose(array, want_arrays[name], rtol=1e-5, atol=1e-6)


CAPTIONS = ["a man riding a horse on the beach.", "two dogs", "a cat",
            "a red bus parked on the street near a tall building with people. a boat on the lake"]


def test_grounder_batch_encodes_each_image_once_and_equals_one_caption_calls(settings):
    """Several images (two input sizes), several captions each, any caption batch: the same boxes, scores and token
    probabilities as one `ground` call per caption (box threshold 0: every query kept, nothing hides a difference),
    and the Swin backbone runs once per input size, not once per caption."""
    grounder = load_role("grounder", settings)
    images = photos(3)
    queries = [(0, CAPTIONS[0]), (0, CAPTIONS[1]), (1, CAPTIONS[3]), (2, CAPTIONS[2]), (1, CAPTIONS[0]),
               (2, CAPTIONS[3]), (0, CAPTIONS[3])]
    kw = dict(box_threshold=0.0, text_threshold=0.25)
    single = [grounder.ground(images[i], caption, **kw) for i, caption in queries]
    calls = []
    swin = grounder.model.model.backbone.conv_encoder  # what computes image features (the backbone's hooks see reuses)
    handle = swin.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    try:
        for batch_size in (None, 1, 2, 3):
            calls.clear()
            batch = grounder.ground_batch(images, queries, batch_size=batch_size,
                                          prepared=[grounder.prepare(im) for im in images], **kw)
            sizes = {tuple(grounder.prepare(im).shape) for im in images}
            assert len(calls) == len(sizes) and sum(calls) == len(images)  # one forward per input size
            for a, b in zip(single, batch, strict=True):
                assert a.token_char_spans == b.token_char_spans and a.boxes_xyxy.shape == b.boxes_xyxy.shape
                np.testing.assert_allclose(b.boxes_xyxy, a.boxes_xyxy, rtol=0, atol=1e-4)
                np.testing.assert_allclose(b.token_probs, a.token_probs, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()
    assert "forward" not in vars(grounder.model.model.backbone)  # the backbone computes again


def test_captioner_greedy_batch_equals_one_image_at_a_time(settings):
    captioner = load_role("captioner", settings)
    images = photos(3)
    greedy = Sampling(8)
    batch = captioner.caption(images, "Describe this image.", greedy)
    assert batch == [captioner.caption([im], "Describe this image.", greedy)[0] for im in images]


# ----------------------------------------------------------------------------------------------------- masks on device
@pytest.mark.parametrize("threshold,offset", [(0.0, 1.0), (0.3, 1.0), (-0.25, 0.5), (0.1, 0.05)])
def test_stability_and_choice_on_tensors_equal_numpy_bit_for_bit(threshold, offset):
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(6, 3, 23, 31)) * 3).astype(np.float32)
    logits[0, 1] = -5  # an empty mask: stability 0
    logits[1, 2] = logits[1, 0]  # a tie on stability, broken by the predicted IoU
    iou = rng.uniform(size=(6, 3)).astype(np.float32)
    iou[2] = 0.5  # a tie on both: the lower index
    logits[2] = logits[2, 0]
    want = stability_score(logits, threshold, offset)
    got = stability_score(torch.from_numpy(logits), threshold, offset)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    index, stab = choose_by_stability(logits, iou, mask_threshold=threshold, offset=offset)
    t_index, t_stab = choose_by_stability(torch.from_numpy(logits), torch.from_numpy(iou),
                                          mask_threshold=threshold, offset=offset)
    assert np.array_equal(t_index.numpy(), index) and np.array_equal(t_stab.numpy(), stab)
    assert index[2] == 0


def test_host_copy_of_cpu_tensors_and_arrays():
    t = torch.arange(6).reshape(2, 3) > 2
    assert np.array_equal(HostCopy(t).numpy(), t.numpy()) and HostCopy(np.ones(2)).numpy().tolist() == [1, 1]


# ----------------------------------------------------------------------------------------------------- helpers
def test_packed_batches_cut_across_items_and_retry_alone():
    calls = []

    def encode(rows):
        calls.append(rows.tolist())
        if (rows == 99).any():
            raise ValueError("bad row")
        return rows * 2, rows + 1

    items = [("a", np.arange(5)), ("b", np.arange(3) + 10), ("c", np.zeros(0, int)),
             ("d", np.array([99, 1, 2, 3, 4, 5, 6])), ("e", np.arange(4) + 20)]
    out = list(packed_batches(items, encode, 4))
    assert [k for k, _ in out] == ["a", "b", "c", "d", "e"]
    assert [a.tolist() for a in out[0][1].get()] == [[0, 2, 4, 6, 8], [1, 2, 3, 4, 5]]
    assert out[1][1].get()[0].tolist() == [20, 22, 24] and out[2][1].get() == ()
    with pytest.raises(ValueError, match="bad row"):
        out[3][1].get()
    assert out[4][1].get()[0].tolist() == [40, 42, 44, 46]
    # a is cut 4 + 1; b fills a's last batch; d's batch fails and d alone fails again; e is encoded on its own
    assert calls == [[0, 1, 2, 3], [4, 10, 11, 12], [99, 1, 2, 3], [99, 1, 2, 3], [20, 21, 22, 23]]
    with pytest.raises(ValueError):
        list(packed_batches(items, encode, 4, retry=lambda exc: False))


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_prefetch_keeps_order_errors_in_place_and_stops_early(ahead):
    read = []

    def source():
        for i in range(8):
            read.append(i)
            yield i
        raise OSError("source broke")

    def work(i):
        time.sleep(0.002 * (7 - i))  # later items finish first
        if i == 5:
            raise ValueError("item 5")
        return i * i

    seen = []
    with pytest.raises(OSError, match="source broke"):
        for _, outcome in prefetch(source(), work, ahead=ahead, threads=3):
            seen.append(outcome.error.args[0] if outcome.error else outcome.get())
    assert seen == [0, 1, 4, 9, 16, "item 5", 36, 49]
    read.clear()
    stream = prefetch(source(), work, ahead=ahead, threads=2)
    assert next(stream)[1].get() == 0
    stream.close()  # stops the feeder: it read at most `ahead` + 2 items
    assert len(read) <= ahead + 2 and not [t for t in threading.enumerate() if t.name.startswith("prefetch")]


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_behind_delivers_in_submission_order_in_the_callers_thread(depth):
    delivered, threads = [], set()

    def deliver(key, outcome: Outcome):
        threads.add(threading.current_thread().name)
        delivered.append((key, outcome.error.args[0] if outcome.error else outcome.get()))

    def post(i):
        time.sleep(0.002 * (5 - i % 5))
        if i == 3:
            raise ValueError("three")
        return -i

    with Behind(deliver, depth=depth, threads=2) as behind:
        for i in range(9):
            behind.submit(i, post, i)
            assert len(behind.pending) <= depth
    assert delivered == [(i, "three" if i == 3 else -i) for i in range(9)]
    assert threads == {threading.current_thread().name}
    dropped = []
    with pytest.raises(RuntimeError), Behind(lambda k, o: dropped.append(k), depth=4) as behind:
        behind.submit(0, time.sleep, 0.05)
        raise RuntimeError("loop failed")
    assert dropped == []  # pending work is not delivered when the loop fails
