"""Tiny random-init models of the real architectures, built offline into a cache folder.

Each builder writes a folder that the *real* loaders read back with `from_pretrained` / `load_sam`, so the tiny
preset exercises exactly the code path real weights take. Builds are seeded and therefore deterministic; a
finished build is never redone (folders appear atomically via `os.rename`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

TINY_VERSION = "tiny-v1"
TINY_ROLES = ("captioner", "grounder", "segmenter", "clip", "dense", "cam_clip", "classifier_clip")
SAM_TINY_CHECKPOINT = "sam_tiny.pth"

# Fixed English word list the tiny tokenizers are trained on: common caption words plus the VOC class names.
WORDS = """
a an the this that these those there here it its is are was were be been being has have had do does did
of in on at to from with without by for into onto over under above below behind near next beside between
and or but not no yes very some many few two three four five several other another each every all both
one man woman men women boy girl child children kid kids people person baby family friend player crowd
dog dogs cat cats car cars bus buses chair chairs table tables sofa couch bottle bottles plant plants
potted pottedplant bird birds boat boats train trains horse horses sheep cow cows tv tvmonitor monitor
screen television aeroplane airplane plane bicycle bike motorbike motorcycle dining diningtable background
photo picture image view scene close up front back side left right top bottom middle center corner
sitting standing walking running riding driving flying lying holding looking playing eating drinking
wearing parked waiting crossing jumping swimming sleeping smiling talking carrying pulling pushing
red blue green yellow white black brown gray grey orange pink purple dark light bright colorful
small large big little tall short long old young new wooden metal glass plastic open empty full
street road city building house room kitchen window door wall floor grass field park beach water sea
river lake sky cloud clouds tree trees mountain snow sand rock hill forest garden yard farm fence
sign light lights pole bench umbrella bag hat shirt jacket dress shoes glasses cup plate food pizza
cake fruit apple banana sandwich bowl vase book books laptop computer phone clock bed pillow lamp desk
shelf mirror toilet sink kite ball frisbee skateboard surfboard skis truck van taxi station track
rail platform airport runway harbor dock animal animals pet grazing flock herd saddle rider wheel
wheels seat seats cushion leather living office store market shop restaurant cafe night day sun
sunny cloudy rainy outside inside outdoor indoor together alone another group line row pair lot
what who where which how why can could will would should may might must just only also then than
as so if when while after before during around along across through down out off away again still
""".split()


def _seeded(seed: int) -> None:
    # Every builder reseeds so a role's weights do not depend on which roles were built before it.
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------- tokenizers
def learn_bpe(words: list[list[str]], min_count: int = 1) -> list[tuple[str, str]]:
    """Classic BPE merge learning on symbol sequences, ties broken by the pair itself, so it is deterministic.

    (The `tokenizers` trainers break ties in hash-map order, which changes from run to run.)
    """
    seqs = [list(w) for w in dict.fromkeys(tuple(w) for w in words)]
    counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}

    def account(i: int, sign: int) -> None:
        for pair in zip(seqs[i], seqs[i][1:], strict=False):
            counts[pair] = counts.get(pair, 0) + sign
            if sign > 0:
                where.setdefault(pair, set()).add(i)

    for i in range(len(seqs)):
        account(i, +1)
    merges: list[tuple[str, str]] = []
    while counts:
        pair, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < min_count:
            break
        merges.append(pair)
        for i in sorted(where.pop(pair, ())):
            account(i, -1)
            seq, out, k = seqs[i], [], 0
            while k < len(seq):
                if k + 1 < len(seq) and (seq[k], seq[k + 1]) == pair:
                    out.append(seq[k] + seq[k + 1])
                    k += 2
                else:
                    out.append(seq[k])
                    k += 1
            seqs[i] = out
            account(i, +1)
        for p in [p for p, c in counts.items() if c <= 0]:
            del counts[p]
    return merges


def build_clip_tokenizer():
    """Byte-level BPE with CLIP's layout: 256 bytes, 256 bytes + '</w>', merges, then <|startoftext|> <|endoftext|>."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_bpe([[*w[:-1], w[-1] + "</w>"] for w in WORDS])
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_bert_tokenizer():
    """Uncased WordPiece with bert-base-uncased's id layout: whole words of `WORDS`, single characters and '##' +
    character continuations.

    The layout matters: Grounding DINO hard-codes the ids of [CLS]=101, [SEP]=102, '.'=1012 and '?'=1029 to split
    the caption into phrases, so the tiny vocab keeps those ids.
    """
    from transformers import BertTokenizer

    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(99, 99 + 999 - len(tokens))]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens += chars  # '!' gets id 999, so '.' is 1012 and '?' is 1029, as in bert-base-uncased
    tokens += sorted(set(WORDS)) + ["##" + c for c in chars]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    assert [tok.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", ".", "?")] == [101, 102, 1012, 1029]
    return tok


def build_llama_tokenizer():
    """Llama-style BPE (metaspace '▁' + byte fallback) with Llama's layout, plus LLaVA's <image> and <pad> tokens."""
    from transformers import AddedToken, LlamaTokenizer

    alphabet = sorted({c for w in WORDS for c in w} | set(string.punctuation + string.digits) | {"▁"})
    merges = learn_bpe([["▁", *w] for w in WORDS])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += alphabet + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = LlamaTokenizer(
        vocab=vocab, merges=merges, model_max_length=512, padding_side="left", add_bos_token=True, add_eos_token=False
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<image>", special=True, normalized=False)], "pad_token": "<pad>"}
    )
    return tok


# ----------------------------------------------------------------------------------------------------- models
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# LLaVA-1.5's chat template: "USER: <image>\n{prompt} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _tiny_vision(image_size: int, patch_size: int = 14) -> dict:
    return dict(
        image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2,
    )


def build_clip(out: Path, *, image_size: int = 56, patch_size: int = 14, seed: int = 1) -> None:
    """CLIPModel (ViT/14 at 56 px → 4×4 patches, joint dim 16) + CLIPTokenizer + CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=_tiny_vision(image_size, patch_size),
        projection_dim=16,
    )
    _seeded(seed)
    CLIPModel(config).eval().save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)


def build_dense(out: Path) -> None:
    """Dinov2Model (patch 14, 3 blocks, width 32) + BitImageProcessor with ImageNet mean/std."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56
    )
    _seeded(2)
    Dinov2Model(config).eval().save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    ).save_pretrained(out)


def save_grounding_dino(out: Path, *, backbone: dict, text: dict, model: dict, edges: tuple[int, int],
                        seed: int | None = None, device: str = "cpu") -> None:
    """A random-init GroundingDinoForObjectDetection of these Swin (``backbone``), BERT (``text``) and model sizes,
    + its processor (the offline BERT tokenizer, images resized to ``edges`` = shortest/longest edge), saved to
    ``out``: the tiny build below and the benchmarks' real-size one (bench/stages.py)."""
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tok = build_bert_tokenizer()
    config = GroundingDinoConfig(backbone_config=SwinConfig(**backbone),
                                 text_config=BertConfig(vocab_size=len(tok), **text), **model)
    if seed is not None:
        _seeded(seed)
    with torch.device(device):
        GroundingDinoForObjectDetection(config).eval().save_pretrained(out)
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": edges[0], "longest_edge": edges[1]}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)


def build_grounder(out: Path) -> None:
    """GroundingDinoForObjectDetection with a tiny Swin backbone and a tiny BERT, + its processor."""
    save_grounding_dino(
        out,
        backbone=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=128,
                      out_indices=[2, 3, 4]),
        text=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        # decoder_layers=2: transformers cannot tie the per-layer bbox heads of a 1-layer decoder.
        model=dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                   encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, encoder_n_points=2,
                   decoder_n_points=2),
        edges=(96, 160), seed=3)


def build_captioner(out: Path) -> None:
    """LlavaForConditionalGeneration (tiny CLIP vision tower + tiny Llama) + LlavaProcessor with LLaVA-1.5's template."""
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = build_llama_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **_tiny_vision(56)), text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2, pad_token_id=tok.pad_token_id,
    )
    _seeded(4)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )
    LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(out)


def build_segmenter(out: Path) -> None:
    """SAM with a tiny ViT image encoder (same `_build_sam` as vit_h), saved as a plain state_dict `.pth`."""
    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, build_sam_arch

    _seeded(5)
    sam = build_sam_arch(SAM_ARCHS["tiny"], checkpoint=None)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), out / SAM_TINY_CHECKPOINT)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "captioner": build_captioner,
    "grounder": build_grounder,
    "segmenter": build_segmenter,
    "clip": build_clip,
    # CaR's two CLIPs: f is a ViT-B/16 (patch 16, 64 px → 4×4), g a ViT-L/14 like `clip` (same tiny weights).
    "cam_clip": lambda out: build_clip(out, image_size=64, patch_size=16, seed=6),
    "classifier_clip": build_clip,
    "dense": build_dense,
}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def tiny_root(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir).expanduser() / TINY_VERSION


def ensure_tiny(role: str, cache_dir: str | os.PathLike) -> Path:
    """Return `<cache_dir>/tiny-v1/<role>/`, building it first if absent.

    The build goes to a temp folder beside the target and is renamed into place, so a crash leaves nothing
    half-written and two processes racing both end with one complete folder (the loser discards its copy).
    """
    target = tiny_root(cache_dir) / role
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{role}-", dir=target.parent))
    try:
        # Keep the caller's global RNG untouched and the build quiet.
        with torch.random.fork_rng(devices=[]), _quiet_transformers():
            BUILDERS[role](tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
