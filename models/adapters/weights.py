"""Loading weights from disk without running code and without silently leaving parts of a model random.

Every ``.pth`` / ``.pt`` pseudoseg reads (SAM checkpoints, groundingdino-py checkpoints, the trainers' checkpoints
and ``model.pt``) goes through :func:`load_weights`: ``torch.load(weights_only=True)``, whose unpickler builds only
tensors, containers and plain numbers, so a checkpoint holding a pickled object (whose loading would call
arbitrary code) is refused with one line naming the file. The state is then loaded with :func:`load_state_strict`:
``load_state_dict(strict=True)`` after checking the keys, so a checkpoint missing some of the model's keys (which
would leave those weights at their random init) or carrying keys the model does not have (another architecture)
fails with one line naming the file and the keys. Hugging Face models are checked the same way by
``models.adapters._hf.hf_load`` (``output_loading_info``).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pseudoseg.models.catalog import ModelUnavailableError

SHOWN_KEYS = 6  # keys named per kind in a message (then "+N more")


class CheckpointError(ModelUnavailableError):
    """A checkpoint that is not plain weights, cannot be read, or does not fit the model: the message is one line
    naming the file (and the keys)."""


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def refusal(exc: BaseException) -> str:
    """The line of a weights-only unpickling error that says what was refused (torch's message opens with a
    paragraph suggesting ``weights_only=False``, which is exactly what must not be done)."""
    for line in (ln.strip() for ln in str(exc).splitlines()):
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "Please file")):
            return line.removeprefix("WeightsUnpickler error: ")
    return type(exc).__name__


def load_weights(path: str | Path, *, what: str) -> Any:
    """The object in checkpoint ``path`` (on the CPU), unpickled with ``weights_only=True``.

    ``what`` names the checkpoint in messages (e.g. "SAM segmenter (`[models] sam_checkpoint`)").
    Raises :class:`CheckpointError` (one line) for a file whose unpickling would build anything but tensors,
    containers and numbers, and for an unreadable or truncated file."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{what} checkpoint {path} is not a plain weights file: torch.load(weights_only=True) refused it "
            f"({refusal(e)}); pseudoseg never unpickles objects from a model file, so nothing in it ran. "
            f"Use a checkpoint that holds only tensors (a state_dict)") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{what} checkpoint {path} cannot be read: {_first_line(e)}") from None


def _keys(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_KEYS])
    return f"{shown}, +{len(names) - SHOWN_KEYS} more" if len(names) > SHOWN_KEYS else shown


def key_problems(missing: list[str], unexpected: list[str], mismatched: list[str] = ()) -> str:
    """``missing keys [...]; unexpected keys [...]; shape mismatches [...]`` of the non-empty kinds."""
    parts = [f"{kind} ({len(names)}): {_keys(sorted(names))}" for kind, names in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", list(mismatched)))
             if names]
    return "; ".join(parts)


def load_state_strict(module: nn.Module, state: Any, *, path: str | Path, what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, failing with one line naming ``path`` and the keys when the
    checkpoint lacks some of the module's keys, has keys the module does not, or a tensor of another shape.

    Keys naming one of the module's *non-persistent* buffers are dropped first: values the module computes itself
    and never saves (older transformers saved BERT's ``position_ids``, which the official Grounding DINO
    checkpoints still hold)."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(state)[:SHOWN_KEYS] if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(f"{what} checkpoint {path} holds no state_dict of tensors (found {found})")
    own = module.state_dict()
    computed = {name for name, _ in module.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in computed}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{what} checkpoint {path} does not fit the model: "
                              f"{key_problems(missing, unexpected, mismatched)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # anything the checks above did not foresee: still one line
        raise CheckpointError(f"{what} checkpoint {path} does not fit the model: {_first_line(e)}") from None
