"""Token files: a prepared data directory and random training windows drawn from it.

A data directory (written by `python -m gptmod_ext.prepare`) holds
    train.bin, val.bin   the token ids, flat, uint16 when the vocabulary fits, else uint32;
                         every document is followed by the <|endoftext|> id
    meta.json            dtype, token/byte/document counts per split, tokenizer, sources
    tokenizer.json       the tokenizer that wrote the ids
The .bin files are raw arrays (no header), memory-mapped on read as in nanoGPT, so a corpus
larger than RAM trains fine; the small JSON "header" lives beside them in meta.json.

A chat data set (meta.json "kind": "chat", prepared from {"messages": [...]} rows: chat.py)
holds whole conversations instead of a stream of documents, and beside each split's ids
    <split>.mask.bin     uint8, 1 where the token is a target the loss sees (the assistant's
                         answers and the end-of-text token after each), 0 elsewhere
    <split>.idx.bin      int64 [conversations + 1], where each conversation starts (and the end)
Training draws whole conversations (one per row, right-padded; targets -1 where the mask is 0
or on the padding). A conversation longer than the window is cut to its first block_size + 1
tokens: what is cut is not trained, and what is kept keeps its exact mask (chat_report says how
many are cut; one with no target left is refused).
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
    """The memory-mapped splits of a data directory, with its metadata; for a chat data set
    also each split's target mask and conversation starts (see the module doc).

    draw / batch / get_batch are how the trainer reads either kind: random window starts and
    windows of a token stream, or random conversations and their padded, masked rows."""
    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray
    masks: dict | None = None    # chat: split -> uint8 [tokens]
    starts: dict | None = None   # chat: split -> int64 [conversations + 1]

    @property
    def chat(self) -> bool:
        return self.masks is not None

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of document text per token (separators count 0 bytes); for chat, of
        the answers' text per target."""
        m = self.meta[split]
        if self.chat:
            return m["target_bytes"] / max(m["targets"], 1)
        return m["bytes"] / max(m["tokens"], 1)

    def tokenizer(self) -> tokenizer_mod.Tokenizer:
        return tokenizer_mod.load(self.path)

    def targets(self, split: str) -> np.ndarray:
        """The tokens the loss is computed on: all of a stream, a chat set's masked ones."""
        tokens = self.split(split)
        return tokens[self.masks[split].astype(bool)] if self.chat else tokens

    def draw(self, split: str, block_size: int, count: int,
             generator: torch.Generator) -> torch.Tensor:
        """`count` random picks from `generator`: window starts, or conversation indices."""
        if self.chat:
            return torch.randint(len(self.starts[split]) - 1, (count,), generator=generator)
        return random_offsets(len(self.split(split)), block_size, count, generator)

    def batch(self, split: str, picks, block_size: int, device="cpu"):
        """Inputs and targets [len(picks), T] for picks from draw (T = block_size for a
        stream, the longest kept conversation, at most block_size, for chat)."""
        if self.chat:
            return conversation_rows(self.split(split), self.masks[split], self.starts[split],
                                     picks, block_size, device)
        return windows(self.split(split), picks, block_size, device)

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator, device="cpu"):
        return self.batch(split, self.draw(split, block_size, batch_size, generator),
                          block_size, device)


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
        masks, starts = _chat_arrays(path, meta) if meta.get("kind") == "chat" else (None, None)
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path} is corrupt ({type(e).__name__}: {e})") from None
    return Dataset(path, meta, arrays["train"], arrays["val"], masks, starts)


def _chat_arrays(path: Path, meta: dict) -> tuple[dict, dict]:
    """The masks and conversation starts of a chat data set, checked against the ids."""
    masks, starts = {}, {}
    for s in SPLITS:
        n = meta[s]["tokens"]
        masks[s] = np.fromfile(path / meta[s]["mask"], dtype=np.uint8)
        starts[s] = np.fromfile(path / meta[s]["idx"], dtype=np.int64)
        ok = (len(masks[s]) == n and len(starts[s]) == meta[s]["docs"] + 1
              and starts[s][0] == 0 and starts[s][-1] == n)
        if not ok:
            raise DataError(f"the chat files of the {s} split in {path} do not match its ids; "
                            "prepare the data again")
    return masks, starts


def conversation_rows(tokens: np.ndarray, mask: np.ndarray, starts: np.ndarray, picks,
                      block_size: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations `picks` as rows: inputs [b, T] right-padded with 0, targets the next
    token where the mask trains it and -1 elsewhere; each cut to block_size + 1 tokens."""
    rows = []
    for i in picks.tolist():
        a = int(starts[i])
        b = min(int(starts[i + 1]), a + block_size + 1)
        ids = np.asarray(tokens[a:b], dtype=np.int64)
        rows.append((ids, np.where(mask[a + 1:b] != 0, ids[1:], -1)))
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (ids, tgt) in enumerate(rows):
        x[r, :len(ids) - 1] = torch.from_numpy(ids[:-1])
        y[r, :len(tgt)] = torch.from_numpy(tgt)
    return x.to(device), y.to(device)


def chat_report(dataset: Dataset, block_size: int) -> dict:
    """Per split: conversations, how many are longer than block_size + 1 tokens (cut), and the
    first (index) of those whose first target lies beyond the cut (nothing left to train)."""
    out = {}
    for s in SPLITS:
        starts, mask = dataset.starts[s], dataset.masks[s]
        lengths = np.diff(starts)
        first = np.array([np.argmax(mask[a + 1:b]) + 1 if mask[a + 1:b].any() else b - a
                          for a, b in zip(starts[:-1], starts[1:])], dtype=np.int64)
        empty = np.nonzero(first > block_size)[0]
        out[s] = {"conversations": len(lengths), "cut": int((lengths > block_size + 1).sum()),
                  "untrainable": int(empty[0]) if len(empty) else None}
    return out


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
