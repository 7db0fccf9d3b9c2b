"""Model presets: which adapter answers each role, configured from luigi.cfg's `[models]` section.

Built-in presets:
- `real`: hub ids or local folders/checkpoints named by the settings (defaults: the papers' models);
- `tiny`: random-init small models of the same architectures, built once into `<cache_dir>/tiny-v1/<role>/`
  and loaded back by the very same `real` loaders (only the ids change).
Others (e.g. the tests' `oracle`) plug in with `register_preset(name, {role: factory})`, possibly from a module
listed in `[models] plugins`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pseudoseg.models.catalog import (
    DEFAULT_CAM_CLIP,
    DEFAULT_CAPTIONER,
    DEFAULT_CLASSIFIER_CLIP,
    DEFAULT_CLIP,
    DEFAULT_DINO,
    DEFAULT_FMBSEG_CLIP,
    DEFAULT_GROUNDER,
    SAM_ARCHS,
    SAM_CHECKPOINT_URLS,
    ModelUnavailableError,
)

__all__ = [
    "ROLES",
    "ModelSettings",
    "ModelUnavailableError",
    "load_role",
    "load_spacy",
    "register_preset",
    "registered_presets",
    "setting_problems",
]

ROLES = ("captioner", "grounder", "segmenter", "clip", "fmbseg_clip", "dense", "cam_clip", "classifier_clip")
Factory = Callable[["ModelSettings"], Any]


@dataclass(frozen=True)
class ModelSettings:
    """The `[models]` section of luigi.cfg, typed. Every field has a default; unknown keys are rejected."""

    preset: str = "tiny"  # "tiny" | "real" | any registered name (random tiny models until real ones are set)
    cache_dir: str = "~/.cache/pseudoseg/models"  # where tiny models are built (and SAM's checkpoint is looked for)
    device: str = "auto"  # "auto" → cuda if available else cpu
    captioner: str = DEFAULT_CAPTIONER
    clip: str = DEFAULT_CLIP  # USE's CLIP (ViT-L/14-336)
    fmbseg_clip: str = DEFAULT_FMBSEG_CLIP  # FMbSeg's CLIP (ViT-L/14): Stage 1 detection and the class texts
    cam_clip: str = DEFAULT_CAM_CLIP  # CaR's mask proposal generator f (car-paper §4: ViT-B/16)
    classifier_clip: str = DEFAULT_CLASSIFIER_CLIP  # CaR's mask classifier g (car-paper §4: ViT-L/14)
    dino: str = DEFAULT_DINO
    grounder: str = DEFAULT_GROUNDER
    grounder_backend: str = "transformers"  # "transformers" | "groundingdino"
    groundingdino_config: str = ""
    groundingdino_checkpoint: str = ""
    groundingdino_text_encoder: str = ""  # local BERT folder overriding the config's text_encoder_type
    sam_arch: str = "vit_h"
    sam_checkpoint: str = ""  # "" → <cache_dir>/<official file name of sam_arch>, e.g. sam_vit_h_4b8939.pth
    plugins: tuple[str, ...] = ()
    keep_loaded: int = 8  # adapters a process keeps for later shards (least recently used dropped); 0 = none

    @classmethod
    def from_mapping(cls, d: Mapping[str, str]) -> ModelSettings:
        """From a plain str→str mapping (e.g. `dict(luigi_config.items("models"))`); blank values keep defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown [models] keys {unknown}; known: {sorted(names)}")
        kw: dict[str, Any] = {k: str(v).strip() for k, v in d.items() if str(v).strip()}
        if "plugins" in kw:
            kw["plugins"] = tuple(p.strip() for p in kw["plugins"].split(",") if p.strip())
        if "keep_loaded" in kw:
            try:
                kw["keep_loaded"] = int(kw["keep_loaded"])
            except ValueError:
                kw["keep_loaded"] = -1
            if kw["keep_loaded"] < 0:
                raise ValueError(f"[models] keep_loaded must be an integer >= 0, got {d['keep_loaded']!r}")
        return cls(**kw)

    def content(self) -> dict[str, Any]:
        """The fields that say WHAT the models are (for stage hashes): where they run and how long a process keeps
        them (`RUNTIME_FIELDS`) are left out."""
        d = dataclasses.asdict(self)
        for name in RUNTIME_FIELDS:
            d.pop(name)
        return d

    def sam_checkpoint_path(self) -> str:
        if self.sam_checkpoint:
            return str(Path(self.sam_checkpoint).expanduser())
        url = SAM_CHECKPOINT_URLS.get(self.sam_arch, f"/sam_{self.sam_arch}.pth")
        return str(Path(self.cache_dir).expanduser() / url.rsplit("/", 1)[-1])


RUNTIME_FIELDS = ("device", "keep_loaded")


def model_identity(role: str, settings: ModelSettings) -> str:
    """What a model role is, for stage hashes: preset + id/path (device and cache location excluded)."""
    name = {
        "captioner": settings.captioner,
        "grounder": f"{settings.grounder_backend}:{settings.grounder}",
        "segmenter": f"{settings.sam_arch}:{Path(settings.sam_checkpoint_path()).name}",
        "clip": settings.clip,
        "fmbseg_clip": settings.fmbseg_clip,
        "cam_clip": settings.cam_clip,
        "classifier_clip": settings.classifier_clip,
        "dense": settings.dino,
    }[role]
    return f"{settings.preset}:{name}"


RANDOM_MODELS_NOTICE = ("Made with the tiny preset: random-init models, random by design, so these outputs show the "
                        "machinery, not quality; for real results set [models] preset = real and the model paths "
                        "(README: Real weights).")


def random_models_notice(settings: ModelSettings) -> str | None:
    """The one line every run, gallery, card and report of random models carries (None for real models)."""
    return RANDOM_MODELS_NOTICE if settings.preset == "tiny" else None


GROUNDER_BACKENDS = ("transformers", "groundingdino")


def setting_problems(d: Mapping[str, str]) -> list[tuple[str, str]]:
    """(key, what it accepts) for each value of a `[models]` mapping that cannot work, checked before a run.

    Unknown keys are `from_mapping`'s error. Plugin modules are imported here (as `load_role` would) so that
    the presets they register count as known."""
    def blank(key: str) -> bool:
        return not str(d.get(key, "")).strip()

    problems: list[tuple[str, str]] = []
    for module in (p.strip() for p in str(d.get("plugins", "")).split(",")):
        if module:
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 — any import failure is a bad setting
                problems.append(("plugins", f"a comma list of importable modules ({module}: {type(e).__name__}: {e})"))
    if not blank("preset") and d["preset"].strip() not in _PRESETS:
        problems.append(("preset", f"one of {' | '.join(registered_presets())} (others come from [models] plugins)"))
    if not blank("device") and d["device"].strip() != "auto":
        import torch

        try:
            torch.device(d["device"].strip())
        except (RuntimeError, ValueError):
            problems.append(("device", "auto or a torch device (cpu, cuda, cuda:N, mps)"))
    if not blank("grounder_backend") and d["grounder_backend"].strip() not in GROUNDER_BACKENDS:
        problems.append(("grounder_backend", f"one of {' | '.join(GROUNDER_BACKENDS)}"))
    if not blank("sam_arch") and d["sam_arch"].strip() not in SAM_ARCHS:
        problems.append(("sam_arch", f"one of {' | '.join(sorted(SAM_ARCHS))}"))
    if not blank("keep_loaded") and not (d["keep_loaded"].strip().isdigit()):
        problems.append(("keep_loaded", "an integer ≥ 0"))
    return problems


# ----------------------------------------------------------------------------------------------------- real
def _captioner(s: ModelSettings):
    from pseudoseg.models.adapters.captioner import HFCaptioner

    return HFCaptioner(s.captioner, device=s.device)


def _grounder(s: ModelSettings):
    if s.grounder_backend == "groundingdino":
        from pseudoseg.models.adapters.grounder import GroundingDinoPy

        return GroundingDinoPy(
            s.groundingdino_config, s.groundingdino_checkpoint, device=s.device,
            text_encoder=s.groundingdino_text_encoder,
        )
    if s.grounder_backend != "transformers":
        raise ValueError(f"[models] grounder_backend must be one of {GROUNDER_BACKENDS}, got {s.grounder_backend!r}")
    from pseudoseg.models.adapters.grounder import HFGroundingDino

    return HFGroundingDino(s.grounder, device=s.device)


def _segmenter(s: ModelSettings):
    from pseudoseg.models.adapters.segmenter import SamSegmenter

    return SamSegmenter.from_checkpoint(s.sam_arch, s.sam_checkpoint_path(), device=s.device)


def _clip(s: ModelSettings):
    from pseudoseg.models.adapters.clip import HFClipEncoder

    return HFClipEncoder(s.clip, device=s.device)


def _fmbseg_clip(s: ModelSettings):
    from pseudoseg.models.adapters.clip import HFClipEncoder

    return HFClipEncoder(s.fmbseg_clip, device=s.device, key="fmbseg_clip", hub_id=DEFAULT_FMBSEG_CLIP)


def _cam_clip(s: ModelSettings):
    from pseudoseg.models.adapters.clip import HFClipEncoder

    return HFClipEncoder(s.cam_clip, device=s.device, key="cam_clip", hub_id=DEFAULT_CAM_CLIP)


def _classifier_clip(s: ModelSettings):
    from pseudoseg.models.adapters.clip import HFClipEncoder

    return HFClipEncoder(s.classifier_clip, device=s.device, key="classifier_clip", hub_id=DEFAULT_CLASSIFIER_CLIP)


def _dense(s: ModelSettings):
    from pseudoseg.models.adapters.dense import HFDinoEncoder

    return HFDinoEncoder(s.dino, device=s.device)


REAL: dict[str, Factory] = {
    "captioner": _captioner, "grounder": _grounder, "segmenter": _segmenter, "clip": _clip,
    "fmbseg_clip": _fmbseg_clip, "dense": _dense,
    "cam_clip": _cam_clip, "classifier_clip": _classifier_clip,
}


# ----------------------------------------------------------------------------------------------------- tiny
def tiny_settings(s: ModelSettings, roles: tuple[str, ...] = ROLES) -> ModelSettings:
    """`s` with the ids of `roles` swapped for tiny folders in `s.cache_dir` (built on first use)."""
    from pseudoseg.models.adapters.tiny import SAM_TINY_CHECKPOINT, ensure_tiny

    swap: dict[str, str] = {}
    for role in roles:
        folder = str(ensure_tiny(role, s.cache_dir))
        if role == "segmenter":
            swap.update(sam_arch="tiny", sam_checkpoint=f"{folder}/{SAM_TINY_CHECKPOINT}")
        elif role == "grounder":
            swap.update(grounder=folder, grounder_backend="transformers")
        else:
            swap[{"captioner": "captioner", "clip": "clip", "fmbseg_clip": "fmbseg_clip", "dense": "dino",
                  "cam_clip": "cam_clip", "classifier_clip": "classifier_clip"}[role]] = folder
    return dataclasses.replace(s, **swap)


TINY: dict[str, Factory] = {role: (lambda s, r=role: REAL[r](tiny_settings(s, (r,)))) for role in ROLES}

_PRESETS: dict[str, dict[str, Factory]] = {"real": REAL, "tiny": TINY}


def register_preset(name: str, factories: Mapping[str, Factory]) -> None:
    """Register (or replace) preset `name`: {role: factory(settings) -> adapter}. Roles it lacks are unavailable."""
    bad = sorted(set(factories) - set(ROLES))
    if bad:
        raise ValueError(f"unknown roles {bad}; roles are {ROLES}")
    _PRESETS[name] = dict(factories)


def registered_presets() -> tuple[str, ...]:
    return tuple(sorted(_PRESETS))


# Adapters already loaded by this process, least recently used first: a worker process (`pseudoseg workers`, or
# `run` with --workers 1, where Luigi runs tasks in-process) loads each model once and reuses it for every shard.
_LOADED: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
LOADS: Counter[str] = Counter()  # factory calls per role in this process (tests count them)


def load_role(role: str, settings: ModelSettings) -> Any:
    """The adapter for `role` (one of ROLES) under `settings.preset`, reused when this process already loaded it
    with the same settings and factory (`[models] keep_loaded` adapters are kept; 0 loads on every call).

    Plugin modules in `settings.plugins` are imported first (they call `register_preset`). Raises
    ModelUnavailableError when a configured model cannot be loaded offline.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
    for module in settings.plugins:
        importlib.import_module(module)
    preset = _PRESETS.get(settings.preset)
    if preset is None:
        raise ValueError(f"unknown [models] preset {settings.preset!r}; registered: {registered_presets()}")
    if role not in preset:
        raise ModelUnavailableError(f"preset {settings.preset!r} has no {role!r} model (it provides {sorted(preset)})")
    factory = preset[role]
    key = (role, dataclasses.replace(settings, keep_loaded=0), factory)
    if settings.keep_loaded > 0 and key in _LOADED:  # 0: a fresh load on every call
        _LOADED.move_to_end(key)
        return _LOADED[key]
    model = factory(settings)
    LOADS[role] += 1
    if settings.keep_loaded > 0:
        _LOADED[key] = model
        while len(_LOADED) > settings.keep_loaded:
            _LOADED.popitem(last=False)
    return model


def release_models() -> None:
    """Drop every kept adapter (their memory is freed once nothing else refers to them)."""
    _LOADED.clear()
    _SPACY.clear()


_SPACY: dict[str, Any] = {}


def load_spacy(name: str) -> Any:
    """spaCy pipeline `name`, loaded once per process (a load costs more than a small shard's parsing)."""
    if name not in _SPACY:
        import spacy

        _SPACY[name] = spacy.load(name)
        LOADS["spacy"] += 1
    return _SPACY[name]
