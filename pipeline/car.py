"""CLIP as RNN (CaR, car-paper §3, Algorithm 1): training-free segmentation by recurrently dropping text queries
whose visually-prompted mask proposal CLIP does not confirm; then dense-CRF post-processing and an optional SAM
ensemble by Intersection-over-Minimum.

Pure logic: the two CLIP roles come in as callables, so real models, tiny models and oracles fit alike.
- ``cam(image, queries, background) -> float [N, H, W]`` in [0, 1]: the mask proposal generator f (gradCAM over
  CLIP, CLIP-ES CAM + class affinity with λ), one map per query, computed with the background queries added to the
  softmax (they suppress activations of texts absent from the image) — e.g. ``HFClipEncoder.gradcam``.
- ``classify(images uint8 [N, H, W, 3], queries) -> float [N, N_q]`` logits: the mask classifier g (a second,
  larger CLIP: logit_scale · cosine of image and text embeddings).
Arrays: image uint8 RGB ``[H, W, 3]``; masks/maps ``[N, H, W]`` (rows, columns) in the image's frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

IGNORE = 255
CamFn = Callable[[np.ndarray, Sequence[str], Sequence[str]], np.ndarray]
ClassifyFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]
VISUAL_PROMPTS = ("circle", "rectangle", "contour", "blur", "gray", "black")
CAM_METHODS = ("gradcam", "clip_es")

# car-paper Appendix D (the lists as printed; the paper's full lists are longer).
BACKGROUND_QUERIES = {
    "terrestrial": ("ground", "land", "grass", "tree", "mountain", "rock", "valley", "earth", "terrain", "forest",
                    "bush", "hill", "field", "pasture", "meadow", "plateau", "cliff", "canyon", "ridge", "peak",
                    "plain"),
    "aquatic_atmospheric": ("sea", "ocean", "lake", "water", "river", "sky", "cloud", "pond", "stream", "lagoon",
                            "bay", "gulf", "fjord", "estuary", "creek", "brook", "reservoir", "pool", "spring",
                            "marsh", "swamp"),
    "man_made": ("building", "house", "wall", "road", "street", "railway", "railroad", "bridge", "edifice",
                 "structure", "apartment", "condominium", "skyscraper", "highway", "boulevard", "lane", "alley",
                 "byway", "avenue"),
}
ALL_BACKGROUND = tuple(q for group in BACKGROUND_QUERIES.values() for q in group)


@dataclass(frozen=True)
class CarParams:
    """eta: binarisation threshold of the proposals (visual prompts, background in post-processing); theta: Eq. 6
    threshold on the diagonal softmax score; lam: CLIP-ES affinity box threshold λ; cam: mask proposal generator,
    "clip_es" (Grad-CAM + class-aware affinity, the paper's reported setting) or "gradcam" (used by clip_cam);
    prompts: visual prompts applied to the image (subset of VISUAL_PROMPTS); max_steps: safety bound on the
    recurrence (the paper stops when no query is dropped); crf: dense-CRF refinement; phi_iom / phi_iou: SAM
    ensemble thresholds (§3.4, 0.7 for all datasets)."""

    eta: float = 0.4
    theta: float = 0.6
    lam: float = 0.4
    cam: str = "clip_es"
    prompts: tuple[str, ...] = ("circle", "blur")
    background: tuple[str, ...] = field(default=ALL_BACKGROUND)
    max_steps: int = 10
    crf: bool = True
    phi_iom: float = 0.7
    phi_iou: float = 0.7


# car-paper §4 "Implementation details" (semantic) and Appendix F (referring; prompts circle + blur).
CAR_DEFAULTS: dict[str, CarParams] = {
    "voc": CarParams(eta=0.4, theta=0.6, lam=0.4),
    "coco": CarParams(eta=0.5, theta=0.3, lam=0.5),
    "context": CarParams(eta=0.6, theta=0.2, lam=0.4),
    "refcoco": CarParams(eta=0.5, theta=0.3, lam=0.5),
    "refcoco+": CarParams(eta=0.2, theta=0.1, lam=0.5),
    "refcocog": CarParams(eta=0.5, theta=0.1, lam=0.6),
}
DATASET_FAMILY = {"voc20": "voc", "voc21": "voc", "coco_object": "coco", "coco_stuff171": "coco",
                  "context59": "context", "context60": "context"}


def car_params(dataset: str) -> CarParams:
    """Defaults for an evaluation dataset name (pipeline.datasets.PROTOCOLS key) or family; VOC's otherwise."""
    return CAR_DEFAULTS.get(DATASET_FAMILY.get(dataset, dataset), CAR_DEFAULTS["voc"])


# ----------------------------------------------------------------------------------------------------- prompts
def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) inclusive pixel bounds of a bool [H, W] mask (x = column), None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def apply_visual_prompts(image: np.ndarray, mask: np.ndarray, prompts: Sequence[str] = ("circle", "blur"), *,
                         color: tuple[int, int, int] = (255, 0, 0), thickness: int = 2,
                         blur_kernel: tuple[int, int] = (15, 15)) -> np.ndarray:
    """car-paper Algorithm B: image uint8 RGB [H, W, 3] + bool mask [H, W] → prompted uint8 [H, W, 3].

    Region prompts first (blur / gray / black: outside the mask is blurred, greyed or blacked out), then the
    drawn ones (circle = ellipse inscribed in the mask's box, rectangle = the box, contour = the outline of the
    hole-filled mask) in `color`. An empty mask leaves drawn prompts out and blacks/blurs/greys everything.
    """
    unknown = set(prompts) - set(VISUAL_PROMPTS)
    if unknown:
        raise ValueError(f"unknown visual prompts {sorted(unknown)}; known: {VISUAL_PROMPTS}")
    img = np.ascontiguousarray(image, np.uint8).copy()
    m = np.asarray(mask, bool)
    keep = m[..., None]
    if "blur" in prompts:
        img = np.where(keep, img, cv2.GaussianBlur(img, blur_kernel, 0))
    if "gray" in prompts:
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None].repeat(3, axis=2)
        img = np.where(keep, img, gray)
    if "black" in prompts:
        img = np.where(keep, img, 0).astype(np.uint8)
    img = np.ascontiguousarray(img)
    box = _mask_box(m)
    if box is not None:
        x0, y0, x1, y1 = box
        if "circle" in prompts:
            center = ((x0 + x1) // 2, (y0 + y1) // 2)
            axes = (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2))
            cv2.ellipse(img, center, axes, 0, 0, 360, color, thickness)
        if "rectangle" in prompts:
            cv2.rectangle(img, (x0, y0), (x1, y1), color, thickness)
        if "contour" in prompts:
            from scipy.ndimage import binary_fill_holes

            filled = binary_fill_holes(m).astype(np.uint8)
            contours, _ = cv2.findContours(filled, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(img, contours, -1, color, thickness)
    return img


# ----------------------------------------------------------------------------------------------------- loop
@dataclass(frozen=True)
class CarStep:
    """One recurrence step: the queries h_{t-1} it scored and their diagonal softmax scores P_t^{ii}."""

    queries: tuple[str, ...]
    scores: np.ndarray


@dataclass(frozen=True)
class CarResult:
    """queries: h_T (kept); proposals float [len(queries), H, W] from the final step; steps: the history."""

    queries: tuple[str, ...]
    proposals: np.ndarray
    steps: tuple[CarStep, ...]


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(x, np.float64)
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def car_loop(image: np.ndarray, queries: Sequence[str], cam: CamFn, classify: ClassifyFn,
             params: CarParams = CarParams()) -> CarResult:
    """Algorithm 1: repeat { proposals = cam(image, h, background); prompted_i = v(image, proposals_i > eta);
    P = softmax_over_queries(classify(prompted, h)); h' = [h_i : P_ii >= theta] } until h' == h (or empty).

    Returns the kept queries with the proposals of the final step (those that produced h_T == h_{T-1}).
    """
    image = np.asarray(image, np.uint8)
    h = tuple(dict.fromkeys(queries))  # unique, order kept
    bg = tuple(q for q in params.background if q not in h)
    steps: list[CarStep] = []
    empty = np.zeros((0, *image.shape[:2]), np.float32)
    proposals = empty
    for _ in range(params.max_steps):
        if not h:
            return CarResult((), empty, tuple(steps))
        proposals = np.asarray(cam(image, list(h), list(bg)), np.float32)
        if proposals.shape != (len(h), *image.shape[:2]):
            raise ValueError(f"cam returned {proposals.shape}, expected {(len(h), *image.shape[:2])}")
        prompted = np.stack([apply_visual_prompts(image, p > params.eta, params.prompts) for p in proposals])
        logits = np.asarray(classify(prompted, list(h)), np.float64)
        diag = np.diagonal(_softmax(logits, axis=1)).astype(np.float32)
        steps.append(CarStep(h, diag))
        keep = diag >= params.theta
        if keep.all():
            return CarResult(h, proposals, tuple(steps))
        h = tuple(q for q, k in zip(h, keep, strict=True) if k)
        bg = tuple(q for q in params.background if q not in h)
    return CarResult(h, proposals if len(proposals) == len(h) else np.asarray(cam(image, list(h), list(bg)),
                                                                             np.float32), tuple(steps))


# ----------------------------------------------------------------------------------------- CLIP-ES affinity (CAA)
def sinkhorn_affinity(attention: np.ndarray, rounds: int = 3) -> np.ndarray:
    """CLIP-ES class-aware affinity base (car-paper App. B, Eq. 7): A = (D + Dᵀ) / 2 with D = Sinkhorn(W).

    attention: float [N, N] non-negative patch-to-patch attention weights (rows = queries). Sinkhorn alternates
    column- then row-normalisation `rounds` times (CLIP-ES: once, then twice more), making W doubly stochastic;
    the mean with its transpose makes it symmetric. Returns float64 [N, N]."""
    d = np.asarray(attention, np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or (d < 0).any():
        raise ValueError(f"attention must be a non-negative square matrix, got shape {d.shape}")
    for _ in range(rounds):
        d = d / np.maximum(d.sum(0, keepdims=True), 1e-12)
        d = d / np.maximum(d.sum(1, keepdims=True), 1e-12)
    return (d + d.T) / 2


def cam_box_mask(cam: np.ndarray, lam: float) -> np.ndarray:
    """bool [h, w]: the union of the bounding boxes of every 8-connected region where cam >= lam · max(cam)
    (CLIP-ES's multi-contour boxes B_c; an all-zero CAM gives no box)."""
    cam = np.asarray(cam, np.float32)
    top = float(cam.max()) if cam.size else 0.0
    out = np.zeros(cam.shape, bool)
    if top <= 0:
        return out
    binary = (cam >= lam * top).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    for x, y, w, h, _area in stats[1:n]:
        out[y : y + h, x : x + w] = True
    return out


def affinity_refine(cams: np.ndarray, affinity: np.ndarray, lam: float, power: int = 2) -> np.ndarray:
    """CLIP-ES refinement (car-paper Eq. 8): M_c^aff = B_c ⊙ Aᵗ · vec(M_c), per class map.

    cams: float [T, h, w] on the patch grid (N = h·w, row-major as the attention); affinity: [N, N] from
    :func:`sinkhorn_affinity`; lam: the box threshold λ; power: t. B_c masks the SOURCE patches (columns of Aᵗ):
    only activation inside the class's boxes spreads, to the patches affine to it. Each refined map is min-max
    scaled to [0, 1] (CLIP-ES's scale_cam_image). Returns float32 [T, h, w]."""
    cams = np.asarray(cams, np.float64)
    t, h, w = cams.shape
    a = np.asarray(affinity, np.float64)
    if a.shape != (h * w, h * w):
        raise ValueError(f"affinity {a.shape} does not match the {h}x{w} CAM grid")
    a_t = np.linalg.matrix_power(a, power)
    out = np.empty((t, h, w), np.float32)
    for i, cam in enumerate(cams):
        box = cam_box_mask(cam, lam).reshape(-1)
        refined = (a_t * box[None, :]) @ cam.reshape(-1)
        refined -= refined.min()
        out[i] = (refined / max(refined.max(), 1e-12)).reshape(h, w)
    return out


# ----------------------------------------------------------------------------------------------------- post
def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = 10, *, pos_xy: float = 1.0,
              pos_w: float = 3.0, bi_xy: float = 67.0, bi_rgb: float = 3.0, bi_w: float = 4.0) -> np.ndarray:
    """Fully connected CRF (Krähenbühl & Koltun 2011) on class probabilities float [C, H, W] (summing to 1 over C)
    → refined probabilities float32 [C, H, W]. Kernel defaults are CLIP-ES's (DeepLab's) post-processing, which
    CaR builds on: Gaussian sxy=1 w=3, bilateral sxy=67 srgb=3 w=4. Needs the optional `pydensecrf2` package
    (extra "crf")."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise ImportError("dense CRF needs the optional package pydensecrf2 (pip install 'pseudoseg[crf]'); "
                          "or run CaR with crf=False") from e
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.clip(probs, 1e-8, 1.0).astype(np.float32))))
    d.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    d.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=np.ascontiguousarray(image, np.uint8), compat=bi_w)
    return np.asarray(d.inference(iterations), np.float32).reshape(c, h, w)


def proposals_to_labels(image: np.ndarray, proposals: np.ndarray, *, eta: float, crf: bool,
                        background_label: int | None) -> np.ndarray:
    """Final masks → label map int64 [H, W] over the proposals' index (0..N-1), background_label where the
    background wins (a constant background score `eta`, as CLIP-ES's background threshold; None: never, i.e.
    argmax over the queries only). With crf, the unaries are the normalised [background, proposals] scores."""
    n, h, w = proposals.shape
    if n == 0:
        return np.full((h, w), IGNORE if background_label is None else background_label, np.int64)
    scores = np.clip(proposals, 0.0, None)
    if background_label is not None:
        scores = np.concatenate([np.full((1, h, w), eta, np.float32), scores])
    probs = scores / np.maximum(scores.sum(0, keepdims=True), 1e-8)
    if crf:
        probs = dense_crf(image, probs)
    label = probs.argmax(0)
    if background_label is None:
        return label
    return np.where(label == 0, -1, label - 1)  # -1 = background


def iom(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the Minimum mask area of two bool masks (0 when either is empty)."""
    small = min(int(a.sum()), int(b.sum()))
    return float((a & b).sum() / small) if small else 0.0


def sam_ensemble(masks: np.ndarray, sam_masks: Sequence[np.ndarray], phi_iom: float = 0.7,
                 phi_iou: float = 0.7) -> np.ndarray:
    """car-paper §3.4: every SAM mask whose IoM with a CaR mask exceeds phi_iom is matched to it; the union of the
    SAM masks matched to a CaR mask replaces it when its IoU with the CaR mask exceeds phi_iou.
    masks: bool [N, H, W] (CaR's per-query masks after CRF) → bool [N, H, W]."""
    out = np.asarray(masks, bool).copy()
    sam = [np.asarray(s, bool) for s in sam_masks]
    for i, m in enumerate(out):
        matched = [s for s in sam if iom(s, m) > phi_iom]
        if not matched:
            continue
        combined = np.logical_or.reduce(matched)
        union = (combined | m).sum()
        if union and (combined & m).sum() / union > phi_iou:
            out[i] = combined
    return out


def masks_to_label_map(masks: np.ndarray, labels: Sequence[int], fill: int) -> np.ndarray:
    """bool [N, H, W] + label value per mask → uint8 [H, W]: larger masks painted first so smaller ones stay on
    top; uncovered pixels get `fill`."""
    masks = np.asarray(masks, bool)
    out = np.full(masks.shape[1:], fill, np.uint8)  # zero masks (every query dropped): all `fill`
    for i in np.argsort(-masks.reshape(len(masks), -1).sum(1) if len(masks) else [], kind="stable"):
        out[masks[i]] = labels[i]
    return out


class CaRSegmenter:
    """The `pipeline.segmenters.SemanticSegmenter` interface around :func:`car_loop` + post-processing.

    Queries are the class names (without "background" when class_names[0] is "background", which then labels
    the pixels the background wins, see :func:`proposals_to_labels`); without a background class those pixels
    get the best query anyway. sam: optional `Segmenter` role for the SAM ensemble (its automatic masks).
    class_scores: per class its last diagonal score P_ii (0 for dropped / never-queried classes).
    """

    def __init__(self, cam: CamFn, classify: ClassifyFn, params: CarParams = CarParams(), *, sam=None,
                 prompt_names: Callable[[str], str] | None = None) -> None:
        self.cam, self.classify, self.params, self.sam = cam, classify, params, sam
        self.prompt_names = prompt_names or (lambda n: n)
        if params.crf and not crf_available():
            raise ImportError("CaR with crf=True needs pydensecrf2 (pip install 'pseudoseg[crf]'); "
                              "pass CarParams(crf=False) to run without CRF refinement")

    def segment(self, image, class_names, *, image_id=None):
        names = list(class_names)
        has_bg = bool(names) and names[0].lower() == "background"
        first = 1 if has_bg else 0
        queries = [self.prompt_names(n) for n in names[first:]]
        result = car_loop(image, queries, self.cam, self.classify, self.params)
        index = {q: first + i for i, q in enumerate(queries)}
        label_idx = proposals_to_labels(image, result.proposals, eta=self.params.eta, crf=self.params.crf,
                                        background_label=-1 if has_bg else None)
        values = [index[q] for q in result.queries]
        masks = np.stack([label_idx == i for i in range(len(values))]) if values else \
            np.zeros((0, *label_idx.shape), bool)
        if self.sam is not None and values:
            sam_masks = [r["segmentation"] for r in self.sam.automatic_masks(image)]
            masks = sam_ensemble(masks, sam_masks, self.params.phi_iom, self.params.phi_iou)
        label = masks_to_label_map(masks, values, 0 if has_bg else IGNORE)
        scores = np.zeros(len(names), np.float32)
        for step in result.steps:
            for q, s in zip(step.queries, step.scores, strict=True):
                scores[index[q]] = s
        return label, scores


# ----------------------------------------------------------------------------------------------------- CLIP roles
def clip_cam(clip, template: str = "a photo of a {}.", *, method: str = "clip_es", lam: float = 0.4,
             attention_layers: int = 8) -> CamFn:
    """CamFn over an `HFClipEncoder`-like object (`image_size`, `encode_text`, `gradcam`): the image is resized to
    S × S (pipeline.transforms.Resize), Grad-CAM maps [T, S/p, S/p] — with method "clip_es" refined on the patch
    grid by the class-aware affinity of the last `attention_layers` blocks' attention (:func:`affinity_refine`,
    box threshold λ = `lam`; car-paper App. B, the CAM behind its reported numbers) — are interpolated (bilinear)
    to the image size and the query maps (background maps dropped) rescaled to [0, 1] each."""
    import torch
    import torch.nn.functional as F

    from pipeline.transforms import Resize

    if method not in CAM_METHODS:
        raise ValueError(f"CAM method must be one of {CAM_METHODS}, got {method!r}")

    def cam(image: np.ndarray, queries: Sequence[str], background: Sequence[str]) -> np.ndarray:
        image = np.asarray(image, np.uint8)
        s = clip.image_size
        crop = Resize(tuple(image.shape[:2]), (s, s)).apply_image(image)
        text = clip.encode_text([template.format(q) for q in [*queries, *background]])
        if method == "clip_es":
            maps, attention = clip.gradcam(crop, text, attention_layers=attention_layers)
            maps = affinity_refine(maps[: len(queries)], sinkhorn_affinity(attention), lam)
        else:
            maps = clip.gradcam(crop, text)[: len(queries)]
        grid = torch.from_numpy(np.ascontiguousarray(maps, np.float32))[None]
        up = F.interpolate(grid, size=tuple(image.shape[:2]), mode="bilinear", align_corners=False)[0].numpy()
        return up / np.maximum(up.reshape(len(up), -1).max(1), 1e-12)[:, None, None]

    return cam


def clip_classifier(clip, template: str = "a photo of a {}.", logit_scale: float = 100.0) -> ClassifyFn:
    """ClassifyFn over a `ClipEncoder`: prompted images resized to S × S → CLS · text embeddings × logit_scale."""
    from pipeline.transforms import Resize

    def classify(images: np.ndarray, queries: Sequence[str]) -> np.ndarray:
        images = np.asarray(images, np.uint8)
        s = clip.image_size
        resize = Resize(tuple(images.shape[1:3]), (s, s))
        cls = clip.encode_image(np.stack([resize.apply_image(im) for im in images])).cls
        return logit_scale * cls @ clip.encode_text([template.format(q) for q in queries]).T

    return classify
