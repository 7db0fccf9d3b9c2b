"""Shared plumbing for the adapters: device choice, autocast, and loading weights with one clear offline error."""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from pseudoseg.models.catalog import ModelUnavailableError  # noqa: F401 (the adapters raise it)
from pseudoseg.models.device import autocast, model_device, resolve_device, to_numpy  # noqa: F401 (adapters')


class HFAdapter:
    """What the transformers adapters share: the `device` they run on, the hub id or folder they load from
    (`source`), `load` (a `from_pretrained` on it that fails with one clear error, see `hf_load`), and the pixel
    normalisation of their image processor (`use_image_processor`, then `normalised`)."""

    def __init__(self, model_id: str, device: str, *, role: str, key: str, hub_id: str) -> None:
        self.device = model_device(device)
        self.source = model_id
        self._names = dict(role=role, key=key, hub_id=hub_id)

    def load(self, loader: Callable[..., Any], **kwargs: Any) -> Any:
        return hf_load(loader, self.source, **self._names, **kwargs)

    def load_model(self, loader: Callable[..., Any], **kwargs: Any) -> Any:
        """``load`` of a model's weights, strictly: a checkpoint that leaves some of the model's weights at their
        random init (missing keys), carries weights the model does not have (unexpected keys) or tensors of
        another shape fails with one line naming the folder and the keys (``models.adapters.weights``).
        transformers reads ``.safetensors`` (no code at all) or ``.bin`` with ``torch.load(weights_only=True)``."""
        from pseudoseg.models.adapters.weights import CheckpointError, refusal

        try:
            model, info = self.load(loader, output_loading_info=True, **kwargs)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"The {self._names['role']} model at '{self.source}' (`[models] "
                                  f"{self._names['key']}`) holds a weights file that is not plain weights: "
                                  f"torch.load(weights_only=True) refused it ({refusal(e)}); nothing in it "
                                  f"ran") from None
        problems = loading_problems(info)
        if problems:
            raise CheckpointError(f"The {self._names['role']} model at '{self.source}' (`[models] "
                                  f"{self._names['key']}`) does not fit {type(model).__name__}: {problems}")
        return model

    def use_image_processor(self, processor: Any) -> None:
        """Take the rescale factor, mean and std of a transformers image processor (only those: resizing and
        cropping are the callers')."""
        self._rescale = float(getattr(processor, "rescale_factor", 1 / 255))
        self._mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(processor.image_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def normalised(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB [B, H, W, 3] → float32 [B, 3, H, W] on the device, rescaled and normalised as the processor
        would (the caller has checked the shape)."""
        pixels = np.require(images, requirements=["C", "W"])  # a read-only input is copied: torch needs writable
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float()
        return (x * self._rescale - self._mean) / self._std


def l2_normalize(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def looks_like_path(model_id: str) -> bool:
    """A local folder rather than a hub id: absolute, ~ or ./ prefixed, or existing on disk."""
    return os.path.isabs(model_id) or model_id.startswith(("~", ".")) or os.path.exists(model_id)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _hub_reachable(timeout: float = 3.0) -> bool:
    # One short TCP probe instead of huggingface_hub's ~30 s of retries on a machine without network.
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may work where a direct connection does not; let the hub client decide
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def loading_problems(info: dict[str, Any]) -> str:
    """What a ``from_pretrained(..., output_loading_info=True)`` report says is wrong ("" when nothing)."""
    from pseudoseg.models.adapters.weights import key_problems

    mismatched = [f"{m[0]} {tuple(m[1])} vs {tuple(m[2])}" if isinstance(m, (list, tuple)) and len(m) == 3
                  else str(m) for m in info.get("mismatched_keys") or ()]
    text = key_problems(sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ()),
                        mismatched)
    errors = [" ".join(str(e).split()) for e in info.get("error_msgs") or ()]
    return "; ".join([t for t in (text, *errors) if t])


def unavailable(role: str, key: str, tried: str, hub_id: str, reason: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"The {role} model could not be loaded from '{tried}' ({reason}); it comes from the config key "
        f"`[models] {key} = {tried}`. To use a local copy: on a connected machine run "
        f"`hf download {hub_id} --local-dir DIR`, copy DIR here, and set `[models] {key} = DIR` "
        f"in luigi.cfg (or set `[models] preset = tiny` for the offline random-init models)."
    )


def hf_load(
    loader: Callable[..., Any], model_id: str, *, role: str, key: str, hub_id: str, **kwargs: Any
) -> Any:
    """`loader(model_id, local_files_only=..., **kwargs)` (a `from_pretrained`), with ModelUnavailableError on failure.

    Folders load with local_files_only; hub ids try the local HF cache first and touch the network only when
    neither HF_HUB_OFFLINE is set nor the hub is unreachable. `hub_id` is the id suggested in the error message.
    """
    if looks_like_path(model_id):
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise unavailable(role, key, model_id, hub_id, "no such folder")
        try:
            return loader(str(folder), local_files_only=True, **kwargs)
        except OSError as e:
            raise unavailable(role, key, model_id, hub_id, f"folder incomplete: {e}") from e
    try:
        return loader(model_id, local_files_only=True, **kwargs)
    except OSError as e:
        if hub_offline():
            raise unavailable(role, key, model_id, hub_id, "not in the local HF cache and HF_HUB_OFFLINE is set") from e
        if not _hub_reachable():
            raise unavailable(role, key, model_id, hub_id, "not in the local HF cache and the hub is unreachable") from e
    try:
        return loader(model_id, **kwargs)
    except Exception as e:  # hub clients raise OSError, httpx errors and HfHubHTTPError alike
        raise unavailable(role, key, model_id, hub_id, f"{type(e).__name__}: {e}") from e
