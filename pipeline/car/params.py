"""Settings of CaR: those of every CaR run (section ``[car]`` of luigi.cfg: ``CarSettings``, read by the CaR label
stage and by Evaluate's CaR) and those of the CaR label stage (section ``[car_labels]``): its params object, hashed
whole into its folder name, and how it resolves to the ``CarParams`` the loop runs with (``car_label_params``: the
official per-dataset preset of ``pipeline.car.recurrent.CAR_DEFAULTS``, then the configured θ, prompts, CRF and CAM).
Defaults are written here only; luigi.cfg repeats them for the reader (a test keeps the two equal)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pseudoseg.pipeline.car.recurrent import (
    CAR_DEFAULTS,
    CRF_IMAGES,
    VISUAL_PROMPTS,
    CarParams,
    car_family,
    car_params,
)
from pseudoseg.pipeline.core.params import StageParams, setting
from pseudoseg.pipeline.core.vocabularies import vocabulary_digest


@dataclass(frozen=True)
class CarSettings(StageParams):
    """Section ``[car]``: settings of every CaR run (the label stage and Evaluate's CaR); they reach each run's
    ``CarParams`` (:func:`with_car_settings`) and so its folder hash."""

    section = "car"  # its luigi.cfg section

    crf_image: str = setting(CarParams.crf_image, choices=CRF_IMAGES,
                             help="what the dense CRF's bilateral kernel compares: official = the released code's "
                             "mean-subtracted BGR copy cast to uint8 (negatives wrap, as on x86), rgb = the photo")


def with_car_settings(params: CarParams, car: CarSettings) -> CarParams:
    """``params`` with the ``[car]`` settings."""
    return dataclasses.replace(params, crf_image=car.crf_image)


@dataclass(frozen=True)
class CaRLabelsParams(StageParams):
    section = "car_labels"  # its luigi.cfg section

    vocabulary: str = setting("", digest=vocabulary_digest, help="vocabulary name or .txt path; empty = [fmbseg]'s")
    params: str = setting("", choices=("", *sorted(CAR_DEFAULTS)),
                          help="η/θ/λ of car-paper §4: voc | coco | context; empty = by vocabulary name "
                          "(coco_* → coco, context* → context, else voc)")
    theta: str = setting("", optional=True, ge=0, le=1,
                         help="θ: a query survives a step when its score P_ii > θ; empty = the official config of "
                         "`params` (voc 0.6, coco 0.3, context 0.25)")
    prompts: str = setting("", items=VISUAL_PROMPTS, help="visual prompts (comma list); empty = the official config "
                           "of `params` (voc: circle,blur; coco: blur,gray; ...)")
    crf: bool = setting(True, help="dense-CRF post-processing (needs pydensecrf2)")
    sam: bool = setting(False, help="CaR+SAM ensemble with the segmenter role (car-paper §3.4)")
    cam: str = setting("clip_es", choices=("clip_es", "gradcam"),
                       help="mask proposals: Grad-CAM + CLIP-ES affinity (λ), or Grad-CAM")
    short_side: int = setting(0, ge=0, help="CaR runs at this short side, labels are resized back (nearest); 0 = "
                              "original size (official code)")


def car_label_family(cfg: CaRLabelsParams, vocabulary: str) -> str:
    """The CAR_DEFAULTS family whose official settings apply: ``cfg.params``, or by the name of the vocabulary
    labelled (``vocabulary``)."""
    family = cfg.params.strip()
    if family and family not in CAR_DEFAULTS:
        raise ValueError(f"[car_labels] params must be one of {sorted(CAR_DEFAULTS)} or empty, got {family!r}")
    return family or car_family(vocabulary.lower())


def car_label_params(cfg: CaRLabelsParams, vocabulary: str, car: CarSettings) -> CarParams:
    """The official settings of the family (``car_label_family``) with the configured θ, prompts, CRF and CAM and
    the ``[car]`` settings. A label run leaves background queries equal to one of its queries out of f's softmax
    (``drop_background_queries``: vocabularies such as coco_stuff171 or context59 hold "grass", "sky", "tree",
    ...; the official benchmarks keep all 23, as the released code)."""
    base = car_params(car_label_family(cfg, vocabulary))
    prompts = tuple(p.strip() for p in cfg.prompts.split(",") if p.strip()) or base.prompts
    unknown = set(prompts) - set(VISUAL_PROMPTS)
    if unknown:
        raise ValueError(f"[car_labels] prompts {cfg.prompts!r}: use a comma list of {VISUAL_PROMPTS}")
    theta = float(cfg.theta) if cfg.theta.strip() else base.theta
    return with_car_settings(dataclasses.replace(base, prompts=prompts, crf=cfg.crf, cam=cfg.cam, theta=theta,
                                                 drop_background_queries=True), car)
