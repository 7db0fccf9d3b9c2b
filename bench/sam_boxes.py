"""SAM box→mask: one batched decoder call against one call per box (bench/results/sam_boxes.json)."""

from __future__ import annotations

from bench.fixtures import photo, random_boxes
from bench.timing import compare, time_call


def bench_sam_boxes(n_boxes: int = 20, repeats: int = 3, arch: str = "vit_b") -> dict:
    """SAM box→mask on one 640x480 image, real-size ``arch`` at random init (seed 0) on this machine's device.

    Batched: `SamSegmenter.embed` once + ONE `predict` call for all boxes (the `masks_for_boxes` path).
    Per box: `SamPredictor.set_image` once + `predict(box=..., multimask_output=True, return_logits=True)` per
    box. Both produce full-resolution logits for 3 masks per box; the batched decode is also timed in chunks of 1
    and 4 boxes per call (`max_boxes_per_call`). `masks_for_boxes` adds the stability choice and cleanup
    (thresholds off, so every mask is cleaned; random-init masks are noisier than trained ones: an upper bound).
    Encoder and decoder variants each: 1 warm-up, then `repeats` interleaved runs (min and median)."""
    import numpy as np
    import torch
    from segment_anything import SamPredictor

    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, SamSegmenter, build_sam_arch
    from pseudoseg.models.roles import Segmenter
    from pseudoseg.pipeline.use.pairs import masks_for_boxes
    from pseudoseg.pipeline.use.params import UseBoxMasksParams

    torch.manual_seed(0)
    sam, build = time_call(lambda: build_sam_arch(SAM_ARCHS[arch], checkpoint=None))
    seg = SamSegmenter(sam, device="auto")
    rng = np.random.default_rng(0)
    image = photo(rng)
    boxes = random_boxes(rng, n_boxes)
    predictor = SamPredictor(seg.sam)
    encoders = compare({"embed": lambda: seg.embed(image), "predictor_set_image": lambda: predictor.set_image(image)},
                       repeats=repeats, warmup=1)
    embedding = seg.embed(image)
    predictor.set_image(image)

    def chunked(size: int) -> None:
        for c in range(0, n_boxes, size):
            seg.predict(embedding, boxes_xyxy=boxes[c : c + size], multimask=True)

    class Cached(Segmenter):  # the embedding above, so masks_for_boxes is timed without the encoder
        def embed(self, image):
            return embedding

        def predict(self, emb, **kw):
            return seg.predict(emb, **kw)

        def automatic_masks(self, image, **params):
            raise NotImplementedError

    def per_box() -> None:
        for box in boxes:
            predictor.predict(box=box, multimask_output=True, return_logits=True)

    decoders = compare({
        "batched": lambda: seg.predict(embedding, boxes_xyxy=boxes, multimask=True),
        "per_box": per_box, "chunks_of_1": lambda: chunked(1), "chunks_of_4": lambda: chunked(4),
        "masks_for_boxes": lambda: masks_for_boxes(Cached(), image, boxes, UseBoxMasksParams(pred_iou_thresh=-np.inf,
                                                   stability_score_thresh=-np.inf)),
    }, repeats=repeats, warmup=1)
    med = {k: v["wall_s"]["median"] for k, v in {**encoders, **decoders}.items()}
    return {
        "arch": f"{arch} (random init)", "image_hw": [480, 640], "boxes": n_boxes, "repeats": repeats,
        "device": str(seg.device), "torch_threads": torch.get_num_threads(), "build_s": round(build["wall_s"], 3),
        "embed_s": med["embed"], "predictor_set_image_s": med["predictor_set_image"],
        "batched_decoder_s": med["batched"], "per_box_decoder_s": med["per_box"],
        "batched_decoder_s_by_max_boxes_per_call": {"1": med["chunks_of_1"], "4": med["chunks_of_4"]},
        "per_box_over_batched": round(med["per_box"] / med["batched"], 3), "masks_for_boxes_s": med["masks_for_boxes"],
        "timings": {**encoders, **decoders},
    }


BENCHMARK = bench_sam_boxes
