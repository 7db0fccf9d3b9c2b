"""FullDAG: every declared stage that says ``full_dag`` (the leaves of every branch, and Ingest and ModelProbe),
and the task class of every name `pseudoseg run` takes."""

from __future__ import annotations

import luigi

from pseudoseg.tasks.engine.base import DatasetTask
from pseudoseg.tasks.stages.catalog import declare, declared


@declare(makes="every branch above except Evaluate")
class FullDAG(luigi.WrapperTask, DatasetTask):
    def requires(self) -> list[luigi.Task]:
        common = self.common()
        tasks = [task(**common) for stage, task in declared() if stage.full_dag]
        return [task for task in tasks if wanted(task)]


def wanted(task: luigi.Task) -> bool:
    """Whether FullDAG runs a stage it declares: a stage may be wanted only under some settings (``FeaturesUse``:
    only when the USE head trains from the cache) and says so with a ``wanted_by_full_dag`` method."""
    check = getattr(task, "wanted_by_full_dag", None)
    return check is None or bool(check())


def stage_classes() -> dict[str, type[luigi.Task]]:
    """The task class of every declared stage, in DAG order."""
    return {stage.name: task for stage, task in declared()}
