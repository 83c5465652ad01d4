"""Picking a device and a dtype from command-line style names ('auto', 'cuda:1', 'bf16', ...)."""
from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) picks cuda, then mps, then cpu; anything else is passed to torch.device
    and refused with a clear message if that backend is not present."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but this torch sees no CUDA GPU")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} was asked for but MPS is not available")
    return device


def pick_dtype(name: str | torch.dtype | None = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' is bfloat16 on GPUs that support it, float16 on other GPUs and MPS, float32 on the
    CPU; otherwise one of float32/fp32, bfloat16/bf16, float16/fp16, float64 or a torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    device = torch.device(device)
    if name is None or name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(sorted(_DTYPES))}") from None
