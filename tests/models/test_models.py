"""models/: tiny models through the real loaders, exactness against segment-anything / a hand MaskCLIP, offline
errors, registry presets and the oracle doubles. CPU only; nothing is downloaded."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pseudoseg.models.adapters import tiny
from pseudoseg.models.registry import ROLES, ModelSettings, ModelUnavailableError, load_role, register_preset
from pseudoseg.models.roles import Captioner, ClipEncoder, DenseEncoder, Grounder, Sampling, Segmenter
from tests.oracles import OracleGT, register_oracle


@pytest.fixture(scope="session")
def tiny_settings(tiny_cache) -> ModelSettings:
    return ModelSettings.from_mapping({"preset": "tiny", "cache_dir": str(tiny_cache), "device": "cpu"})


@pytest.fixture(scope="session")
def adapters(tiny_settings) -> dict:
    return {role: load_role(role, tiny_settings) for role in ROLES}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A non-square uint8 RGB image [H=90, W=140, 3]."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------- tiny
def test_tiny_models_load_from_cache_through_real_loaders(adapters, tiny_cache):
    root = tiny_cache / tiny.TINY_VERSION
    assert sorted(p.name for p in root.iterdir()) == sorted(ROLES)  # no leftover temp folders
    kinds = {"captioner": Captioner, "grounder": Grounder, "segmenter": Segmenter, "clip": ClipEncoder,
             "fmbseg_clip": ClipEncoder,
             "dense": DenseEncoder, "cam_clip": ClipEncoder, "classifier_clip": ClipEncoder}
    for role, adapter in adapters.items():
        assert isinstance(adapter, kinds[role])
        assert Path(adapter.source).is_relative_to(root / role), (role, adapter.source)
        if role != "segmenter":  # from_pretrained records the folder it read
            assert Path(adapter.model.name_or_path) == root / role
    seg = adapters["segmenter"]
    saved = torch.load(root / "segmenter" / tiny.SAM_TINY_CHECKPOINT)
    assert seg.sam.image_encoder.patch_embed.proj.weight.shape[0] == 32  # the tiny arch
    for k, v in seg.sam.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_tiny_build_is_deterministic_and_not_redone(tiny_settings, adapters, tiny_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    first = tiny_cache / tiny.TINY_VERSION
    for role in ROLES:
        tiny.ensure_tiny(role, tmp_path)
    second = tmp_path / tiny.TINY_VERSION
    for role in ROLES:
        if role == "segmenter":
            a = torch.load(first / role / tiny.SAM_TINY_CHECKPOINT)
            b = torch.load(second / role / tiny.SAM_TINY_CHECKPOINT)
        else:
            a, b = load_file(first / role / "model.safetensors"), load_file(second / role / "model.safetensors")
            assert (first / role / "tokenizer.json").exists() == (role != "dense")
            if role != "dense":
                assert (first / role / "tokenizer.json").read_bytes() == (second / role / "tokenizer.json").read_bytes()
        assert a.keys() == b.keys(), role
        for k in a:
            assert torch.equal(a[k], b[k]), (role, k)

    def no_rebuild(out):
        raise AssertionError("tiny model rebuilt although it is cached")

    monkeypatch.setattr(tiny, "BUILDERS", {role: no_rebuild for role in ROLES})
    assert load_role("dense", tiny_settings).num_layers == adapters["dense"].num_layers


def test_tiny_bert_vocab_keeps_grounding_dino_special_ids(adapters):
    tok = adapters["grounder"].processor.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", ".", "?")] == [101, 102, 1012, 1029]
    assert tok.tokenize("A person and a tvmonitor.") == ["a", "person", "and", "a", "tvmonitor", "."]


# ----------------------------------------------------------------------------------------------------- shapes
def test_captioner_returns_seeded_strings(adapters, photo):
    cap = adapters["captioner"]
    images = [photo, photo[:60, :50]]
    sampling = Sampling(6, temperature=1.0, top_p=0.9, top_k=20, seed=3)
    a = cap.caption(images, "Describe the image.", sampling)
    assert len(a) == 2 and all(isinstance(s, str) for s in a)
    assert cap.caption(images, "Describe the image.", sampling) == a
    assert not any("ASSISTANT:" in s for s in a)  # only newly generated text, not the prompt


def test_grounder_shapes(adapters, photo):
    g = adapters["grounder"]
    caption = "  A dog sitting on a red sofa next to a person"
    out = g.ground(photo, caption, box_threshold=0.0, text_threshold=0.25)
    n, t = out.token_probs.shape
    assert t == len(out.token_char_spans) == g.count_tokens(caption) <= g.max_text_tokens
    assert n == len(out.boxes_xyxy) == len(out.scores) > 0
    assert out.boxes_xyxy.dtype == out.scores.dtype == out.token_probs.dtype == np.float32
    assert out.boxes_xyxy.shape == (n, 4)
    assert np.all((out.token_probs >= 0) & (out.token_probs <= 1))
    np.testing.assert_allclose(out.scores, out.token_probs.max(axis=1))
    words = [caption[s:e] for s, e in out.token_char_spans if s >= 0]
    assert words == ["A", "dog", "sitting", "on", "a", "red", "sofa", "next", "to", "a", "person"]
    assert out.token_char_spans[0] == out.token_char_spans[-1] == (-1, -1)  # [CLS], [SEP]
    assert out.token_mask().shape == (n, t)
    none = g.ground(photo, caption, box_threshold=1.0, text_threshold=0.25)
    assert none.boxes_xyxy.shape == (0, 4) and none.token_probs.shape == (0, t)


def test_segmenter_shapes(adapters, photo):
    seg = adapters["segmenter"]
    emb = seg.embed(photo)
    assert emb.original_size == (90, 140) and emb.input_size == (658, 1024)
    boxes = np.array([[5, 5, 60, 70], [30, 10, 139, 89]], np.float32)
    p = seg.predict(emb, boxes_xyxy=boxes)
    assert p.logits.shape == (2, 3, 90, 140) and p.logits.dtype == np.float32
    assert p.iou_pred.shape == (2, 3) and p.low_res_logits.shape == (2, 3, 256, 256)
    pts = np.array([[[10, 20], [100, 50]], [[70, 80], [5, 5]]], np.float32)  # (x, y)
    q = seg.predict(emb, points_xy=pts, point_labels=np.array([[1, 0], [1, 1]]), multimask=False)
    assert q.logits.shape == (2, 1, 90, 140) and q.masks().dtype == bool
    masks = seg.automatic_masks(photo, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert all(m["segmentation"].shape == (90, 140) for m in masks)


def test_clip_shapes(adapters):
    clip = adapters["clip"]
    s, p, d = clip.image_size, clip.patch_size, clip.embed_dim
    crops = np.random.default_rng(1).integers(0, 256, (3, s, s, 3), dtype=np.uint8)
    f = clip.encode_image(crops)
    assert f.cls.shape == (3, d) and f.patch.shape == (3, s // p, s // p, d)
    assert f.cls.dtype == f.patch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f.patch, axis=-1), 1, atol=1e-5)
    t = clip.encode_text(["a photo of a dog.", "a photo of a tv monitor."])
    assert t.shape == (2, d) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=-1), 1, atol=1e-5)
    with pytest.raises(ValueError):
        clip.encode_image(crops[:, :-1])


def test_car_clip_roles_are_the_papers_architectures(adapters):
    """CaR's f is a ViT-B/16 (patch 16), g a ViT-L/14 like `clip` (patch 14); [models] keys name them."""
    assert adapters["cam_clip"].patch_size == 16 and adapters["classifier_clip"].patch_size == 14
    assert ModelSettings().cam_clip == "openai/clip-vit-base-patch16"
    assert ModelSettings().classifier_clip == "openai/clip-vit-large-patch14"


def test_dense_shapes(adapters):
    dense = adapters["dense"]
    p, c = dense.patch_size, dense.hidden_size
    images = np.random.default_rng(2).integers(0, 256, (2, 3 * p, 5 * p, 3), dtype=np.uint8)
    f = dense.encode(images, layers=[0, -1])
    assert f.layers == (0, dense.num_layers - 1)
    assert f.cls.shape == (2, 2, c) and f.patches.shape == (2, 2, 3, 5, c)
    assert f.patches.dtype == np.float32
    last = dense.encode(images)
    assert last.layers == (dense.num_layers - 1,)
    np.testing.assert_allclose(last.patches[:, 0], f.patches[:, 1], atol=1e-6)


# ----------------------------------------------------------------------------------------------------- exactness
def test_batched_sam_boxes_equal_sam_predictor_box_by_box(adapters, photo):
    from segment_anything import SamPredictor

    seg = adapters["segmenter"]
    boxes = np.array([[5, 5, 60, 70], [30, 10, 139, 89], [0, 40, 20, 89]], np.float32)
    batched = seg.predict(seg.embed(photo), boxes_xyxy=boxes, multimask=True)
    predictor = SamPredictor(seg.sam)
    predictor.set_image(photo)
    for i, box in enumerate(boxes):
        logits, iou, low = predictor.predict(box=box, multimask_output=True, return_logits=True)
        np.testing.assert_allclose(batched.logits[i], logits, atol=1e-5)
        np.testing.assert_allclose(batched.iou_pred[i], iou, atol=1e-5)
        np.testing.assert_allclose(batched.low_res_logits[i], low, atol=1e-5)


def test_dense_clip_equals_hand_maskclip(adapters):
    clip = adapters["clip"]
    model = clip.model
    s, g = clip.image_size, clip.image_size // clip.patch_size
    crops = np.random.default_rng(4).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    f = clip.encode_image(crops)

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        out = model.vision_model(pixel_values=x, output_hidden_states=True)
        block = model.vision_model.encoder.layers[-1]
        h = out.hidden_states[-2][:, 1:]  # input of the last block, patch tokens only
        v = torch.nn.functional.linear(block.layer_norm1(h), block.self_attn.v_proj.weight, block.self_attn.v_proj.bias)
        o = torch.nn.functional.linear(v, block.self_attn.out_proj.weight, block.self_attn.out_proj.bias)
        z = model.vision_model.post_layernorm(o) @ model.visual_projection.weight.T
        z = z / z.norm(dim=-1, keepdim=True)
        cls = model.get_image_features(pixel_values=x).pooler_output
        cls = cls / cls.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(f.patch, z.reshape(2, g, g, -1).numpy(), atol=1e-5)
    np.testing.assert_allclose(f.cls, cls.numpy(), atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # groundingdino-py's own
def test_groundingdino_py_backend_matches_official_predict(tiny_cache, tmp_path, photo):
    """The official implementation (random-init, small heads) loaded from a config + .pth like real weights."""
    import groundingdino
    from groundingdino.util.inference import predict
    from torchvision.ops import box_convert
    from transformers import BertConfig, BertModel

    from pseudoseg.models.adapters.grounder import GroundingDinoPy, _bert_compat

    bert_dir = tmp_path / "bert"
    tok = tiny.build_bert_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    official = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    config = tmp_path / "cfg.py"
    config.write_text(official.read_text() + textwrap.dedent(f"""
        enc_layers = 1
        dec_layers = 2
        dim_feedforward = 64
        num_queries = 20
        use_checkpoint = False
        use_transformer_ckpt = False
        text_encoder_type = {str(bert_dir)!r}
    """))
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    args = SLConfig.fromfile(str(config))
    args.device = "cpu"
    torch.manual_seed(1)
    with _bert_compat():
        built = build_model(args)
    state = built.state_dict()
    # As the official checkpoints: keys under "module." (DataParallel), plus the non-persistent buffers older
    # transformers saved (BERT's position_ids): both accepted, every other key must be there (strict loading).
    computed = {k: v for k, v in built.named_buffers() if k not in state}
    assert computed, "the tiny BERT should have a non-persistent buffer to prove it is dropped"
    torch.save({"model": {f"module.{k}": v for k, v in {**state, **computed}.items()}}, tmp_path / "ckpt.pth")

    g = GroundingDinoPy(str(config), str(tmp_path / "ckpt.pth"), device="cpu", size=96, max_size=160)
    assert g.model.state_dict().keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(g.model.state_dict()[k], v), k
    caption = "A dog sitting on a red sofa"
    out = g.ground(photo, caption, box_threshold=0.0, text_threshold=0.25)
    boxes, logits, _ = predict(g.model, g._transform(photo), caption, box_threshold=0.0, text_threshold=0.25,
                               device="cpu")
    h, w = photo.shape[:2]
    xyxy = box_convert(boxes * torch.tensor([w, h, w, h]), "cxcywh", "xyxy").numpy()
    np.testing.assert_allclose(out.boxes_xyxy, xyxy, atol=1e-3)
    np.testing.assert_allclose(out.scores, logits.numpy(), atol=1e-6)
    assert out.token_probs.shape == (len(boxes), len(out.token_char_spans)) == (20, g.count_tokens(caption))


# ----------------------------------------------------------------------------------------------------- real/offline
def test_real_missing_folders_raise_one_clear_error(tmp_path, monkeypatch):
    settings = ModelSettings.from_mapping({
        "preset": "real", "device": "cpu", "cache_dir": str(tmp_path),
        "clip": "/nonexistent/folder", "dino": "/nonexistent/dino", "sam_checkpoint": "/nonexistent/sam.pth",
    })
    for role, key, path in (("clip", "clip", "/nonexistent/folder"), ("dense", "dino", "/nonexistent/dino"),
                            ("segmenter", "sam_checkpoint", "/nonexistent/sam.pth")):
        with pytest.raises(ModelUnavailableError) as err:
            load_role(role, settings)
        msg = str(err.value)
        assert f"[models] {key} = {path}" in msg and "local" in msg, msg
    official = dataclasses.replace(settings, grounder_backend="groundingdino", groundingdino_config="/nonexistent/cfg.py")
    with pytest.raises(ModelUnavailableError, match=re.escape("[models] groundingdino_config = /nonexistent/cfg.py")):
        load_role("grounder", official)
    # A hub id while offline: the local HF cache is tried, the network is not.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailableError) as err:
        load_role("grounder", settings)
    assert "[models] grounder = IDEA-Research/grounding-dino-tiny" in str(err.value)
    assert "hf download IDEA-Research/grounding-dino-tiny --local-dir DIR" in str(err.value)


def test_settings_from_mapping_and_plugins(tmp_path, monkeypatch):
    s = ModelSettings.from_mapping({"preset": "tiny", "plugins": " a.b , c ", "sam_arch": "vit_b", "clip": ""})
    assert s.plugins == ("a.b", "c") and s.sam_arch == "vit_b" and s.clip == "openai/clip-vit-large-patch14-336"
    assert s.sam_checkpoint_path().endswith("sam_vit_b_01ec64.pth")
    with pytest.raises(ValueError, match="unknown"):
        ModelSettings.from_mapping({"cilp": "x"})
    (tmp_path / "my_plugin.py").write_text(
        "from pseudoseg.models.registry import register_preset\n"
        "register_preset('plugged', {'dense': lambda s: ('dense from plugin', s.device)})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_plugin", raising=False)
    s = ModelSettings.from_mapping({"preset": "plugged", "plugins": "my_plugin", "device": "cpu"})
    assert load_role("dense", s) == ("dense from plugin", "cpu")
    with pytest.raises(ModelUnavailableError):
        load_role("clip", s)
    with pytest.raises(ValueError):
        load_role("dense", ModelSettings(preset="no-such-preset"))


# ----------------------------------------------------------------------------------------------------- oracle
@pytest.fixture(scope="module")
def gt() -> OracleGT:
    return register_oracle()


def test_oracle_preset_plugs_in_with_one_call(gt):
    from tests import oracles

    settings = ModelSettings(preset="oracle")
    expected = {"captioner": oracles.OracleCaptioner, "grounder": oracles.OracleGrounder,
                "segmenter": oracles.OracleSegmenter, "clip": oracles.OracleClipEncoder,
                "dense": oracles.OracleDenseEncoder}
    for role, cls in expected.items():
        assert isinstance(load_role(role, settings), cls)
    register_preset("oracle", {})  # replaceable
    register_oracle(gt)


def test_oracle_answers_from_ground_truth(gt):
    settings = ModelSettings(preset="oracle")
    clip, seg, grounder = (load_role(r, settings) for r in ("clip", "segmenter", "grounder"))
    names = list(gt.class_names)
    person = names.index("person")
    # A crop cut from the photo and resized: located, and its person patches align with the person text.
    import cv2

    x0, y0, side = 250, 60, 200
    crop = cv2.resize(gt.rgb[y0 : y0 + side, x0 : x0 + side], (clip.image_size,) * 2, interpolation=cv2.INTER_AREA)
    bx, by, bw, bh = clip.locate(crop)
    assert abs(bx - x0) <= 8 and abs(by - y0) <= 8 and abs(bw - side) <= 0.1 * side
    feats = clip.encode_image(crop[None])
    text = clip.encode_text([f"a photo of a {n}." for n in names])
    sim = feats.patch[0] @ text.T  # [g, g, classes]
    g = clip.image_size // clip.patch_size
    cells = cv2.resize(gt.class_label[y0 : y0 + side, x0 : x0 + side], (g, g), interpolation=cv2.INTER_NEAREST)
    assert (sim.argmax(-1) == cells).mean() > 0.8
    # SAM: a point on an instance returns exactly that instance; the exact mask has the highest iou_pred.
    k = 10
    ys, xs = np.nonzero(gt.instance_label == k)
    emb = seg.embed(gt.rgb)
    p = seg.predict(emb, points_xy=np.array([[[xs[len(xs) // 2], ys[len(ys) // 2]]]], np.float32))
    best = p.masks()[0, p.iou_pred[0].argmax()]
    assert np.array_equal(best, gt.instance_label == k)
    b = seg.predict(emb, boxes_xyxy=gt.instance_box_xyxy(k)[None])
    assert np.array_equal(b.masks()[0, 1], gt.instance_label == k)
    # Grounder: GT person boxes, peaked on the word "person".
    caption = "a person next to a bottle"
    out = grounder.ground(gt.rgb, caption, box_threshold=0.3, text_threshold=0.25)
    n_person = int((gt.instance_classes == person).sum())
    n_bottle = int((gt.instance_classes == names.index("bottle")).sum())
    assert len(out.boxes_xyxy) == n_person + n_bottle
    top = [caption[slice(*out.token_char_spans[t])] for t in out.token_probs.argmax(1)]
    assert sorted(set(top)) == ["bottle", "person"]
    assert load_role("captioner", settings).caption([gt.rgb], "", Sampling(1))[0].startswith("a photo of a person")


def test_a_process_loads_each_model_once_across_shards(tmp_path, tiny_cache):
    """Three one-image shards of UseExpressions (captioner + spaCy) and SamEmbeddings (SAM) in one worker process:
    each model is loaded once and reused for every shard (models.registry keeps the adapters)."""
    from pseudoseg.models import registry
    from pseudoseg.tasks.engine.base import build_tasks
    from pseudoseg.tasks.stages.sam import SamEmbeddings
    from pseudoseg.tasks.stages.use import UseExpressions
    from tests.helpers import luigi_settings, write_good_images

    images = tmp_path / "images"
    write_good_images(images, 3)
    calls: dict[str, int] = {}

    def counting(role):
        def factory(settings):
            calls[role] = calls.get(role, 0) + 1
            return registry.TINY[role](settings)

        return factory

    register_preset("counting", {r: counting(r) for r in ("captioner", "segmenter")})
    registry.release_models()
    spacy_before = registry.LOADS["spacy"]
    args = {"images": str(images), "dataset": "ds", "out": str(tmp_path / "out")}
    with luigi_settings(models={"preset": "counting", "cache_dir": str(tiny_cache)},
                        ingest={"shard_size": 1}, use={"caption_max_new_tokens": 4}):
        tasks = [UseExpressions(**args), SamEmbeddings(**args)]
        result = build_tasks(tasks, local_scheduler=True, workers=1)
        assert all(t.complete() for t in tasks), result.summary_text
        assert len(SamEmbeddings(**args).requires()) == 3
    assert calls == {"captioner": 1, "segmenter": 1}
    assert registry.LOADS["spacy"] - spacy_before == 1
    # keep_loaded = 0: every call loads
    s = ModelSettings(preset="counting", cache_dir=str(tiny_cache), keep_loaded=0)
    load_role("segmenter", s)
    load_role("segmenter", s)
    assert calls["segmenter"] == 3


def test_stage1_loads_fmbseg_clip_and_use_loads_clip(tmp_path):
    """FMbSeg (fmbseg-paper §4: CLIP ViT-L/14) detects, labels and trains against one CLIP; USE (use-paper §4.1:
    ViT-L/14-336) embeds its texts with another; Grounding DINO is the Swin-T of use-paper §4.1."""
    from pseudoseg.models.registry import model_identity
    from pseudoseg.tasks.stages.features import TextClasses, UseTextShard
    from pseudoseg.tasks.stages.fmbseg import FmbsegDenseShard, FmbsegDetectShard

    defaults = ModelSettings()
    assert (defaults.fmbseg_clip, defaults.clip) == ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14-336")
    assert defaults.grounder == "IDEA-Research/grounding-dino-tiny"
    assert FmbsegDenseShard.roles == FmbsegDetectShard.roles == ("fmbseg_clip",) and UseTextShard.roles == ("clip",)
    classes = TextClasses(images=str(tmp_path), dataset="d", out=str(tmp_path / "out"))
    assert classes.stage_dir.params["clip"] == model_identity("fmbseg_clip", defaults)
