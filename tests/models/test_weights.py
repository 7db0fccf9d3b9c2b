"""models/adapters/weights.py and every loader built on it: a checkpoint whose unpickling would run code is refused
before anything of it runs, and a checkpoint that does not fit its model (missing, unexpected or reshaped keys)
fails with one line naming the file and the keys, instead of leaving weights at their random init."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from pseudoseg.models.adapters.segmenter import SAM_ARCHS, build_sam_arch, load_sam
from pseudoseg.models.adapters.weights import CheckpointError, load_state_strict, load_weights
from pseudoseg.models.training.heads import build_head
from pseudoseg.models.training.trainer import load_trained


class Payload:
    """Unpickling this runs ``os.system`` (the classic pickle payload): it touches ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker, wrap=lambda p: {"model": {"weight": p}}) -> None:
    torch.save(wrap(Payload(marker)), path)
    assert b"system" in path.read_bytes()  # the payload is really in there


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("computed", torch.arange(4), persistent=False)


def test_a_checkpoint_whose_unpickling_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pth"
    plant(path, marker)
    with pytest.raises(CheckpointError) as e:
        load_weights(path, what="SAM segmenter")
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "weights_only=True" in message
    assert not marker.exists()
    # the classic way would have run it: the test's payload is real
    with open(path, "rb") as fh:
        torch.load(fh, weights_only=False)
    assert marker.exists()


def test_strict_loading_names_the_file_and_the_keys(tmp_path):
    model, path = Small(), tmp_path / "m.pth"
    good = Small().state_dict()
    load_state_strict(model, {**good, "computed": torch.zeros(4)}, path=path, what="head")  # computed: dropped
    assert torch.equal(model.lin.weight, good["lin.weight"])

    cases = {
        "missing keys (1): lin.bias": {k: v for k, v in good.items() if k != "lin.bias"},
        "unexpected keys (1): extra.weight": {**good, "extra.weight": torch.zeros(1)},
        "shape mismatches (1): lin.weight (2, 4) vs (2, 3)": {**good, "lin.weight": torch.zeros(2, 4)},
        "holds no state_dict of tensors": {"lin.weight": "not a tensor"},
    }
    for expected, state in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_state_strict(Small(), state, path=path, what="head")
        assert expected in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"missing keys \(3\): lin.bias, lin.weight, scale$"):
        load_state_strict(Small(), {}, path=path, what="head")  # {"model": {}} is no checkpoint


def test_sam_checkpoint_is_loaded_weights_only_and_strictly(tmp_path):
    sam = build_sam_arch(SAM_ARCHS["tiny"], None)
    path = tmp_path / "sam.pth"
    torch.save(sam.state_dict(), path)
    loaded = load_sam(SAM_ARCHS["tiny"], str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sam.state_dict().items())

    state = sam.state_dict()
    del state["mask_decoder.iou_prediction_head.layers.0.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"sam\.pth does not fit the model: missing keys \(1\): "
                                              r"mask_decoder\.iou_prediction_head\.layers\.0\.weight$"):
        load_sam(SAM_ARCHS["tiny"], str(path))

    marker = tmp_path / "ran"
    plant(path, marker, wrap=lambda p: {**sam.state_dict(), "payload": p})
    with pytest.raises(CheckpointError, match="not a plain weights file"):
        load_sam(SAM_ARCHS["tiny"], str(path))
    assert not marker.exists()


def test_groundingdino_checkpoint_is_loaded_weights_only(tmp_path, monkeypatch):
    """The official backend used to unpickle with weights_only=False: the payload is refused before the model is
    even needed (its config and checkpoint exist, the model build is stubbed)."""
    import groundingdino.models

    from pseudoseg.models.adapters import grounder

    monkeypatch.setattr(groundingdino.models, "build_model", lambda args: Small())
    config, path, marker = tmp_path / "cfg.py", tmp_path / "gd.pth", tmp_path / "ran"
    config.write_text("text_encoder_type = 'bert-base-uncased'\n")
    plant(path, marker)
    with pytest.raises(CheckpointError, match="groundingdino_checkpoint.*not a plain weights file"):
        grounder.load_groundingdino(str(config), str(path))
    assert not marker.exists()
    torch.save({"model": {}}, path)  # accepted before as a "checkpoint": a random model without a word
    with pytest.raises(CheckpointError, match=r"gd\.pth does not fit the model: missing keys \(3\)"):
        grounder.load_groundingdino(str(config), str(path))
    torch.save({"model": {f"module.{k}": v for k, v in Small().state_dict().items()}}, path)
    assert isinstance(grounder.load_groundingdino(str(config), str(path)), Small)


def test_trained_heads_and_checkpoints_are_loaded_weights_only_and_strictly(tmp_path):
    config = {"clip_dim": 8, "clip_blocks": 1, "dino_dim": 0, "dino_blocks": 0, "embed_dim": 4, "width": 8,
              "use_cls": False}
    head = build_head("use", config)
    path, marker = tmp_path / "model.pt", tmp_path / "ran"
    torch.save({"model": head.state_dict(), "head": config, "metadata": {}}, path)
    loaded, _ = load_trained(path, "use")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in head.state_dict().items())

    plant(path, marker, wrap=lambda p: {"model": head.state_dict(), "head": config, "metadata": p})
    with pytest.raises(CheckpointError, match="trained head checkpoint .*model.pt is not a plain weights file"):
        load_trained(path, "use")
    assert not marker.exists()
    torch.save({"model": {}, "head": config}, path)
    with pytest.raises(CheckpointError, match="model.pt does not fit the model: missing keys"):
        load_trained(path, "use")


def test_hugging_face_models_fail_on_missing_weights(tmp_path, tiny_cache):
    """A folder whose weights lack keys of the model (which transformers would quietly initialise at random)."""
    from safetensors.torch import load_file, save_file

    from pseudoseg.models.adapters import tiny
    from pseudoseg.models.adapters.dense import HFDinoEncoder

    folder = tmp_path / "dino"
    source = tiny.ensure_tiny("dense", tiny_cache)
    for f in source.iterdir():
        (folder / f.name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f.name).write_bytes(f.read_bytes())
    (weights,) = folder.glob("*.safetensors")
    state = load_file(weights)
    dropped = sorted(k for k in state if "layernorm" in k)[:1]
    save_file({k: v for k, v in state.items() if k not in dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        HFDinoEncoder(str(folder), device="cpu")
    assert "missing keys (1)" in str(e.value) and str(folder) in str(e.value) and "\n" not in str(e.value)

    marker = tmp_path / "ran"
    weights.unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump(Payload(marker), fh, protocol=2)
    with pytest.raises(CheckpointError, match="not plain weights"):
        HFDinoEncoder(str(folder), device="cpu")
    assert not marker.exists()
