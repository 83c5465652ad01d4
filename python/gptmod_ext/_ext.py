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


def _built_cuda_archs() -> str:
    info = LIB_DIR / "_build_info.json" if LIB_DIR is not None else None
    if info is None or not info.exists():
        return ""
    return json.loads(info.read_text()).get("cuda_archs", "")


# CMAKE_CUDA_ARCHITECTURES of the CUDA library, comma separated ("80,86,89,90"); "" without one.
CUDA_ARCHS = _built_cuda_archs()


def cuda_archs_fit(capability: tuple[int, int], archs: str) -> bool:
    """Whether a library built for `archs` (CMake's list: "80", "90a", "86-real", "80-virtual",
    comma separated) holds a kernel image a GPU of compute capability (major, minor) runs:
    a plain entry is machine code plus PTX, so any GPU at least that new runs it (newer ones
    compile the PTX at first use); "-real" is machine code alone (same major, minor at least
    that); "-virtual" PTX alone; "90a"-style entries fit that exact GPU. An entry CMake
    expands itself ("native", "all") counts as fitting."""
    major, minor = capability
    for entry in filter(None, (a.strip() for a in archs.split(","))):
        arch, _, kind = entry.partition("-")
        if not arch[:2].isdigit():
            return True
        need = (int(arch[:-1]), int(arch[-1])) if arch[-1].isdigit() else None
        if need is None:  # an arch-specific entry such as 90a
            if (major, minor) == (int(arch[:-2]), int(arch[-2])):
                return True
        elif kind == "real":
            if major == need[0] and minor >= need[1]:
                return True
        elif (major, minor) >= need:
            return True
    return False


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
        if not CUDA_LOADED:
            return (f"this gptmod_ext build has no CUDA kernels (no libgptmod_cuda.so loaded "
                    f"from {LIB_DIR}); build it with CUDA or use the torch backend")
        return _cuda_arch_reason(torch.device(device))
    return f"gptmod_ext has no kernels for {kind} devices; use the torch backend"


def _cuda_arch_reason(device: torch.device) -> str | None:
    """Why the CUDA kernels cannot run on this GPU (built for other architectures), or None."""
    if not CUDA_ARCHS:
        return None
    capability = torch.cuda.get_device_capability(device)
    if cuda_archs_fit(capability, CUDA_ARCHS):
        return None
    major, minor = capability
    return (f"{device} ({torch.cuda.get_device_name(device)}) is sm_{major}{minor} but the CUDA "
            f"kernels were built for sm {CUDA_ARCHS}; rebuild for it with "
            f"`pip install --no-build-isolation --no-deps . "
            f"-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=\"{major}{minor}\"`")


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
    if CUDA_LOADED and torch.device(device).type == "cuda":
        # An explicit ext on a GPU outside the built list: the first op says so, with the
        # rebuild command (gptmod/cuda_utils.cuh), as it always has.
        return Backend("ext", None)
    raise ExtensionNotAvailable(f"backend 'ext' cannot run on {torch.device(device)}: {reason}")
