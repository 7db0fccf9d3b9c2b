"""Steps of CaR's released code (google-research ``clip_as_rnn``) written from their text, as independent references
for the tests: they use numpy / OpenCV / torch only, never the project's functions. Each names the official
function it follows."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def scale_cam_image(cam: np.ndarray) -> np.ndarray:
    """modeling/model/cam.py scale_cam_image of one map: (x - min) / (1e-15 + max), float32."""
    cam = np.asarray(cam, np.float32)
    cam = cam - np.min(cam)
    return (cam / (np.float32(1e-15) + np.max(cam))).astype(np.float32)


def box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """modeling/model/utils.py scoremap2bbox(multi_contour_eval=True) + clipcam.py's aff_mask: the map as uint8
    (·255, truncated), cv2.threshold at int(threshold · max) (THRESH_BINARY: strictly above), every contour's
    bounding rectangle with x1, y1 clipped to W - 1, H - 1, filled end-exclusive."""
    height, width = cam.shape
    scoremap = (np.asarray(cam) * 255).astype(np.uint8)
    _, binary = cv2.threshold(scoremap, int(threshold * np.max(scoremap)), 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros((height, width), bool)
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        mask[y : min(y + h, height - 1), x : min(x + w, width - 1)] = True
    return mask


def clip_es_refine(cam: np.ndarray, attention: torch.Tensor, threshold: float) -> np.ndarray:
    """clipcam.py's CLIP-ES refinement of one Grad-CAM map [h, w] with the head- and block-averaged attention
    [N, N] (float32 torch, as there): column- then row-normalised once and twice more, (T + Tᵀ) / 2, one matmul
    with itself, the columns outside the map's boxes zeroed, times the map; scale_cam_image. Returns [h, w]."""
    trans = attention.float()
    trans = trans / torch.sum(trans, dim=0, keepdim=True)
    trans = trans / torch.sum(trans, dim=1, keepdim=True)
    for _ in range(2):
        trans = trans / torch.sum(trans, dim=0, keepdim=True)
        trans = trans / torch.sum(trans, dim=1, keepdim=True)
    trans = (trans + trans.transpose(1, 0)) / 2
    trans = torch.matmul(trans, trans)
    trans = trans * torch.from_numpy(box_mask(cam, threshold).reshape(1, -1).astype(np.float32))
    refined = torch.matmul(trans, torch.from_numpy(np.asarray(cam, np.float32)).view(-1, 1)).reshape(cam.shape)
    return scale_cam_image(refined.numpy())
