"""Settings of Evaluate (section ``[evaluate]`` of luigi.cfg): the split and grid every method uses, plus those of
one method (CaR's overrides of its official config, USE+SAM's class texts and point grid), so a method's folder
hash holds its own settings only. Defaults are written here only; luigi.cfg repeats them for the reader (a test
keeps the two equal). Resolution, sliding window and background rule are the method's paper's
(``pipeline.eval.benchmarks.PAPER_PROTOCOLS``), not settings."""

from __future__ import annotations

from dataclasses import dataclass

from pseudoseg.pipeline.core.params import StageParams, setting
from pseudoseg.pipeline.features.cache import TEXT_TEMPLATE_SETS


@dataclass(frozen=True)
class EvaluateParams(StageParams):
    """Every method (``fmbseg`` and ``pseudo`` have no settings of their own)."""

    section = "evaluate"  # its luigi.cfg section

    split: str = setting("val", help="benchmark split (the split file / folder name)")
    grid_images: int = setting(4, ge=0, help="rows of grid.png: the first N images by id")


@dataclass(frozen=True)
class EvaluateCarParams(EvaluateParams):
    """method = car: overrides of CaR's official per-benchmark config (``pipeline.car.recurrent.car_params``)."""

    section = "evaluate"  # its luigi.cfg section

    car_prompts: str = setting("", help="CaR visual prompts (comma list); empty = the official config of the "
                               "benchmark (voc: circle,blur; coco: blur,gray)")
    car_crf: bool = setting(True, help="dense-CRF post-processing (needs pydensecrf2)")
    car_sam: bool = setting(False, help="CaR+SAM ensemble with the segmenter role")
    car_cam: str = setting("clip_es", choices=("clip_es", "gradcam"),
                           help="CaR mask proposals: Grad-CAM + CLIP-ES affinity (λ), or Grad-CAM")


@dataclass(frozen=True)
class EvaluateUseSamParams(EvaluateParams):
    """method = use_sam: the class texts' template set and SAM's automatic-mask point grid (use-paper §4.3)."""

    section = "evaluate"  # its luigi.cfg section

    use_sam_templates: str = setting("single", choices=tuple(sorted(TEXT_TEMPLATE_SETS)),
                                     help="use_sam: template set of the class texts (use-paper §4.3: one noun "
                                     "template, 'a photo of a {}.'); single | imagenet80 | use4")
    use_sam_points_per_side: int = setting(32, ge=1, help="use_sam: SAM automatic-mask point grid per side "
                                           "(use-paper §4.3: a regular grid)")


METHOD_PARAMS: dict[str, type[EvaluateParams]] = {"car": EvaluateCarParams, "use_sam": EvaluateUseSamParams}


def method_params(method: str) -> type[EvaluateParams]:
    """The params type of one method's evaluation."""
    return METHOD_PARAMS.get(method, EvaluateParams)
