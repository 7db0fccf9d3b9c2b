"""The sections of luigi.cfg: one ``luigi.Config`` class each, generated from the params dataclasses of the stages
that read it (``tasks.params.config_section``: the section's keys are their fields). A task names only its
params type; ``section_of`` says which section holds it."""

from __future__ import annotations

import luigi

from pseudoseg.models.training.params import TrainAlignmentParams, TrainUseParams
from pseudoseg.pipeline.car.params import CaRLabelsParams, CarSettings
from pseudoseg.pipeline.core.params import DecodeLimits, IngestPlanParams, StageParams
from pseudoseg.pipeline.core.storage import StorageParams
from pseudoseg.pipeline.eval.params import EvaluateCarParams, EvaluateParams, EvaluateUseSamParams
from pseudoseg.pipeline.features.params import (
    FeaturesFmbsegParams,
    FeaturesUseParams,
    SamEmbeddingsParams,
    SamSharingParams,
    UseTextParams,
)
from pseudoseg.pipeline.fmbseg.params import (
    FmbsegAutoMasksParams,
    FmbsegDenseParams,
    FmbsegDetectParams,
    FmbsegLabelsParams,
    FmbsegQueryMasksParams,
)
from pseudoseg.pipeline.use.params import (
    UseBoxesParams,
    UseBoxMasksParams,
    UseCaptionsParams,
    UseExpressionsParams,
    UseGtBoxesParams,
    UseSegmentsParams,
)
from pseudoseg.tasks.engine.params import config_section

ingest = config_section("ingest", IngestPlanParams, DecodeLimits, module=__name__)
sam_embeddings = config_section("sam_embeddings", SamEmbeddingsParams, SamSharingParams, module=__name__)
use = config_section("use", UseCaptionsParams, UseExpressionsParams, UseBoxesParams, UseGtBoxesParams,
                     UseBoxMasksParams, UseSegmentsParams, module=__name__)
fmbseg = config_section("fmbseg", FmbsegDenseParams, FmbsegDetectParams, FmbsegQueryMasksParams,
                        FmbsegAutoMasksParams, FmbsegLabelsParams, module=__name__)
car = config_section("car", CarSettings, module=__name__)
car_labels = config_section("car_labels", CaRLabelsParams, module=__name__)
features_use = config_section("features_use", FeaturesUseParams, UseTextParams, module=__name__)
features_fmbseg = config_section("features_fmbseg", FeaturesFmbsegParams, module=__name__)
train_use = config_section("train_use", TrainUseParams, module=__name__)
train_alignment = config_section("train_alignment", TrainAlignmentParams, module=__name__)
evaluate = config_section("evaluate", EvaluateParams, EvaluateCarParams, EvaluateUseSamParams, module=__name__)
storage = config_section("storage", StorageParams, module=__name__)

SECTIONS: tuple[type[luigi.Config], ...] = (ingest, sam_embeddings, use, fmbseg, car, car_labels, features_use,
                                           features_fmbseg, train_use, train_alignment, evaluate, storage)
_SECTION_OF: dict[type[StageParams], type[luigi.Config]] = {
    params_type: section for section in SECTIONS for params_type in section.params_types}
if len(_SECTION_OF) != sum(len(section.params_types) for section in SECTIONS):
    raise TypeError("a params type is in two luigi.cfg sections: its settings would have two sources")


def section_of(params_type: type[StageParams]) -> type[luigi.Config]:
    """The section whose keys are ``params_type``'s fields."""
    return _SECTION_OF[params_type]
