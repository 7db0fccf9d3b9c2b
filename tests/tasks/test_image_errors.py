"""The per-image error policy of every stage's loop (tasks/engine/image_errors.py): which exceptions become reject rows for
one image, which fail the shard. Through the real CLI: tests/tasks/test_bad_inputs_cli.py."""

from __future__ import annotations

import pytest

from pseudoseg.models.catalog import ModelUnavailableError
from pseudoseg.pipeline.core.images import ImageRejected
from pseudoseg.schemas.contract import SchemaError
from pseudoseg.tasks.engine.image_errors import (
    IMAGE_ERROR,
    REJECTED,
    ArtifactMismatchError,
    ImageErrors,
    SystematicImageErrors,
    per_image_reason,
)


def raiser(exc: BaseException):
    def fn(*_args, **_kwargs):
        raise exc

    return fn


def test_bad_image_errors_become_rows_for_each_unit_of_that_image_only() -> None:
    rejects: list[dict] = []
    units = {"a": ["box:0", "box:1"], "b": ["box:2"], "c": ["box:3"]}
    with ImageErrors("use_box_masks", rejects, units.__getitem__) as errors:
        assert errors.run("a", raiser(RuntimeError("Kernel size can't be greater than actual input size"))) \
            is REJECTED
        assert errors.run("b", raiser(ImageRejected("too_small", "2048x1: shorter side < 2"))) is REJECTED
        assert errors.run("c", lambda x, y=0: x + y, 1, y=2) == 3
    assert [(r["image_id"], r["source"], r["reason"]) for r in rejects] == [
        ("a", "box:0", IMAGE_ERROR), ("a", "box:1", IMAGE_ERROR), ("b", "box:2", "too_small")]
    assert rejects[0]["detail"] == "RuntimeError: Kernel size can't be greater than actual input size"
    assert rejects[2]["detail"] == "2048x1: shorter side < 2" and rejects[0]["stage"] == "use_box_masks"


@pytest.mark.parametrize("exc", [TypeError("bug"), AttributeError("bug"), KeyError("bug"), AssertionError(),
                                 OSError(5, "I/O error"), MemoryError(), NotImplementedError(),
                                 ModelUnavailableError("no model"), SchemaError("bad artifact"),
                                 ArtifactMismatchError("stored embedding of another size")])
def test_programming_io_model_and_artifact_errors_fail_the_shard(exc: BaseException) -> None:
    assert per_image_reason(exc) is None
    rejects: list[dict] = []
    with pytest.raises(type(exc)), ImageErrors("s", rejects, lambda i: [i]) as errors:
        errors.run("a", lambda: 1)
        errors.run("b", raiser(exc))
    assert rejects == []


def test_out_of_memory_fails_the_shard() -> None:
    import torch

    assert per_image_reason(torch.OutOfMemoryError("CUDA out of memory")) is None
    assert per_image_reason(RuntimeError("shape mismatch")) == IMAGE_ERROR


def test_every_image_failing_is_systematic_and_fails_the_shard() -> None:
    with pytest.raises(SystematicImageErrors, match="all 2 images"), \
            ImageErrors("s", [], lambda i: [i]) as errors:
        for image_id in ("a", "b"):
            errors.run(image_id, raiser(ValueError("always")))
    # one image alone, or rejects by code (ImageRejected) only, are bad images
    with ImageErrors("s", [], lambda i: [i]) as errors:
        errors.run("a", raiser(ValueError("odd image")))
    with ImageErrors("s", [], lambda i: [i]) as errors:
        for image_id in ("a", "b"):
            errors.run(image_id, raiser(ImageRejected("corrupt", "x")))


def test_a_failed_batch_is_redone_image_by_image() -> None:
    rejects: list[dict] = []
    items = {"a": 1, "b": -1, "c": 3}

    def one(value: int) -> int:
        if value < 0:
            raise ValueError("negative")
        return value * 10

    with ImageErrors("s", rejects, lambda i: [f"src:{i}"]) as errors:
        ids = list(items)
        got = errors.run_batch(ids, lambda: [one(items[i]) for i in ids], lambda k: one(items[ids[k]]))
        assert errors.run_batch(["a"], lambda: [one(1)], lambda k: one(1)) == [10]
        assert errors.run_batch(["b"], lambda: [one(-1)], lambda k: one(-1)) == [REJECTED]
    assert got == [10, REJECTED, 30]
    assert [(r["source"], r["reason"]) for r in rejects] == [("src:b", IMAGE_ERROR), ("src:b", IMAGE_ERROR)]
    with pytest.raises(TypeError), ImageErrors("s", [], lambda i: [i]) as errors:
        errors.run_batch(["a", "b"], raiser(TypeError("bug")), lambda k: 0)


class Done:
    """A finished behind-the-loop outcome: ``get`` returns the value or raises the exception."""

    def __init__(self, value):
        self.value = value

    def get(self):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_sample_of_passes_samples_and_turns_none_into_one_reject_row_per_unit():
    rejects: list[dict] = []
    errors = ImageErrors("stage_x", rejects, lambda image_id: [f"{image_id}/a", f"{image_id}/b"])
    assert errors.sample_of("ok", Done(("sample", {"r": 1})), "nonfinite_x", "NaN") == ("sample", {"r": 1})
    assert errors.sample_of("nan", Done(None), "nonfinite_x", "NaN") is None
    assert errors.sample_of("bad", Done(ValueError("broken")), "nonfinite_x", "NaN") is None
    assert [(r["image_id"], r["source"], r["reason"]) for r in rejects] == [
        ("nan", "nan/a", "nonfinite_x"), ("nan", "nan/b", "nonfinite_x"),
        ("bad", "bad/a", "image_error"), ("bad", "bad/b", "image_error")]
    assert rejects[0]["detail"] == "NaN" and rejects[0]["stage"] == "stage_x"


def test_collect_appends_rows_and_rejects_of_images_that_were_not_rejected():
    rows: list[dict] = []
    rejects: list[dict] = []
    errors = ImageErrors("stage_x", rejects, lambda image_id: [image_id])
    errors.collect("a", Done(([{"row": 1}], [{"reject": "small"}])), rows)
    errors.collect("b", Done(ValueError("broken")), rows)
    assert rows == [{"row": 1}]
    assert rejects[0] == {"reject": "small"} and (rejects[1]["image_id"], rejects[1]["reason"]) == ("b", "image_error")
