"""models.roles.prompt_arrays: the prompt checks every Segmenter adapter shares."""

import numpy as np
import pytest

from pseudoseg.models.roles import prompt_arrays


def test_prompts_become_float32_arrays_with_default_foreground_labels():
    boxes, points, labels = prompt_arrays(boxes_xyxy=[[0, 1, 2, 3]], points_xy=[[[4, 5], [6, 7]]])
    assert boxes.dtype == points.dtype == np.float32 and boxes.shape == (1, 4) and points.shape == (1, 2, 2)
    assert labels.tolist() == [[1, 1]]
    assert prompt_arrays(boxes_xyxy=np.zeros(4))[0].shape == (1, 4)  # one box given flat
    assert prompt_arrays(boxes_xyxy=np.zeros((2, 4)))[1:] == (None, None)


@pytest.mark.parametrize("prompts, message", [
    ({}, "needs boxes_xyxy and/or points_xy"),
    ({"points_xy": np.zeros((2, 2))}, r"points_xy must be \[N, P, 2\]"),
    ({"points_xy": np.zeros((2, 3, 2)), "point_labels": np.ones((2, 2))}, r"point_labels must be \[N, P\]"),
    ({"boxes_xyxy": np.zeros((3, 4)), "points_xy": np.zeros((2, 1, 2))}, "must have the same N"),
])
def test_bad_prompts_are_refused_with_what_is_wrong(prompts, message):
    with pytest.raises(ValueError, match=message):
        prompt_arrays(**prompts)


def test_a_misspelt_prompt_keyword_is_an_error():
    with pytest.raises(TypeError):
        prompt_arrays(box_xyxy=np.zeros((1, 4)))
