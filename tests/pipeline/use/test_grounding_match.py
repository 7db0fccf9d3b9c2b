"""Box ↔ phrase matching, caption windows, span shifting and box NMS (pipeline/use/grounding.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from pseudoseg.pipeline.use.grounding import (
    SPECIAL_SPAN,
    box_nms,
    match_boxes_to_phrases,
    shift_spans,
    split_caption_windows,
)

CAPTION = "the rabbit eats an apple near the rabbit."
#          0123456789012345678901234567890123456789012
# Word-level tokens with [CLS]/[SEP] specials at both ends, as a BERT tokenizer reports them.
TOKENS = [(-1, -1)] + [(m.start(), m.end()) for m in re.finditer(r"\w+|[^\w\s]", CAPTION)] + [(0, 0)]
PHRASES = [(0, 10), (16, 24), (30, 40)]  # "the rabbit", "an apple", "the rabbit"


def _one_hot(token_index: int, width: int = len(TOKENS), value: float = 0.9) -> list[float]:
    row = [0.05] * width
    row[token_index] = value
    return row


def _token(text: str, occurrence: int = 0) -> int:
    hits = [i for i, (s, e) in enumerate(TOKENS) if s >= 0 and s != e and CAPTION[s:e] == text]
    return hits[occurrence]


def test_fixture_spans():
    assert [CAPTION[s:e] for s, e in PHRASES] == ["the rabbit", "an apple", "the rabbit"]


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (("rabbit", 0), 0),
        (("the", 0), 0),
        (("apple", 0), 1),
        (("rabbit", 1), 2),  # repeated phrase: the occurrence holding the argmax token
        (("the", 1), 2),
        (("eats", 0), None),  # outside every phrase
        (("near", 0), None),
        ((".", 0), None),
    ],
)
def test_match_table(token, expected):
    probs = np.array([_one_hot(_token(*token))])
    assert match_boxes_to_phrases(probs, TOKENS, PHRASES) == [expected]


def test_special_tokens_never_win():
    probs = np.full((2, len(TOKENS)), 0.01)
    probs[:, 0] = probs[:, -1] = 1.0  # specials carry the highest score
    probs[0, _token("apple")] = 0.5
    probs[1, _token("eats")] = 0.5
    assert match_boxes_to_phrases(probs, TOKENS, PHRASES) == [1, None]


def test_ties_go_to_lowest_token_and_nan_never_wins():
    probs = np.zeros((2, len(TOKENS)))
    probs[0, _token("rabbit", 1)] = probs[0, _token("rabbit", 0)] = 0.7
    probs[1, :] = np.nan
    probs[1, _token("apple")] = 0.1
    assert match_boxes_to_phrases(probs, TOKENS, PHRASES) == [0, 1]


def test_token_straddling_phrase_start_counts_by_its_start():
    spans = [(0, 5), (5, 12)]  # "the r" | "abbit e"
    assert match_boxes_to_phrases(np.array([[0.0, 1.0]]), spans, [(0, 10)]) == [0]
    assert match_boxes_to_phrases(np.array([[0.0, 1.0]]), spans, [(6, 10)]) == [None]


def test_degenerate_inputs():
    assert match_boxes_to_phrases(np.zeros((0, len(TOKENS))), TOKENS, PHRASES) == []
    assert match_boxes_to_phrases(np.ones((2, 2)), [(-1, -1), (3, 3)], PHRASES) == [None, None]
    with pytest.raises(ValueError):
        match_boxes_to_phrases(np.ones((1, 3)), TOKENS, PHRASES)


@st.composite
def _grounding_case(draw):
    n_tokens = draw(st.integers(1, 12))
    # Tokens: consecutive spans of length 1..4 separated by 0..2 chars, some marked special.
    spans, pos = [], 0
    for _ in range(n_tokens):
        if draw(st.booleans()) and draw(st.booleans()):
            spans.append((-1, -1))
            continue
        pos += draw(st.integers(0, 2))
        length = draw(st.integers(1, 4))
        spans.append((pos, pos + length))
        pos += length
    # Non-overlapping phrases over [0, pos].
    cuts = sorted(draw(st.lists(st.integers(0, max(pos, 1)), max_size=6, unique=True)))
    phrases = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    n_boxes = draw(st.integers(0, 5))
    probs = draw(
        st.lists(
            st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), min_size=n_tokens, max_size=n_tokens),
            min_size=n_boxes,
            max_size=n_boxes,
        )
    )
    return np.array(probs, dtype=np.float64).reshape(n_boxes, n_tokens), spans, phrases


@settings(max_examples=200, deadline=None)
@given(_grounding_case())
def test_match_properties(case):
    probs, spans, phrases = case
    result = match_boxes_to_phrases(probs, spans, phrases)
    assert len(result) == probs.shape[0]
    regular = [t for t, (s, e) in enumerate(spans) if s >= 0 and s != e]
    for row, got in zip(probs, result, strict=True):
        if not regular:
            assert got is None
            continue
        best = max(regular, key=lambda t: (row[t], -t))  # highest score, then lowest index
        start = spans[best][0]
        inside = [k for k, (ps, pe) in enumerate(phrases) if ps <= start < pe]
        assert got == (inside[0] if inside else None)


def _whitespace_tokens(text: str) -> list[tuple[int, int]]:
    """Stand-in tokenizer: words and punctuation with offsets, wrapped in two special tokens."""
    return [(0, 0)] + [(m.start(), m.end()) for m in re.finditer(r"\w+|[^\w\s]", text)] + [(0, 0)]


def _count(text: str) -> int:
    return len(_whitespace_tokens(text))


def test_windows_table():
    caption = "A b c. D e. F g h i j k. L."
    sentences = [(m.start(), m.end()) for m in re.finditer(r"[^.]+\.", caption)]
    sentences = [(s + (caption[s] == " "), e) for s, e in sentences]
    assert [caption[s:e] for s, e in sentences] == ["A b c.", "D e.", "F g h i j k.", "L."]
    # Counts with 2 specials: 6, 5, 9, 4; "A b c. D e." = 9.
    assert split_caption_windows(caption, sentences, _count, 9) == [(0, 11), (12, 24), (25, 27)]
    # The 9-token sentence exceeds 8 on its own: its own window.
    assert split_caption_windows(caption, sentences, _count, 8) == [(0, 6), (7, 11), (12, 24), (25, 27)]
    assert split_caption_windows(caption, sentences, _count, 1000) == [(0, 27)]
    assert split_caption_windows("", [], _count, 10) == []
    with pytest.raises(ValueError):
        split_caption_windows(caption, [(7, 11), (0, 6)], _count, 10)


_WORDS = st.text(alphabet="abcxyz", min_size=1, max_size=5)
_SENTENCE = st.lists(_WORDS, min_size=1, max_size=6).map(lambda ws: " ".join(ws) + ".")


@settings(max_examples=150, deadline=None)
@given(st.lists(_SENTENCE, min_size=1, max_size=8), st.integers(3, 20), st.sampled_from([" ", "  ", "\n"]))
def test_windows_cover_sentences_and_spans_map_back(sentences, max_tokens, sep):
    caption = sep.join(sentences)
    spans, pos = [], 0
    for s in sentences:
        spans.append((pos, pos + len(s)))
        pos += len(s) + len(sep)
    windows = split_caption_windows(caption, spans, _count, max_tokens)

    # Every sentence lies in exactly one window, windows in order, each made of whole sentences.
    owners = [[w for w, (ws, we) in enumerate(windows) if ws <= s and e <= we] for s, e in spans]
    assert all(len(o) == 1 for o in owners)
    assert [o[0] for o in owners] == sorted(o[0] for o in owners)
    assert {o[0] for o in owners} == set(range(len(windows)))
    starts = {s for s, _ in spans}
    ends = {e for _, e in spans}
    assert all(ws in starts and we in ends for ws, we in windows)
    for w, (ws, we) in enumerate(windows):
        members = [i for i, o in enumerate(owners) if o[0] == w]
        # Fits, or is a single over-long sentence; and greedy: the next sentence would not have fit.
        assert _count(caption[ws:we]) <= max_tokens or len(members) == 1
        if w + 1 < len(windows):
            nxt = spans[members[-1] + 1]
            assert _count(caption[ws : nxt[1]]) > max_tokens

    # Token spans of each window's text, shifted, index the same text in the caption.
    for ws, we in windows:
        text = caption[ws:we]
        local = _whitespace_tokens(text)
        shifted = shift_spans(local, ws)
        assert len(shifted) == len(local)
        for (ls, le), (gs, ge) in zip(local, shifted, strict=True):
            if ls == le:
                assert (gs, ge) == SPECIAL_SPAN
            else:
                assert caption[gs:ge] == text[ls:le]


def test_shift_spans_keeps_specials():
    assert shift_spans([(-1, -1), (0, 0), (0, 3), (4, 5)], 10) == [(-1, -1), (-1, -1), (10, 13), (14, 15)]


def test_box_nms_matches_torchvision_and_breaks_ties_by_index():
    boxes = np.array(
        [[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [20, 20, 30, 30]], float
    )
    scores = np.array([0.5, 0.9, 0.9, 0.3, 0.3])
    keep = box_nms(boxes, scores, 0.5)
    assert keep.dtype == np.int64
    assert keep.tolist() == [1, 3]  # 1 and 2 tie at 0.9: the lower index wins; likewise 3 over 4
    assert box_nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_box_nms_greedy_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    xy = rng.uniform(0, 50, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (n, 2))], axis=1)
    scores = rng.integers(0, 4, n).astype(float)  # many ties
    iou = torchvision.ops.box_iou(
        torch.tensor(boxes, dtype=torch.float32), torch.tensor(boxes, dtype=torch.float32)
    ).numpy()
    kept: list[int] = []
    for i in sorted(range(n), key=lambda i: (-scores[i], i)):
        if all(iou[i, k] <= 0.5 for k in kept):
            kept.append(i)
    assert box_nms(boxes, scores, 0.5).tolist() == kept
