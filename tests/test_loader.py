"""The loader: a binary built for another torch, or no binary at all, gives one clear sentence."""
import json
import os
import shutil
import subprocess
import sys

import torch

import gptmod_ext
from gptmod_ext import _ext


def _run(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONWARNINGS": "always"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_library_loaded_in_this_install():
    assert _ext.AVAILABLE, _ext.LOAD_ERROR
    assert gptmod_ext.ops.cpu_capability() in ("DEFAULT", "AVX2", "AVX512")


def test_torch_version_mismatch_names_versions_and_rebuild(tmp_path):
    lib = tmp_path / "libgptmod_cpu.so"
    shutil.copy(_ext.LIB_DIR / "libgptmod_cpu.so", lib)
    (tmp_path / "_build_info.json").write_text(json.dumps({"torch_version": "1.0.0", "torch_cuda": ""}))
    code = ("import warnings, torch, gptmod_ext\n"
            "from gptmod_ext import _ext\n"
            "assert not _ext.AVAILABLE\n"
            "try:\n    gptmod_ext.ops.swiglu(torch.randn(2, 4))\n"
            "except ImportError as e:\n    print('ERR', e)\n")
    r = _run(code, {"GPTMOD_EXT_LIB_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "built against torch 1.0.0" in r.stdout
    assert f"torch {torch.__version__} is running" in r.stdout
    assert _ext.REBUILD_COMMAND in r.stdout
    # The command that works: the build tools first, then no isolation and no dependencies (the
    # runtime pin would otherwise replace the user's torch with 2.13).
    assert "pip install --no-build-isolation --no-deps ." in r.stdout
    assert "scikit-build-core" in r.stdout and "ninja" in r.stdout
    # The import itself warned once with the same sentence, not a symbol error.
    assert "built against torch 1.0.0" in r.stderr
    assert "undefined symbol" not in r.stderr + r.stdout


def test_unloadable_library_is_reported(tmp_path):
    (tmp_path / "libgptmod_cpu.so").write_bytes(b"not an ELF file")
    code = "import gptmod_ext; from gptmod_ext import _ext; print('AVAILABLE', _ext.AVAILABLE); print(_ext.LOAD_ERROR)"
    r = _run(code, {"GPTMOD_EXT_LIB_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "AVAILABLE False" in r.stdout
    assert "could not load" in r.stdout and _ext.REBUILD_COMMAND in r.stdout
