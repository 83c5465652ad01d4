"""benchmarks/run.py: its quickest mode writes valid JSON and markdown, the bars are read from the
rows correctly, the README table renders, and --device cuda on a CPU-only machine says why it
cannot run. No timing is asserted: the numbers are whatever this machine measures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run  # noqa: E402  (benchmarks/run.py)
from helpers import needs_ext  # noqa: E402

BAR_STATES = {"PASS", "FAIL", "not measured"}


def _env():
    # The same gptmod_ext as this process: the installed one in CI, the checkout's in development.
    import gptmod_ext

    pkg_parent = str(Path(gptmod_ext.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_quick_run_writes_json_md_and_readme(tmp_path):
    # The cheapest real suite (decode_attention: two cache lengths, two batch sizes) in its quick
    # mode, fp32 only, no compile: the whole path from the suite's rows to the files. The other
    # suites' tables and bars are checked on synthetic rows below (their quick modes take minutes
    # on a small shared machine).
    cmd = [sys.executable, "benchmarks/run.py", "--suite", "decode", "--quick", "--no-compile",
           "--dtype", "float32", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    files = list(tmp_path.glob("*-quick.json"))
    assert len(files) == 1, sorted(x.name for x in tmp_path.iterdir())
    res = json.loads(files[0].read_text())
    assert res["machine"] and res["machine"].startswith("cpu-")
    assert files[0].name == f"{res['machine']}-{res['date']}-quick.json"
    assert res["quick"] is True and res["compile"] is False and res["dtypes"] == ["float32"]
    assert res["info"]["torch"] == torch.__version__
    assert res["copy_bandwidth"]["GBps"] > 0
    assert set(res["suites"]) == {"decode"}
    for name, suite in res["suites"].items():
        assert suite["status"] in ("ok", "skipped"), (name, suite.get("message"))
        if suite["status"] == "ok":
            assert suite["rows"], name
            assert all(Path(png).exists() for png in suite["plots"])
    assert [b["bar"] for b in res["bars"]] == [b[0] for b in run.BARS]
    assert all(b["status"] in BAR_STATES for b in res["bars"])
    assert all(b["status"] == "not measured" for b in res["bars"][:3])  # ops was not run
    if res["suites"]["decode"]["status"] == "ok":  # the quick lengths include the bars' 4096
        assert all(b["status"] != "not measured" for b in res["bars"][3:5])

    md = files[0].with_suffix(".md").read_text()
    for text in ("# gptmod_ext benchmarks", res["info"]["torch"], "command: `", "--quick",
                 "## Bars", "## decode", "CPU capability"):
        assert text in md, text

    p = subprocess.run([sys.executable, "benchmarks/run.py", "--readme", "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    latest = (tmp_path / "LATEST.md").read_text()
    assert latest.strip() in p.stdout
    assert res["machine"] in latest and "decode_attention B=8" in latest


def _synthetic(quick=False):
    suites = {
        "ops": [dict(op="rope", mode="fwd", shape=(8, 512, 12, 64), dtype="float32", impl=impl,
                     median_ms=ms, min_ms=ms, speedup_vs_eager=2.0 / ms, speedup_vs_compile=None,
                     gbps=10.0, frac_copy=0.5, note=None) for impl, ms in (("ours", 1.0),
                                                                            ("eager", 2.0))]
        + [dict(op="swiglu", mode=m, shape=(4096, 3072), dtype="float32", impl="ours",
                median_ms=1.0, min_ms=1.0, speedup_vs_eager=x, speedup_vs_compile=None,
                gbps=10.0, frac_copy=0.5, note=None) for m, x in (("fwd", 1.29), ("fwd+bwd", 1.5))],
        "decode": [dict(device="cpu", dtype="float32", B=b, L=4096, Hq=12, Hkv=4, D=64, ours_ms=1.0,
                        sdpa_gqa_ms=x, sdpa_repeat_ms=2.0, compile_ms=None, copy_ms=0.5,
                        ours_GBps=4.0, copy_GBps=8.0, vs_sdpa_gqa=x, vs_sdpa_repeat=2.0,
                        vs_compile=None) for b, x in ((1, 1.1), (8, 1.4))],
        "generate": [dict(engine="gptmod ext", batch=1, new_tokens=256, seconds=1.0,
                          tok_per_s=256.0, ttft_ms=5.0, vs_hf=1.6, dtype="float32"),
                     dict(engine="hf generate", batch=1, new_tokens=256, seconds=1.6,
                          tok_per_s=160.0, ttft_ms=9.0, vs_hf=1.0, dtype="float32")],
        "train": [dict(engine="gptmod default", tokens_per_s=200.0, ms_per_step=10.0, mfu=None,
                       note="", preset="tiny", batch=8, seq=256, dtype="float32", device="cpu",
                       vs_hf_fp32=2.1, vs_hf_bf16=1.2, rounds=20),
                  dict(engine="HF LlamaForCausalLM", tokens_per_s=100.0, ms_per_step=20.0,
                       mfu=None, note="", preset="tiny", batch=8, seq=256, dtype="float32",
                       device="cpu")],
        "serve": [dict(clients=c, requests=32, failed=f, tokens=1000, seconds=1.0, tok_per_s=t,
                       ttft_p50_ms=1.0, ttft_p99_ms=2.0, itl_p50_ms=1.0, itl_p99_ms=2.0,
                       errors=["HTTP 429"] if f else [], speedup=t / 100)
                  for c, t, f in ((1, 100.0, 0), (32, 400.0, 1))],
    }
    for name in suites:
        run.add_derived(name, suites[name])
    res = dict(machine="cpu-test-2c", date="2026-11-25", started="2026-11-25T00:00:00+00:00",
               command="x", device="cpu", dtypes=["float32"], quick=quick, compile=True,
               info=dict(cpu_model="Test CPU", usable_cpus=2, torch=torch.__version__),
               copy_bandwidth=dict(GBps=10.0, nbytes=1 << 20), duration_s=1.0,
               suites={n: dict(module=f"benchmarks/{run.SUITES[n][0]}.py", status="ok", rows=r,
                               seconds=1.0) for n, r in suites.items()})
    res["bars"] = run.evaluate_bars(res)
    return res


def test_bars_and_tables_from_rows(tmp_path):
    res = _synthetic()
    got = {b["bar"].split(" ")[0] + str(i): (b["status"], b["measured"])
           for i, b in enumerate(res["bars"])}
    assert [s for s, _ in got.values()] == ["PASS", "FAIL", "PASS", "PASS", "FAIL", "PASS", "FAIL",
                                            "PASS", "FAIL"]
    assert res["bars"][7]["measured"] == pytest.approx(2.1)  # the default command vs HF fp32
    assert res["bars"][6]["measured"] == pytest.approx(4.0)  # 4x, but a failed request: FAIL
    assert res["suites"]["decode"]["rows"][0]["pct_copy"] == pytest.approx(0.5)
    assert res["suites"]["train"]["rows"][0]["vs_hf"] == pytest.approx(2.0)
    md = run.render_markdown(res)
    for name in run.SUITES:
        assert f"## {name}:" in md
    assert "| rope | fwd | [8, 512, 12, 64] | float32 | 1.00 | 2.00 |" in md
    assert "HTTP 429" in md and "**FAIL**" in md

    # --readme picks each machine's newest full run over a newer quick one.
    run.common.write_json(tmp_path / "cpu-test-2c-2026-11-25.json", res)
    quick = _synthetic(quick=True)
    quick["started"] = "2026-11-26T00:00:00+00:00"
    quick["suites"]["ops"]["rows"] = []
    run.common.write_json(tmp_path / "cpu-test-2c-2026-11-26-quick.json", quick)
    text = run.render_readme(tmp_path)
    assert "cpu-test-2c-2026-11-25.md" in text and "quick run" not in text
    assert text.count("| PASS |") == 5


def test_missing_suite_is_skipped_with_a_message(monkeypatch):
    monkeypatch.setitem(run.SUITES, "ops", ("bench_does_not_exist", "x"))
    out = run.run_suite("ops", "cpu", ["float32"], True, False)
    assert out["status"] == "skipped" and "bench_does_not_exist.py" in out["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_a_cpu_only_machine_says_why(capsys, tmp_path):
    assert run.main(["--device", "cuda", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err
    assert not list(tmp_path.iterdir())


def test_serve_comparison_sides_and_ratios(monkeypatch, tmp_path):
    # bench_serve's before / after comparison: which package and server options each side
    # runs with, alternating rounds, medians and after/before ratios, the markdown. The
    # servers themselves are replaced by rows made up here (no timing is involved).
    import bench_serve

    calls = []

    def fake_run(quick, preset, ckpt, concurrency, threads, src, server_args=()):
        calls.append((src, tuple(server_args)))
        fast = 2.0 if server_args else 1.0
        return [{"clients": c, "ttft_p50_ms": 100 / fast, "ttft_p99_ms": 200 / fast,
                 "itl_p50_ms": 10.0, "itl_p99_ms": 20.0, "tok_per_s": 50 * fast}
                for c in (1, 32)]
    monkeypatch.setattr(bench_serve, "run", fake_run)
    monkeypatch.setattr(bench_serve, "make_run", lambda path, preset: path)
    monkeypatch.setattr(bench_serve, "run_dir_for", lambda src, path: path)
    res = bench_serve.compare(None, True, None, None, rounds=2, after_args=["--compile"])
    assert calls == [(None, ()), (None, ("--compile",))] * 2
    assert res["after_over_before"] == [
        {"clients": c, "ttft_p50_ms": 0.5, "ttft_p99_ms": 0.5, "itl_p50_ms": 1.0,
         "itl_p99_ms": 1.0, "tok_per_s": 2.0} for c in (1, 32)]
    text = bench_serve.compare_markdown(res, {"cpu_model": "x", "usable_cpus": 2, "torch": "t"})
    assert "Before: this checkout; after: this checkout (" in text and "--compile." in text
    assert "| 32 | 0.50 | 0.50 | 1.00 | 1.00 | 2.00 |" in text
    calls.clear()
    res = bench_serve.compare("/elsewhere/python", True, None, None, rounds=1)
    assert calls == [("/elsewhere/python", ()), (None, ())]
    assert res["before"] == "the package in /elsewhere/python"


def test_serve_baseline_reads_a_run_dir_without_newer_fields(tmp_path):
    # An older package refuses config fields it does not know: the baseline side serves a copy
    # without them, as long as each holds its default (the same model); otherwise one error.
    import dataclasses

    import bench_serve
    from gptmod_ext import GPTConfig

    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    old_fields = [f for f in fields if f not in ("softcap_in_loss", "norm_bias")]
    pkg = tmp_path / "old" / "gptmod_ext"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import dataclasses\n"
        f"GPTConfig = dataclasses.make_dataclass('GPTConfig', {old_fields!r})\n")
    run = tmp_path / "run"
    run.mkdir()
    model = GPTConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2).to_dict()
    (run / "config.json").write_text(json.dumps({"format": "x", "model": model}))
    old = bench_serve.run_dir_for(str(tmp_path / "old"), run)
    assert old != run and json.loads((run / "config.json").read_text())["model"] == model
    got = json.loads((old / "config.json").read_text())["model"]
    assert sorted(got) == sorted(old_fields) and all(got[k] == model[k] for k in got)
    assert bench_serve.run_dir_for(os.pathsep.join([str(tmp_path / "old"), "x"]), old) == old
    model["softcap_in_loss"] = False
    (run / "config.json").write_text(json.dumps({"format": "x", "model": model}))
    with pytest.raises(SystemExit, match="softcap_in_loss"):
        bench_serve.run_dir_for(str(tmp_path / "old"), run)


@needs_ext
def test_bench_softcap_writes_its_three_ways(tmp_path):
    import bench_softcap

    assert bench_softcap.main(["--budget", "0", "--rounds", "2", "--out", str(tmp_path)]) == 0
    md = next(tmp_path.glob("*-softcap.md")).read_text()
    doc = json.loads(next(tmp_path.glob("*-softcap.json")).read_text())
    assert [r["way"] for r in doc["rows"]] == ["no cap", "cap, logits returned",
                                               "cap, return_logits=False"]
    assert all(r["rounds"] == 2 and r["ms_per_step"] > 0 for r in doc["rows"])
    assert "| cap, return_logits=False |" in md


def test_bench_ab_alternates_and_takes_ratios_per_pair(monkeypatch):
    # bench_ab's bookkeeping on made-up rounds: sides alternate (A B, then B A), each pair gives
    # after/before, the median of those is the result, and the table shows them.
    import bench_ab

    calls, values = [], {"old": iter([100.0, 90.0, 110.0]), "new": iter([150.0, 180.0, 110.0])}

    def fake_round(python_dir, suite, args):
        calls.append(python_dir)
        return {"tok/s": next(values[python_dir])}
    monkeypatch.setattr(bench_ab, "one_round", fake_round)
    args = bench_ab.argparse.Namespace(before="old", after="new", suite=["decode"], rounds=3)
    res = bench_ab.compare(args)
    assert calls == ["old", "new", "new", "old", "old", "new"]
    m = res["decode"]["tok/s"]
    assert m["ratios"] == [1.5, 2.0, 1.0] and m["median_ratio"] == 1.5
    text = bench_ab.markdown(res, {"name": "cpu-x-2c"}, "cmd", "0.1")
    assert "| decode | tok/s | 100.0 | 150.0 | 1.50, 2.00, 1.00 | 1.50x |" in text
