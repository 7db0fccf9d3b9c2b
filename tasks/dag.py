"""FullDAG: the leaves of every branch. Later stages add themselves here as they land."""

from __future__ import annotations

import luigi

from tasks.base import DatasetTask
from tasks.export import ExportCoco, Preview
from tasks.fmbseg import PseudoLabels
from tasks.ingest import Ingest
from tasks.models import ModelProbe
from tasks.use import UseSegments


class FullDAG(luigi.WrapperTask, DatasetTask):
    def requires(self) -> list[luigi.Task]:
        common = self.common()
        return [Ingest(**common), ModelProbe(**common), UseSegments(**common), ExportCoco(**common),
                Preview(**common), PseudoLabels(**common)]
