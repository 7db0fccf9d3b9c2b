"""Class vocabularies (label index → class name), CLIP prompt templates, and THE function that turns a
vocabulary's classes into CLIP text embeddings (:func:`class_text_embeddings`: prompt names × templates, averaged
per class). Training (FMbSeg Stage 1, ``TextClasses``) and evaluation (``Evaluate``: fmbseg, use_sam) all
call it, so a class is prompted with the same texts everywhere.

Vocabulary file format (``pipeline/core/data/vocab/<name>.txt`` or any custom path), UTF-8, one class per line:
- the line's position among non-comment lines is the class's label value (0-based), as in the dataset's GT;
- ``name`` alone prompts CLIP with the name; ``name | prompt name | other prompt name`` keeps ``name`` as the
  class name (what artifacts store) and prompts CLIP with the names after ``|`` (their embeddings are averaged),
  e.g. ``diningtable | dining table``;
- blank lines and lines starting with ``#`` are ignored. At most 255 classes (label maps are uint8, 255 =
  unlabelled).

Built-ins (class names and order as the datasets' evaluation label ids): voc20, voc21 (background = 0), context59,
coco_stuff171, coco_object80, ade150, cityscapes19.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB_DIR = Path(__file__).parent / "data" / "vocab"
BUILTIN_VOCABULARIES = ("voc20", "voc21", "context59", "coco_stuff171", "coco_object80", "ade150", "cityscapes19")
UNLABELLED = 255
MAX_CLASSES = 255

# CLIP's single prompt, and the 80 ImageNet prompt templates of CLIP's zero-shot notebook (Radford et al. 2021),
# whose embeddings are averaged per class ("prompt ensembling").
SINGLE_TEMPLATE = ("a photo of a {}.",)
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
TEMPLATE_SETS = {"single": SINGLE_TEMPLATE, "imagenet80": IMAGENET_TEMPLATES}


class VocabularyError(ValueError):
    """A vocabulary spec or file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Vocabulary:
    """classes[i] is the name of label value i; prompts[i] the names CLIP is prompted with for it."""

    name: str
    classes: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int | None:
        """Label value of a class given by its name or one of its prompt names (case-insensitive), else None."""
        low = name.strip().lower()
        for i, (cls, names) in enumerate(zip(self.classes, self.prompts, strict=True)):
            if low == cls.lower() or low in (n.lower() for n in names):
                return i
        return None

    @property
    def digest(self) -> str:
        """Content hash (names + prompts): part of stage hashes, so editing a custom file reruns the stages."""
        body = "\n".join(f"{c}|{'|'.join(p)}" for c, p in zip(self.classes, self.prompts, strict=True))
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def texts(self, templates: Sequence[str]) -> tuple[list[str], list[int]]:
        """Every prompt text (template × prompt name) and the class index it belongs to, in class order."""
        texts, owner = [], []
        for i, names in enumerate(self.prompts):
            for n in names:
                for t in templates:
                    texts.append(t.format(n))
                    owner.append(i)
        return texts, owner

    def select(self, names: Sequence[str], name: str | None = None) -> Vocabulary:
        """The vocabulary of `names` in that order (each a class name or one of its prompt names, see
        :meth:`index`), with their prompt names; a name this vocabulary lacks raises VocabularyError."""
        idx = []
        for n in names:
            i = self.index(n)
            if i is None:
                raise VocabularyError(f"{self.name}: no class or prompt name {n!r}")
            idx.append(i)
        return Vocabulary(name=name or self.name, classes=tuple(self.classes[i] for i in idx),
                          prompts=tuple(self.prompts[i] for i in idx))

    def __add__(self, other: Vocabulary) -> Vocabulary:
        """This vocabulary's classes, then `other`'s (class names must stay distinct)."""
        clash = sorted(set(self.classes) & set(other.classes))
        if clash:
            raise VocabularyError(f"{self.name} + {other.name}: duplicate class names {clash}")
        return Vocabulary(name=f"{self.name}+{other.name}", classes=self.classes + other.classes,
                          prompts=self.prompts + other.prompts)


def class_text_embeddings(clip, vocab: Vocabulary, templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """float32 ``[K, D]``: per class the mean of its (prompt name × template) text embeddings
    (:meth:`Vocabulary.texts`, sent to ``clip.encode_text`` in that order, `batch_size` at a time), L2-normalised.
    The one way class texts reach CLIP: FMbSeg Stage 1, TextClasses (training) and Evaluate use it."""
    texts, owner = vocab.texts(tuple(templates))
    if not texts:
        raise VocabularyError(f"{vocab.name}: no prompt text (empty vocabulary or template set)")
    chunks = [np.asarray(clip.encode_text(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
    emb = np.concatenate(chunks).astype(np.float32)
    out = np.zeros((len(vocab), emb.shape[1]), np.float32)
    np.add.at(out, np.asarray(owner), emb)
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def parse_vocabulary(text: str, name: str) -> Vocabulary:
    """Vocabulary from the file format described in the module docstring."""
    classes, prompts = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        if not parts[0] or any(not p for p in parts[1:]):
            raise VocabularyError(f"{name}: empty class or prompt name in line {raw!r}")
        classes.append(parts[0])
        prompts.append(tuple(parts[1:]) or (parts[0],))
    if not classes:
        raise VocabularyError(f"{name}: no classes")
    if len(classes) > MAX_CLASSES:
        raise VocabularyError(f"{name}: {len(classes)} classes, at most {MAX_CLASSES} fit a uint8 label map")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise VocabularyError(f"{name}: duplicate class names {dupes}")
    return Vocabulary(name=name, classes=tuple(classes), prompts=tuple(prompts))


def load_vocabulary(spec: str) -> Vocabulary:
    """A built-in name (see BUILTIN_VOCABULARIES) or the path of a vocabulary text file."""
    spec = spec.strip()
    if spec in BUILTIN_VOCABULARIES:
        return parse_vocabulary((VOCAB_DIR / f"{spec}.txt").read_text(encoding="utf-8"), spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise VocabularyError(
            f"vocabulary {spec!r} is neither a built-in ({', '.join(BUILTIN_VOCABULARIES)}) nor a readable file"
        )
    return parse_vocabulary(path.read_text(encoding="utf-8"), path.stem)


def vocabulary_digest(spec: str) -> str:
    """How a vocabulary setting (a built-in name or a path) enters a stage hash: the vocabulary's name (written into
    the artifacts) and the digest of its classes and prompt names, so editing a custom file renames the stage folder
    and moving it does not; "" (= "another setting's vocabulary") stays ""."""
    if not spec.strip():
        return ""
    vocab = load_vocabulary(spec)
    return f"{vocab.name}:{vocab.digest}"


def load_templates(name: str) -> tuple[str, ...]:
    """'single' → ("a photo of a {}.",); 'imagenet80' → CLIP's 80 ImageNet templates."""
    try:
        return TEMPLATE_SETS[name.strip()]
    except KeyError:
        raise VocabularyError(f"unknown template set {name!r}; known: {sorted(TEMPLATE_SETS)}") from None
