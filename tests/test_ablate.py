"""python -m gptmod_ext.ablate: a small grid writes its three report files, the report's numbers
are the run directories' own, `gpt2` and `modern` are the models their names promise, widths
are matched, a stopped grid resumes without retraining finished runs, a failed run is reported
while the others finish, and bad input is one line."""
import json
import statistics
from pathlib import Path

import pytest
import torch
from helpers import prepare_test_corpus

from gptmod_ext import ablate as A
from gptmod_ext.checkpoint import load_model
from gptmod_ext.model import GPT, GPTConfig

MODEL = "n_layer=1,n_embd=32,n_head=2,n_kv_head=1,block_size=32"
TRAIN = "--eval-iters 2 --sample-tokens 0 --backend torch"
MAX_ITERS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_test_corpus(tmp_path_factory.mktemp("data") / "stdlib")


def ablate(data_dir, out, *args):
    """python -m gptmod_ext.ablate in this process (the runs are its subprocesses)."""
    return A.main(["--data", str(data_dir), "--out-dir", str(out), "--model-args", MODEL,
                   "--max-iters", str(MAX_ITERS), "--batch-size", "4", "--eval-interval", "2",
                   "--train-args", TRAIN, "--jobs", "2", "--threads", "1", "--no-progress",
                   *[str(a) for a in args]])


def metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def snapshot(run_dir):
    """What retraining would change: the weights' mtime and the metrics lines."""
    return (Path(run_dir, "model.safetensors").stat().st_mtime_ns, metrics(run_dir))


@pytest.fixture(scope="module")
def grid(tmp_path_factory, data_dir):
    """gpt2 and modern, two seeds, built the way an interrupted grid is: seed 1337 finished,
    then seed 1338 stopped at step 2 (--stop-at), then the whole grid run again."""
    out = tmp_path_factory.mktemp("grid") / "ablate"
    runs = {(v, s): out / "runs" / v / f"seed{s}" for v in ("gpt2", "modern") for s in (1337, 1338)}
    assert ablate(data_dir, out, "--variants", "gpt2,modern", "--seeds", 1) == 0
    finished = {k: snapshot(d) for k, d in runs.items() if k[1] == 1337}
    assert ablate(data_dir, out, "--variants", "gpt2,modern", "--seeds", 2, "--stop-at", 2) == 0
    stopped = {k: snapshot(d) for k, d in runs.items() if k[1] == 1338}
    assert ablate(data_dir, out, "--variants", "gpt2,modern", "--seeds", 2) == 0
    return out, runs, finished, stopped


def test_grid_writes_the_report(grid):
    out = grid[0]
    doc = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"], r["status"]) for r in doc["runs"]] == [
        ("gpt2", 1337, "done"), ("gpt2", 1338, "done"), ("modern", 1337, "done"),
        ("modern", 1338, "done")]
    assert [(s["variant"], s["n"]) for s in doc["summary"]] == [("gpt2", 2), ("modern", 2)]
    md = (out / "results.md").read_text()
    assert "| variant | change | params" in md and md.count("\n| gpt2 |") == 1
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_numbers_are_the_run_dirs_own(grid):
    out = grid[0]
    doc = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    final = {}
    for r in doc["runs"]:
        rows = metrics(out / r["run_dir"])
        last = [x for x in rows if "final_val_loss" in x][-1]
        assert last["step"] == MAX_ITERS
        assert r["final_val_loss"] == last["final_val_loss"]
        assert r["final_val_bpb"] == last["final_val_bpb"]
        assert r["params"] == rows[0]["params"]
        assert r["tokens"] == MAX_ITERS * 4 * 32
        final[r["variant"], r["seed"]] = last["final_val_loss"]
    for s in doc["summary"]:
        losses = [final[s["variant"], seed] for seed in (1337, 1338)]
        mean, std = statistics.fmean(losses), statistics.stdev(losses)
        assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
        assert f"| {mean:.3f} ± {std:.3f} |" in md
    diffs = [final["modern", s] - final["gpt2", s] for s in (1337, 1338)]
    delta = doc["summary"][1]["delta_gpt2"]
    assert delta["mean"] == pytest.approx(statistics.fmean(diffs))
    assert delta["std"] == pytest.approx(statistics.stdev(diffs))
    assert f"{statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}" in md


def non_embedding(model):
    """Parameters outside the token and position tables and an untied lm_head, by name."""
    skip = ("wte.", "wpe.", "lm_head.")
    return sum(p.numel() for n, p in model.named_parameters()
               if not any(n.startswith(s) for s in skip))


def test_gpt2_and_modern_are_what_their_names_say(grid):
    runs = grid[1]
    want = {"gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True,
                         tie_embeddings=True, logit_softcap=0.0, n_kv_head=2, ffn_hidden=128),
            "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                           tie_embeddings=False, n_kv_head=1)}
    counts = {}
    for (variant, seed), run_dir in runs.items():
        config = json.loads((run_dir / "config.json").read_text())
        model = config["model"]
        assert {k: model[k] for k in want[variant]} == want[variant]
        assert (model["n_layer"], model["n_embd"], model["n_head"]) == (1, 32, 2)
        assert config["train"]["seed"] == seed and config["step"] == MAX_ITERS
        # An ordinary run directory: it loads and samples like any other.
        m, tok, info = load_model(run_dir, device="cpu", dtype="float32", backend="torch")
        assert info.kind == "run"
        assert m.generate(torch.tensor([[tok.eot_id]]), 4, temperature=0).shape == (1, 5)
        counts[variant] = non_embedding(m)
    assert json.loads((runs["modern", 1337] / "config.json").read_text())["model"][
        "logit_softcap"] > 0
    assert abs(counts["modern"] / counts["gpt2"] - 1) < 0.05, counts


def test_default_grid_widths_are_matched():
    shape = A.parse_shape(A.DEFAULT_SHAPE)
    counts = {}
    for v in A.default_grid():
        fields = A.model_fields(v, shape)
        counts[v.name] = non_embedding(GPT(GPTConfig(vocab_size=256, **fields)))
        if v.name == "gpt2":
            assert fields["ffn_hidden"] == 4 * shape["n_embd"]
    assert max(counts.values()) / min(counts.values()) < 1.02, counts


def test_stopped_grid_resumes_without_retraining(grid):
    out, runs, finished, stopped = grid
    for key, (mtime, rows) in finished.items():
        assert snapshot(runs[key]) == (mtime, rows), f"{key} was trained again"
        log = (out / "logs" / f"{key[0]}-seed{key[1]}.log").read_text()
        assert log.count("\n$ ") + log.startswith("$ ") == 1, log
    for key, (_, rows) in stopped.items():
        assert max(r["step"] for r in rows) == 2
        after = metrics(runs[key])
        # The rows up to step 2 are the stopped run's own (a retrained run rewrites them).
        assert [r for r in after if r["step"] <= 2] == rows
        log = (out / "logs" / f"{key[0]}-seed{key[1]}.log").read_text()
        assert "--resume" in log and log.count("\nstep 1: loss") + log.startswith("step 1:") == 1


def test_failed_run_is_reported_and_others_finish(tmp_path, data_dir, capsys):
    out = tmp_path / "grid"
    out.mkdir()
    (out / "grid.json").write_text(json.dumps({"format": A.FORMAT, "grid": {"other": 1}}))
    capsys.readouterr()
    assert ablate(data_dir, out, "--variants", "gpt2", "--seeds", 1) == 1
    err = capsys.readouterr().err
    assert err.count(f"{A.PROG}: error: ") == 1 and "another grid" in err and "--force" in err
    assert ablate(data_dir, out, "--variants", "gpt2", "--seeds", 1, "--force") == 0
    # A run that cannot write its directory fails; the grid goes on and reports it.
    (out / "runs" / "+rope").mkdir()
    (out / "runs" / "+rope" / "seed1337").write_text("not a directory")
    capsys.readouterr()
    assert ablate(data_dir, out, "--variants", "gpt2,+rope,+rmsnorm", "--seeds", 1) == 1
    err = capsys.readouterr().err
    assert "1 of 3 runs failed" in err.splitlines()[-1], err
    doc = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in doc["runs"]] == ["done", "failed", "done"]
    md = (out / "results.md").read_text()
    assert "| +rope |" in md and "| failed |" in md and "+rope seed 1337: failed" in md


@pytest.mark.parametrize("args, fragment", [
    (["--variants", "gpt2,llama"], "unknown variant 'llama'; known variants: gpt2, +rope"),
    (["--variants", "modern+rope"], "modern has rope already"),
    (["--variants", "+softcap,modern"], "is the same model as '+softcap'"),
    (["--model-args", "pos_emb=rope"], "pos_emb are what the variants decide"),
    (["--train-args", "--seed 3"], "--seed is set by the grid"),
    (["--train-args", "--init-from out"], "trains each architecture from scratch"),
    (["--train-args=--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--model-args", "n_head=2,n_kv_head=2"], "not fewer than n_head=2"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, fragment):
    rc = A.main(["--out-dir", str(tmp_path / "g"), "--data", str(tmp_path / "none"), *args])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "g").exists()


def test_list_prints_the_default_grid(capsys):
    assert A.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [l.split()[0] for l in lines]
    assert names == ["gpt2", "+rope", "+rmsnorm", "+swiglu", "+no-bias", "+gqa", "+untie",
                     "modern"]
    assert all(len(l.split(None, 1)[1]) > 10 for l in lines)
    for name in names:  # every listed name is understood, and they walk to modern
        A.parse_variant(name)
    assert A.parse_variant("+softcap").on == A.parse_variant("modern").on
