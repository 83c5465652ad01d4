"""gptmod_ext: a small modern GPT whose hot paths are C++/CUDA torch.library ops."""
from __future__ import annotations

import warnings

from . import _ext
from . import ops
from .reference import rope_cache
from .model import GPT, GPTConfig

if not _ext.AVAILABLE:
    # The torch backend still works; the ext backend and torch.ops.gptmod raise this message.
    warnings.warn(_ext.LOAD_ERROR, RuntimeWarning, stacklevel=2)

__version__ = "0.1.0"
__all__ = ["ops", "rope_cache", "GPT", "GPTConfig"]
