"""Turns text into token files: `python -m gptmod_ext.prepare [INPUT ...] [--out DIR]`.

Inputs (any mix): text files, globs, directories (every non-hidden file inside, recursively),
and JSONL files (`*.jsonl`, one document per line in the field --jsonl-field). With no input,
the corpus is the Python standard library's own source (`sysconfig.get_paths()["stdlib"]`,
present on every Python install; tests and site-packages left out), capped at --max-bytes.

Documents: each file is a document, and inside any text file the literal `<|endoftext|>`
separates documents, which is the format of TinyStories' released text files
(TinyStoriesV2-GPT4-train.txt). Every document is written followed by the end-of-text id.

Split: documents are assigned to train/val by a seeded random choice of round(n * val_fraction)
of them (at least one each way). A corpus with fewer than 20 documents (one long text file,
say) is split by position instead: the last val_fraction of each document goes to val.

Chat: .jsonl files whose rows are {"messages": [{"role", "content"}, ...]} make a chat data set
instead (prepare_chat): whole conversations, split by a seeded draw, tokenized through the
tokenizer's chat template (chat.py; ours is added when it has none), with the mask of the
tokens trained on.

Output (see data.py): train.bin, val.bin, meta.json, tokenizer.json (chat: also the masks and
conversation starts; a Hugging Face tokenizer: hf_tokenizer/ instead of tokenizer.json).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from . import chat as chat_mod
from . import data as data_mod
from .common import Parser, UserError, atomic_write, run_cli
from . import tokenizer as tokenizer_mod

DEFAULT_MAX_BYTES = 6_000_000   # default corpus: ~6 MB of stdlib source, ~2M BPE tokens
DEFAULT_OUT = "data/stdlib"
MIN_DOCS_FOR_DOC_SPLIT = 20
BPE_TRAIN_MAX_BYTES = 100_000_000  # BPE merges are learned from at most this much text


PROG = "python -m gptmod_ext.prepare"


class PrepareError(UserError):
    """Bad input to prepare; the message is one line that says why."""


# -- finding the sources ----------------------------------------------------------------------
def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES, seed: int = 0) -> list[Path]:
    """The standard library's .py files in a seeded order, up to max_bytes in all.

    Shuffling before capping spreads the sample across the whole library instead of taking
    the alphabetically first packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [f for f in root.rglob("*.py")
             if not skip.intersection(f.relative_to(root).parts)]
    files.sort(key=lambda f: hashlib.sha1(f"{seed}/{f.relative_to(root)}".encode()).hexdigest())
    chosen, total = [], 0
    for f in files:
        size = f.stat().st_size
        if max_bytes and total + size > max_bytes:
            continue
        chosen.append(f)
        total += size
    if not chosen:
        raise PrepareError(f"no Python sources found under {root}")
    return sorted(chosen)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by paths, globs and directories, in a stable order, without duplicates."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise PrepareError(f"directory {p} holds no files")
            files += found
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                raise PrepareError(f"no file matches {item!r}")
            files += found
        else:
            raise PrepareError(f"input {item} does not exist")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


# -- reading documents ------------------------------------------------------------------------
def _decode(raw: bytes, path: Path, offset: int, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: invalid UTF-8 at byte {offset + e.start} "
                           "(fix the file or pass --errors replace)") from None


def read_text_documents(path: Path, errors: str = "strict") -> Iterator[str]:
    """Documents of a text file: the whole file, or the pieces between <|endoftext|> markers.

    Reads line by line so that a multi-GB TinyStories file never sits in memory whole."""
    sep = tokenizer_mod.EOT.encode()
    has_sep = False
    pending: list[bytes] = []
    start = 0  # byte offset of pending[0], for error messages
    pos = 0    # byte offset of the current line
    try:
        with open(path, "rb") as f:
            for line in f:
                parts = line.split(sep)
                pending.append(parts[0])
                at = pos + len(parts[0])
                for piece in parts[1:]:
                    has_sep = True
                    doc = _decode(b"".join(pending), path, start, errors).strip()
                    if doc:
                        yield doc
                    start = at + len(sep)
                    at = start + len(piece)
                    pending = [piece]
                pos += len(line)
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror or e}") from None
    doc = _decode(b"".join(pending), path, start, errors)
    # A plain file keeps its text exactly; separated stories drop the blank lines around them.
    if has_sep:
        doc = doc.strip()
    if doc.strip():
        yield doc


def jsonl_rows(path: Path, errors: str = "strict") -> Iterator[tuple[str, object]]:
    """(where, row) for every non-empty line of a .jsonl file, where = 'file:line'."""
    try:
        with open(path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, offset, errors)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                yield f"{path}:{lineno}", row
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror or e}") from None


def read_jsonl_documents(path: Path, field: str, errors: str = "strict") -> Iterator[str]:
    for where, row in jsonl_rows(path, errors):
        if not isinstance(row, dict) or field not in row:
            raise PrepareError(f"{where}: no field {field!r} (choose it with --jsonl-field)")
        text = row[field]
        if not isinstance(text, str):
            raise PrepareError(f"{where}: field {field!r} is not a string")
        if text:
            yield text


def read_conversations(path: Path, errors: str = "strict") -> Iterator[tuple[str, list]]:
    """(where, messages) of every row of a chat .jsonl file (chat.check_messages)."""
    for where, row in jsonl_rows(path, errors):
        try:
            yield where, chat_mod.check_messages(row, where)
        except chat_mod.ChatError as e:
            raise PrepareError(str(e)) from None


def is_chat_file(path: Path) -> bool:
    """A .jsonl file whose first row has "messages": a chat data set."""
    if Path(path).suffix != ".jsonl":
        return False
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    row = json.loads(raw)
                    return isinstance(row, dict) and "messages" in row
    except (OSError, ValueError):
        return False
    return False


def iter_documents(files: list[Path], jsonl_field: str = "text", errors: str = "strict",
                   progress: bool = False, desc: str = "reading") -> Iterator[str]:
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
              file=sys.stderr) as bar:
        for f in files:
            if f.suffix == ".jsonl":
                yield from read_jsonl_documents(f, jsonl_field, errors)
            else:
                yield from read_text_documents(f, errors)
            bar.update(f.stat().st_size)


# -- the split --------------------------------------------------------------------------------
def choose_val_docs(n_docs: int, val_fraction: float, seed: int) -> set[int]:
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    rng = np.random.default_rng(seed)
    return set(rng.choice(n_docs, size=n_val, replace=False).tolist())


def split_by_position(doc: str, val_fraction: float) -> tuple[str, str]:
    """(train part, val part) of one document, cut at a line boundary near the end."""
    cut = int(len(doc) * (1 - val_fraction))
    nl = doc.rfind("\n", 0, cut)
    if nl > len(doc) // 2:
        cut = nl + 1
    return doc[:cut], doc[cut:]


# -- the whole pipeline -----------------------------------------------------------------------
def _input_files(inputs: list[str] | None, max_bytes: int | None) -> tuple[list, list[str]]:
    """(files, their description for meta.json's "sources")."""
    if inputs:
        files = expand_inputs(inputs)
        if max_bytes:
            raise PrepareError("--max-bytes applies to the default corpus only")
        return files, [str(f) for f in files]
    files = stdlib_files(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    return files, [f"stdlib:{sysconfig.get_paths()['stdlib']} ({len(files)} files)"]


def _first_pass(docs, tokenizer: str, vocab_size: int, tokenizer_path: str | None, tok=None):
    """(tokenizer, number of documents): counts the documents (the split needs n) and trains
    the BPE on the text; a given tok is used as it is."""
    n_docs, n_bytes = 0, 0

    def counted(limit_bytes):
        nonlocal n_docs, n_bytes
        for d in docs("reading"):
            n_docs += 1
            n_bytes += len(d)
            if n_bytes <= limit_bytes:
                yield d

    try:
        if tok is not None:
            for _ in counted(0):
                pass
        elif tokenizer == "bpe":
            tok = tokenizer_mod.train_bpe(counted(BPE_TRAIN_MAX_BYTES), vocab_size)
        else:
            for _ in counted(0):
                pass
            tok = tokenizer_mod.build(tokenizer, vocab_size=vocab_size, path=tokenizer_path)
    except tokenizer_mod.TokenizerError as e:
        raise PrepareError(str(e)) from None
    return tok, n_docs


def _write_splits(docs, tok, out: Path, n_docs: int, val_fraction: float, seed: int) -> dict:
    """Pass 2: encodes the documents into train.bin / val.bin; their stats by split. Batches
    of documents go through tiktoken's threaded encoder."""
    dtype = data_mod.token_dtype(tok.vocab_size)
    by_doc = n_docs >= MIN_DOCS_FOR_DOC_SPLIT
    val_docs = choose_val_docs(n_docs, val_fraction, seed) if by_doc else set()
    stats = {s: {"file": f"{s}.bin", "tokens": 0, "bytes": 0, "docs": 0} for s in data_mod.SPLITS}
    with contextlib.ExitStack() as stack:  # both files appear, or neither does
        tmps = {s: stack.enter_context(atomic_write(out / f"{s}.bin")) for s in data_mod.SPLITS}
        handles = {s: stack.enter_context(open(tmps[s], "wb")) for s in data_mod.SPLITS}

        # A char vocabulary has no end-of-text token: its documents are written back to back.
        tail = [] if tok.eot_id is None else [tok.eot_id]

        def flush(batch):
            ids = tok.encode_batch([text for _, text in batch])
            for (split, text), toks in zip(batch, ids):
                arr = np.asarray(list(toks) + tail, dtype=dtype)
                handles[split].write(arr.tobytes())
                st = stats[split]
                st["tokens"] += len(arr)
                st["bytes"] += len(text.encode("utf-8"))
                st["docs"] += 1
            batch.clear()

        batch: list[tuple[str, str]] = []
        for i, doc in enumerate(docs("tokenizing")):
            if by_doc:
                batch.append(("val" if i in val_docs else "train", doc))
            else:
                tr, va = split_by_position(doc, val_fraction)
                batch += [("train", tr), ("val", va)]
            if len(batch) >= 256:
                flush(batch)
        flush(batch)
        for s in data_mod.SPLITS:
            if stats[s]["tokens"] == 0:
                raise PrepareError(f"the {s} split is empty; add more text")
    return {"dtype": dtype.name, "by": "document" if by_doc else "position", **stats}


def prepare(inputs: list[str] | None, out_dir: str | os.PathLike, tokenizer: str = "bpe",
            vocab_size: int = 4096, tokenizer_path: str | None = None,
            jsonl_field: str = "text", val_fraction: float = 0.05, seed: int = 1337,
            errors: str = "strict", max_bytes: int | None = None,
            progress: bool = True, tok=None) -> dict:
    """Prepares `inputs` (None: the default stdlib corpus) into `out_dir`; returns meta.
    tok: a tokenizer to use as it is (a fine-tuned model's) instead of --tokenizer's. Chat
    .jsonl files ({"messages": [...]} rows) make a chat data set (prepare_chat)."""
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    files, sources = _input_files(inputs, max_bytes)
    chats = [f for f in files if is_chat_file(f)]
    if chats:
        if len(chats) != len(files):
            raise PrepareError(f"{chats[0]} is a chat data set ({{\"messages\": [...]}} rows) "
                               "and cannot be mixed with text inputs; prepare them apart")
        return prepare_chat(files, out_dir, tok, dict(tokenizer=tokenizer, vocab_size=vocab_size,
                            tokenizer_path=tokenizer_path, jsonl_field=jsonl_field,
                            errors=errors, max_bytes=max_bytes), val_fraction, seed, progress)

    def docs(desc):
        return iter_documents(files, jsonl_field, errors, progress, desc)

    tok, n_docs = _first_pass(docs, tokenizer, vocab_size, tokenizer_path, tok)
    if n_docs == 0:
        raise PrepareError("the corpus is empty (no non-empty document in "
                           f"{len(files)} file{'s' if len(files) != 1 else ''})")
    out = _open_output(out_dir)
    written = _write_splits(docs, tok, out, n_docs, val_fraction, seed)
    meta = {
        "format": data_mod.FORMAT,
        "dtype": written["dtype"],
        "train": written["train"],
        "val": written["val"],
        "tokenizer": tok.describe(),
        "sources": sources,
        "split": {"by": written["by"], "val_fraction": val_fraction, "seed": seed},
        "args": {"tokenizer": tokenizer, "vocab_size": vocab_size,
                 "tokenizer_path": tokenizer_path, "jsonl_field": jsonl_field,
                 "errors": errors, "max_bytes": max_bytes},
    }
    return _close_output(out, tok, meta)


def _open_output(out_dir) -> Path:
    """The output directory, made, and not a data directory until _close_output."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / data_mod.META).unlink(missing_ok=True)  # incomplete until meta.json is back
    return out


def _close_output(out: Path, tok, meta: dict) -> dict:
    """The tokenizer, then meta.json, which makes the directory a data directory."""
    tok.save(out)
    with atomic_write(out / data_mod.META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return meta


# -- chat data sets ------------------------------------------------------------------------------
def _conversations(files: list[Path], errors: str, progress: bool, desc: str):
    """(where, messages) of every conversation of the chat files (read_conversations)."""
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
              file=sys.stderr) as bar:
        for f in files:
            yield from read_conversations(f, errors)
            bar.update(f.stat().st_size)


def _chat_tokenizer(convs, tok, tok_args: dict):
    """(tokenizer with a chat template, number of conversations): tok, or --tokenizer's (a BPE
    trained on the messages' text, one id short of --vocab-size to leave room for the
    template's token), through chat.with_template."""
    n = 0

    def texts():
        nonlocal n
        for _, msgs in convs("reading"):
            n += 1
            yield from (m["content"] for m in msgs)

    try:
        if tok is None and tok_args["tokenizer"] == "bpe":
            tok = tokenizer_mod.train_bpe(texts(), tok_args["vocab_size"] - 1)
        else:
            for _ in texts():
                pass
            if tok is None:
                tok = tokenizer_mod.build(tok_args["tokenizer"], path=tok_args["tokenizer_path"])
        return chat_mod.with_template(tok), n
    except (tokenizer_mod.TokenizerError, chat_mod.ChatError) as e:
        raise PrepareError(str(e)) from None


def _write_chat(convs, tok, out: Path, n: int, val_fraction: float, seed: int) -> dict:
    """Pass 2: each conversation's ids (chat.conversation_ids), target mask and start into the
    split it was drawn for; the splits' stats."""
    dtype = data_mod.token_dtype(tok.vocab_size)
    val_ids = choose_val_docs(n, val_fraction, seed)
    stats = {s: {"file": f"{s}.bin", "mask": f"{s}.mask.bin", "idx": f"{s}.idx.bin", "tokens": 0,
                 "bytes": 0, "docs": 0, "targets": 0, "target_bytes": 0} for s in data_mod.SPLITS}
    starts = {s: [0] for s in data_mod.SPLITS}
    names = [(s, k) for s in data_mod.SPLITS for k in ("file", "mask", "idx")]
    with contextlib.ExitStack() as stack:  # every file appears, or none does
        tmps = {nk: stack.enter_context(atomic_write(out / stats[nk[0]][nk[1]])) for nk in names}
        handles = {nk: stack.enter_context(open(tmps[nk], "wb")) for nk in names if nk[1] != "idx"}
        for i, (where, msgs) in enumerate(convs("tokenizing")):
            try:
                ids, trained = chat_mod.conversation_ids(tok, msgs)
            except chat_mod.ChatError as e:
                raise PrepareError(f"{where}: {e}") from None
            split = "val" if i in val_ids else "train"
            handles[split, "file"].write(np.asarray(ids, dtype=dtype).tobytes())
            handles[split, "mask"].write(np.asarray(trained, dtype=np.uint8).tobytes())
            st = stats[split]
            st["tokens"] += len(ids)
            st["docs"] += 1
            st["targets"] += sum(trained)
            st["bytes"] += sum(len(m["content"].encode("utf-8")) for m in msgs)
            st["target_bytes"] += sum(len(m["content"].encode("utf-8")) for m in msgs
                                      if m["role"] == "assistant")
            starts[split].append(st["tokens"])
        for s in data_mod.SPLITS:
            handles[s, "file"].close()
            handles[s, "mask"].close()
            np.asarray(starts[s], dtype=np.int64).tofile(tmps[s, "idx"])
    return {"dtype": dtype.name, **stats}


def prepare_chat(files: list[Path], out_dir, tok, tok_args: dict, val_fraction: float,
                 seed: int, progress: bool) -> dict:
    """A chat data set (data.py) from chat .jsonl files: conversations split by a seeded draw
    (at least one each way), tokenized with tok (or --tokenizer's) given a chat template."""
    def convs(desc):
        return _conversations(files, tok_args["errors"], progress, desc)

    tok, n = _chat_tokenizer(convs, tok, tok_args)
    if n < 2:
        raise PrepareError(f"a chat data set needs at least 2 conversations (one goes to val), "
                           f"found {n}")
    out = _open_output(out_dir)
    written = _write_chat(convs, tok, out, n, val_fraction, seed)
    return _close_output(out, tok, {
        "format": data_mod.FORMAT, "kind": "chat", "dtype": written["dtype"],
        "train": written["train"], "val": written["val"], "tokenizer": tok.describe(),
        "sources": [str(f) for f in files],
        "split": {"by": "conversation", "val_fraction": val_fraction, "seed": seed},
        "args": tok_args})


def summary(meta: dict, out_dir) -> str:
    t, v = meta["train"], meta["val"]
    if meta.get("kind") == "chat":
        return (f"wrote {out_dir}: chat, train {t['docs']:,} conversations ({t['tokens']:,} "
                f"tokens, {t['targets']:,} trained), val {v['docs']:,} conversations "
                f"({v['targets']:,} trained tokens), {meta['dtype']}, tokenizer "
                f"{meta['tokenizer']['name']} (vocab {meta['tokenizer']['vocab_size']})")
    return (f"wrote {out_dir}: train {t['tokens']:,} tokens ({t['docs']:,} docs, "
            f"{t['bytes']:,} bytes), val {v['tokens']:,} tokens ({v['docs']:,} docs), "
            f"{meta['dtype']}, tokenizer {meta['tokenizer']['name']} "
            f"(vocab {meta['tokenizer']['vocab_size']})")


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    """Options shared with train.py, which prepares raw text given to --data."""
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "bytes", "gpt2"],
                   help="bpe: byte-level BPE trained on the corpus (rustbpe); bytes: raw "
                        "UTF-8 bytes; gpt2: GPT-2's encoding from local files")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--tokenizer-path", default=None,
                   help="gpt2: a .tiktoken file or a directory with vocab.bpe + encoder.json "
                        "(default: tiktoken's cache)")
    p.add_argument("--jsonl-field", default="text", help="the text field of .jsonl inputs")
    p.add_argument("--errors", default="strict", choices=["strict", "replace"],
                   help="invalid UTF-8: stop with its position, or replace it with U+FFFD")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog=PROG, description="Tokenize text into train.bin/val.bin/meta.json.")
    p.add_argument("inputs", nargs="*",
                   help="text/JSONL files, globs or directories (default: the Python "
                        "standard library's source)")
    p.add_argument("--out", default=None,
                   help=f"output directory (default: {DEFAULT_OUT} for the default corpus, "
                        "data/<first input's name> otherwise)")
    add_tokenizer_args(p)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--max-bytes", type=int, default=None,
                   help=f"cap on the default corpus (default {DEFAULT_MAX_BYTES:,}; 0 = all)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = args.out or (f"data/{Path(args.inputs[0].rstrip('/*')).stem or 'corpus'}"
                       if args.inputs else DEFAULT_OUT)

    def run() -> int:
        meta = prepare(args.inputs or None, out, args.tokenizer, args.vocab_size,
                       args.tokenizer_path, args.jsonl_field, args.val_fraction, args.seed,
                       args.errors, args.max_bytes, progress=not args.no_progress)
        print(summary(meta, out))
        return 0
    return run_cli(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
