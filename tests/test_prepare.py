"""prepare: text files, globs, directories, JSONL and TinyStories-format inputs become token
files whose decoded documents are exactly the input documents; bad inputs give one-line
errors with exit code 1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import PKG_PARENT

from gptmod_ext import data as D
from gptmod_ext import prepare as P
from gptmod_ext import tokenizer as T

ROOT = Path(__file__).resolve().parents[1]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args, capsys=None, subprocess_run=False):
    """The prepare CLI, in this process through main() (fast) or as a real subprocess."""
    argv = ["--no-progress", *args]
    if subprocess_run:
        env = dict(os.environ, PYTHONPATH=PKG_PARENT, PYTHONWARNINGS="ignore")
        return subprocess.run([sys.executable, "-m", "gptmod_ext.prepare", *argv],
                              capture_output=True, text=True, env=env, timeout=120)
    capsys.readouterr()
    rc = P.main(argv)
    out = capsys.readouterr()
    return Result(rc, out.out, out.err)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("python -m gptmod_ext.prepare: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def decoded_documents(out_dir):
    """Every document of both splits, decoded from the token files (split at the EOT ids)."""
    ds = D.load(out_dir)
    tok = ds.tokenizer()
    docs = {}
    for split in D.SPLITS:
        ids = np.asarray(ds.split(split)).tolist()
        assert ids[-1] == tok.eot_id  # every document is followed by the separator
        cur, out = [], []
        for i in ids:
            if i == tok.eot_id:
                out.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
        docs[split] = out
    return ds, docs


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = {}
    for i in range(24):
        text = f"Document {i}: " + "naïve café 日本 🎉 " * (i + 1) + f"\nline two of {i}\n"
        f = (root / "sub" if i % 2 else root) / f"doc{i:02d}.txt"
        f.write_text(text, encoding="utf-8")
        docs[f] = text
    (root / ".hidden.txt").write_text("never read")
    rows = [{"text": f"jsonl row {i} with ünïcode", "id": i} for i in range(10)]
    jl = tmp_path / "rows.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    stories = [f"Once upon a time there was a cat number {i}.\nIt was happy." for i in range(15)]
    ts = tmp_path / "TinyStories-valid.txt"
    ts.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return {"root": root, "docs": docs, "jsonl": jl, "rows": [r["text"] for r in rows],
            "tinystories": ts, "stories": stories}


def test_directory_jsonl_and_tinystories(tmp_path, corpus):
    out = tmp_path / "out"
    meta = P.prepare([str(corpus["root"]), str(corpus["jsonl"]), str(corpus["tinystories"])],
                     out, tokenizer="bpe", vocab_size=300, progress=False)
    expected = list(corpus["docs"].values()) + corpus["rows"] + corpus["stories"]
    ds, docs = decoded_documents(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(expected)
    assert meta["split"]["by"] == "document"
    assert meta["val"]["docs"] == round(len(expected) * 0.05) == len(docs["val"])
    assert meta["train"]["docs"] + meta["val"]["docs"] == len(expected)
    for split in D.SPLITS:
        assert meta[split]["tokens"] == len(ds.split(split))
        assert meta[split]["bytes"] == sum(len(d.encode()) for d in docs[split])
    assert meta["dtype"] == "uint16" and ds.train.dtype == np.uint16
    assert T.load(out).vocab_size == meta["tokenizer"]["vocab_size"]


def test_glob_and_determinism(tmp_path, corpus):
    pattern = str(corpus["root"] / "**" / "*.txt")
    a = P.prepare([pattern], tmp_path / "a", tokenizer="bytes", progress=False, seed=7)
    b = P.prepare([pattern], tmp_path / "b", tokenizer="bytes", progress=False, seed=7)
    c = P.prepare([pattern], tmp_path / "c", tokenizer="bytes", progress=False, seed=8)
    for split in D.SPLITS:
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == \
            (tmp_path / "b" / f"{split}.bin").read_bytes()
    _, docs = decoded_documents(tmp_path / "a")
    assert sorted(docs["train"] + docs["val"]) == sorted(corpus["docs"].values())
    # The hidden file is not matched by the glob's * and not read from directories either.
    assert not any("never read" in d for d in docs["train"] + docs["val"])
    # Bytes: one token per UTF-8 byte plus one separator per document.
    assert a["train"]["tokens"] == a["train"]["bytes"] + a["train"]["docs"]
    assert a == b and a["split"] != c["split"]


def test_small_corpus_splits_by_position(tmp_path):
    f = tmp_path / "shakespeare.txt"
    text = "".join(f"Line {i}: to be or not to be.\n" for i in range(200))
    f.write_text(text)
    meta = P.prepare([str(f)], tmp_path / "out", tokenizer="bytes", progress=False)
    assert meta["split"]["by"] == "position"
    _, docs = decoded_documents(tmp_path / "out")
    assert len(docs["train"]) == len(docs["val"]) == 1
    assert docs["train"][0] + docs["val"][0] == text
    assert 0.02 < len(docs["val"][0]) / len(text) < 0.1


def test_token_dtype():
    assert D.token_dtype(4096) == np.uint16
    assert D.token_dtype(65536) == np.uint16
    assert D.token_dtype(65537) == np.uint32


def test_default_corpus_cli(tmp_path, capsys):
    proc = run_cli("--out", str(tmp_path / "std"), "--max-bytes", "150000",
                   "--tokenizer", "bpe", "--vocab-size", "512", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    meta = json.loads((tmp_path / "std" / "meta.json").read_text())
    assert meta["sources"][0].startswith("stdlib:")
    assert 0 < meta["train"]["bytes"] <= 150000
    assert meta["tokenizer"]["kind"] == "bpe"


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("  \n")
    assert_one_line_error(run_cli(str(tmp_path / "empty"), "--out", str(tmp_path / "o"), capsys=capsys),
                          "corpus is empty")


def test_missing_input(tmp_path, capsys):
    assert_one_line_error(run_cli(str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), capsys=capsys),
                          "does not exist")
    assert_one_line_error(run_cli(str(tmp_path / "*.nothing"), "--out", str(tmp_path / "o"), capsys=capsys),
                          "no file matches")


def test_invalid_utf8(tmp_path, capsys):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good text\nmore good text\nbad \xff byte\n" * 3)
    # A real subprocess: the exit code and stderr of `python -m gptmod_ext.prepare` itself.
    assert_one_line_error(run_cli(str(f), "--out", str(tmp_path / "o"), subprocess_run=True),
                          str(f), "invalid UTF-8 at byte 29", "--errors replace")
    proc = run_cli(str(f), "--out", str(tmp_path / "o"), "--errors", "replace",
                   "--tokenizer", "bytes", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    _, docs = decoded_documents(tmp_path / "o")
    assert "\ufffd" in docs["train"][0] + docs["val"][0]


def test_bad_jsonl(tmp_path, capsys):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    assert_one_line_error(run_cli(str(f), "--out", str(tmp_path / "o"), capsys=capsys),
                          "x.jsonl:2", "no field 'text'")
    f.write_text('{"text": "ok"}\nnot json\n')
    assert_one_line_error(run_cli(str(f), "--out", str(tmp_path / "o"), capsys=capsys), "x.jsonl:2")
    proc = run_cli(str(f), "--out", str(tmp_path / "o"), "--jsonl-field", "body", capsys=capsys)
    assert proc.returncode == 1


def test_unreadable_file(tmp_path, monkeypatch):
    # Permissions do not stop root (the test machines run as root), so the OS error is
    # injected where prepare opens files.
    f = tmp_path / "secret.txt"
    f.write_text("text")

    def deny(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(P, "open", deny, raising=False)
    with pytest.raises(P.PrepareError, match=r"cannot read .*secret.txt: Permission denied"):
        P.prepare([str(f)], tmp_path / "o", tokenizer="bytes", progress=False)


def test_data_load_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load(tmp_path / "nothing")
    with pytest.raises(D.DataError, match="not a prepared data directory"):
        D.load(tmp_path)
    f = tmp_path / "t.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    P.prepare([str(f)], tmp_path / "d", tokenizer="bytes", progress=False)
    with open(tmp_path / "d" / "train.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(D.DataError, match="truncated"):
        D.load(tmp_path / "d")
