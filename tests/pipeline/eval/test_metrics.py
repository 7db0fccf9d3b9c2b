import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pseudoseg.pipeline.eval.metrics import miou


def reference_miou(preds, gts, k, ignore=255):
    """Independent reference: explicit loops over classes with boolean masks."""
    inter = np.zeros(k)
    union = np.zeros(k)
    for p, g in zip(preds, gts, strict=True):
        valid = g != ignore
        for c in range(k):
            pc = (p == c) & valid
            gc = (g == c) & valid
            inter[c] += (pc & gc).sum()
            union[c] += (pc | gc).sum()
    per = np.array([inter[c] / union[c] if union[c] > 0 else np.nan for c in range(k)])
    return np.nanmean(per) if not np.all(np.isnan(per)) else np.nan, per


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 7), n=st.integers(1, 4))
def test_matches_reference(seed, k, n):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    absent = rng.integers(0, k)  # one class never in GT
    for _ in range(n):
        h, w = rng.integers(1, 9, size=2)
        g = rng.integers(0, k, size=(h, w))
        g[g == absent] = 255 if k > 1 else g[g == absent]
        g[rng.random((h, w)) < 0.2] = 255
        p = rng.integers(-1, k + 2, size=(h, w))  # includes out-of-range predictions
        p[rng.random((h, w)) < 0.1] = 255
        preds.append(p)
        gts.append(g.astype(np.int64))
    m, per = miou(preds, gts, k)
    rm, rper = reference_miou(preds, gts, k)
    np.testing.assert_allclose(per, rper, equal_nan=True)
    if np.isnan(rm):
        assert np.isnan(m)
    else:
        assert m == pytest.approx(rm)


def test_hand_cases():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    assert miou([gt.copy()], [gt], 3) == (1.0, pytest.approx(np.array([1.0, 1.0, np.nan]), nan_ok=True))
    pred = np.array([[0, 0, 0, 1], [0, 0, 1, 1]])  # last pixel is ignored in GT
    m, per = miou([pred], [gt], 2)
    np.testing.assert_allclose(per, [4 / 5, 2 / 3])
    assert m == pytest.approx((4 / 5 + 2 / 3) / 2)
    # predictions of 255 are wrong, not ignored
    m, per = miou([np.full((2, 2), 255)], [np.zeros((2, 2), int)], 2)
    assert m == 0.0 and np.isnan(per[1])
    # summed over the dataset, not averaged per image
    m, per = miou([np.array([[0]]), np.array([[1, 1, 1]])], [np.array([[1]]), np.array([[1, 1, 1]])], 2)
    np.testing.assert_allclose(per, [0.0, 3 / 4])


def test_errors():
    with pytest.raises(ValueError, match="shape"):
        miou([np.zeros((2, 2))], [np.zeros((2, 3))], 2)
    with pytest.raises(ValueError, match="outside"):
        miou([np.zeros((1, 1))], [np.full((1, 1), 5)], 2)
    with pytest.raises(ValueError, match="more"):
        miou([np.zeros((1, 1))] * 2, [np.zeros((1, 1))], 2)
