"""Box ↔ phrase matching for caption-level grounding (use-paper §3.1), caption windows, box NMS.

The grounder is queried with the whole caption (or with windows of whole sentences when the caption is longer
than the text encoder allows). It returns, per box, a probability for every text token; the box belongs to the
noun phrase containing its most probable token.

Conventions
- Character spans are ``(start, end)`` offsets into a string, end exclusive (Python slicing).
- A token span is *special* (``[CLS]``, ``[SEP]``, padding, ...) when ``start < 0`` or ``start == end``;
  tokenizers report these as ``(-1, -1)`` or ``(0, 0)``. Special tokens never win a box.
- Boxes are ``xyxy`` float pixels, ``(x, y) = (column, row)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision

SPECIAL_SPAN: tuple[int, int] = (-1, -1)


def _is_special(span: tuple[int, int]) -> bool:
    return span[0] < 0 or span[0] == span[1]


def match_boxes_to_phrases(
    token_probs: np.ndarray,
    token_char_spans: Sequence[tuple[int, int]],
    phrase_char_spans: Sequence[tuple[int, int]],
) -> list[int | None]:
    """Index of the phrase each box belongs to, or ``None``.

    ``token_probs``: float ``[N, T]``, box ``n``'s score for text token ``t``. ``token_char_spans``: ``T``
    spans of the tokens in the caption (special tokens: see module docstring). ``phrase_char_spans``: spans
    of the phrases in the same caption.

    For each box the argmax over non-special tokens is taken (ties: lowest token index; NaN never wins);
    the box goes to the first phrase whose span contains the token's start (``start <= s < end``), so a
    token straddling a phrase boundary counts for the phrase its start lies in. ``None`` when that token
    starts outside every phrase, or when the box has no non-special, non-NaN token. Returns ``N`` entries.
    """
    probs = np.asarray(token_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(token_char_spans):
        raise ValueError(f"token_probs must be [N, {len(token_char_spans)}], got {probs.shape}")
    special = np.array([_is_special(s) for s in token_char_spans], dtype=bool)
    out: list[int | None] = []
    for row in probs:
        cols = np.flatnonzero(~special & ~np.isnan(row))
        if cols.size == 0:
            out.append(None)
            continue
        start = token_char_spans[int(cols[np.argmax(row[cols])])][0]  # argmax: first maximum on ties
        out.append(next((k for k, (ps, pe) in enumerate(phrase_char_spans) if ps <= start < pe), None))
    return out


def split_caption_windows(
    caption: str,
    sentence_spans: Sequence[tuple[int, int]],
    count_tokens: Callable[[str], int],
    max_tokens: int,
) -> list[tuple[int, int]]:
    """Greedy windows of whole consecutive sentences that fit the grounder's text length.

    ``sentence_spans``: character spans of the caption's sentences, in order, non-overlapping (e.g. spaCy's
    ``(sent.start_char, sent.end_char)``). ``count_tokens(text)`` must return the number of tokens the grounder
    will see for ``text``, special tokens included. A window spans from its first sentence's start to its
    last sentence's end (the whitespace between them included) and grows while its text still counts at most
    ``max_tokens``. A single sentence longer than ``max_tokens`` becomes a window of its own; the grounder's
    tokenizer truncates it, so phrases past the cut get no boxes.

    Returns character spans into ``caption``, in order; every sentence is in exactly one window.
    """
    windows: list[tuple[int, int]] = []
    start: int | None = None
    end = 0
    prev_end = 0
    for s, e in sentence_spans:
        if s < prev_end or e < s or e > len(caption):
            raise ValueError(
                f"sentence spans must be ordered, non-overlapping and inside the caption: {(s, e)}"
            )
        prev_end = e
        if start is not None and count_tokens(caption[start:e]) <= max_tokens:
            end = e
            continue
        if start is not None:
            windows.append((start, end))
        start, end = s, e
    if start is not None:
        windows.append((start, end))
    return windows


def shift_spans(spans: Sequence[tuple[int, int]], offset: int) -> list[tuple[int, int]]:
    """Map token spans of a window's text into caption coordinates: ``(s + offset, e + offset)``.

    ``offset`` is the window's start in the caption. Special spans (``start < 0`` or ``start == end``)
    become :data:`SPECIAL_SPAN` ``(-1, -1)`` so they stay special whatever the offset. Same length and order
    as ``spans``, so token columns of the grounder's output keep their meaning.
    """
    return [SPECIAL_SPAN if _is_special((s, e)) else (s + offset, e + offset) for s, e in spans]


def box_nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy box NMS (``torchvision.ops.nms``): indices of the kept boxes, by descending score.

    ``boxes_xyxy``: float ``[N, 4]`` pixels, ``x0 <= x1``, ``y0 <= y1``. ``scores``: float ``[N]``.
    A box is dropped when its IoU with a higher-ranked kept box is ``> iou_threshold``. Equal scores rank by
    lower index first (torchvision sorts stably on CPU). Returns int64 ``[K]``.
    """
    boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4))
    scr = torch.as_tensor(np.asarray(scores, dtype=np.float32).reshape(-1))
    if boxes.shape[0] != scr.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {scr.shape[0]} scores")
    # CPU on purpose: the stable tie order is what the CPU kernel guarantees, and N is small.
    return torchvision.ops.nms(boxes.cpu(), scr.cpu(), float(iou_threshold)).numpy().astype(np.int64)
