"""Load every model role of a preset and run each once on one image: a cheap check that the configured
models exist, load, and produce the documented shapes on this machine."""

from __future__ import annotations

from typing import Any

import numpy as np

from pseudoseg.models.registry import ROLES, ModelSettings, load_role
from pseudoseg.models.roles import Sampling

PROBE_CAPTION = "a person next to a dog and a car."


def _crop(image: np.ndarray, side: int) -> np.ndarray:
    """Centre square of ``image`` resized to ``side`` (nearest; only shapes matter here)."""
    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    idx = (np.arange(side) * s // side)
    return image[y0:y0 + s, x0:x0 + s][idx][:, idx]


def _run(role: str, model: Any, image: np.ndarray) -> dict[str, Any]:
    h, w = image.shape[:2]
    if role == "captioner":
        text = model.caption([image], "Describe this image.", Sampling(8, temperature=0.8, top_p=0.4, top_k=5))
        return {"caption": np.asarray([len(t) for t in text])}
    if role == "grounder":
        g = model.ground(image, PROBE_CAPTION, box_threshold=0.0, text_threshold=0.25)
        return {"boxes_xyxy": g.boxes_xyxy, "token_probs": g.token_probs}
    if role == "segmenter":
        emb = model.embed(image)
        boxes = np.array([[0, 0, w / 2, h / 2], [w / 4, h / 4, w - 1, h - 1]], dtype=np.float32)
        pred = model.predict(emb, boxes_xyxy=boxes, multimask=True)
        return {"logits": pred.logits, "iou_pred": pred.iou_pred}
    if role in ("clip", "cam_clip", "classifier_clip"):
        feats = model.encode_image(_crop(image, model.image_size)[None])
        return {"cls": feats.cls, "patch": feats.patch, "text": model.encode_text(["a photo of a dog."])}
    if role == "dense":
        side = 4 * model.patch_size
        feats = model.encode(_crop(image, side)[None], layers=[-2, -1])
        return {"cls": feats.cls, "patches": feats.patches}
    raise ValueError(role)


def probe_roles(settings: ModelSettings, image: np.ndarray, roles: tuple[str, ...] = ROLES) -> list[dict]:
    """One row per output of each role: role, model, output, shape, dtype (no timings: rows are data)."""
    rows = []
    for role in roles:
        model = load_role(role, settings)
        for name, value in _run(role, model, image).items():
            rows.append({"role": role, "model": f"{settings.preset}:{model.source}",
                         "output": name, "shape": list(value.shape), "dtype": str(value.dtype)})
    return rows
