"""FullDAG: the leaves of every branch. Later stages add themselves here as they land."""

from __future__ import annotations

import luigi

from tasks.base import DatasetTask
from tasks.car_labels import CaRLabels
from tasks.export import ExportCoco, Preview
from tasks.features import ClassTextEmbeddings, FmbsegFeatures, UseFeatures, UseTextEmbeddings
from tasks.fmbseg import PseudoLabels
from tasks.ingest import Ingest
from tasks.models import ModelProbe
from tasks.train import TrainAlignment, TrainUSEHead, train_use
from tasks.use import UseSegments


class FullDAG(luigi.WrapperTask, DatasetTask):
    def requires(self) -> list[luigi.Task]:
        common = self.common()
        # [train_use] features = online encodes in the training loop: no USE feature cache to build then
        use_cache = [UseFeatures(**common)] if train_use().features == "cache" else []
        return [Ingest(**common), ModelProbe(**common), UseSegments(**common), ExportCoco(**common),
                Preview(**common), PseudoLabels(**common), *use_cache, FmbsegFeatures(**common),
                UseTextEmbeddings(**common), ClassTextEmbeddings(**common), TrainUSEHead(**common),
                TrainAlignment(**common), CaRLabels(**common)]
