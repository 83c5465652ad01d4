"""Finding and loading the compiled op libraries.

The ops live in two shared libraries next to this file (or in $GPTMOD_EXT_LIB_DIR, or in the
source checkout's build/ directory for development builds):
  libgptmod_cpu.so   every schema plus the CPU kernels
  libgptmod_cuda.so  the CUDA kernels (only in CUDA builds)
They are plain libraries loaded with torch.ops.load_library: they use no Python C API.

`resolve_backend(requested, device)` is the only place that decides whether the `ext` backend
can run on a device; train, sample, serve and the GPT.backend setter all ask it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from .common import UserError

# Build isolation would compile against a fresh torch 2.13 and the runtime pin would then replace
# the user's torch; --no-deps keeps their torch, and the build tools must be there first.
REBUILD_COMMAND = ('pip install scikit-build-core ninja "cmake>=3.26" && '
                   "pip install --no-build-isolation --no-deps .")
REBUILD_HINT = (f"rebuild it against the torch you have, from the gptmod_ext source folder: "
                f"`{REBUILD_COMMAND}`")


class ExtensionNotAvailable(UserError, ImportError):
    """The compiled ops cannot be used; the message says why and how to fix it."""


def _candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("GPTMOD_EXT_LIB_DIR"):
        dirs.append(Path(os.environ["GPTMOD_EXT_LIB_DIR"]))
    here = Path(__file__).resolve().parent
    dirs.append(here)
    # An editable install (pip install -e .) keeps the Python files here and installs the
    # libraries into site-packages; the package's __path__ lists both.
    pkg = sys.modules.get(__package__)
    for d in getattr(pkg, "__path__", []):
        if Path(d).resolve() != here:
            dirs.append(Path(d))
    # A source checkout: python/gptmod_ext/ -> <repo>/build (cmake -B build).
    dirs.append(here.parent.parent / "build")
    return dirs


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def _load() -> tuple[Path | None, bool, str | None]:
    """Returns (library dir, cuda library loaded, error message or None)."""
    for d in _candidate_dirs():
        cpu_lib = d / "libgptmod_cpu.so"
        if not cpu_lib.exists():
            continue
        info_file = d / "_build_info.json"
        if info_file.exists():
            built = json.loads(info_file.read_text())
            if _torch_release(built["torch_version"]) != _torch_release(torch.__version__):
                return d, False, (
                    f"gptmod_ext's compiled ops in {d} were built against torch "
                    f"{built['torch_version']} but torch {torch.__version__} is running; "
                    f"{REBUILD_HINT}.")
        try:
            torch.ops.load_library(str(cpu_lib))
        except OSError as e:
            return d, False, f"gptmod_ext could not load {cpu_lib} ({e}); {REBUILD_HINT}."
        cuda_lib = d / "libgptmod_cuda.so"
        cuda_loaded = False
        if cuda_lib.exists() and torch.version.cuda:
            try:
                torch.ops.load_library(str(cuda_lib))
                cuda_loaded = True
            except OSError as e:
                return d, False, f"gptmod_ext could not load {cuda_lib} ({e}); {REBUILD_HINT}."
        return d, cuda_loaded, None
    return None, False, ("gptmod_ext's compiled ops were not found (looked in "
                         + ", ".join(str(d) for d in _candidate_dirs())
                         + "); install the package with `pip install .`.")


LIB_DIR, CUDA_LOADED, LOAD_ERROR = _load()
AVAILABLE = LOAD_ERROR is None


def require() -> None:
    """Raises ExtensionNotAvailable with the reason when the compiled ops cannot be used."""
    if not AVAILABLE:
        raise ExtensionNotAvailable(LOAD_ERROR)


def ext_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the ext ops cannot run on device, or None when they can.

    The CPU library carries every schema and every CPU kernel; the CUDA kernels come only with
    libgptmod_cuda.so (design.md §2: each library has a kernel for every op), so what is loaded
    answers the question without asking the dispatcher.
    """
    if not AVAILABLE:
        return LOAD_ERROR
    kind = torch.device(device).type
    if kind == "cpu":
        return None
    if kind == "cuda":
        if CUDA_LOADED:
            return None
        return (f"this gptmod_ext build has no CUDA kernels (no libgptmod_cuda.so loaded from "
                f"{LIB_DIR}); build it with CUDA or use the torch backend")
    return f"gptmod_ext has no kernels for {kind} devices; use the torch backend"


class Backend(NamedTuple):
    name: str           # 'ext' or 'torch'
    reason: str | None  # why 'auto' chose torch; None when nothing was given up


def resolve_backend(requested: str = "auto", device: torch.device | str = "cpu") -> Backend:
    """The one place that decides which backend runs on device.

    'torch' is always possible. 'ext' runs when the ops are loaded with kernels for device,
    otherwise ExtensionNotAvailable says why. 'auto' is 'ext' when it can run, else 'torch'
    with the reason, for the caller to report.
    """
    if requested not in ("auto", "ext", "torch"):
        raise ValueError(f"backend must be 'ext' or 'torch' (or 'auto'), got {requested!r}")
    if requested == "torch":
        return Backend("torch", None)
    reason = ext_unavailable_reason(device)
    if reason is None:
        return Backend("ext", None)
    if requested == "auto":
        return Backend("torch", reason)
    raise ExtensionNotAvailable(f"backend 'ext' cannot run on {torch.device(device)}: {reason}")
