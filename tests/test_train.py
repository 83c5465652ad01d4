"""The trainer and the run directory: loss goes down, --stop-at/--resume is exact, Ctrl-C and
NaN stop cleanly, bad inputs are one-line errors, checkpoints load back (tied weights, compiled
models), and two DDP processes equal one process with twice the accumulation."""
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import typing
import unicodedata
from pathlib import Path

import pytest
from helpers import PKG_PARENT, prepare_test_corpus
import torch
from safetensors.torch import load_file

from gptmod_ext import checkpoint as C
from gptmod_ext import data as D
from gptmod_ext import prepare as P
from gptmod_ext import train as TR
from gptmod_ext.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = "n_layer=1,n_embd=32,n_head=2,n_kv_head=1,block_size=64"
COMMON = ["--model-args", MODEL, "--block-size", "32", "--batch-size", "4", "--eval-iters", "2",
          "--sample-tokens", "8", "--backend", "torch", "--no-progress", "--lr", "1e-2",
          "--log-interval", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_test_corpus(tmp_path_factory.mktemp("data") / "stdlib")


def train(capsys, *args):
    """python -m gptmod_ext.train in this process: (exit code, stderr)."""
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        # One thread: the machine is shared, and oversubscribed threads only spin.
        rc = TR.main([*COMMON, "--threads", "1", *[str(a) for a in args]])
    finally:
        torch.set_num_threads(threads)
    return rc, capsys.readouterr().err


def run_subprocess(args, timeout=180, launcher=None):
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    cmd = (launcher or [sys.executable, "-m", "gptmod_ext.train"]) + COMMON + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def one_error_line(err, *fragments):
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith(f"{TR.PROG}: error: ")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_loss_decreases_and_run_dir(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-iters", 60,
                    "--eval-interval", 20, "--eval-iters", 4, "--batch-size", 8)
    assert rc == 0, err
    rows = metrics(out)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    unigram = rows[0]["unigram_entropy"]
    # Independent baseline: the unigram entropy recomputed here from the token file.
    import numpy as np
    tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    p = np.bincount(tokens).astype(float)
    p = p[p > 0] / p.sum()
    assert unigram == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
    assert evals[0]["val_loss"] == pytest.approx(math.log(512), abs=0.3)  # uniform at init
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals
    assert evals[-1]["val_loss"] < unigram  # better than any context-free model
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    bpt = json.loads((data_dir / "meta.json").read_text())["val"]
    assert evals[-1]["val_bpb"] == pytest.approx(
        evals[-1]["val_loss"] * bpt["tokens"] / bpt["bytes"] / math.log(2))
    (final,) = [r for r in rows if "final_val_loss" in r]  # the whole val split, once
    n_val = len(np.fromfile(data_dir / "val.bin", dtype=np.uint16))
    assert final["step"] == 60 and final["final_val_tokens"] == n_val - 1
    assert math.isfinite(final["final_val_loss"]) and final["final_val_loss"] < unigram
    assert f"over {n_val - 1:,} tokens: the whole val split" in err
    assert f"val loss {final['final_val_loss']:.4f} on the whole val split" in err
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "train_state.pt"):
        assert (out / f).is_file()
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["step"] == 60 and cfg["model"]["n_layer"] == 1
    assert cfg["train"]["max_iters"] == 60 and cfg["tokenizer"]["kind"] == "bpe"
    model, tok, config = C.load_model(out, device="cpu")
    assert not model.training and tok.vocab_size == 512
    text = tok.decode(model.generate(torch.tensor([[tok.eot_id]]), 10, temperature=0)[0].tolist())
    assert isinstance(text, str)


def test_exact_resume(tmp_path, capsys, data_dir):
    # Dropout makes the torch RNG matter; accumulation and evaluations in between must not
    # shift anything either.
    args = ["--data", data_dir, "--max-iters", 40, "--eval-interval", 10, "--grad-accum", 2,
            "--model-args", MODEL + ",dropout=0.1"]
    rc, err = train(capsys, *args, "--out-dir", tmp_path / "straight")
    assert rc == 0, err
    rc, err = train(capsys, *args, "--out-dir", tmp_path / "split", "--stop-at", 20)
    assert rc == 0, err
    assert "stopped at step 20" in err
    assert json.loads((tmp_path / "split" / "config.json").read_text())["step"] == 20
    mid = load_file(tmp_path / "split" / "model.safetensors")
    rc, err = train(capsys, *args, "--out-dir", tmp_path / "split", "--resume")
    assert rc == 0, err
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 3
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # the last 20 steps did something
    sa = torch.load(tmp_path / "straight" / "train_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 40
    assert torch.equal(sa["data"]["sampler"], sb["data"]["sampler"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    # The metrics of the resumed run continue the first part without duplicates.
    steps = [r["step"] for r in metrics(tmp_path / "split") if "loss" in r]
    assert steps == list(range(1, 41))


def test_ctrl_c_saves_a_checkpoint(tmp_path, data_dir):
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, PYTHONWARNINGS="ignore")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptmod_ext.train", *COMMON, "--data", str(data_dir),
           "--out-dir", str(out), "--max-iters", "100000", "--eval-interval", "100000"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    deadline = time.time() + 120
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step 3: loss") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err = "".join(seen) + rest
    assert proc.returncode == 0, err
    assert "stopped at step" in err and "Traceback" not in err
    step = json.loads((out / "config.json").read_text())["step"]
    assert step >= 3
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-iters", 50,
                    "--eval-interval", 1, "--lr", "1e35", "--grad-clip", 0,
                    "--warmup-iters", 1, "--sample-tokens", 0)
    assert rc == 1
    one_error_line(err, "the loss is", "last good")
    bad_step = int(err.split("the loss is ")[1].split(" at step ")[1].split(";")[0])
    saved = json.loads((out / "config.json").read_text())["step"]
    assert saved == bad_step - 1
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == saved


def test_whole_split_evaluation_scores_every_token_once(data_dir):
    # With every residual branch's output projection zeroed, the logits at a position depend
    # on its token only, so the loss over the split does not depend on how it is cut into
    # windows: the reference scores each (token, next token) pair on its own, in float64.
    import numpy as np
    tokens = np.fromfile(data_dir / "val.bin", dtype=np.uint16)[:1000]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=512, n_layer=2, n_embd=32, n_head=2,
                                      n_kv_head=1, block_size=1024))
    with torch.no_grad():
        for block in model.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    prev = torch.from_numpy(tokens[:-1].astype(np.int64)).view(-1, 1)
    nxt = torch.from_numpy(tokens[1:].astype(np.int64))
    logits = model(prev)[0][:, 0, :512].double()
    want = torch.nn.functional.cross_entropy(logits, nxt).item()
    for block_size, batch in ((16, 4), (7, 3), (999, 1)):
        loss, n = TR.evaluate_split(model, tokens, block_size, batch, "cpu",
                                    contextlib.nullcontext())
        assert n == len(tokens) - 1
        assert loss == pytest.approx(want, rel=1e-6)
    # A cap: evenly spaced windows, about max_targets targets, the count reported.
    loss, n = TR.evaluate_split(model, tokens, 16, 4, "cpu", contextlib.nullcontext(), 320)
    assert 320 - 16 < n <= 320 and loss == pytest.approx(want, rel=0.1)
    offsets, skip = D.covering_windows(len(tokens), 16, 320)
    assert offsets[0] == 0 and offsets[-1] == len(tokens) - 1 - 16 and len(set(offsets.tolist())) == 20


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path, capsys, data_dir):
    # What a SIGKILL mid-write leaves behind: `.NAME.tmpPID` of a process that is gone. The
    # next write of NAME removes it; a temporary of a live process (a writer at work) stays.
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [out / f".{name}.tmp{dead.pid}" for name in
             ("loss.png", "metrics.jsonl", "model.safetensors", "config.json", "train_state.pt")]
    live = out / f".loss.png.tmp{os.getppid()}"
    for p in stale + [live]:
        p.write_bytes(b"half a file")
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-iters", 2,
                    "--eval-interval", 2, "--sample-tokens", 0)
    assert rc == 0, err
    assert [p for p in stale if p.exists()] == []
    assert live.exists()
    live.unlink()
    assert not list(out.glob(".*tmp*"))


def test_torchrun_needs_no_flags(tmp_path):
    # The documented command, as torchrun's own launcher runs it, with no --grad-accum: one
    # micro-batch per process, said in the banner.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "gptmod_ext.train"]
    data = P.prepare([str(f) for f in P.stdlib_files(max_bytes=60_000)], tmp_path / "d",
                     tokenizer="bytes", progress=False)
    assert data["val"]["tokens"] > 32
    proc = run_subprocess(["--data", tmp_path / "d", "--out-dir", tmp_path / "o",
                           "--max-iters", 2, "--eval-interval", 2, "--sample-tokens", 0],
                          timeout=300, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 x 1 x 4 x 32); --grad-accum not given: one micro-batch per process" in proc.stderr
    assert json.loads((tmp_path / "o" / "config.json").read_text())["train"]["grad_accum"] == 2


def test_missing_data_is_one_line(tmp_path):
    proc = run_subprocess(["--data", tmp_path / "nope", "--out-dir", tmp_path / "o"])
    assert proc.returncode == 1
    one_error_line(proc.stderr, "does not exist")


def test_bad_inputs(tmp_path, capsys, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # raw text is prepared into ./data/
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    rc, err = train(capsys, "--data", tmp_path / "empty", "--out-dir", tmp_path / "o")
    assert rc == 1
    one_error_line(err, "corpus is empty")

    rc, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / "o",
                    "--block-size", 1000)
    assert rc == 1
    one_error_line(err, "--block-size 1000 is larger than the model's block_size 64")

    rc, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / "o", "--grad-accum", 3,
                    "--resume")
    assert rc == 1
    one_error_line(err, "--resume", "does not exist")

    rc, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / "o",
                    "--model-args", "n_layer=1,n_embd=30,n_head=4")
    assert rc == 1
    one_error_line(err, "n_embd=30")


# Spellings of each GPTConfig field's type (the README's model table writes True/False/None).
GOOD = {bool: [("True", True), ("false", False), ("1", True), ("0", False)],
        int: [("12", 12), ("-3", -3)], float: [("1e-6", 1e-6), ("50", 50.0), ("0.5", 0.5)],
        str: [("rmsnorm", "rmsnorm")]}
BAD = {bool: ["yes", "Falsy", "2", ""], int: ["1.5", "True", "x", ""],
       float: ["fast", "1e", ""], str: [""]}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(GPTConfig)])
def test_model_args_parse_every_field_by_its_type(field):
    typ = typing.get_type_hints(GPTConfig)[field]
    optional = type(None) in typing.get_args(typ)
    base = [a for a in typing.get_args(typ) if a is not type(None)][0] if optional else typ
    for text, value in GOOD[base]:
        got = TR.parse_model_args(f"{field}={text}")[field]
        assert got == value and type(got) is type(value), (field, text, got)
    for text in ["None", "null"]:
        if optional:
            assert TR.parse_model_args(f"{field}={text}") == {field: None}
        elif base is not str:
            with pytest.raises(TR.TrainError, match=f"{field}={text!r}"):
                TR.parse_model_args(f"{field}={text}")
    for text in BAD[base]:
        with pytest.raises(TR.TrainError) as e:
            TR.parse_model_args(f"{field}={text}")
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and f"{field}={text!r}" in msg, msg


def test_model_args_as_the_readme_spells_them(tmp_path, capsys, data_dir):
    # tie_embeddings=False must untie (the string "False" was truthy), bias=False no biases,
    # n_kv_head=None is MHA; an unknown field or a bad value is one line.
    out = tmp_path / "o"
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-iters", 1,
                    "--final-eval-tokens", 0, "--model-args",
                    MODEL.replace(",n_kv_head=1", "") + ",tie_embeddings=False,bias=False,"
                    "n_kv_head=None,norm=layernorm")
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())["model"]
    assert (cfg["tie_embeddings"], cfg["bias"], cfg["n_kv_head"]) == (False, False, 2)
    weights = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" in weights and not any(k.endswith(".bias") for k in weights)
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--model-args", "biass=False")
    assert rc == 1
    one_error_line(err, "'biass' is not a GPTConfig field")
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--model-args", "bias=maybe")
    assert rc == 1
    one_error_line(err, "bias='maybe'", "True/False")


def test_cpu_only_build_with_device_cuda(tmp_path, capsys, data_dir, monkeypatch):
    # A torch that sees a GPU, a gptmod_ext built without CUDA: the one message of
    # _ext.resolve_backend for an explicit --backend ext (see test_devices.py for the others).
    from gptmod_ext import _ext
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "AVAILABLE", True)
    monkeypatch.setattr(_ext, "LOAD_ERROR", None)
    monkeypatch.setattr(_ext, "CUDA_LOADED", False)
    rc, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / "o", "--device", "cuda",
                    "--dtype", "float32", "--backend", "ext")
    assert rc == 1
    one_error_line(err, "backend 'ext' cannot run on cuda", "no CUDA kernels")
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoints(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-iters", 4,
                    "--eval-interval", 2, "--sample-tokens", 0)
    assert rc == 0, err
    state = (out / "train_state.pt").read_bytes()
    (out / "train_state.pt").write_bytes(b"garbage" * 10)
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-iters", 8, "--resume")
    assert rc == 1
    one_error_line(err, "train_state.pt is corrupt")
    torch.save({"step": 4, "optimizer": {}}, out / "train_state.pt")  # loads, but is no state
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-iters", 8, "--resume")
    assert rc == 1
    one_error_line(err, "train_state.pt does not fit this run")
    (out / "train_state.pt").write_bytes(state)

    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-iters", 8, "--resume")
    assert rc == 1
    one_error_line(err, "model.safetensors is corrupt or truncated")
    with pytest.raises(C.CheckpointError, match="corrupt or truncated"):
        C.load_model(out, device="cpu")
    (out / "model.safetensors").write_bytes(weights)
    C.load_model(out, device="cpu")  # whole again


def test_load_model_errors(tmp_path, capsys, data_dir):
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.load_model(tmp_path / "missing")
    with pytest.raises(C.CheckpointError, match="holds no model.safetensors"):
        C.load_model(tmp_path)
    out = tmp_path / "run"
    rc, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-iters", 2,
                    "--eval-interval", 2, "--sample-tokens", 0)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["n_layer"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(C.CheckpointError, match="does not match the weights.*missing h.1"):
        C.load_model(out, device="cpu")
    cfg["model"]["n_layer"], cfg["model"]["n_embd"] = 1, 64
    cfg["model"]["head_dim"] = cfg["model"]["ffn_hidden"] = None
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(C.CheckpointError, match="does not match the weights.*shape"):
        C.load_model(out, device="cpu")
    (out / "config.json").write_text("{broken")
    with pytest.raises(C.CheckpointError, match="config.json is corrupt"):
        C.load_model(out, device="cpu")


def _tiny_model(**kw):
    cfg = GPTConfig.from_preset("tiny", vocab_size=300, n_layer=1, n_embd=32, n_head=2,
                                n_kv_head=1, block_size=16, **kw)
    return GPT(cfg)


def test_tied_weights_and_compiled_model_round_trip(tmp_path):
    from gptmod_ext.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    tied = GPT(GPTConfig.from_preset("gpt2", vocab_size=300, n_layer=1, n_embd=32, n_head=2,
                                     block_size=16))
    assert tied.lm_head.weight is tied.wte.weight
    compiled = torch.compile(tied)  # wrapping is lazy: nothing is compiled here
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    C.save_model(tmp_path, compiled, byte_tokenizer(), {"note": "test"}, {"step": 0})
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert not any("_orig_mod" in k for k in keys)
    assert "wte.weight" in keys and "lm_head.weight" not in keys  # stored once
    model, tok, cfg = C.load_model(tmp_path, device="cpu", backend="torch")
    assert model.lm_head.weight is model.wte.weight  # still tied after loading
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(x)[0], tied.eval()(x)[0], rtol=0, atol=0)
    assert cfg.config["train"] == {"note": "test"} and tok.kind == "bytes"

    untied = _tiny_model()
    C.save_model(tmp_path / "u", untied, byte_tokenizer())
    model, _, _ = C.load_model(tmp_path / "u", device="cpu", dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    for k, v in untied.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k].float(), v, rtol=1e-2, atol=1e-2)


def test_ddp_two_processes_match_accumulation(tmp_path, capsys, data_dir):
    common = ["--data", data_dir, "--max-iters", 6, "--eval-interval", 3, "--grad-accum", 2,
              "--sample-tokens", 0]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "gptmod_ext.train"]
    proc = run_subprocess(common + ["--out-dir", tmp_path / "ddp"], timeout=300,
                          launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 x 2 x" not in proc.stderr and "(2 x 1 x 4 x 32)" in proc.stderr
    assert proc.stderr.count("unigram entropy of the train tokens") == 1  # rank 0 only prints
    rows = metrics(tmp_path / "ddp")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(l) for l in losses)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["step"] == 6

    rc, err = train(capsys, *common, "--out-dir", tmp_path / "single")
    assert rc == 0, err
    single_losses = [r["loss"] for r in metrics(tmp_path / "single") if "loss" in r]
    assert single_losses == pytest.approx(losses, rel=1e-4)
    a = load_file(tmp_path / "ddp" / "model.safetensors")
    b = load_file(tmp_path / "single" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)



def test_ddp_accumulation_must_divide(tmp_path, capsys, data_dir, monkeypatch):
    # torchrun's environment for rank 0 of 2; the check comes before any process group.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / "x", "--grad-accum", 3)
    assert rc == 1
    one_error_line(err, "--grad-accum 3 is not divisible by the 2 processes")


def test_raw_text_data_is_prepared(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "poem.txt"
    text.write_text("".join(f"line {i}: roses are red, violets are blue\n" for i in range(300)))
    rc, err = train(capsys, "--data", text, "--tokenizer", "bytes", "--out-dir", tmp_path / "o",
                    "--max-iters", 2, "--eval-interval", 2, "--sample-tokens", 0)
    assert rc == 0, err
    prepared = list((tmp_path / "data").glob("poem-*/meta.json"))
    assert len(prepared) == 1
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["tokenizer"]["kind"] == "bytes" and cfg["model"]["vocab_size"] == 257


def test_console_samples_are_text(tmp_path, capsys, monkeypatch):
    # An untrained bytes model samples control bytes (NUL, ^A, ESC ...): the console shows them
    # escaped, so a redirected log stays text; newlines still break the sample's lines.
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "poem.txt"
    text.write_text("".join(f"line {i}: roses are red,\tviolets are blue\n" for i in range(300)))
    rc, err = train(capsys, "--data", text, "--tokenizer", "bytes", "--out-dir", tmp_path / "o",
                    "--max-iters", 1, "--eval-interval", 1, "--sample-tokens", 200,
                    "--final-eval-tokens", 0)
    assert rc == 0, err
    samples = "".join(line for line in err.splitlines(keepends=True) if line.startswith("  | "))
    assert samples and re.search(r"\\x[01][0-9a-f]", samples), samples
    assert not [ch for ch in err if ch not in "\n\t" and unicodedata.category(ch) == "Cc"]
    assert TR.console_text("a\x00b\x01\x0b\x1b[2J\r\n\tc\u00e9\U0001f642") == \
        "a\\x00b\\x01\\x0b\\x1b[2J\\r\n\tc\u00e9\U0001f642"


@pytest.mark.skipif(not __import__("gptmod_ext")._ext.AVAILABLE,
                    reason="the compiled ops are not built")
def test_ext_backend_trains_like_torch(tmp_path, capsys, data_dir):
    losses = {}
    for backend in ("ext", "torch"):
        rc, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / backend,
                        "--max-iters", 5, "--eval-interval", 5, "--sample-tokens", 4,
                        "--backend", backend)
        assert rc == 0, err
        losses[backend] = [r["loss"] for r in metrics(tmp_path / backend) if "loss" in r]
    assert json.loads((tmp_path / "ext" / "config.json").read_text())["train"]["backend"] == "ext"
    assert losses["ext"] == pytest.approx(losses["torch"], rel=1e-4)


def test_mlflow_missing_is_one_line(tmp_path, capsys, data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    rc, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / "o", "--max-iters", 2,
                    "--mlflow", f"sqlite:///{tmp_path}/m.db")
    assert rc == 1
    one_error_line(err, "--mlflow needs the mlflow package")


def test_mlflow_logging(tmp_path, capsys, data_dir):
    mlflow = pytest.importorskip("mlflow")  # the optional `mlflow` extra
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    rc, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / "o", "--max-iters", 4,
                    "--eval-interval", 2, "--sample-tokens", 0, "--mlflow", uri)
    assert rc == 0, err
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("gptmod_ext")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["max_iters"] == "4" and run.data.params["lr"] == "0.01"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    local = [r["loss"] for r in metrics(tmp_path / "o") if "loss" in r]
    assert [m.value for m in losses] == pytest.approx(local)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 2, 4]



@pytest.mark.skipif(not __import__("gptmod_ext")._ext.AVAILABLE,
                    reason="the compiled ops are not built")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_resume_ext_backend(tmp_path, capsys, data_dir, dtype):
    # The default run's path: our fused norm and loss ops, fp32 or bf16 autocast (fp32 master
    # weights and optimizer). Resuming must give the weights of the run that never stopped.
    args = ["--data", data_dir, "--max-iters", 16, "--eval-interval", 8, "--backend", "ext",
            "--dtype", dtype]
    rc, err = train(capsys, *args, "--out-dir", tmp_path / "straight")
    assert rc == 0, err
    rc, err = train(capsys, *args, "--out-dir", tmp_path / "split", "--stop-at", 8)
    assert rc == 0, err
    rc, err = train(capsys, *args, "--out-dir", tmp_path / "split", "--resume")
    assert rc == 0, err
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in a.values())  # master weights stay fp32
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "split" / "config.json").read_text())["train"]["dtype"] == dtype


def test_epochs_line(tmp_path, capsys, data_dir):
    rc, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / "run", "--max-iters", 4,
                    "--eval-interval", 4, "--final-eval-tokens", 0)
    assert rc == 0, err
    import numpy as np
    n_train = len(np.fromfile(data_dir / "train.bin", dtype=np.uint16))
    epochs = 4 * 4 * 32 / n_train  # steps x batch x block over the train tokens
    assert f"4 steps x 128 tokens = {epochs:.2f} epochs of the {n_train:,} train tokens" in err
    assert metrics(tmp_path / "run")[0]["epochs"] == pytest.approx(epochs)


def test_overfitting_warning_once(tmp_path, capsys, data_dir):
    # Val loss that falls, then rises at three evaluations in a row, then keeps rising: one
    # warning, at the third rise, in the console and in metrics.jsonl.
    cfg = TR.Config(**{**{f.name: None for f in __import__("dataclasses").fields(TR.Config)},
                       "out_dir": str(tmp_path / "run"), "resume": False, "mlflow": None,
                       "no_progress": True})
    log = TR.RunLogger(cfg, True, 0, 5.0, 1.0, None)
    capsys.readouterr()
    vals = [6.0, 5.0, 4.0, 4.1, 4.05, 4.2, 4.3, 4.4, 4.5]
    for i, v in enumerate(vals):
        log.evaluation(10 * i, {"val": v, "train": v - 1}, 1.0, "")
    err = capsys.readouterr().err
    warnings = [r for r in log.rows if r.get("warning") == "overfitting"]
    assert len(warnings) == 1 and warnings[0]["step"] == 70  # 4.05 -> 4.2 -> 4.3 -> 4.4
    assert err.count("warning: val loss has risen at 3 evaluations in a row") == 1
    assert "(4.0500 -> 4.4000 at step 70)" in err
    log.write_metrics()
    assert [r for r in metrics(tmp_path / "run") if "warning" in r] == warnings
