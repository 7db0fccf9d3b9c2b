"""Fidelity of the transformers Grounding DINO backend (`HFGroundingDino`) against the official implementation
(`GroundingDinoPy`, groundingdino-py, which produced the papers' boxes) on shared random weights: one tiny official
model, its state_dict converted into `GroundingDinoForObjectDetection` (tests/models/adapters/gdino_parity.py), both adapters run on
the real VOC photo at the official 800/1333 resize. CPU only; nothing is downloaded.

The one computation the two models do differently (pinned by
`test_box_refinement_inverse_sigmoid_eps_is_the_only_model_difference`): the official box refinement inverts the
sigmoid with `inverse_sigmoid(x, eps=1e-3)`, transformers with `torch.special.logit(x, eps=1e-5)`. They agree
exactly for reference coordinates in [1e-3, 1 - 1e-3] and differ outside (boxes within 0.1% of an image border or
wider/taller than 99.9% of it).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pseudoseg.models.adapters.grounder import GroundingDinoPy, HFGroundingDino, official_resize_hw, prepare_caption
from pseudoseg.pipeline.use.grounding import match_boxes_to_phrases
from tests.models.adapters.gdino_parity import tiny_swin, write_hf, write_official

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]  # groundingdino-py's own

CAPTION = "A person sitting on a sofa next to a dog. A bottle on the table"


def phrase_spans(caption: str) -> list[tuple[int, int]]:
    """Every word is a phrase: with random weights most argmax tokens are not nouns."""
    return [m.span() for m in re.finditer(r"\w+", caption)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gdino-parity")
    config, ckpt = write_official(root / "official")
    missing = write_hf(root / "hf", torch.load(ckpt)["model"])
    return {"config": config, "ckpt": ckpt, "hf": root / "hf", "missing": missing}


@pytest.fixture(scope="module")
def official(files) -> GroundingDinoPy:
    with tiny_swin():
        return GroundingDinoPy(str(files["config"]), str(files["ckpt"]), device="cpu")  # size 800, max_size 1333


@pytest.fixture(scope="module")
def hf(files) -> HFGroundingDino:
    return HFGroundingDino(str(files["hf"]), device="cpu")


@pytest.fixture(scope="module")
def photo(voc_data) -> np.ndarray:
    return np.asarray(voc_data["rgb"])  # uint8 [375, 500, 3]


# ----------------------------------------------------------------------------------------------------- weights
def test_converted_checkpoint_fills_every_transformers_parameter(files, official, hf):
    # SwinModel's final layernorm is not on the backbone path (the per-stage hidden_states_norms are).
    assert files["missing"] == [f"model.backbone.conv_encoder.model.swin.layernorm.{p}" for p in ("bias", "weight")]
    n_official = sum(p.numel() for p in official.model.parameters())
    n_hf = sum(p.numel() for n, p in hf.model.named_parameters() if ".swin.layernorm." not in n)
    bert_pooler = sum(p.numel() for p in official.model.bert.pooler.parameters())  # unused by both
    assert n_hf == n_official - bert_pooler


# ----------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("crop", [(375, 500), (200, 500)], ids=["photo", "wide-crop"])
def test_hf_pixels_equal_official_transform(official, hf, photo, crop):
    """`HFGroundingDino` resizes as groundingdino-py's `load_image` does, bit for bit. transformers' own
    GroundingDinoImageProcessor does not: its torchvision resize differs by up to one grey level (measured max
    0.0175 after normalisation on the photo) and, when the 1333 cap applies (wide crop), its long side is 1 px
    longer (533x1333 vs the official 533x1332)."""
    image = np.ascontiguousarray(photo[: crop[0], : crop[1]])
    want = official._transform(image)
    got = hf.pixel_values(image)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    assert tuple(want.shape[1:]) == official_resize_hw(*crop, 800, 1333)
    processor = hf.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    if crop == (200, 500):
        assert tuple(want.shape[1:]) == (533, 1332) and tuple(processor.shape[1:]) == (533, 1333)
    else:
        assert processor.shape == want.shape
        assert 0 < (processor - want).abs().max() <= 1.01 / 255 / min(hf.std)


LONG = " ".join(["a man and a woman sitting at a wooden table with a dog"] * 26) + ". two cats on a red sofa?"


@pytest.mark.parametrize("caption", [CAPTION, "  Dogs? cats. .. a tvmonitor", LONG], ids=["two-sentences", "marks",
                                                                                        "longer-than-256"])
def test_text_tokens_masks_and_position_ids_equal(official, hf, caption):
    """Same token ids and spans, and the same phrase-wise text self-attention masks and position ids from the two
    implementations' mask builders (official loop vs transformers' vectorised version), cut to 256 tokens."""
    from groundingdino.models.GroundingDINO.bertwarper import (
        generate_masks_with_special_tokens_and_transfer_map,
    )
    from transformers.models.grounding_dino import modeling_grounding_dino as hf_gd

    text = prepare_caption(caption)[0]
    a = official.model.tokenizer([text], padding="longest", return_tensors="pt")
    b = hf.processor.tokenizer([text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and official.count_tokens(caption) == hf.count_tokens(caption)
    mask_a, pos_a, _ = generate_masks_with_special_tokens_and_transfer_map(a, official.model.specical_tokens, None)
    mask_b, pos_b = hf_gd.generate_masks_with_special_tokens_and_transfer_map(
        b["input_ids"], hf.model.model.special_tokens)
    assert official.model.specical_tokens == hf.model.model.special_tokens.tolist() == [101, 102, 1012, 1029]
    assert torch.equal(mask_a, mask_b) and torch.equal(pos_a, pos_b)
    if caption == LONG:
        assert a["input_ids"].shape[1] > 256 == official.max_text_tokens == hf.max_text_tokens


def test_backbone_features_and_position_embeddings_equal(official, hf, photo):
    """Swin features at the 3 output stages, their padding masks and sine position embeddings (temperature 20),
    from the same pixels. Features within 1e-4 absolute (measured ≈ 2e-6), masks and embeddings exactly."""
    from groundingdino.util.misc import nested_tensor_from_tensor_list

    x = official._transform(photo)
    with torch.inference_mode():
        feats, pos = official.model.backbone(nested_tensor_from_tensor_list(x[None]))
        hf_feats, hf_pos = hf.model.model.backbone(x[None], torch.ones((1, *x.shape[1:]), dtype=torch.long))
    assert len(feats) == len(hf_feats) == 3
    for f, (g, g_mask), p, q in zip(feats, hf_feats, pos, hf_pos, strict=True):
        assert f.tensors.shape == g.shape
        torch.testing.assert_close(f.tensors, g, rtol=0, atol=1e-4)
        assert torch.equal(f.mask, ~g_mask)  # official: True = padding; transformers: True = pixel
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------------------- outputs
def capture_references(hf: HFGroundingDino) -> tuple[list, object]:
    """Records the transformers model's initial and per-layer reference boxes (sigmoid space) while active."""
    seen: list[torch.Tensor] = []

    def hook(module, args, out):
        seen.extend([out.init_reference_points, out.intermediate_reference_points])

    return seen, hf.model.model.register_forward_hook(hook)


def assert_same_grounding(a, b, caption: str, *, box_atol: float) -> list[int | None]:
    """Same kept boxes in the same order; boxes within box_atol px; probabilities within 1e-4 relative + 1e-6; the
    same box→phrase assignment (returned)."""
    assert a.token_char_spans == b.token_char_spans
    assert a.boxes_xyxy.shape == b.boxes_xyxy.shape
    np.testing.assert_allclose(b.boxes_xyxy, a.boxes_xyxy, rtol=0, atol=box_atol)
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.token_probs, a.token_probs, rtol=1e-4, atol=1e-6)
    assert np.array_equal(a.token_mask(), b.token_mask())
    spans = phrase_spans(caption)
    assignment = match_boxes_to_phrases(a.token_probs, a.token_char_spans, spans)
    assert match_boxes_to_phrases(b.token_probs, b.token_char_spans, spans) == assignment
    return assignment


def test_ground_equals_official_on_voc_photo(official, hf, photo):
    """Both backends' `ground` on the VOC photo (800x1066 input), box_threshold 0.7, text_threshold 0.25: the same
    kept queries in the same order, boxes within 0.01 px (measured ≈ 3e-3 px on a 500 px image: float32 op order),
    scores / token probabilities within rel 1e-4 (measured ≈ 3e-6 absolute), the same token masks and the same
    box→phrase assignment (pipeline/use/grounding.py). Every reference coordinate stays inside [1e-3, 1 - 1e-3], the
    range where the two inverse sigmoids agree (see the module docstring)."""
    kw = dict(box_threshold=0.7, text_threshold=0.25)
    a = official.ground(photo, CAPTION, **kw)
    seen, handle = capture_references(hf)
    try:
        b = hf.ground(photo, CAPTION, **kw)
    finally:
        handle.remove()
    assert 0 < len(a.boxes_xyxy) < official.model.num_queries  # the box threshold keeps some queries, not all
    assert 0 < a.token_mask().sum() < a.token_mask().size
    assignment = assert_same_grounding(a, b, CAPTION, box_atol=1e-2)
    assert len(set(assignment)) > 1  # boxes go to different phrases
    refs = torch.cat([r.flatten() for r in seen])
    assert ((refs > 1e-3) & (refs < 1 - 1e-3)).all()


def test_ground_equals_official_for_caption_longer_than_max_text_len(official, hf, photo, monkeypatch):
    """A caption of 308 tokens: both cut it to 256 tokens after building the phrase masks on the whole caption
    (no [SEP] re-appended). Smaller input (200 short side) to keep the test fast."""
    for g in (official, hf):
        monkeypatch.setattr(g, "size", 200)
        monkeypatch.setattr(g, "max_size", 333)
    a = official.ground(photo, LONG, box_threshold=0.0, text_threshold=0.25)
    b = hf.ground(photo, LONG, box_threshold=0.0, text_threshold=0.25)
    assert a.token_probs.shape == (official.model.num_queries, 256)
    assert a.token_char_spans[-1] != (-1, -1)  # the cut leaves no trailing [SEP]
    assert_same_grounding(a, b, LONG, box_atol=1e-2)


def test_box_refinement_inverse_sigmoid_eps_is_the_only_model_difference():
    """Official `inverse_sigmoid(x, eps=1e-3)` (decoder box refinement and the final box head) vs transformers'
    `torch.special.logit(x, eps=1e-5)` at the same places: equal inside [1e-3, 1 - 1e-3], different outside."""
    from groundingdino.util.misc import inverse_sigmoid

    inside = torch.linspace(1e-3, 1 - 1e-3, 10001)
    torch.testing.assert_close(inverse_sigmoid(inside), torch.special.logit(inside, eps=1e-5), rtol=1e-5, atol=1e-5)
    edge = torch.tensor([0.0, 1e-4, 1 - 1e-4, 1.0])
    official, transformers = inverse_sigmoid(edge), torch.special.logit(edge, eps=1e-5)
    assert official.abs().max() == pytest.approx(np.log(1000), abs=1e-4)  # ±6.9
    assert transformers.abs().max() == pytest.approx(np.log(99999), abs=1e-3)  # ±11.5
