"""Sharing SAM image embeddings: one encoder forward against reading the stored embedding back
(bench/results/sam_embedding_share.json)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.timing import compare


def bench_sam_embedding_share(repeats: int = 5, arch: str = "vit_b") -> dict:
    """What sharing SAM image embeddings (tasks/stages/sam.py) trades: one ``arch`` encoder forward (random init, seed 0,
    one 640x480 image, this machine's device) against reading the stored float16 embedding back from a WebDataset
    tar (both: 1 warm-up, median of ``repeats`` interleaved), and the bytes it costs per image. With both branches,
    each image is otherwise encoded 3 times (USE box masks, FMbSeg Stage 1.1, Stage 1.2)."""
    import numpy as np
    import torch

    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, SamSegmenter, build_sam_arch
    from pseudoseg.pipeline.core.artifacts import TarSpool
    from pseudoseg.pipeline.features.params import SamEmbeddingsParams
    from pseudoseg.pipeline.features.sam_embeddings import embedding_sample, iter_sam_embeddings

    torch.manual_seed(0)
    seg = SamSegmenter(build_sam_arch(SAM_ARCHS[arch], checkpoint=None), device="auto")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    emb = seg.embed(rgb)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "shard-000000.tar"
        with TarSpool(target) as spool:
            sample, record = embedding_sample("img", emb.features.float().cpu().numpy(), emb.original_size,
                                              emb.input_size, f"{arch}:random", SamEmbeddingsParams())
            spool.write(sample)
        t = compare({"encode": lambda: seg.embed(rgb), "read": lambda: list(iter_sam_embeddings(str(spool.path)))},
                    repeats=repeats, warmup=1)
        (_, features, _), = list(iter_sam_embeddings(str(spool.path)))
    err = float(np.abs(features - emb.features.float().cpu().numpy()).max())
    encode_s, read_s = t["encode"]["wall_s"]["median"], t["read"]["wall_s"]["median"]
    return {"model": f"SAM {arch}, random init", "device": str(seg.device), "image_hw": [480, 640],
            "repeats": repeats, "encode_s": encode_s, "read_stored_s": read_s,
            "bytes_per_image": record["embedding_bytes"], "float16_max_abs_error": err,
            "encoder_passes_saved_per_image_both_branches": 2,
            "seconds_saved_per_image_both_branches": round(2 * encode_s - 3 * read_s, 4), "timings": t}


BENCHMARK = bench_sam_embedding_share
