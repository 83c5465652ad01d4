"""The one place that picks a device and a dtype from command-line names ('auto', 'cuda:1', 'bf16').

The 'auto' rules, the same for the trainer, the sampler, the server and checkpoint.load_model:
- device: cuda when torch sees a GPU, then mps, then cpu;
- dtype: bfloat16 on a CUDA GPU that supports it, float32 everywhere else (CPU, MPS, older
  GPUs). float16 is never picked on its own: it needs a loss scaler to train and overflows in
  some models, so it is only used when asked for. For the trainer the dtype is the autocast
  dtype (the weights stay fp32); for inference it is the dtype of the weights.
- training on a CPU (pick_dtype(..., training=True)): bfloat16 autocast where the CPU has native
  bf16 dot products (AVX512-BF16, or AMX-BF16 that the OS has enabled) *and* a bf16 matrix
  product measures at least BF16_MIN_SPEEDUP times faster than an fp32 one in a child process
  (cpu_bf16_matmul_speedup): cpuid alone is not trusted (a VM may list AMX and fault on it;
  oneDNN may not use the instructions), and a CPU without them runs bf16 slower than fp32.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

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


# bf16 autocast must beat fp32 by this much on a bare matrix product before the trainer picks
# it: autocast adds casts and the elementwise ops do not speed up.
BF16_MIN_SPEEDUP = 1.5


def cpu_bf16_flags() -> list[str]:
    """The native bf16 dot-product features /proc/cpuinfo lists (avx512_bf16, amx_bf16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


# Run in a child process: an instruction the VM does not allow kills the child, not the trainer.
_PROBE = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a32, b32 = torch.randn(2048, 512), torch.randn(512, 1536)
a16, b16 = a32.bfloat16(), b32.bfloat16()
def best(a, b):
    torch.mm(a, b)
    ts = []
    for _ in range(5):
        t = time.perf_counter(); torch.mm(a, b); ts.append(time.perf_counter() - t)
    return min(ts)
print(best(a32, b32) / best(a16, b16))
"""


@functools.lru_cache(maxsize=None)
def cpu_bf16_matmul_speedup(threads: int | None = None) -> float | None:
    """fp32 time / bf16 time of a training-sized matrix product on this CPU, measured once per
    process in a child process (None when the CPU lists no native bf16 dot product, or the probe
    fails or dies: no bf16 then)."""
    if not cpu_bf16_flags() or os.environ.get("GPTMOD_CPU_BF16_AUTOCAST") == "0":
        return None
    threads = threads or torch.get_num_threads()
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, str(threads)], capture_output=True,
                           text=True, timeout=120)
        return float(r.stdout.strip()) if r.returncode == 0 else None
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


def cpu_trains_faster_in_bf16(speedup: float | None) -> bool:
    """The rule of pick_dtype(training=True) on a CPU, given cpu_bf16_matmul_speedup()."""
    return speedup is not None and speedup >= BF16_MIN_SPEEDUP


def pick_dtype(name: str | torch.dtype | None = "auto", device: torch.device | str = "cpu",
               training: bool = False) -> torch.dtype:
    """'auto' (or None): bfloat16 on CUDA GPUs that support it, and for training (the autocast
    dtype) on CPUs where bf16 matrix products measure faster; else float32 (see the module
    doc); otherwise a name of DTYPES (case-insensitive) or a torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if (device.type == "cpu" and training
                and cpu_trains_faster_in_bf16(cpu_bf16_matmul_speedup(torch.get_num_threads()))):
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
