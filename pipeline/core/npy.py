"""One ``.npy`` codec for arrays stored inside artifacts (WebDataset tar members, side files).

Always C order and never pickled, so the same array always gives the same bytes (artifact hashes are stable)
and loading stored bytes cannot run code.
"""

from __future__ import annotations

import io

import numpy as np


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` file bytes of ``array`` (written C-contiguous, ``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    """The array of ``.npy`` file bytes (``allow_pickle=False``)."""
    return np.load(io.BytesIO(data), allow_pickle=False)
