"""Shared fixtures. Modules with small torch workloads opt in with
``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and avoids OpenMP spin-waits on busy shared cores.
    Restored after the module so other tests keep the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
