"""Token files: a prepared data directory and random training windows drawn from it.

A data directory (written by `python -m gptmod_ext.prepare`) holds
    train.bin, val.bin   the token ids, flat, uint16 when the vocabulary fits, else uint32;
                         every document is followed by the <|endoftext|> id
    meta.json            dtype, token/byte/document counts per split, tokenizer, sources
    tokenizer.json       the tokenizer that wrote the ids
The .bin files are raw arrays (no header), memory-mapped on read as in nanoGPT, so a corpus
larger than RAM trains fine; the small JSON "header" lives beside them in meta.json.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import tokenizer as tokenizer_mod
from .common import UserError

META = "meta.json"
FORMAT = "gptmod_ext.data/1"
SPLITS = ("train", "val")


class DataError(UserError):
    """A data directory is missing or unusable; the message is one line that says why."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_data_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


@dataclass
class Dataset:
    """The memory-mapped splits of a data directory, with its metadata."""
    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of document text per token (separators count 0 bytes)."""
        m = self.meta[split]
        return m["bytes"] / max(m["tokens"], 1)

    def tokenizer(self) -> tokenizer_mod.Tokenizer:
        return tokenizer_mod.load(self.path)


def load(path: str | os.PathLike) -> Dataset:
    """Opens a prepared data directory (memory-mapped, read-only)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    meta_path = path / META
    if not meta_path.is_file():
        raise DataError(f"{path} is not a prepared data directory (no {META}); "
                        "run `python -m gptmod_ext.prepare` or pass raw text to --data")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise DataError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        dtype = np.dtype(meta["dtype"])
        arrays = {}
        for s in SPLITS:
            f = path / meta[s]["file"]
            expected = meta[s]["tokens"] * dtype.itemsize
            if not f.is_file() or f.stat().st_size != expected:
                got = f.stat().st_size if f.is_file() else "missing"
                raise DataError(f"{f} is truncated or missing (expected {expected} bytes, "
                                f"found {got}); prepare the data again")
            arrays[s] = (np.memmap(f, dtype=dtype, mode="r") if expected
                         else np.zeros(0, dtype=dtype))
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path} is corrupt ({type(e).__name__}: {e})") from None
    return Dataset(path, meta, arrays["train"], arrays["val"])


def random_offsets(n_tokens: int, block_size: int, count: int,
                   generator: torch.Generator) -> torch.Tensor:
    """`count` random window starts for windows of block_size + 1 tokens, drawn from
    `generator` (a CPU torch.Generator), so the stream is fixed by its seed and resumes
    exactly from its saved state."""
    n = n_tokens - block_size
    if n < 1:
        raise DataError(f"the split has {n_tokens} tokens, too few for windows of "
                        f"{block_size} + 1; use a smaller --block-size or more data")
    return torch.randint(n, (count,), generator=generator)


def windows(tokens: np.ndarray, offsets, block_size: int,
            device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [len(offsets), block_size] and next-token targets for the given starts."""
    # int64 from the start: ids are the embedding's indices, and uint16 has no torch type.
    xy = np.stack([np.asarray(tokens[i:i + block_size + 1], dtype=np.int64)
                   for i in offsets.tolist()])
    xy = torch.from_numpy(xy)
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    device = torch.device(device)
    if device.type == "cuda":
        # Pinned memory lets the copy overlap with compute (as in nanoGPT).
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int,
              generator: torch.Generator, device: str | torch.device = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `block_size` tokens and their next-token targets."""
    offsets = random_offsets(len(tokens), block_size, batch_size, generator)
    return windows(tokens, offsets, block_size, device)


def covering_windows(n_tokens: int, block_size: int,
                     max_targets: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Window starts that predict every token of a split once, for evaluating on all of it:
    (offsets, already_scored), where window i scores its targets from already_scored[i] on.

    Windows are consecutive (start 0, T, 2T, ...); the last one is moved back to end at the
    split's end, and its first targets (scored by the window before) are skipped. With more
    than max_targets targets, evenly spaced windows of the split are kept instead, about
    max_targets targets in all (a sample whose size the caller reports).
    """
    T, n_targets = block_size, n_tokens - 1
    if n_targets < T:
        raise DataError(f"the split has {n_tokens} tokens, too few for windows of {T} + 1")
    starts = torch.arange(0, n_targets, T)
    if max_targets is not None and n_targets > max_targets:
        keep = max(1, max_targets // T)
        starts = starts[torch.linspace(0, len(starts) - 1, keep).round().long().unique()]
    offsets = starts.clamp(max=n_targets - T)
    return offsets, starts - offsets


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the token frequency distribution: the loss of the best model that
    ignores context, the baseline a trained model must beat."""
    # The first 100M tokens estimate it well enough and keep a huge corpus from being read whole.
    counts = np.bincount(np.asarray(tokens[:100_000_000]), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Converts a mean per-token loss in nats to bits per UTF-8 byte of text."""
    return loss_nats / bytes_per_token / math.log(2)
