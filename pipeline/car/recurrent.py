"""CLIP as RNN (CaR, car-paper §3, Algorithm 1): training-free segmentation by recurrently dropping text queries
whose visually-prompted mask proposal CLIP does not confirm; then dense-CRF post-processing and an optional SAM
ensemble by Intersection-over-Minimum. Where the paper is silent or differs, this follows CaR's official code
(google-research `clip_as_rnn`: `modeling/model/car.py`, `clipcam.py`, `clip_wrapper.py`, `crf.py`, `configs/`),
which produced the paper's tables; the README's fidelity table lists each such choice.

Pure logic: the two CLIP roles come in as callables, so real models, tiny models and oracles fit alike.
- ``cam(image, query_texts, background_texts) -> float [N, H, W]`` in [0, 1]: the mask proposal generator f
  (Grad-CAM over CLIP ViT-B/16, CLIP-ES class-aware affinity with λ), one map per query text, the background texts
  sharing the softmax (they suppress activations of texts absent from the image) — see :func:`clip_cam`. The loop
  formats the texts (templates below).
- ``classify(images uint8 [N, H, W, 3], queries) -> float [N, N_q]``: the mask classifier g (CLIP ViT-L/14), the
  normalised similarity matrix P_t (each row sums to 1 over the queries) — see :func:`clip_classifier`.
Arrays: image uint8 RGB ``[H, W, 3]``; masks/maps ``[N, H, W]`` (rows, columns) in the image's frame.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pseudoseg.pipeline.eval.metrics import IGNORE

CamFn = Callable[[np.ndarray, Sequence[str], Sequence[str]], np.ndarray]
ClassifyFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]
VISUAL_PROMPTS = ("circle", "rectangle", "contour", "blur", "gray", "black")
CAM_METHODS = ("gradcam", "clip_es")

# Official code: every background query, and every query from the second step on, is prompted to the CAM CLIP as
# "a clean origami {}." (car.py `cam_text_template`, clipcam.py); the first step sees the bare query names.
CAM_TEMPLATE = "a clean origami {}."
# Official configs (voc/coco/pascal_context.yaml `semantic_templates`): g scores every prompted image against each
# template separately; the per-template softmaxes are summed, then softmaxed again (clip_wrapper.forward_clip).
CLASSIFIER_TEMPLATES = (
    "a clean origami {}.", "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene",
    "There is the {} in the scene", "a photo of a {} in the scene", "a photo of a small {}.",
    "a photo of a medium {}.", "a photo of a large {}.", "This is a photo of a small {}.",
    "This is a photo of a medium {}.", "This is a photo of a large {}.", "There is a small {} in the scene.",
    "There is a medium {} in the scene.", "There is a large {} in the scene.",
)
# Official configs' `bg_cls` (the same 23 queries for VOC, COCO and Pascal Context). car-paper App. D prints longer
# per-group lists (its Table 6 ablation); the released configs, which produced Table 1, use these.
BACKGROUND_QUERIES = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley", "bridge",
)
# Pascal Context's "stuff" classes (official data/context.py PASCAL_CONTEXT_STUFF_CLASS_ID, as context59 names):
# car-paper App. E's mutual background — stuff and things are segmented in two passes, each with the other group
# as its background queries.
CONTEXT_STUFF = (
    "bedclothes", "ceiling", "cloth", "curtain", "door", "fence", "floor", "grass", "ground", "light", "mountain",
    "platform", "road", "rock", "sidewalk", "sky", "snow", "wall", "water", "window", "wood",
)
# ADE20K-150's stuff classes (official data/ade.py ADE_STUFF_CLASS_ID, as ade150 names).
ADE_STUFF = (
    "apparel", "bridge", "ceiling", "dirt track", "earth", "field", "floor", "flower", "grass", "hill", "lake",
    "land", "mountain", "path", "plant", "river", "road", "sand", "sea", "sky", "skyscraper", "tree", "wall",
    "water", "waterfall",
)
# The official code's query text for class names that differ from the dataset's own: data/voc.py VOC_CLASSES,
# data/context.py PASCAL_CONTEXT_CLASSES, data/coco.py COCO_OBJECT_CLASSES (for coco_object80's / COCO-Stuff's 80
# thing names; its typo "sknowboard" included) and data/ade.py ADE_CLASSES (ADE20K's comma-joined WordNet synonym
# lists, as written there); other classes are queried by their dataset name.
OFFICIAL_QUERY_NAMES = {
    "voc": {"bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
            "tvmonitor": "tvmonitor screen"},
    "context": {"aeroplane": "airplane", "pottedplant": "plant", "tvmonitor": "monitor"},
    "coco": {"person": "person with clothes,people,human", "motorcycle": "motorbike", "airplane": "aeroplane",
             "bird": "bird avian", "backpack": "backpack,bag", "umbrella": "umbrella,parasol",
             "handbag": "handbag,purse", "tie": "necktie", "snowboard": "sknowboard", "baseball glove": "glove",
             "spoon": "dessertspoon", "chair": "chair seat", "couch": "sofa", "potted plant": "pottedplant",
             "dining table": "diningtable", "tv": "tvmonitor screen", "remote": "remote control",
             "hair drier": "hairdrier,blowdrier"},
    "ade": {
        "building": "building, edifice", "floor": "floor, flooring", "road": "road, route",
        "windowpane": "windowpane, window", "sidewalk": "sidewalk, pavement",
        "person": "person, individual, someone, somebody, mortal, soul", "earth": "earth, ground",
        "door": "door, double, door", "mountain": "mountain, mount", "plant": "plant, flora, plant, life",
        "curtain": "curtain, drape, drapery, mantle, pall", "car": "car, auto, automobile, machine, motorcar",
        "painting": "painting, picture", "sofa": "sofa, couch, lounge", "rug": "rug, carpet, carpeting",
        "fence": "fence, fencing", "rock": "rock, stone", "wardrobe": "wardrobe, closet, press",
        "bathtub": "bathtub, bathing, tub, bath, tub", "railing": "railing, rail",
        "base": "base, pedestal, stand", "column": "column, pillar", "signboard": "signboard, sign",
        "chest of drawers": "chest, of, drawers, chest, bureau, dresser",
        "fireplace": "fireplace, hearth, open, fireplace", "refrigerator": "refrigerator, icebox",
        "grandstand": "grandstand, covered, stand", "stairs": "stairs, steps",
        "case": "case, display, case, showcase, vitrine",
        "pool table": "pool, table, billiard, table, snooker, table", "screen door": "screen, door, screen",
        "stairway": "stairway, staircase", "bridge": "bridge, span", "blind": "blind, screen",
        "coffee table": "coffee, table, cocktail, table",
        "toilet": "toilet, can, commode, crapper, pot, potty, stool, throne",
        "stove": "stove, kitchen, stove, range, kitchen, range, cooking, stove", "palm": "palm, palm, tree",
        "kitchen island": "kitchen, island",
        "computer": "computer, computing, machine, computing, device, data, processor, electronic, computer, "
        "information, processing, system",
        "swivel chair": "swivel, chair", "arcade machine": "arcade, machine",
        "hovel": "hovel, hut, hutch, shack, shanty",
        "bus": "bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, "
        "passenger, vehicle",
        "light": "light, light, source", "truck": "truck, motortruck",
        "chandelier": "chandelier, pendant, pendent", "awning": "awning, sunshade, sunblind",
        "streetlight": "streetlight, street, lamp", "booth": "booth, cubicle, stall, kiosk",
        "television receiver": "television, television, receiver, television, set, tv, tv, set, idiot, box, "
        "boob, tube, telly, goggle, box",
        "airplane": "airplane, aeroplane, plane", "dirt track": "dirt, track",
        "apparel": "apparel, wearing, apparel, dress, clothes", "land": "land, ground, soil",
        "bannister": "bannister, banister, balustrade, balusters, handrail",
        "escalator": "escalator, moving, staircase, moving, stairway",
        "ottoman": "ottoman, pouf, pouffe, puff, hassock", "buffet": "buffet, counter, sideboard",
        "poster": "poster, posting, placard, notice, bill, card",
        "conveyer belt": "conveyer, belt, conveyor, belt, conveyer, conveyor, transporter",
        "washer": "washer, automatic, washer, washing, machine", "plaything": "plaything, toy",
        "swimming pool": "swimming, pool, swimming, bath, natatorium", "barrel": "barrel, cask",
        "basket": "basket, handbasket", "waterfall": "waterfall, falls", "tent": "tent, collapsible, shelter",
        "minibike": "minibike, motorbike", "food": "food, solid, food", "step": "step, stair",
        "tank": "tank, storage, tank", "trade name": "trade, name, brand, name, brand, marque",
        "microwave": "microwave, microwave, oven", "pot": "pot, flowerpot",
        "animal": "animal, animate, being, beast, brute, creature, fauna",
        "bicycle": "bicycle, bike, wheel, cycle", "dishwasher": "dishwasher, dish, washer, dishwashing, machine",
        "screen": "screen, silver, screen, projection, screen", "blanket": "blanket, cover",
        "hood": "hood, exhaust, hood", "traffic light": "traffic, light, traffic, signal, stoplight",
        "ashcan": "ashcan, trash, can, garbage, can, wastebin, ash, bin, ash-bin, ashbin, dustbin, trash, "
        "barrel, trash, bin",
        "pier": "pier, wharf, wharfage, dock", "crt screen": "crt, screen",
        "monitor": "monitor, monitoring, device", "bulletin board": "bulletin, board, notice, board",
        "glass": "glass, drinking, glass",
    },
}
# What the dense CRF's bilateral kernel sees (`[car] crf_image`): "official" = what the official PostProcess passes,
# the photo as BGR minus the Caffe mean (104.008, 116.669, 122.675), cast to uint8 (see :func:`crf_image`); "rgb" =
# the photo itself.
CRF_IMAGES = ("official", "rgb")
CRF_MEAN_BGR = (104.008, 116.669, 122.675)


@dataclass(frozen=True)
class CarParams:
    """One CaR configuration (all of it enters the output hash).

    eta: binarisation threshold of the proposals for the visual prompts (official `mask_threshold`); theta: a
    query survives a step when its diagonal score P_ii > theta (official `confidence_threshold`; the paper's
    Eq. 6 writes ≥); lam: CLIP-ES box threshold λ (`clipes_threshold`); cam: "clip_es" (Grad-CAM + class-aware
    affinity, the reported setting) or "gradcam"; prompts: visual prompts of the queries; background: background
    queries of f; cam_template / raw_first_step: CAM texts (see CAM_TEMPLATE); classifier_templates: g's template
    ensemble; classifier_skip_last_block: g's image embedding is the CLS after all but the last vision block (the
    official wrapper); bg_factor: the CRF's background score is (1 - max_q proposal_q)^bg_factor; crf: dense-CRF
    refinement (always on in the official code); crf_image: what the CRF's bilateral kernel sees (CRF_IMAGES;
    "official" = the official PostProcess's wrapped mean-subtracted BGR copy, see :func:`crf_image`); stuff /
    stuff_prompts: class names segmented in a second pass with the other classes as background queries (mutual
    background, Pascal Context, ADE) and their visual prompts; drop_background_queries: leave background queries
    equal to a query out of f's softmax (False in the official code and on the official benchmarks; the CaR label
    source sets it, see pipeline.car.params); max_steps: a safety cap only — the official loop has none, and
    every step that does not end it drops a query, so it ends within len(queries) + 1 steps; a run that reaches
    the cap is logged and marked (:class:`CarResult` ``capped``); phi_iom / phi_iou: SAM ensemble thresholds
    (car-paper §4: 0.7 for all datasets)."""

    eta: float = 0.4
    theta: float = 0.6
    lam: float = 0.4
    cam: str = "clip_es"
    prompts: tuple[str, ...] = ("circle", "blur")
    background: tuple[str, ...] = BACKGROUND_QUERIES
    cam_template: str = CAM_TEMPLATE
    raw_first_step: bool = True
    classifier_templates: tuple[str, ...] = CLASSIFIER_TEMPLATES
    classifier_skip_last_block: bool = True
    bg_factor: float = 1.0
    crf: bool = True
    crf_image: str = "official"
    stuff: tuple[str, ...] = ()
    stuff_prompts: tuple[str, ...] = ("blur", "gray")
    drop_background_queries: bool = False
    max_steps: int = 1000
    phi_iom: float = 0.7
    phi_iou: float = 0.7


# Official configs (configs/voc.yaml, coco.yaml, pascal_context.yaml, ade_150.yaml) for the semantic benchmarks
# (ADE's queries are ade150's names, not the official comma-joined WordNet synonym lists); car-paper App. F
# for referring segmentation (prompts circle + blur). The paper's §4 prints θ = 0.2 for Pascal Context; the
# released config uses 0.25.
CAR_DEFAULTS: dict[str, CarParams] = {
    "voc": CarParams(eta=0.4, theta=0.6, lam=0.4, prompts=("circle", "blur")),
    "coco": CarParams(eta=0.5, theta=0.3, lam=0.5, prompts=("blur", "gray")),
    "context": CarParams(eta=0.6, theta=0.25, lam=0.4, prompts=("blur", "circle"), stuff=CONTEXT_STUFF,
                         stuff_prompts=("blur", "gray")),
    "ade": CarParams(eta=0.6, theta=0.25, lam=0.7, prompts=("gray", "blur"), stuff=ADE_STUFF,
                     stuff_prompts=("gray", "blur")),
    "refcoco": CarParams(eta=0.5, theta=0.3, lam=0.5),
    "refcoco+": CarParams(eta=0.2, theta=0.1, lam=0.5),
    "refcocog": CarParams(eta=0.5, theta=0.1, lam=0.6),
}
DATASET_FAMILY = {"voc20": "voc", "voc21": "voc", "coco_object": "coco", "coco_object80": "coco",
                  "coco_stuff171": "coco", "context59": "context", "context60": "context", "ade150": "ade"}


def car_family(dataset: str) -> str:
    """The CAR_DEFAULTS key of a benchmark or vocabulary name (pipeline.eval.benchmarks) or a family; names starting
    coco / context / ade map to their family, anything else (cityscapes19, custom vocabularies) to VOC's."""
    if dataset in CAR_DEFAULTS:
        return dataset
    if dataset in DATASET_FAMILY:
        return DATASET_FAMILY[dataset]
    for family in ("coco", "context", "ade"):
        if dataset.startswith(family):
            return family
    return "voc"


def car_params(dataset: str) -> CarParams:
    """Defaults for an evaluation dataset name or family (see :func:`car_family`)."""
    return CAR_DEFAULTS[car_family(dataset)]


def official_query_name(family: str, class_name: str, default: str | None = None) -> str:
    """The text CaR's official code queries for `class_name` on a `family` benchmark, else `default` (or the name)."""
    return OFFICIAL_QUERY_NAMES.get(family, {}).get(class_name, default if default is not None else class_name)


# ----------------------------------------------------------------------------------------------------- prompts
def _mask_center_extent(mask: np.ndarray) -> tuple[tuple[int, int], int, int] | None:
    """((cx, cy), width, height) of a bool [H, W] mask as the official code's `mask2chw`: the centre is the
    truncated MEAN pixel position (x = column), the extents count pixels (max - min + 1). None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return (int(np.mean(xs)), int(np.mean(ys))), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def apply_visual_prompts(image: np.ndarray, mask: np.ndarray, prompts: Sequence[str] = ("circle", "blur"), *,
                         color: tuple[int, int, int] = (255, 0, 0), thickness: int = 1,
                         blur_kernel: tuple[int, int] = (15, 15)) -> np.ndarray:
    """car-paper Algorithm B / official `apply_visual_prompts`: image uint8 RGB [H, W, 3] + bool mask [H, W] →
    prompted uint8 [H, W, 3].

    Region prompts first (blur / gray / black: outside the mask is blurred, greyed or blacked out), then the drawn
    ones in `color`, 1 px wide: circle = ellipse centred on the mask's mean pixel with half its extents as axes,
    rectangle = that centre ± half the extents, contour = the outline of the hole-filled mask. "gray" converts
    with OpenCV's BGR weights on the RGB array, as the official code does. An empty mask leaves drawn prompts out
    and blacks/blurs/greys everything.
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
        gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY)[..., None].repeat(3, axis=2)
        img = np.where(keep, img, gray)
    if "black" in prompts:
        img = np.where(keep, img, 0).astype(np.uint8)
    img = np.ascontiguousarray(img)
    extent = _mask_center_extent(m)
    if extent is not None:
        (cx, cy), w, h = extent
        if "circle" in prompts:
            cv2.ellipse(img, (cx, cy), (w // 2, h // 2), 0, 0, 360, color, thickness)
        if "rectangle" in prompts:
            cv2.rectangle(img, (cx - w // 2, cy - h // 2), (cx + w // 2, cy + h // 2), color, thickness)
        if "contour" in prompts:
            from scipy.ndimage import binary_fill_holes

            filled = binary_fill_holes(m).astype(np.uint8)
            contours, _ = cv2.findContours(filled, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(img, contours, -1, color, thickness)
    return img


def prompt_image(image: np.ndarray, proposal: np.ndarray, eta: float, prompts: Sequence[str]) -> np.ndarray:
    """The classifier's input for one proposal (official `CaR.apply_visual_prompts`): a proposal whose soft
    values sum to at most 1 leaves the image unprompted; otherwise the prompts of `proposal > eta`."""
    if float(np.sum(proposal)) <= 1:
        return np.ascontiguousarray(image, np.uint8).copy()
    return apply_visual_prompts(image, np.asarray(proposal) > eta, prompts)


# ----------------------------------------------------------------------------------------------------- loop
@dataclass(frozen=True)
class CarStep:
    """One recurrence step: the queries h_{t-1} it scored and their diagonal scores P_t^{ii}."""

    queries: tuple[str, ...]
    scores: np.ndarray


@dataclass(frozen=True)
class CarResult:
    """queries: h_T (kept); proposals float [len(queries), H, W] from the final step; steps: the history; capped:
    the loop stopped at ``CarParams.max_steps`` instead of converging (never expected: see CarParams)."""

    queries: tuple[str, ...]
    proposals: np.ndarray
    steps: tuple[CarStep, ...]
    capped: bool = False


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(x, np.float64)
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def car_loop(image: np.ndarray, queries: Sequence[str], cam: CamFn, classify: ClassifyFn,
             params: CarParams = CarParams()) -> CarResult:
    """Algorithm 1 as the official `CaR._forward_car`: repeat { proposals = cam(image, h, background);
    prompted_i = v(image, proposals_i > eta); P = classify(prompted, h); keep h_i with P_ii > theta — or, when none
    passes, the best one (a query set never empties) } until a step keeps every query it scored (the number of
    kept queries no longer changes; the first step never ends the loop, so the final proposals always come from
    CAM texts with the `cam_template`). A later step whose proposals are all zero keeps the previous step's
    proposals of its queries (official: `mask_proposals = prev_mask_proposals`; the official reuses the whole
    previous stack, pairing its first rows with the kept queries by position, and at the first step it has none
    and crashes later — here the rows of the same queries are kept, and a first step keeps its zero maps).

    All background queries enter f's softmax, also one equal to a query (the official code: Pascal Context's
    "building" and "tree" are both); with ``params.drop_background_queries`` those are left out (the CaR label
    source's setting, for vocabularies such as COCO-Stuff whose classes include "grass" or "sky"). Returns the
    kept queries with the proposals of the final step.
    """
    image = np.asarray(image, np.uint8)
    h = tuple(dict.fromkeys(queries))  # unique, order kept
    background = [q for q in params.background if not (params.drop_background_queries and q in h)]
    bg_texts = [params.cam_template.format(q) for q in background]
    steps: list[CarStep] = []
    if not h:
        return CarResult((), np.zeros((0, *image.shape[:2]), np.float32), ())
    previous = None
    for step in range(params.max_steps):
        template = "{}" if step == 0 and params.raw_first_step else params.cam_template
        proposals = np.asarray(cam(image, [template.format(q) for q in h], bg_texts), np.float32)
        if proposals.shape != (len(h), *image.shape[:2]):
            raise ValueError(f"cam returned {proposals.shape}, expected {(len(h), *image.shape[:2])}")
        prompted = np.stack([prompt_image(image, p, params.eta, params.prompts) for p in proposals])
        scores = np.asarray(classify(prompted, list(h)), np.float64)
        diag = np.diagonal(scores).astype(np.float32)
        steps.append(CarStep(h, diag))
        if previous is not None and float(proposals.max(initial=0.0)) == 0.0:
            proposals = previous  # every map is zero: the previous step's proposals of these queries
        keep = diag > np.float32(params.theta)  # compared in float32, as the official torch scores
        if not keep.any():
            keep[int(np.argmax(diag))] = True
        if step > 0 and keep.all():
            return CarResult(h, proposals, tuple(steps))
        h = tuple(q for q, k in zip(h, keep, strict=True) if k)
        proposals = previous = proposals[keep]
    logging.getLogger(__name__).warning(
        "CaR stopped at its safety cap of %d steps with %d queries left (the loop had not converged)",
        params.max_steps, len(h))
    return CarResult(h, proposals, tuple(steps), capped=True)


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
    """bool [h, w]: CLIP-ES's box mask B_c as the official `scoremap2bbox` + `aff_mask` compute it. The CAM in
    [0, 1] is quantised to uint8 (·255, truncated); pixels strictly above int(lam · its max) form regions; each
    region's bounding rectangle (x, y, w, h) fills rows y .. min(y + h, H - 1) - 1 and columns
    x .. min(x + w, W - 1) - 1 (end-exclusive and clipped one short of the border, as the official code).
    An all-zero CAM gives no box."""
    quantised = (np.asarray(cam, np.float32) * 255).astype(np.uint8)
    out = np.zeros(quantised.shape, bool)
    top = int(quantised.max()) if quantised.size else 0
    if top == 0:
        return out
    binary = np.where(quantised > int(lam * top), 255, 0).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    height, width = quantised.shape
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        out[y : min(y + h, height - 1), x : min(x + w, width - 1)] = True
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


def crf_image(image: np.ndarray, mode: str) -> np.ndarray:
    """The uint8 [H, W, 3] image the CRF's bilateral kernel sees (`CarParams.crf_image`, one of CRF_IMAGES).

    "official": what CaR's official `PostProcess` passes — the RGB photo as float32, channels reversed to BGR,
    minus the Caffe mean CRF_MEAN_BGR, then `astype(np.uint8)`. Values below the mean are negative and wrap: on
    x86 (where the published numbers were made) the cast truncates toward zero and keeps the low 8 bits, so -0.6
    → 0, -1.5 → 255 and -104.008 → 152; other platforms may saturate. That x86 result is written out here
    (truncate, then modulo 256), so it does not depend on the machine. "rgb": the photo itself."""
    if mode not in CRF_IMAGES:
        raise ValueError(f"crf_image must be one of {CRF_IMAGES}, got {mode!r}")
    rgb = np.ascontiguousarray(image, np.uint8)
    if mode == "rgb":
        return rgb
    shifted = rgb[..., ::-1].astype(np.float32) - np.asarray(CRF_MEAN_BGR, np.float32)
    return np.ascontiguousarray(np.mod(np.trunc(shifted).astype(np.int64), 256).astype(np.uint8))


def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = 10, *, pos_xy: float = 1.0,
              pos_w: float = 3.0, bi_xy: float = 67.0, bi_rgb: float = 3.0, bi_w: float = 4.0) -> np.ndarray:
    """Fully connected CRF (Krähenbühl & Koltun 2011) on class scores float [C, H, W] in (0, 1] (unaries -log of
    the scores, clipped at 1e-5: `unary_from_softmax`; normalising per pixel would not change the result) →
    refined probabilities float32 [C, H, W]. Kernels as CaR's official `PostProcess` (CLIP-ES's / DeepLab's):
    Gaussian sxy=1 w=3, bilateral sxy=67 srgb=3 w=4, 10 iterations. `image` uint8 [H, W, 3] is what the
    bilateral kernel compares, as given (:func:`crf_image` makes the official one). Needs the optional
    `pydensecrf2` package (extra "crf")."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise ImportError("dense CRF needs the optional package pydensecrf2 (pip install 'pseudoseg[crf]'); "
                          "or run CaR with crf=False") from e
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.asarray(probs, np.float32))))
    d.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    d.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=np.array(image, np.uint8, order="C"), compat=bi_w)
    return np.asarray(d.inference(iterations), np.float32).reshape(c, h, w)


def proposals_to_labels(image: np.ndarray, proposals: np.ndarray, *, crf: bool, background: bool,
                        bg_factor: float = 1.0, crf_image_mode: str = CRF_IMAGES[0]) -> np.ndarray:
    """Final proposals float [N, H, W] in [0, 1] → label map int64 [H, W] over their index 0..N-1, -1 where the
    background wins (official `PostProcess`): the background score is (1 - max_q proposal_q)^bg_factor, and with
    crf the unnormalised [background, proposals] scores are the dense CRF's softmax unaries (-log, clipped at 1e-5)
    over :func:`crf_image` (`crf_image_mode`) of the image. background False: no background label, argmax over the
    proposals only (not what CaR runs: the official code always has the background channel).
    """
    n, h, w = proposals.shape
    if n == 0:
        return np.full((h, w), -1, np.int64)
    scores = np.clip(np.asarray(proposals, np.float32), 0.0, None)
    if background:
        bg = np.power(1.0 - scores.max(0, keepdims=True), bg_factor)
        scores = np.concatenate([bg, scores])
    if crf:
        scores = dense_crf(crf_image(image, crf_image_mode), scores)
    label = scores.argmax(0)
    return label - 1 if background else label


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


def masks_to_label_map(masks: np.ndarray, labels: Sequence[int], scores: Sequence[float], fill: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """bool [N, H, W] + label value and score per mask → uint8 [H, W], painted in ascending score order so the
    most confident mask ends on top (official evaluate.py `assign_label`); uncovered pixels keep `out`'s values
    (a fresh map of `fill` when None)."""
    masks = np.asarray(masks, bool)
    label = np.full(masks.shape[1:], fill, np.uint8) if out is None else out
    for i in np.argsort(np.asarray(scores, np.float64), kind="stable") if len(masks) else []:
        label[masks[i]] = labels[i]
    return label


class CaRMethod:
    """The `pipeline.eval.methods.SegmentationMethod` interface around :func:`car_loop` + post-processing.

    Queries are the classes' query texts (`query_names(class name)`; without "background" when class_names[0] is
    "background"). The CRF always has the background channel, as the official PostProcess: the pixels the
    background wins (and those no kept mask covers) are label 0 when class_names[0] is "background", else 255 =
    no class (official evaluate.py: assign_label leaves them 0 and `ignore_background` drops predicted background
    from the score; pipeline.eval's "ignored" unlabelled rule). With `params.stuff`, those classes run in a second
    loop whose background queries are the other classes' (mutual background, car-paper App. E); stuff masks are
    painted first, things on top, each pass in ascending score order. sam: optional `Segmenter` role for the SAM
    ensemble (its automatic masks).
    class_scores: per class the LOWEST diagonal score P_ii over the steps that scored it (0 if never queried), so
    a score > θ means the query passed every step — a query kept only because none passed (the set never empties;
    alone, its later scores are a softmax over one query, i.e. 1) stays at its sub-θ score.
    """

    def __init__(self, cam: CamFn, classify: ClassifyFn, params: CarParams = CarParams(), *, sam=None,
                 query_names: Callable[[str], str] | None = None) -> None:
        self.cam, self.classify, self.params, self.sam = cam, classify, params, sam
        self.query_names = query_names or (lambda n: n)
        if params.crf and not crf_available():
            raise ImportError("CaR with crf=True needs pydensecrf2 (pip install 'pseudoseg[crf]'); "
                              "pass CarParams(crf=False) to run without CRF refinement")

    def _pass(self, image, queries, params, background):
        """One CaR loop + post-processing → (result, bool masks [K, H, W], score per kept query)."""
        result = car_loop(image, queries, self.cam, self.classify, params)
        label = proposals_to_labels(image, result.proposals, crf=params.crf, background=background,
                                    bg_factor=params.bg_factor, crf_image_mode=params.crf_image)
        masks = np.stack([label == i for i in range(len(result.queries))]) if result.queries else \
            np.zeros((0, *label.shape), bool)
        last = dict(zip(result.steps[-1].queries, result.steps[-1].scores, strict=True)) if result.steps else {}
        return result, masks, [float(last[q]) for q in result.queries]

    def segment(self, image, class_names, *, image_id=None):
        names = list(class_names)
        has_bg = bool(names) and names[0].lower() == "background"
        first = 1 if has_bg else 0
        queries = [self.query_names(n) for n in names[first:]]
        index = {q: first + i for i, q in enumerate(queries)}
        stuff = {self.query_names(n) for n in self.params.stuff}
        things = [q for q in queries if q not in stuff]
        stuff_queries = [q for q in queries if q in stuff]
        passes = [(things, self.params)]
        if stuff_queries:
            passes.insert(0, (stuff_queries, dataclasses.replace(self.params, prompts=self.params.stuff_prompts,
                                                                 background=tuple(things))))
        background = True  # the official PostProcess always adds the background channel, whatever the benchmark
        label = np.full(np.asarray(image).shape[:2], 0 if has_bg else IGNORE, np.uint8)
        scores = np.zeros(len(names), np.float32)
        sam_masks = None
        for group, params in passes:
            result, masks, kept_scores = self._pass(image, group, params, background)
            seen: dict[str, float] = {}
            for step in result.steps:
                for q, s in zip(step.queries, step.scores, strict=True):
                    seen[q] = min(seen.get(q, 1.0), float(s))
            for q, s in seen.items():
                scores[index[q]] = s
            if self.sam is not None and len(result.queries):
                if sam_masks is None:
                    sam_masks = [r["segmentation"] for r in self.sam.automatic_masks(image)]
                masks = sam_ensemble(masks, sam_masks, params.phi_iom, params.phi_iou)
            label = masks_to_label_map(masks, [index[q] for q in result.queries], kept_scores, 0, out=label)
        return label, scores


# ----------------------------------------------------------------------------------------------------- CLIP roles
def clip_cam(clip, *, method: str = "clip_es", lam: float = 0.4, attention_layers: int = 8) -> CamFn:
    """CamFn over a CLIP adapter (`patch_size`, `encode_text`, `gradcam`; f = ViT-B/16 in the paper) as the
    official `CLIPCAM`: the image is resized (bicubic) to its own size rounded UP to patch multiples (aspect kept,
    pipeline.core.transforms.patch_multiple_size), Grad-CAM maps on its patch grid with the background texts in the
    softmax — with "clip_es" refined by the class-aware affinity of the last `attention_layers` blocks' attention
    (:func:`affinity_refine`, box threshold λ = `lam`; car-paper App. B) — each min-max scaled and resized
    (bilinear) to the image. Background text embeddings are computed once per distinct list."""
    from pseudoseg.pipeline.core.transforms import patch_multiple_size, resize_bicubic_pil

    if method not in CAM_METHODS:
        raise ValueError(f"CAM method must be one of {CAM_METHODS}, got {method!r}")
    background_cache: dict[tuple[str, ...], np.ndarray] = {}

    def cam(image: np.ndarray, query_texts: Sequence[str], background_texts: Sequence[str]) -> np.ndarray:
        image = np.asarray(image, np.uint8)
        height, width = image.shape[:2]
        x = resize_bicubic_pil(image, patch_multiple_size((height, width), clip.patch_size))
        fg = clip.encode_text(list(query_texts))
        key = tuple(background_texts)
        if key and key not in background_cache:
            background_cache[key] = clip.encode_text(list(key))
        bg = background_cache.get(key)
        if method == "clip_es":
            maps, attention = clip.gradcam(x, fg, bg, attention_layers=attention_layers)
            maps = affinity_refine(maps, sinkhorn_affinity(attention), lam)
        else:
            maps = clip.gradcam(x, fg, bg)
        maps = np.asarray(maps, np.float32)
        return np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps]) \
            if len(maps) else np.zeros((0, height, width), np.float32)

    return cam


def clip_classifier(clip, templates: Sequence[str] = CLASSIFIER_TEMPLATES, *,
                    skip_last_block: bool = True) -> ClassifyFn:
    """ClassifyFn over a CLIP adapter (`image_size`, `logit_scale`, `encode_text`, `encode_image_car`; g = ViT-L/14
    in the paper) as the official `get_mask_confidence`: each prompted image through CLIP's own preprocess geometry
    (short side → S, centre crop; pipeline.core.transforms.clip_center_crop); for every template t,
    softmax_q(logit_scale · cos(image, text_t(q))); the per-template matrices are summed and softmaxed again over
    the queries. Returns P float64 [N, N_q], rows summing to 1. Text embeddings are cached per query."""
    from pseudoseg.pipeline.core.transforms import clip_center_crop

    text_cache: dict[str, np.ndarray] = {}

    def classify(images: np.ndarray, queries: Sequence[str]) -> np.ndarray:
        missing = [q for q in dict.fromkeys(queries) if q not in text_cache]
        if missing:
            emb = clip.encode_text([t.format(q) for q in missing for t in templates])
            for i, q in enumerate(missing):
                text_cache[q] = emb[i * len(templates) : (i + 1) * len(templates)]
        s = clip.image_size
        crops = np.stack([clip_center_crop(np.asarray(im, np.uint8), s) for im in images])
        image_emb = np.asarray(clip.encode_image_car(crops, skip_last_block=skip_last_block), np.float64)
        text = np.stack([text_cache[q] for q in queries], axis=1).astype(np.float64)  # [T, N_q, D]
        summed = sum(_softmax(clip.logit_scale * image_emb @ text[t].T, axis=1) for t in range(len(templates)))
        return _softmax(summed, axis=1)

    return classify
