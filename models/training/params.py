"""Settings of the two trainers (sections ``[train_use]`` and ``[train_alignment]`` of luigi.cfg): one frozen params
object per trainer, hashed whole into its run folder (``tasks.train``; ``num_workers`` and ``keep_checkpoints``
change no weight and are not hashed) and the one place their defaults are written: ``TrainConfig.use_paper`` /
``alignment_paper`` take the optimiser and schedule from these defaults, ``use_step`` / ``alignment_step`` the loss
settings from the objects. luigi.cfg repeats the defaults for the reader (a test keeps the two equal)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pseudoseg.pipeline.core.params import StageParams, setting
from pseudoseg.pipeline.use.params import TEXT_CHOICES

ALIGNMENT_VARIANTS = ("block", "linear", "mlp")  # models.training.heads.AlignmentBlock's (kept torch-free here)

WORKERS_HELP = "DataLoader workers (not a content parameter)"


@dataclass(frozen=True)
class TrainUseParams(StageParams):
    """The USE head (use-paper §4.2: AdamW lr 1e-3, wd 0.01, poly 0.9, 5 epochs, batch 32 images, logit scale 30)."""

    section = "train_use"  # its luigi.cfg section

    lr: float = setting(1e-3, gt=0)
    weight_decay: float = setting(0.01, ge=0)
    poly_power: float = setting(0.9, ge=0)
    epochs: int = setting(5, ge=1)
    batch_size: int = setting(32, ge=1, help="images per batch (all their segments)")
    grad_clip: float = setting(0.0, ge=0, help="max grad norm; 0 = off")
    width: int = setting(256, ge=1, help="per-part width of the head (LLN outputs, CLS)")
    use_cls: bool = setting(True)
    logit_scale: float = setting(30.0, gt=0, help="the paper's temperature 30 (multiplies)")
    dedup: bool = setting(True, help="identical texts of one batch are not negatives of each other")
    texts: str = setting("both", choices=tuple(TEXT_CHOICES), help="texts a segment's text is drawn from: both = "
                         "noun phrases and referring expressions (use-paper §3.1), or only one kind (ablation)")
    features: str = setting("cache", choices=("cache", "online"), help="cache: read [features_use] tokens; online: "
                            "frozen encoders in the loop on augmented crops (the paper's setting, GPU)")
    augment: bool = setting(True, help="online only: random rescale + crop; false = the cache's squash")
    crop_size: int = setting(560, ge=1, help="online: crop side (patch multiple), use-paper §4.2")
    scale_min: float = setting(0.5, gt=0, help="online: rescale factor range (of the crop-fit size)")
    scale_max: float = setting(2.0, gt=0)
    seed: int = setting(0, ge=0)
    num_workers: int = setting(4, ge=0, hashed=False, help=WORKERS_HELP)
    keep_checkpoints: int = setting(2, ge=1, hashed=False)

    def optimisation(self) -> dict[str, Any]:
        """The TrainConfig fields of the optimiser and schedule (AdamW + poly)."""
        return dict(lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs, batch_size=self.batch_size,
                    optimizer="adamw", scheduler="poly", poly_power=self.poly_power)


@dataclass(frozen=True)
class TrainAlignmentParams(StageParams):
    """The FMbSeg alignment block (fmbseg-paper §4.1: SGD + cosine, batch 5 images, 10 epochs; lr / momentum / wd
    are usual SGD values, the paper's appendix is not available here) and TSupCon (Eq. 1-4)."""

    section = "train_alignment"  # its luigi.cfg section

    label_source: str = setting("fmbseg", choices=("fmbseg", "car"),
                                help="pseudo-label maps: FMbSeg Stage 1 or CaR (car_labels)")
    lr: float = setting(0.01, gt=0)
    momentum: float = setting(0.9, ge=0, le=1)
    weight_decay: float = setting(1e-4, ge=0)
    min_lr: float = setting(0.0, ge=0)
    epochs: int = setting(10, ge=1)
    batch_size: int = setting(5, ge=1, help="images per batch")
    grad_clip: float = setting(0.0, ge=0, help="max grad norm; 0 = off")
    variant: str = setting("block", choices=ALIGNMENT_VARIANTS)
    width: int = setting(0, ge=0, help="0 = the DINOv2 width")
    num_heads: int = setting(8, ge=1)
    mlp_ratio: float = setting(4.0, gt=0)
    dropout: float = setting(0.0, ge=0, lt=1)
    temperature: float = setting(1.0, gt=0, help="TSupCon temperature; 1 = Eq. 1-4 as written (plain dot products), "
                                 "0.1 = SupCon's usual value (faster, see alignment_step)")
    anchor_positive: bool = setting(True, help="Eq. 4 as printed: the anchor is one of its own positives; false = "
                                    "SupCon's P(i) without it")
    label_mode: str = setting("majority", choices=("majority", "centre"))
    dino_block: int = setting(-1, help="which stored DINOv2 block (index into its layers)")
    crop_patches: int = setting(0, ge=0, help="random crop of the patch grid per item; 0 = whole")
    repeats: int = setting(1, ge=1, help="passes over each image per epoch (tiny datasets)")
    seed: int = setting(0, ge=0)
    num_workers: int = setting(4, ge=0, hashed=False, help=WORKERS_HELP)
    keep_checkpoints: int = setting(2, ge=1, hashed=False)

    def optimisation(self) -> dict[str, Any]:
        """The TrainConfig fields of the optimiser and schedule (SGD + cosine to min_lr)."""
        return dict(lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs, batch_size=self.batch_size,
                    optimizer="sgd", scheduler="cosine", momentum=self.momentum, min_lr=self.min_lr)
