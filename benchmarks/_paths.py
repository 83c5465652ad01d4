"""Lets the benchmark scripts run from a source checkout without shadowing an installed package.

An installed gptmod_ext (or one on PYTHONPATH) wins; only when none is importable is the
checkout's python/ put on sys.path (its loader then finds the ops in build/).
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("gptmod_ext") is None:
    sys.path.insert(0, str(ROOT / "python"))
