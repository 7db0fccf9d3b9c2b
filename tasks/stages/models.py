"""ModelProbe: load every role of the configured preset and run it once on the dataset's first image."""

from __future__ import annotations

import luigi
import numpy as np

from pseudoseg.models.probe import probe_roles
from pseudoseg.pipeline.core.artifacts import StageDir, atomic_write_bytes
from pseudoseg.pipeline.core.ingest import iter_ingested_images
from pseudoseg.schemas import MODEL_PROBE
from pseudoseg.tasks.engine.base import DatasetTask, model_settings, verify_inputs
from pseudoseg.tasks.engine.progress import report_status
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.ingest import IngestShard


@declare(makes="load every model role once and record its output shapes", counts="roles", rows_are="roles",
         contract=MODEL_PROBE, full_dag=True)
class ModelProbe(DatasetTask):
    def requires(self) -> IngestShard:
        return IngestShard(shard=0, **self.common())

    @property
    def stage_dir(self) -> StageDir:
        settings = model_settings().content()  # where it runs does not change what it is
        params = {"ingest": self.requires().stage_dir.hash, "models": settings}
        return StageDir(self.root, self.dataset, "model_probe", params)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir.path / "probe.parquet"))

    def run(self) -> None:
        verify_inputs(self, [self.requires()])
        tar = self.requires().stage_dir.shard_path(0, "tar")
        first = next(iter_ingested_images(str(tar)), None)
        image = first[1] if first else np.full((96, 128, 3), 127, np.uint8)  # empty shard: a grey image
        report_status(self, "loading and probing models")
        rows = probe_roles(model_settings(), image)
        self.stage_dir.write_params()
        atomic_write_bytes(self.stage_dir.path / "probe.parquet",
                           MODEL_PROBE.to_parquet_bytes(MODEL_PROBE.table(rows)))
