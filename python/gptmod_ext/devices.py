"""The one place that picks a device and a dtype from command-line names ('auto', 'cuda:1', 'bf16').

The 'auto' rules, the same for the trainer, the sampler, the server and checkpoint.load_model:
- device: cuda when torch sees a GPU, then mps, then cpu;
- dtype: bfloat16 on a CUDA GPU that supports it, float32 everywhere else (CPU, MPS, older
  GPUs). float16 is never picked on its own: it needs a loss scaler to train and overflows in
  some models, so it is only used when asked for. For the trainer the dtype is the autocast
  dtype (the weights stay fp32); for inference it is the dtype of the weights.
"""
from __future__ import annotations

import torch

# The one dtype table: every accepted name (the CLI spellings first) and its torch dtype.
DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "fp32": torch.float32, "float": torch.float32, "bf16": torch.bfloat16,
    "fp16": torch.float16, "half": torch.float16, "float64": torch.float64, "fp64": torch.float64,
}
# What the command lines offer (argparse choices).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) picks cuda, then mps, then cpu; anything else is parsed by torch.device.
    A name torch cannot parse, or a backend this machine lacks, is a ValueError that says so."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(name)!r} (expected cpu, cuda, cuda:N, mps or "
                         "auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} was asked for but this torch sees no CUDA GPU")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {str(name)!r} was asked for but MPS is not available")
    return device


def pick_dtype(name: str | torch.dtype | None = "auto",
               device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' (or None): bfloat16 on CUDA GPUs that support it, else float32 (see the module
    doc); otherwise a name of DTYPES (case-insensitive) or a torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown dtype {name!r}; choose from auto, "
                         f"{', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the name the command lines and messages use."""
    return str(dtype).replace("torch.", "")
