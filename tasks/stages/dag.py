"""FullDAG (the leaves of every branch) and the task class of every name in ``tasks.catalog.STAGES``."""

from __future__ import annotations

import luigi

from pseudoseg.tasks.engine.base import DatasetTask
from pseudoseg.tasks.stages.car_labels import CarLabels
from pseudoseg.tasks.stages.catalog import OUTPUT_OF, OUTPUTS, STAGES, Stage  # noqa: F401 (where callers look)
from pseudoseg.tasks.stages.export import ExportCoco, UsePreview
from pseudoseg.tasks.stages.features import FeaturesFmbseg, FeaturesUse, TextClasses, UseText
from pseudoseg.tasks.stages.fmbseg import FmbsegLabels
from pseudoseg.tasks.stages.ingest import Ingest
from pseudoseg.tasks.stages.models import ModelProbe
from pseudoseg.tasks.stages.train import TrainAlignment, TrainUse
from pseudoseg.tasks.stages.use import UseSegments


class FullDAG(luigi.WrapperTask, DatasetTask):
    def requires(self) -> list[luigi.Task]:
        common = self.common()
        # [train_use] features = online encodes in the training loop: no USE feature cache to build then
        train = TrainUse(**common)
        use_cache = [FeaturesUse(**common)] if train.params.features == "cache" else []
        return [Ingest(**common), ModelProbe(**common), UseSegments(**common), ExportCoco(**common),
                UsePreview(**common), FmbsegLabels(**common), *use_cache, FeaturesFmbseg(**common),
                UseText(**common), TextClasses(**common), train,
                TrainAlignment(**common), CarLabels(**common)]


def stage_classes() -> dict[str, type[luigi.Task]]:
    """The task class of every STAGES name, in DAG order."""
    from pseudoseg.tasks.stages import (
        car_labels,
        evaluate,
        export,
        features,
        fmbseg,
        ingest,
        models,
        sam,
        train,
        use,
    )

    modules = (ingest, models, sam, use, export, fmbseg, car_labels, features, train, evaluate)
    found = {name: cls for m in modules for name, cls in vars(m).items() if isinstance(cls, type)}
    found["FullDAG"] = FullDAG
    return {stage.name: found[stage.name] for stage in STAGES}
