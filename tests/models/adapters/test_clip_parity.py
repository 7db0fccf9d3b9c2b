"""Parity of the CLIP adapter (models/adapters/clip.py `HFClipEncoder`) with OpenAI's own CLIP code under shared random
weights (issue 10 item 12; no real weights exist here).

OpenAI's `clip.model.build_model` builds a small ViT CLIP from a random state dict; the test converts those weights
to transformers' `CLIPModel` (its own key mapping below) and a `CLIPTokenizer` built from OpenAI's BPE tables, saves
them as a model folder and loads it through the adapter, as real weights would be. Every output the pipeline uses
is compared with an independent reference computed on OpenAI's modules: the CLS embedding, MaskCLIP patch
features, text embeddings, CaR's Grad-CAM maps and CLIP-ES attention (official `clipcam.py` / `clip_wrapper.py` /
`cam.py`: last block's ln_1 as target, mean-pooled patch tokens, bilinear position embeddings rounded through
float16 on a non-square image, maps min-max scaled twice, an all-zero map redone with the query texts only, every
block on a 76-patch image), the whole mask proposal generator f (`clip_cam` against `CLIPCAM` written out, on a
vision tower deep enough that "the last 8 blocks" is not "all of them") and CaR's classifier embedding (CLS after
all but the last block).

openai-clip 1.0.1's package `__init__` imports `pkg_resources`, which setuptools >= 81 removed, so its `model` and
`simple_tokenizer` modules are loaded from their files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pseudoseg.models.adapters.clip import HFClipEncoder
from tests import official

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
RTOL = 1e-4


def _openai_module(name: str):
    spec = importlib.util.find_spec("clip")
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _to_hf_state_dict(sd: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict[str, torch.Tensor]:
    """OpenAI CLIP keys → transformers CLIPModel keys (fused in_proj split into q/k/v; projections transposed)."""
    out = {
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T,
        "logit_scale": sd["logit_scale"],
    }
    for tower, src, layers in (("vision_model", "visual.transformer", vision_layers),
                               ("text_model", "transformer", text_layers)):
        for i in range(layers):
            s, d = f"{src}.resblocks.{i}.", f"{tower}.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                q, k, v = sd[f"{s}attn.in_proj_{kind}"].chunk(3)
                out |= {f"{d}self_attn.q_proj.{kind}": q, f"{d}self_attn.k_proj.{kind}": k,
                        f"{d}self_attn.v_proj.{kind}": v,
                        f"{d}self_attn.out_proj.{kind}": sd[f"{s}attn.out_proj.{kind}"],
                        f"{d}layer_norm1.{kind}": sd[f"{s}ln_1.{kind}"],
                        f"{d}layer_norm2.{kind}": sd[f"{s}ln_2.{kind}"],
                        f"{d}mlp.fc1.{kind}": sd[f"{s}mlp.c_fc.{kind}"],
                        f"{d}mlp.fc2.{kind}": sd[f"{s}mlp.c_proj.{kind}"]}
    return {k: v.detach().clone().float().contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(OpenAI CLIP model float32, OpenAI tokenize fn, our adapter on the same weights)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    om, tok_module = _openai_module("model"), _openai_module("simple_tokenizer")
    torch.manual_seed(0)
    # 10 vision blocks: CLIP-ES averages the attention of the last 8 block runs (of 10: 9 without gradient + the last)
    dims = dict(embed_dim=32, image_resolution=64, vision_layers=10, vision_width=128, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
    state = om.CLIP(**dims).state_dict()
    state["logit_scale"] = torch.tensor(np.log(50.0))  # any learned temperature: the adapter must read it
    model = om.build_model(dict(state)).float().eval()  # OpenAI's own builder (it rounds to fp16 first)
    hf_state = _to_hf_state_dict(model.state_dict(), dims["vision_layers"], dims["transformer_layers"])

    bpe = tok_module.SimpleTokenizer()
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    tokenizer = CLIPTokenizer(vocab=dict(bpe.encoder), merges=merges, model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=10, num_attention_heads=2,
                           image_size=64, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=32,
    )
    hf = CLIPModel(config).eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    folder = tmp_path_factory.mktemp("openai_clip_as_hf")
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=MEAN,
                       image_std=STD).save_pretrained(folder)

    def tokenize(texts):
        sot, eot = bpe.encoder["<|startoftext|>"], bpe.encoder["<|endoftext|>"]
        out = torch.zeros(len(texts), 77, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [sot, *bpe.encode(t), eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    return model, tokenize, HFClipEncoder(str(folder), device="cpu"), bpe


def _pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images, np.float32) / 255.0).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _unit(x: torch.Tensor) -> np.ndarray:
    return (x / x.norm(dim=-1, keepdim=True)).detach().numpy()


def _tokens(visual, x: torch.Tensor, half: bool = True) -> torch.Tensor:
    """OpenAI ViT stem as CaR's CustomVisionTransformer: the position embeddings resized bilinearly to the input
    grid (`upsample_position_embedding`: F.upsample, align_corners False) and made a float16 Parameter (`half`),
    added in the input's dtype; LND layout."""
    patches = visual.conv1(x).flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    side = int(round((pos.shape[0] - 1) ** 0.5))
    gh, gw = x.shape[2] // visual.conv1.kernel_size[0], x.shape[3] // visual.conv1.kernel_size[0]
    grid = F.interpolate(pos[1:].T.reshape(1, -1, side, side), size=(gh, gw), mode="bilinear", align_corners=False)
    pos = torch.cat([pos[:1], grid.reshape(pos.shape[1], -1).T])
    if half:
        pos = pos.half().to(x.dtype)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, patches.shape[-1])
    return visual.ln_pre(torch.cat([cls, patches], dim=1) + pos).permute(1, 0, 2)


def _block(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One OpenAI residual block, also returning its head-averaged attention weights."""
    out, weights = block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=True)
    x = x + out
    return x + block.mlp(block.ln_2(x)), weights


def test_tokenizer_ids_equal_openai_tokenize(pair):
    _, tokenize, clip, _ = pair
    texts = ["a photo of a cat.", "a clean origami person with clothes,people,human.", "There is a tvmonitor screen"]
    ours = clip.tokenizer(texts, padding="max_length", max_length=77)["input_ids"]
    ref = tokenize(texts)
    for i, ids in enumerate(ours):
        n = int((ref[i] != 0).sum())
        assert ids[:n] == ref[i, :n].tolist()


def test_cls_patch_and_text_embeddings_equal_openai_clip(pair):
    model, tokenize, clip, _ = pair
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    feats = clip.encode_image(images)
    with torch.no_grad():
        x = _pixels(images)
        ref_cls = _unit(model.encode_image(x))
        v = model.visual
        h = _tokens(v, x)
        for block in v.transformer.resblocks[:-1]:
            h = block(h)
        last = v.transformer.resblocks[-1]
        width = h.shape[-1]
        value = F.linear(last.ln_1(h), last.attn.in_proj_weight[2 * width :], last.attn.in_proj_bias[2 * width :])
        dense = v.ln_post(last.attn.out_proj(value).permute(1, 0, 2)[:, 1:]) @ v.proj  # MaskCLIP: q/k, MLP skipped
        ref_patch = _unit(dense).reshape(2, 4, 4, -1)
        texts = ["a photo of a cat.", "a photo of a dog on the grass."]
        ref_text = _unit(model.encode_text(tokenize(texts)))
    np.testing.assert_allclose(feats.cls, ref_cls, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(feats.patch, ref_patch, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(clip.encode_text(texts), ref_text, rtol=RTOL, atol=RTOL)


def test_car_classifier_embedding_is_penultimate_cls_as_official_wrapper(pair):
    """Official CLIPWrapper.forward runs L-1 vision blocks on an image and pools CLS (repeat_last=False)."""
    model, _, clip, _ = pair
    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        v = model.visual
        h = _tokens(v, _pixels(images))  # position embeddings through float16, as the official stem
        for block in v.transformer.resblocks[:-1]:
            h = block(h)
        ref = _unit(v.ln_post(h.permute(1, 0, 2)[:, 0]) @ v.proj)
    np.testing.assert_allclose(clip.encode_image_car(images), ref, rtol=RTOL, atol=RTOL)
    full = clip.encode_image_car(images, skip_last_block=False)
    np.testing.assert_allclose(full, clip.encode_image(images).cls, rtol=RTOL, atol=RTOL)
    assert np.abs(full - ref).max() > 1e-3  # the last block matters: the two are not the same embedding


def _reference_gradcam(model, image: np.ndarray, fg: torch.Tensor, bg: torch.Tensor, last: int = 8, *,
                       half: bool = True, text_rule: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """CaR's official CAM on OpenAI's modules, written from clip_wrapper.py / cam.py / clipcam.py. The stem of
    `_tokens`; CustomTransformer runs L-1 blocks without gradient — all L when the sequence has 77 tokens (its test
    for text; `text_rule`) — collecting each block's attention; forward_last_layer runs the last block again with
    gradient; mean-pooled ln_post patch tokens · proj; softmax over fg + bg texts; Grad-CAM at that block's ln_1
    output: ReLU(Σ_c mean-grad_c · A_c), scale_cam_image, then aggregate_multi_layers (ReLU, mean over the one
    layer, scale_cam_image again); a map whose max is then 0 is redone with the softmax over fg texts only;
    attention = the mean of the last `last` collected attentions (the no-grad blocks', then the grad run's), CLS
    dropped. Returns (maps [T, h, w], attention [N, N], {"raw": ReLU maps, "redone": indices redone})."""
    v = model.visual
    x = _pixels(image[None])
    gh, gw = x.shape[2] // 16, x.shape[3] // 16
    blocks = v.transformer.resblocks
    weights = []
    with torch.no_grad():
        h = _tokens(v, x, half=half)
        for block in blocks[: len(blocks) if text_rule and h.shape[0] == 77 else len(blocks) - 1]:
            h, w = _block(block, h)
            weights.append(w)
    block = blocks[-1]
    store = {}
    hook = block.ln_1.register_forward_hook(lambda _m, _i, out: store.setdefault("a", out))
    out, w = _block(block, h.detach())
    hook.remove()
    weights.append(w.detach())
    act = store["a"]
    pooled = v.ln_post(out.permute(1, 0, 2))[:, 1:].mean(1) @ v.proj
    image_feature = pooled / pooled.norm(dim=-1, keepdim=True)
    info = {"raw": [], "redone": [], "image_feature": image_feature.detach()}

    def probs(text):
        text = text / text.norm(dim=-1, keepdim=True)
        return torch.softmax(model.logit_scale.exp() * image_feature @ text.T, dim=-1)[0]

    def cam(score):
        (grad,) = torch.autograd.grad(score, act, retain_graph=True)
        a, g = act[1:, 0].detach().numpy(), grad[1:, 0].numpy()  # LND: tokens first
        raw = np.maximum((a * g.mean(0)).sum(1), 0).astype(np.float32).reshape(gh, gw)
        return raw, official.scale_cam_image(np.maximum(official.scale_cam_image(raw), 0))

    p_all, p_fg = probs(torch.cat([fg, bg])), probs(fg)
    maps = []
    for t in range(len(fg)):
        raw, m = cam(p_all[t])
        if m.max() == 0:
            raw, m = cam(p_fg[t])
            info["redone"].append(t)
        maps.append(m)
        info["raw"].append(raw)
    attention = torch.stack(weights[-last:]).mean(0)[0, 1:, 1:].numpy()
    return np.stack(maps), attention, info


def _text(model, tokenize, texts):
    with torch.no_grad():
        return model.encode_text(tokenize(texts)).float()


def test_gradcam_and_attention_equal_official_car_cam_on_openai_clip(pair):
    model, tokenize, clip, _ = pair
    image = np.random.default_rng(2).integers(0, 256, (48, 80, 3), dtype=np.uint8)  # 3 × 5 patches, not 4 × 4
    fg_texts = ["cat", "dog", "a clean origami person."]
    bg_texts = ["a clean origami grass.", "a clean origami sky.", "a clean origami road."]
    ref_maps, ref_attention, _ = _reference_gradcam(model, image, _text(model, tokenize, fg_texts),
                                                    _text(model, tokenize, bg_texts), last=8)
    maps, attention = clip.gradcam(image, clip.encode_text(fg_texts), clip.encode_text(bg_texts),
                                   attention_layers=8)
    assert maps.shape == (3, 3, 5) and attention.shape == (15, 15)
    assert ref_maps.max() > 0.99 and (ref_maps.reshape(3, -1).std(1) > 0.05).sum() >= 2  # non-trivial maps
    np.testing.assert_allclose(maps, ref_maps, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(attention, ref_attention, rtol=RTOL, atol=1e-6)


def test_car_stem_resizes_position_embeddings_bilinearly_through_float16(pair):
    """clip_wrapper.upsample_position_embedding: the table is resized bilinearly to the input's patch grid and kept as
    a float16 Parameter, also at the native size: the tokens after ln_pre carry that rounding."""
    model, _, clip, _ = pair
    for hw in ((48, 80), (64, 64)):
        image = np.random.default_rng(hw[0]).integers(0, 256, (1, *hw, 3), dtype=np.uint8)
        with torch.no_grad():
            ours = clip._tokens(clip._normalised(image))[0].numpy()
            ref = _tokens(model.visual, _pixels(image))[:, 0].numpy()
            unrounded = _tokens(model.visual, _pixels(image), half=False)[:, 0].numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)
        assert np.abs(unrounded - ref).max() > 2e-5, hw  # the rounding is visible at this tolerance


def test_gradcam_on_76_patches_runs_every_block_then_the_last_again(pair):
    """clip_wrapper.CustomTransformer tells text from images by the sequence length: 77 tokens (the text context)
    run every block. A 4 × 19-patch image (76 patches + CLS) therefore runs all 10 blocks without gradient and the
    last one again for Grad-CAM; its attention list has 11 entries, the last 8 averaged."""
    model, tokenize, clip, _ = pair
    image = np.random.default_rng(3).integers(0, 256, (64, 304, 3), dtype=np.uint8)
    fg, bg = ["cat", "a clean origami dog."], ["a clean origami grass.", "a clean origami sky."]
    ref_maps, ref_attention, _ = _reference_gradcam(model, image, _text(model, tokenize, fg),
                                                    _text(model, tokenize, bg))
    plain_maps, _, _ = _reference_gradcam(model, image, _text(model, tokenize, fg), _text(model, tokenize, bg),
                                          text_rule=False)
    assert np.abs(plain_maps - ref_maps).max() > 1e-2  # the extra block changes the maps
    maps, attention = clip.gradcam(image, clip.encode_text(fg), clip.encode_text(bg), attention_layers=8)
    np.testing.assert_allclose(maps, ref_maps, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(attention, ref_attention, rtol=RTOL, atol=1e-6)


def test_gradcam_of_an_improbable_query_is_scaled_twice_as_official(pair):
    """cam.py scales each map twice, (x - min) / (max + 1e-15) per target layer and again after aggregation. A query
    whose probability is ~1e-14 has a Grad-CAM of ~1e-15: once scaled its maximum is well below 1, twice scaled it
    is 1 — the official maps."""
    model, tokenize, clip, _ = pair
    image = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    bg = _text(model, tokenize, ["a clean origami grass.", "a clean origami sky."])
    _, _, info = _reference_gradcam(model, image, bg[:1], bg)
    e = info["image_feature"][0].double()
    u = torch.randn(e.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = u - (u @ e) * e
    u = u / u.norm()
    # queries from almost the image's direction to far from it: probabilities from ~1 down to far below 1e-14
    fg = torch.stack([c * e + (1 - c * c) ** 0.5 * u for c in np.linspace(0.95, -0.6, 32)]).float()
    fg = torch.cat([fg, e[None].float()])  # the image feature itself: the others become improbable
    ref_maps, _, info = _reference_gradcam(model, image, fg, bg)
    raw_max = np.array([r.max() for r in info["raw"]])
    tiny = (raw_max > 0) & (raw_max < 3e-15)
    once = np.stack([official.scale_cam_image(r) for r in info["raw"]])
    assert tiny.any() and np.abs(once - ref_maps)[tiny].max() > 0.1, raw_max  # the second scaling matters
    maps = clip.gradcam(image, fg.numpy(), bg.numpy())
    np.testing.assert_allclose(maps, ref_maps, rtol=RTOL, atol=RTOL)


def test_gradcam_all_zero_map_is_redone_with_the_query_texts_only(pair):
    """clipcam.py: a map that is all zero after scaling (every weighted activation ≤ 0) is computed again with the
    softmax over the query texts only. Background texts near the image's own feature dominate the softmax; on a
    2 × 2-patch image some of 24 random queries then hit that branch and get a non-zero map from it; all maps
    equal the official ones."""
    model, tokenize, clip, _ = pair
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    g = torch.Generator().manual_seed(0)
    grass = _text(model, tokenize, ["a clean origami grass."])
    e = _reference_gradcam(model, image, grass, grass)[2]["image_feature"].float()
    bg = torch.cat([e, e + 0.1 * torch.randn(2, 32, generator=g)])
    fg = torch.randn(24, 32, generator=g)
    ref_maps, _, info = _reference_gradcam(model, image, fg, bg)
    redone = info["redone"]
    assert redone and any(ref_maps[t].max() > 0 for t in redone), redone  # the branch runs and changes maps
    maps = clip.gradcam(image, fg.numpy(), bg.numpy())
    np.testing.assert_allclose(maps, ref_maps, rtol=RTOL, atol=RTOL)


def test_clip_cam_equals_official_clipcam_end_to_end(pair):
    """The mask proposal generator f with its defaults (`clip_cam(clip)`: CLIP-ES, λ = 0.4, the attention of the last
    8 block runs) against CLIPCAM written out: the photo resized (PIL bicubic, torchvision's Resize) to its own size
    rounded UP to multiples of 16, Grad-CAM as above, CLIP-ES refinement (tests/official.py), scale_cam_image and
    cv2.resize back to the photo. A 50 × 70 photo: 4 × 5 patches."""
    from PIL import Image

    from pseudoseg.pipeline.car.recurrent import clip_cam

    model, tokenize, clip, _ = pair
    photo = np.random.default_rng(6).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    fg_texts = ["cat", "dog", "a clean origami person."]
    bg_texts = ["a clean origami grass.", "a clean origami sky.", "a clean origami road."]
    resized = np.asarray(Image.fromarray(photo).resize((80, 64), Image.BICUBIC))
    maps, attention, _ = _reference_gradcam(model, resized, _text(model, tokenize, fg_texts),
                                            _text(model, tokenize, bg_texts))
    ref = np.stack([cv2.resize(official.clip_es_refine(m, torch.from_numpy(attention), 0.4), (70, 50))
                    for m in maps])
    got = clip_cam(clip)(photo, fg_texts, bg_texts)
    assert got.shape == (3, 50, 70) and (ref.reshape(3, -1).std(1) > 0.05).sum() >= 2
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL)
