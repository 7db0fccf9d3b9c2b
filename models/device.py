"""Where models run: the device a setting names, TF32 on CUDA, bf16 autocast on CUDA (CPU stays exact float32), and
tensors back to the host. Shared by the adapters and the trainers."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' → cuda if available else cpu; anything else is passed to `torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_device(device: str | torch.device = "auto") -> torch.device:
    """`resolve_device` for a frozen model being loaded: on CUDA it also turns TF32 on (`cuda_fast_float32`)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        cuda_fast_float32()
    return resolved


@functools.cache
def cuda_fast_float32() -> None:
    """TF32 tensor cores for the float32 matmuls and convolutions autocast leaves in float32 (SAM's mask decoder and
    upsampling, the automatic mask generator, Grounding DINO's box heads, ...). Process-wide, set once, on CUDA
    only: CPU runs stay exact float32."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs stay float32 so results are exact and reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Any tensor → host float32 numpy (bf16 under autocast included)."""
    return t.detach().float().cpu().numpy().astype(np.float32, copy=False)
