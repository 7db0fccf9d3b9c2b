"""Grounding DINO as the `Grounder` role: transformers backend (default) and the official groundingdino-py backend."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pseudoseg.models.adapters._hf import HFAdapter, ModelUnavailableError, autocast, model_device, to_numpy
from pseudoseg.models.adapters.weights import load_state_strict, load_weights
from pseudoseg.models.catalog import DEFAULT_GROUNDER
from pseudoseg.models.roles import Grounder, Grounding


def prepare_caption(caption: str) -> tuple[str, int, int]:
    """The official preprocessing (lowercase, strip, end with '.') plus what maps its offsets back.

    Returns (text, lead, length): `text[i]` is `caption[i + lead]` for i < length; characters of `text` past
    `length` (the appended '.') are not in `caption`.
    """
    lowered = caption.lower()
    text = lowered if len(lowered) == len(caption) else caption  # keep offsets valid for exotic lowercasing
    lead = len(text) - len(text.lstrip())
    text = text.strip()
    length = len(text)
    if not text.endswith("."):
        text += "."
    return text, lead, length


def char_spans(
    offsets: Sequence[Sequence[int]], special: Sequence[int], lead: int, length: int
) -> tuple[tuple[int, int], ...]:
    """Tokenizer offsets into the prepared text → (start, end) into the original caption; (-1, -1) otherwise."""
    spans = []
    for (s, e), sp in zip(offsets, special, strict=True):
        ok = not sp and e > s and e <= length
        spans.append((int(s) + lead, int(e) + lead) if ok else (-1, -1))
    return tuple(spans)


def official_resize_hw(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) of groundingdino-py's `RandomResize([size], max_size)`: the short side becomes `size`, unless the
    long side would then exceed `max_size`, in which case the short side becomes round(max_size * short / long); the
    long side is then truncated (int) from the *rounded* short side. (transformers' GroundingDinoImageProcessor
    derives the long side from the unrounded value instead, so when the cap applies it can be 1 px off.)"""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def official_pixels(image: np.ndarray, size: int, max_size: int | None, mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB [H, W, 3] → float32 [3, h, w] exactly as groundingdino-py's `load_image` transform: PIL bilinear
    resize of the uint8 image (`official_resize_hw`), /255, (x - mean) / std."""
    from PIL import Image

    h, w = official_resize_hw(image.shape[0], image.shape[1], size, max_size)
    resized = np.array(Image.fromarray(np.asarray(image)).resize((w, h), Image.BILINEAR))  # a writable copy
    x = torch.from_numpy(resized).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def to_grounding(
    probs: torch.Tensor, boxes_cxcywh: torch.Tensor, spans: tuple[tuple[int, int], ...], image_hw: tuple[int, int],
    box_threshold: float, text_threshold: float,
) -> Grounding:
    """probs [Q, >=T] sigmoid token probabilities, boxes [Q, 4] normalised cxcywh → `Grounding` in image pixels.

    Keeps queries whose best token probability exceeds `box_threshold`, as the official `predict` does.
    """
    t = len(spans)
    probs = probs[:, :t].float()
    keep = probs.max(dim=1).values > box_threshold
    probs, boxes = probs[keep], boxes_cxcywh[keep].float()
    h, w = image_hw
    cx, cy, bw, bh = boxes.unbind(-1)
    xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
    xyxy = xyxy * torch.tensor([w, h, w, h], dtype=torch.float32, device=xyxy.device)
    scores = probs.max(dim=1).values if len(probs) else torch.zeros(0)
    return Grounding(
        boxes_xyxy=to_numpy(xyxy).reshape(-1, 4),
        scores=to_numpy(scores).reshape(-1),
        token_probs=to_numpy(probs).reshape(-1, t),
        token_char_spans=spans,
        text_threshold=float(text_threshold),
    )


class HFGroundingDino(HFAdapter, Grounder):
    """transformers `GroundingDinoForObjectDetection` + `AutoProcessor` (tokenizer + image processor settings).

    Inputs are prepared as the official groundingdino-py does, not by transformers' image processor: the image is
    resized by `official_pixels` with the processor's size, longest edge, mean and std (the processor's own
    torchvision resize differs by up to one grey level per pixel, and under the max_size cap its long side can be
    1 px off), and the caption is tokenised untruncated and cut to `max_text_tokens` inside the model (a
    truncating tokenizer would re-append [SEP] and change the last phrase's text mask). size / max_size override
    the processor's shortest / longest edge.

    Known model-level difference (not fixable here): transformers' box refinement inverts the sigmoid with
    eps=1e-5 where the official uses 1e-3; they agree for reference coordinates in [1e-3, 1 - 1e-3] (see
    tests/models/adapters/test_grounding_parity.py).
    """

    def __init__(self, model_id: str = DEFAULT_GROUNDER, *, device: str = "auto", key: str = "grounder",
                 size: int | None = None, max_size: int | None = None) -> None:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        super().__init__(model_id, device, role="Grounding DINO grounder", key=key, hub_id=DEFAULT_GROUNDER)
        self.model = self.load_model(GroundingDinoForObjectDetection.from_pretrained, dtype=torch.float32)
        self.model = self.model.to(self.device).eval()
        self.processor = self.load(AutoProcessor.from_pretrained)
        self.max_text_tokens = int(self.model.config.max_text_len)
        ip = self.processor.image_processor
        sizes = ip.size or {}  # a dict or transformers' SizeDict
        rescale = ip.rescale_factor if ip.do_rescale else 1.0
        if not sizes.get("shortest_edge") or not ip.do_resize or not ip.do_normalize or abs(rescale * 255 - 1) > 1e-6:
            raise ValueError(f"{model_id}: expected a Grounding DINO image processor that resizes by shortest_edge, "
                             f"rescales by 1/255 and normalises, got size={sizes}, do_resize={ip.do_resize}, "
                             f"rescale={rescale}, do_normalize={ip.do_normalize}")
        self.size = int(size or sizes.get("shortest_edge"))
        self.max_size = max_size or sizes.get("longest_edge")
        self.mean, self.std = [float(v) for v in ip.image_mean], [float(v) for v in ip.image_std]

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """uint8 RGB [H, W, 3] → float32 [3, h, w], the official transform (see the class docstring)."""
        return official_pixels(image, self.size, self.max_size, self.mean, self.std)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """`pixel_values` (host, thread-safe): what `ground_batch` takes as `prepared`."""
        return self.pixel_values(np.asarray(image))

    def count_tokens(self, caption: str) -> int:
        """Tokens incl. [CLS]/[SEP] and the appended '.' that `ground` would see, before truncation."""
        return len(self.processor.tokenizer(prepare_caption(caption)[0])["input_ids"])

    def ground(self, image: np.ndarray, caption: str, *, box_threshold: float, text_threshold: float) -> Grounding:
        """image: uint8 RGB [H, W, 3]; caption: free text (lowercased and '.'-terminated internally, as officially).

        Returns `Grounding`: boxes xyxy float32 pixels of `image`, token_probs = sigmoid(logits) over the caption's
        T tokens (T <= max_text_tokens, special tokens included with span (-1, -1)).
        """
        return self.ground_batch([image], [(0, caption)], box_threshold=box_threshold,
                                 text_threshold=text_threshold)[0]

    @torch.inference_mode()
    def ground_batch(self, images: Sequence[np.ndarray], queries: Sequence[tuple[int, str]], *, box_threshold: float,
                     text_threshold: float, batch_size: int | None = None,
                     prepared: Sequence[torch.Tensor] | None = None, reuse_backbone: bool = True) -> list[Grounding]:
        """`ground(images[i], caption)` for every query `(i, caption)`, in query order, with each image encoded ONCE.

        The vision backbone (Swin) runs once per image — one forward for all images of the same input size — and
        its output is handed to every caption of that image: the model's own forward runs with the backbone
        answering from these features (`_backbone_answers`), so the text encoder, the fusion encoder and the decoder
        see exactly what they see in a one-caption call. Up to `batch_size` captions (None: all of a size) go
        through them together, padded to the longest (padding is masked out of every attention and of the
        logits); results equal one-caption calls up to float rounding. prepared: the images' `prepare` outputs.
        reuse_backbone = False: each caption's image is repeated in the batch and the backbone runs per caption (the
        plain batched call; bench/grounder_batching.py compares the two).
        """
        queries = list(queries)
        if not queries:
            return []
        tokenizer = self.processor.tokenizer
        pixels = {i: prepared[i] if prepared is not None else self.prepare(images[i])
                  for i in sorted({i for i, _ in queries})}
        groups: dict[tuple[int, ...], list[int]] = {}
        for q, (i, _) in enumerate(queries):
            groups.setdefault(tuple(pixels[i].shape), []).append(q)
        results: list[Grounding | None] = [None] * len(queries)
        for members in groups.values():
            image_ids = sorted({queries[q][0] for q in members})
            row = {i: r for r, i in enumerate(image_ids)}
            batch = torch.stack([pixels[i] for i in image_ids]).to(self.device)
            mask = torch.ones((len(image_ids), *batch.shape[-2:]), dtype=torch.long, device=self.device)
            if reuse_backbone:
                with autocast(self.device):
                    features = self.model.model.backbone(batch, mask)
            step = batch_size or len(members)
            for c in range(0, len(members), step):
                chunk = members[c : c + step]
                prepared = [prepare_caption(queries[q][1]) for q in chunk]
                # Untruncated, like the official forward: the model builds the phrase masks and position ids from the
                # full ids and then cuts ids, masks and the detection head's attention mask to max_text_len.
                encs = [tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
                        for text, _, _ in prepared]
                width = max(len(e["input_ids"]) for e in encs)
                ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
                types = torch.zeros((len(chunk), width), dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for b, e in enumerate(encs):
                    n = len(e["input_ids"])
                    ids[b, :n] = torch.tensor(e["input_ids"])
                    types[b, :n] = torch.tensor(e["token_type_ids"])
                    attention[b, :n] = 1
                # The detection head applies `attention_mask` to the cut logits, so it is given at the cut length.
                attention = attention[:, : self.max_text_tokens]
                index = torch.tensor([row[queries[q][0]] for q in chunk], device=self.device)
                text = dict(input_ids=ids.to(self.device), token_type_ids=types.to(self.device),
                            attention_mask=attention.to(self.device))
                if reuse_backbone:
                    with _backbone_answers(self.model.model.backbone, features, index), autocast(self.device):
                        out = self.model(pixel_values=batch[:1].expand(len(chunk), -1, -1, -1),
                                         pixel_mask=mask[:1].expand(len(chunk), -1, -1), **text)
                else:
                    with autocast(self.device):
                        out = self.model(pixel_values=batch.index_select(0, index),
                                         pixel_mask=mask.index_select(0, index), **text)
                for b, (q, e, (_, lead, length)) in enumerate(zip(chunk, encs, prepared, strict=True)):
                    spans = char_spans(e["offset_mapping"], e["special_tokens_mask"], lead, length)
                    image = images[queries[q][0]]
                    results[q] = to_grounding(out.logits[b].float().sigmoid(), out.pred_boxes[b],
                                              spans[: self.max_text_tokens], np.asarray(image).shape[:2],
                                              box_threshold, text_threshold)
        return results  # type: ignore[return-value]


@contextlib.contextmanager
def _backbone_answers(backbone: torch.nn.Module, features: tuple, index: torch.Tensor) -> Iterator[None]:
    """While active, `backbone(pixel_values, pixel_mask)` returns the given output of an earlier call (features and
    masks per level, position embeddings per level) at batch rows `index` instead of computing it: how
    `HFGroundingDino.ground_batch` reuses one image encoding for many captions through the model's own forward."""
    maps, positions = features

    def answer(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> tuple[list, list]:
        if len(index) != len(pixel_values):
            raise RuntimeError(f"backbone asked for {len(pixel_values)} images, {len(index)} prepared")
        return ([(f.index_select(0, index), m.index_select(0, index)) for f, m in maps],
                [p.index_select(0, index) for p in positions])

    backbone.forward = answer  # an instance attribute: nn.Module.__call__ (and its hooks) calls it
    try:
        yield
    finally:
        del backbone.forward


@contextlib.contextmanager
def _bert_compat() -> Iterator[None]:
    """groundingdino-py 0.4.0 wraps BERT with helpers transformers 5 removed; swap in a wrapper while building.

    The wrapper keeps the same submodule names (embeddings, encoder, pooler) so official checkpoints load as-is,
    and lets BertModel itself handle the phrase-wise [B, T, T] attention mask.
    """
    import groundingdino.models.GroundingDINO.groundingdino as gd_module
    from transformers import BertModel

    if hasattr(BertModel, "get_extended_attention_mask"):
        yield
        return

    class BertCompat(torch.nn.Module):
        def __init__(self, bert_model):
            super().__init__()
            self.config = bert_model.config
            self.embeddings = bert_model.embeddings
            self.encoder = bert_model.encoder
            self.pooler = bert_model.pooler
            self._bert = (bert_model,)  # a tuple: not registered twice in the state_dict

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **_):
            if attention_mask is not None and attention_mask.ndim == 3:
                attention_mask = attention_mask[:, None].bool()  # [B, 1, T, T] boolean mask, True = attend
            return self._bert[0](
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                position_ids=position_ids, return_dict=True,
            )

    original = gd_module.BertModelWarper
    gd_module.BertModelWarper = BertCompat
    try:
        yield
    finally:
        gd_module.BertModelWarper = original


def load_groundingdino(config_path: str, checkpoint_path: str, *, text_encoder: str = ""):
    """The official model from its python config file and `.pth` checkpoint ({'model': state_dict}), on CPU.

    text_encoder: overrides the config's `text_encoder_type` (a local BERT folder when offline).
    """
    from groundingdino.models import build_model
    from groundingdino.util.misc import clean_state_dict
    from groundingdino.util.slconfig import SLConfig

    for what, key, path in (("config", "groundingdino_config", config_path),
                            ("checkpoint", "groundingdino_checkpoint", checkpoint_path)):
        if not path or not Path(path).expanduser().is_file():
            raise ModelUnavailableError(
                f"The groundingdino-py grounder {what} '{path}' does not exist; it comes from the config key "
                f"`[models] {key} = {path}`. Get the official files (GroundingDINO_SwinB_cfg.py ships inside the "
                f"groundingdino package; weights from https://github.com/IDEA-Research/GroundingDINO releases) "
                f"and set the key to their local path, or use `[models] grounder_backend = transformers`."
            )
    args = SLConfig.fromfile(str(Path(config_path).expanduser()))
    args.device = "cpu"
    if text_encoder:
        args.text_encoder_type = text_encoder
    try:
        with _bert_compat():
            model = build_model(args)
    except OSError as e:
        raise ModelUnavailableError(
            f"The groundingdino-py grounder needs its BERT text encoder '{args.text_encoder_type}', which could "
            f"not be loaded ({e}). On a connected machine run `hf download bert-base-uncased "
            f"--local-dir DIR`, copy DIR here and set `[models] groundingdino_text_encoder = DIR`."
        ) from e
    path = Path(checkpoint_path).expanduser()
    what = "groundingdino-py grounder (`[models] groundingdino_checkpoint`)"
    state = load_weights(path, what=what)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    load_state_strict(model, clean_state_dict(state) if isinstance(state, dict) else state, path=path, what=what)
    return model.eval()


class GroundingDinoPy(Grounder):
    """The official IDEA-Research implementation (`groundingdino-py`), same `Grounding` output as `HFGroundingDino`.

    Image transform as the official `load_image`: resize shortest side to `size` (longest <= `max_size`),
    ImageNet normalisation. Logits → token_probs by sigmoid; boxes normalised cxcywh → xyxy pixels.
    """

    def __init__(
        self, config_path: str, checkpoint_path: str, *, device: str = "auto", text_encoder: str = "",
        size: int = 800, max_size: int = 1333,
    ) -> None:
        self.device = model_device(device)
        self.source = checkpoint_path
        self.model = load_groundingdino(config_path, checkpoint_path, text_encoder=text_encoder).to(self.device)
        self.max_text_tokens = int(self.model.max_text_len)
        self.size, self.max_size = size, max_size

    def _transform(self, image: np.ndarray) -> torch.Tensor:
        import groundingdino.datasets.transforms as T
        from PIL import Image

        tf = T.Compose([
            T.RandomResize([self.size], max_size=self.max_size),  # one size: deterministic
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])
        x, _ = tf(Image.fromarray(np.asarray(image)), None)
        return x

    def count_tokens(self, caption: str) -> int:
        """Tokens incl. [CLS]/[SEP] and the appended '.' that `ground` would see, before truncation."""
        return len(self.model.tokenizer(prepare_caption(caption)[0])["input_ids"])

    @torch.inference_mode()
    def ground(self, image: np.ndarray, caption: str, *, box_threshold: float, text_threshold: float) -> Grounding:
        """Same contract as `HFGroundingDino.ground` (uint8 RGB [H, W, 3] in, xyxy pixels out)."""
        text, lead, length = prepare_caption(caption)
        # Tokenised like the model's own forward: untruncated, then cut to max_text_len columns.
        enc = self.model.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        spans = char_spans(enc["offset_mapping"], enc["special_tokens_mask"], lead, length)[: self.max_text_tokens]
        x = self._transform(image).to(self.device)
        with autocast(self.device):
            out = self.model(x[None], captions=[text])
        return to_grounding(
            out["pred_logits"][0].float().sigmoid(), out["pred_boxes"][0], spans, image.shape[:2],
            box_threshold, text_threshold,
        )
