"""Evaluate: mIoU of one segmentation method on one benchmark, under the protocol of the method's paper
(``pipeline.eval.benchmarks.protocol_for``: FMbSeg / pseudo → TCL's configs as fmbseg-paper §4 says, CaR → its official
evaluate.py, USE → use-paper §4.3).

    Evaluate(benchmark="voc21", data_root="/data/VOCdevkit/VOC2012", method="car", limit=0)

Methods and what they need:
- ``car``: training-free CaR (car-paper) over the preset's ``cam_clip`` (f, ``clip_cam``) and ``classifier_clip``
  (g, ``clip_classifier``) roles with the official per-dataset settings and texts (pipeline.car.recurrent.CAR_DEFAULTS);
  no upstream task. The image at its original resolution (CaR's protocol).
- ``fmbseg``: DINOv2 + the alignment block of ``TrainAlignment`` (``images``/``dataset`` = the training run, e.g.
  the COCO-Stuff images the pseudo labels came from); short side, sliding window and background rule of the
  protocol. Class texts: the benchmark classes' prompt names × the template set the block was trained with
  (``[fmbseg] templates``), through ``pipeline.core.vocabularies.class_text_embeddings`` as in training.
- ``use_sam``: SAM automatic masks + the USE head of ``TrainUse`` (same ``images``/``dataset`` convention);
  class texts: prompt names × ``[evaluate] use_sam_templates``, same function.
- ``pseudo``: the FMbSeg Stage-1 label maps of ``FmbsegLabels`` run over the benchmark's own images (``images`` =
  e.g. ``<data_root>/JPEGImages`` or a .txt listing the split's JPEGs; ``dataset`` = the run's name). Label maps
  are matched to benchmark ids by the source file's stem and mapped to the benchmark classes by name.

Outputs under ``<out>/<benchmark>/eval_<method>/<params-hash>/``: ``_meta/params.json``, ``per_class.parquet``
(schemas.evaluation.CLASS_IOU), ``grid.png`` (image | GT | prediction for the first images by id) and ``report.md``
(written last: the Luigi target). The dataset folder parameter is ``data_root`` (not ``root``: on every other task
``root`` is the output root).
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path
from typing import Any

import luigi
import numpy as np
from PIL import Image

from pseudoseg.models.registry import load_role, random_models_notice
from pseudoseg.pipeline.core.artifacts import StageDir, atomic_write_bytes
from pseudoseg.pipeline.core.params import StageParams
from pseudoseg.pipeline.core.vocabularies import class_text_embeddings
from pseudoseg.pipeline.eval.benchmarks import (
    BENCHMARKS,
    Protocol,
    coco_stuff_classes,
    open_dataset,
    prompt_vocabulary,
    protocol_for,
)
from pseudoseg.pipeline.eval.params import method_params
from pseudoseg.pipeline.eval.report import ShortSide, grid_png, report_markdown, run_evaluation
from pseudoseg.pipeline.features.cache import text_templates
from pseudoseg.schemas import MANIFEST
from pseudoseg.schemas.evaluation import CLASS_IOU
from pseudoseg.tasks.engine.base import (
    GPU,
    StageSettings,
    clear_task_failure,
    model_settings,
    pseudoseg,
    record_task_failure,
    stage_params,
    uses_gpu,
    verify_inputs,
)
from pseudoseg.tasks.engine.failures import explain
from pseudoseg.tasks.engine.params import IntParameter
from pseudoseg.tasks.engine.progress import report_status
from pseudoseg.tasks.stages.catalog import declare

METHODS = ("car", "pseudo", "fmbseg", "use_sam")
NEEDS_RUN = {"fmbseg": "TrainAlignment", "use_sam": "TrainUse", "pseudo": "FmbsegLabels"}




@declare(makes="mIoU of a method on a benchmark (--set Evaluate.benchmark=... Evaluate.data_root=...)",
         counts="runs", rows_are="classes")
class Evaluate(StageSettings, luigi.Task):
    """Settings: ``[evaluate]`` through ``self.params``, of the type of ``method`` (pipeline.eval.params)."""

    benchmark = luigi.ChoiceParameter(choices=sorted(BENCHMARKS), description="a pipeline.eval.benchmarks.BENCHMARKS key")
    data_root = luigi.Parameter(description="the benchmark's folder (layout: see pipeline.eval.benchmarks)")
    method = luigi.ChoiceParameter(choices=METHODS, default="car")
    limit = IntParameter(default=0, ge=0, description="evaluate the first N images by id; 0 = all")
    images = luigi.Parameter(default="", description="fmbseg/use_sam: training images; pseudo: benchmark images")
    dataset = luigi.Parameter(default="", description="the upstream run's dataset name (fmbseg/use_sam/pseudo)")
    out = luigi.Parameter(default=None, significant=True)

    def params_source(self) -> type[StageParams]:
        return method_params(self.method)

    @property
    def out_root(self) -> Path:
        return Path(self.out or pseudoseg().out).resolve()

    def requires(self) -> dict[str, luigi.Task]:
        if self.method == "car":
            return {}
        if not (self.images and self.dataset):
            raise ValueError(f"Evaluate method={self.method!r} needs images= and dataset= of the "
                             f"{NEEDS_RUN[self.method]} run it evaluates")
        common = {"images": self.images, "dataset": self.dataset, "out": self.out}
        if self.method == "pseudo":
            from pseudoseg.tasks.stages.fmbseg import FmbsegLabels

            return {"pseudo": FmbsegLabels(**common)}
        from pseudoseg.tasks.stages import train

        return {"model": getattr(train, NEEDS_RUN[self.method])(**common)}

    @property
    def resources(self) -> dict[str, int]:  # type: ignore[override]
        return {GPU: 1} if self.method != "pseudo" and uses_gpu(model_settings()) else {}

    @property
    def protocol(self) -> Protocol:
        return protocol_for(self.method, self.benchmark)

    def text_templates(self) -> tuple[str, tuple[str, ...]]:
        """(template set name, templates) of the class texts: fmbseg → the set its alignment block was trained
        with (the TextClasses of the TrainAlignment run, i.e. [fmbseg] templates); use_sam →
        [evaluate] use_sam_templates."""
        if self.method == "fmbseg":
            name = self.requires()["model"].requires()["text"].spec()[1]
        elif self.method == "use_sam":
            name = self.params.use_sam_templates
        else:
            raise ValueError(f"method {self.method!r} prompts no class texts through Evaluate.protos")
        return name, text_templates(name)  # the template sets of pipeline.core.vocabularies + USE's "use4"

    def upstream_params(self) -> dict[str, str]:
        upstream = {}
        for name, task in sorted(self.requires().items()):
            if name == "pseudo":  # a stage wrapper: its shards share one stage folder
                shards = task.requires()
                upstream[name] = shards[0].stage_dir.hash if shards else task.task_id
            else:
                upstream[name] = task.stage_dir.hash
        return upstream

    def content_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            **super().content_params(),
            "benchmark": self.benchmark, "data_root": str(Path(self.data_root).expanduser().resolve()),
            "limit": self.limit, "method": self.method, "protocol": self.protocol.content(),
        }
        if self.method != "pseudo":
            params["models"] = model_settings().content()
        if self.method in ("fmbseg", "use_sam"):
            name, templates = self.text_templates()
            params["text"] = {"template_set": name, "templates": list(templates),
                              "vocabulary_digest": prompt_vocabulary(self.protocol).digest}
        if self.method == "car":
            params["car"] = dataclasses.asdict(self.car_params())
        return params

    @property
    def stage_dir(self) -> StageDir:
        return StageDir(self.out_root, self.benchmark, f"eval_{self.method}", self.content_params())

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir.path / "report.md"))

    def on_failure(self, exception: BaseException) -> str:
        # A missing dataset or model: the message itself (it names the expected layout / the config key), not a
        # traceback, and no retries (tasks.failures).
        record_task_failure(self, exception)
        return explain(exception, f"Evaluate {self.benchmark}") or super().on_failure(exception)

    def on_success(self) -> object:
        clear_task_failure(self)
        return super().on_success()

    # ------------------------------------------------------------------------------------------------ methods
    def car_params(self):
        from pseudoseg.pipeline.car.params import CarSettings, with_car_settings
        from pseudoseg.pipeline.car.recurrent import car_params

        cfg = self.params
        base = car_params(self.benchmark)
        prompts = tuple(p.strip() for p in cfg.car_prompts.split(",") if p.strip()) or base.prompts
        return with_car_settings(dataclasses.replace(base, prompts=prompts, crf=cfg.car_crf, cam=cfg.car_cam),
                                 stage_params(CarSettings))

    def segmenter(self):
        settings, cfg = model_settings(), self.params
        protocol = self.protocol
        threshold = protocol.bg_threshold if protocol.background == "threshold" else None
        if self.method == "car":
            from pseudoseg.pipeline.car.recurrent import (
                CaRMethod,
                car_family,
                clip_cam,
                clip_classifier,
                official_query_name,
            )

            sam = load_role("segmenter", settings) if cfg.car_sam else None
            params = self.car_params()
            family = car_family(self.benchmark)
            classifier = clip_classifier(load_role("classifier_clip", settings), params.classifier_templates,
                                         skip_last_block=params.classifier_skip_last_block)
            seg = CaRMethod(clip_cam(load_role("cam_clip", settings), method=params.cam, lam=params.lam),
                               classifier, params, sam=sam, query_names=lambda n: official_query_name(family, n))
            return ShortSide(seg, protocol.short_side)
        if self.method == "pseudo":
            return self.pseudo_segmenter()
        from pseudoseg.models.training.trainer import load_trained

        # FMbSeg's block speaks its CLIP's text space (ViT-L/14); USE's head that of USE's (ViT-L/14-336)
        clip = load_role("fmbseg_clip" if self.method == "fmbseg" else "clip", settings)
        template_set, templates = self.text_templates()
        vocab = prompt_vocabulary(protocol)

        def protos(names):
            # benchmark class names → their prompt names (e.g. diningtable → "dining table"), the training texts
            return class_text_embeddings(clip, vocab.select(names), templates)

        path = self.input()["model"].path
        if self.method == "fmbseg":
            from pseudoseg.pipeline.eval.methods import FMbSegMethod

            block, record = load_trained(path, "alignment")
            meta = record.get("metadata", {})
            if meta.get("template_set", template_set) != template_set:
                raise ValueError(f"{path}: alignment block trained on template set {meta['template_set']!r}, "
                                 f"evaluation would prompt with {template_set!r}")
            layer = int(meta.get("dino_layer", -1))
            stuff = coco_stuff_classes().classes if protocol.background == "stuff" else ()
            return FMbSegMethod(load_role("dense", settings), block.eval(), protos,
                                   short_side=protocol.short_side, max_long_side=protocol.max_long_side,
                                   crop=protocol.crop, stride=protocol.stride, layer=layer,
                                   background_threshold=threshold, background_classes=stuff)
        from pseudoseg.pipeline.eval.methods import UseSamMethod, use_head_embedder

        head, record = load_trained(path, "use")
        meta = record.get("metadata", {})
        clip_layers, dino_layers = tuple(meta.get("clip_layers", ())), tuple(meta.get("dino_layers", ()))
        input_hw = meta.get("input_hw", {})
        # the head only knows the square grid it was trained on (features_use input size)
        image_size = int((input_hw.get("clip") or input_hw.get("dino") or [224])[0])
        embed = use_head_embedder(head.eval(), clip=clip if clip_layers else None,
                                  dense=load_role("dense", settings) if dino_layers else None,
                                  clip_layers=clip_layers, dino_layers=dino_layers, image_size=image_size)
        return UseSamMethod(load_role("segmenter", settings), embed, protos,
                               uncovered=255 if protocol.background == "none" else 0,
                               amg_params={"points_per_side": cfg.use_sam_points_per_side})

    def pseudo_segmenter(self):
        """Stage-1 label maps of every FmbsegLabels shard, keyed by the source file's stem."""
        import json

        from pseudoseg.pipeline.eval.methods import PseudoLabelMethod

        maps: dict[str, np.ndarray] = {}
        classes: list[str] | None = None
        shards = self.requires()["pseudo"].requires()
        verify_inputs(self, [u for shard in shards for u in (shard, shard.requires()["ingest"])])
        for shard in shards:
            labels_dir = shard.stage_dir
            stems = {r["image_id"]: Path(r["source"]).stem
                     for r in MANIFEST.read_parquet(shard.requires()["ingest"].stage_dir.shard_path(
                         shard.shard, "parquet")).to_pylist()}
            table = json.loads(labels_dir.shard_path(shard.shard, "classes.json").read_text())
            classes = [c["name"] for c in table["classes"]]
            with tarfile.open(labels_dir.shard_path(shard.shard, "tar")) as tar:
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    if ext == "png" and key in stems:
                        with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                            maps[stems[key]] = np.asarray(im, np.uint8)
        stuff = coco_stuff_classes().classes if self.protocol.background == "stuff" else ()
        return PseudoLabelMethod(maps, classes or [], background_classes=stuff)

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> None:
        cfg = self.params
        data = open_dataset(self.benchmark, self.data_root, split=cfg.split, limit=self.limit)  # DatasetError
        segmenter = self.segmenter()
        total = len(data)

        def progress(i: int) -> None:
            if i == total or i % 10 == 0:
                if callable(self.set_progress_percentage):  # None outside a worker
                    self.set_progress_percentage(round(100.0 * i / max(total, 1), 1))
                report_status(self, f"{i}/{total} images")

        protocol = self.protocol
        result = run_evaluation(segmenter, data, data.class_names, keep=cfg.grid_images, progress=progress,
                                ignore_unlabelled=protocol.unlabelled == "ignored")
        stage_dir = self.stage_dir
        stage_dir.write_params()
        atomic_write_bytes(stage_dir.path / "per_class.parquet",
                           CLASS_IOU.to_parquet_bytes(CLASS_IOU.table(result.rows())))
        atomic_write_bytes(stage_dir.path / "grid.png", grid_png(result.samples, class_names=data.class_names))
        params = {"benchmark": self.benchmark, "method": self.method, "split": cfg.split, "limit": self.limit,
                  "hash": stage_dir.hash}
        report = report_markdown(result, benchmark=self.benchmark, method=self.method, params=params,
                                 protocol=protocol, notice=random_models_notice(model_settings()))
        atomic_write_bytes(stage_dir.path / "report.md", report.encode())
