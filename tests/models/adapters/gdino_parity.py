"""Test helpers: a tiny official Grounding DINO (groundingdino-py) and the same weights as a transformers
`GroundingDinoForObjectDetection`, so both `Grounder` backends can be compared on shared random weights.

The key mapping is our own, written against the two installed module trees (groundingdino-py 0.4.0 and the pinned
transformers); transformers' `convert_grounding_dino_to_hf.py` documents the correspondence.
"""

from __future__ import annotations

import contextlib
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import torch

# Official config values overridden for the tiny model (everything else: GroundingDINO_SwinT_OGC.py as shipped).
# hidden_dim stays 256: the official encoder hard-codes a 256-wide sine embedding of the text position ids.
TINY_OFFICIAL = dict(hidden_dim=256, nheads=8, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=20,
                     enc_n_points=2, dec_n_points=2, use_checkpoint=False, use_transformer_ckpt=False)
# The Swin backbone's size: groundingdino-py only knows the fixed swin_T/B/L sizes, so the test swaps these in.
TINY_SWIN = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=7)
TINY_BERT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


@contextlib.contextmanager
def tiny_swin() -> Iterator[None]:
    """While active, groundingdino-py's `swin_T_224_1k` backbone is built with `TINY_SWIN` sizes."""
    import groundingdino.models.GroundingDINO.backbone.backbone as backbone_module

    original = backbone_module.build_swin_transformer

    def build(modelname, pretrain_img_size, **kw):
        return original(modelname, pretrain_img_size, **TINY_SWIN, **kw)

    backbone_module.build_swin_transformer = build
    try:
        yield
    finally:
        backbone_module.build_swin_transformer = original


def write_official(folder: Path, *, seed: int = 1) -> tuple[Path, Path]:
    """A tiny official model as the files `GroundingDinoPy` reads: (config .py, checkpoint .pth {'model': sd}).

    The zero-initialised box heads' last layers and the 1e-4 fusion layer-scales (gamma_v, gamma_l) are redrawn
    so every branch of the network moves the outputs, and the text features are scaled so that token
    probabilities spread over (0, 1) instead of saturating.
    """
    import groundingdino
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig
    from transformers import BertConfig, BertModel

    from pseudoseg.models.adapters import tiny
    from pseudoseg.models.adapters.grounder import _bert_compat

    folder.mkdir(parents=True, exist_ok=True)
    bert_dir = folder / "bert"
    tok = tiny.build_bert_tokenizer()
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(tok), **TINY_BERT)).save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    shipped = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    lines = "".join(f"{k} = {v!r}\n" for k, v in {**TINY_OFFICIAL, "text_encoder_type": str(bert_dir)}.items())
    config = folder / "cfg.py"
    config.write_text(shipped.read_text() + "\n" + textwrap.dedent(lines))
    args = SLConfig.fromfile(str(config))
    args.device = "cpu"
    with tiny_swin(), _bert_compat():
        model = build_model(args)
    state = model.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in state.items():
        if re.search(r"bbox_embed(\.\d+)?\.layers\.2\.", k):
            state[k] = torch.randn(v.shape, generator=g) * 0.3
        elif re.search(r"fusion_layers\.\d+\.gamma_[vl]$", k):
            state[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.25
        elif re.fullmatch(r"transformer\.encoder\.text_layers\.0\.norm2\.weight", k):
            state[k] = v * 0.03  # text features ~30x smaller: token logits of a few units, not saturated
    # The decoder's shared box head is one module under three names: keep the copies identical.
    for k in list(state):
        if k.startswith("transformer.decoder.bbox_embed."):
            state[k.removeprefix("transformer.decoder.")] = state[k]
            i = k.split(".")[3]
            for j in range(TINY_OFFICIAL["dec_layers"]):
                state[k.replace(f"bbox_embed.{i}.", f"bbox_embed.{j}.", 1)] = state[k]
    ckpt = folder / "ckpt.pth"
    torch.save({"model": state}, ckpt)
    return config, ckpt


def hf_config():
    """The `GroundingDinoConfig` equivalent to `TINY_OFFICIAL` + `TINY_SWIN` + `TINY_BERT` (official field → here):
    hidden_dim → d_model, nheads → encoder/decoder_attention_heads (text enhancer and fusion use half, on both sides),
    dim_feedforward → encoder/decoder_ffn_dim, enc/dec_layers, enc/dec_n_points → encoder/decoder_n_points,
    num_queries, pe_temperatureH/W → positional_embedding_temperature, return_interm_indices [1, 2, 3] → Swin
    out_indices [2, 3, 4] (HF counts the stem as stage 0), two_stage_type 'standard' → two_stage, the three *_share
    flags, max_text_len 256 (hard-coded in the official model)."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    from pseudoseg.models.adapters import tiny

    backbone = SwinConfig(**TINY_SWIN, image_size=224, out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(tiny.build_bert_tokenizer()), **TINY_BERT)
    o = TINY_OFFICIAL
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=o["hidden_dim"], encoder_layers=o["enc_layers"],
        decoder_layers=o["dec_layers"], encoder_ffn_dim=o["dim_feedforward"], decoder_ffn_dim=o["dim_feedforward"],
        encoder_attention_heads=o["nheads"], decoder_attention_heads=o["nheads"], num_queries=o["num_queries"],
        encoder_n_points=o["enc_n_points"], decoder_n_points=o["dec_n_points"], num_feature_levels=4,
        two_stage=True, embedding_init_target=True, decoder_bbox_embed_share=True, two_stage_bbox_embed_share=False,
        positional_embedding_temperature=20, max_text_len=256, activation_function="relu", layer_norm_eps=1e-5,
    )


# official sub-key → transformers sub-key, per module kind (prefix match on whole dotted components)
_SWIN_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
               "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
               "mlp": "mlp"}
_DEFORMABLE = {"self_attn": "self_attn", "norm1": "self_attn_layer_norm", "linear1": "fc1", "linear2": "fc2",
               "norm2": "final_layer_norm"}
_TEXT_ENHANCER = {"self_attn.out_proj": "self_attn.out_proj", "linear1": "fc1", "linear2": "fc2",
                  "norm1": "layer_norm_before", "norm2": "layer_norm_after"}
_FUSION = {"gamma_v": "vision_param", "gamma_l": "text_param", "layer_norm_v": "layer_norm_vision",
           "layer_norm_l": "layer_norm_text", "attn.v_proj": "attn.vision_proj", "attn.l_proj": "attn.text_proj",
           "attn.values_v_proj": "attn.values_vision_proj", "attn.values_l_proj": "attn.values_text_proj",
           "attn.out_v_proj": "attn.out_vision_proj", "attn.out_l_proj": "attn.out_text_proj"}
_DECODER = {"cross_attn": "encoder_attn", "norm1": "encoder_attn_layer_norm",
            "ca_text.out_proj": "encoder_attn_text.out_proj", "catext_norm": "encoder_attn_text_layer_norm",
            "self_attn.out_proj": "self_attn.out_proj", "norm2": "self_attn_layer_norm", "linear1": "fc1",
            "linear2": "fc2", "norm3": "final_layer_norm"}
_TOP = {"transformer.level_embed": "model.level_embed", "transformer.tgt_embed": "model.query_position_embeddings",
        "transformer.decoder.norm": "model.decoder.layer_norm",
        "transformer.decoder.ref_point_head": "model.decoder.reference_points_head",
        "transformer.decoder.bbox_embed": "model.decoder.bbox_embed", "bbox_embed": "bbox_embed",
        "transformer.enc_output": "model.enc_output", "transformer.enc_output_norm": "model.enc_output_norm",
        "transformer.enc_out_bbox_embed": "model.encoder_output_bbox_embed", "feat_map": "model.text_projection",
        "input_proj": "model.input_proj_vision", "bert": "model.text_backbone"}
_SWIN = "model.backbone.conv_encoder.model."


def _rename(rest: str, table: dict[str, str]) -> str:
    for a, b in sorted(table.items(), key=lambda kv: -len(kv[0])):  # longest prefix first
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    raise KeyError(rest)


def official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """groundingdino-py state_dict → `GroundingDinoForObjectDetection` state_dict (same tensors, renamed; packed
    q/k/v projections split in q, k, v order). Drops what transformers has no slot for: BERT's pooler (unused by
    both) and Swin's relative_position_index buffers (recomputed by both)."""
    out: dict[str, torch.Tensor] = {}

    def split_qkv(dst: str, w: torch.Tensor, b: torch.Tensor, names: tuple[str, str, str]) -> None:
        for name, wi, bi in zip(names, w.chunk(3), b.chunk(3), strict=True):
            out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = wi, bi

    for k, v in sd.items():
        if k.startswith("bert.pooler.") or k.endswith("attn.relative_position_index"):
            continue
        if m := re.fullmatch(r"backbone\.0\.patch_embed\.(proj|norm)\.(\w+)", k):
            out[f"{_SWIN}swin.embeddings.{'patch_embeddings.projection' if m[1] == 'proj' else 'norm'}.{m[2]}"] = v
        elif m := re.fullmatch(r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", k):
            dst = f"{_SWIN}swin.encoder.layers.{m[1]}.blocks.{m[2]}"
            if m[3] == "attn.qkv.weight":
                split_qkv(f"{dst}.attention", v, sd[k.replace("weight", "bias")], ("q_proj", "k_proj", "v_proj"))
            elif m[3] != "attn.qkv.bias":
                out[f"{dst}.{_rename(m[3], _SWIN_BLOCK)}"] = v
        elif m := re.fullmatch(r"backbone\.0\.layers\.(\d+)\.downsample\.(.+)", k):
            out[f"{_SWIN}swin.encoder.layers.{m[1]}.downsample.{m[2]}"] = v
        elif m := re.fullmatch(r"backbone\.0\.norm(\d)\.(\w+)", k):  # official out index i = HF stage i + 1
            out[f"{_SWIN}hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"] = v
        elif m := re.fullmatch(r"transformer\.encoder\.layers\.(\d+)\.(.+)", k):
            out[f"model.encoder.layers.{m[1]}.deformable_layer.{_rename(m[2], _DEFORMABLE)}"] = v
        elif m := re.fullmatch(r"transformer\.encoder\.text_layers\.(\d+)\.(.+)", k):
            dst = f"model.encoder.layers.{m[1]}.text_enhancer_layer"
            if m[2] == "self_attn.in_proj_weight":
                split_qkv(f"{dst}.self_attn", v, sd[k.replace("weight", "bias")], ("query", "key", "value"))
            elif m[2] != "self_attn.in_proj_bias":
                out[f"{dst}.{_rename(m[2], _TEXT_ENHANCER)}"] = v
        elif m := re.fullmatch(r"transformer\.encoder\.fusion_layers\.(\d+)\.(.+)", k):
            out[f"model.encoder.layers.{m[1]}.fusion_layer.{_rename(m[2], _FUSION)}"] = v
        elif m := re.fullmatch(r"transformer\.decoder\.layers\.(\d+)\.(.+)", k):
            dst = f"model.decoder.layers.{m[1]}"
            if m[2] in ("self_attn.in_proj_weight", "ca_text.in_proj_weight"):
                attn = "self_attn" if m[2].startswith("self_attn") else "encoder_attn_text"
                split_qkv(f"{dst}.{attn}", v, sd[k.replace("weight", "bias")], ("query", "key", "value"))
            elif not m[2].endswith("in_proj_bias"):
                out[f"{dst}.{_rename(m[2], _DECODER)}"] = v
        else:
            out[_rename(k, _TOP)] = v
    return out


def write_hf(folder: Path, official_state: dict[str, torch.Tensor]) -> list[str]:
    """The converted model + a processor configured like IDEA-Research/grounding-dino-base's (800/1333 resize,
    ImageNet mean/std, bilinear) with the tiny BERT tokenizer, saved for `HFGroundingDino(folder)`.
    Returns the transformers parameters the official model has no counterpart for."""
    from transformers import (
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    from pseudoseg.models.adapters import tiny

    model = GroundingDinoForObjectDetection(hf_config()).eval()
    missing, unexpected = model.load_state_dict(official_to_hf(official_state), strict=False)
    assert not unexpected, unexpected
    model.save_pretrained(folder)
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": 800, "longest_edge": 1333}, image_mean=tiny.IMAGENET_MEAN,
        image_std=tiny.IMAGENET_STD, resample=2,
    )
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tiny.build_bert_tokenizer()).save_pretrained(
        folder)
    return sorted(missing)
