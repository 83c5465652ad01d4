"""Before / after: two versions of the package, alternating, in fresh processes.

A change that restructures code is measured against the version before it, the way the
developers' guide asks: the two versions run one after the other in pairs of rounds (A, B, A, B,
...), each in its own process (two builds of the ops cannot share one), and each pair gives one
ratio; the median of the ratios is the result (a neighbour that slows the machine for a moment
slows one pair, not the median). A version is the path of its `python/` directory; its compiled
libraries are found as usual (its checkout's build/, or GPTMOD_EXT_LIB_DIR).

Suites (each a measurement a round runs in its process):
  decode   greedy generation of 256 tokens after a 16-token prompt, `small` preset (seed 0), B=1
           and B=8, tokens/s: as `generate` runs with no flag ("default") and after
           `model.compile_decode()` ("fastest"), ext backend
  train    the default training command's steady tokens/s (--max-iters 40 on the default corpus,
           no evaluations; the median over steps 10..40), one process per round

    PYTHONPATH=python python benchmarks/bench_ab.py --before /path/to/old/python \\
        --after python --suite decode train --rounds 3 [--threads 2] [--data data/stdlib]

Writes benchmarks/results/<machine>-<date>-ab.{json,md} (--out).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _paths  # noqa: F401  (python/ only when gptmod_ext is not installed)
import common  # noqa: E402

DECODE = r"""
import json, sys, time, torch
from gptmod_ext import GPT, GPTConfig
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
model = GPT(GPTConfig.from_preset("small", vocab_size=4096)).eval()
model.backend = "ext"
out = {}
for mode in ("default", "fastest"):
    if mode == "fastest":
        model.compile_decode()
    for B in (1, 8):
        idx = torch.randint(0, 4096, (B, 16), generator=torch.Generator().manual_seed(B))
        model.generate(idx, 16, temperature=0)  # warm-up (packing, first calls)
        t = time.perf_counter()
        model.generate(idx, 256, temperature=0)
        out[f"{mode} B={B} tok/s"] = B * 256 / (time.perf_counter() - t)
print(json.dumps(out))
"""

TRAIN = r"""
import json, sys, statistics, torch
from pathlib import Path
from gptmod_ext import train
out_dir, data, threads = sys.argv[1], sys.argv[2], sys.argv[3]
rc = train.main(["--out-dir", out_dir, "--data", data, "--max-iters", "40",
                 "--eval-interval", "1000", "--final-eval-tokens", "0", "--sample-tokens", "0",
                 "--no-progress", "--threads", threads])
rows = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] >= 10]
print(json.dumps({"train tok/s": statistics.median(tps)}))
"""


def one_round(python_dir: str, suite: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(python_dir).resolve()), PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        if suite == "decode":
            cmd = [sys.executable, "-c", DECODE, str(args.threads)]
        else:
            cmd = [sys.executable, "-c", TRAIN, str(Path(tmp) / "out"),
                   str(Path(args.data).resolve()), str(args.threads)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{suite} round in {python_dir} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(args) -> dict:
    """{suite: {metric: {before: [...], after: [...], ratios: [...], median_ratio}}}."""
    res = {}
    for suite in args.suite:
        rounds = {"before": [], "after": []}
        for i in range(args.rounds):
            for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
                rounds[side].append(one_round(getattr(args, side), suite, args))
                print(f"{suite} round {i + 1} {side}: {rounds[side][-1]}", file=sys.stderr)
        res[suite] = {}
        for metric in rounds["after"][0]:
            b = [r[metric] for r in rounds["before"]]
            a = [r[metric] for r in rounds["after"]]
            ratios = [x / y for x, y in zip(a, b)]
            res[suite][metric] = {"before": b, "after": a, "ratios": ratios,
                                  "median_ratio": statistics.median(ratios)}
    return res


def markdown(res: dict, machine: dict, command: str, load: str) -> str:
    lines = ["# Before / after, alternating in fresh processes", "",
             f"Machine: {machine['name']} ({machine.get('cpu_model')}, kernels "
             f"{machine.get('cpu_capability')}), torch {machine.get('torch')}; load before the "
             f"run: {load}. Command: `{command}`", "",
             "Ratio: after / before per pair of rounds (above 1: after is faster), and their "
             "median.", "",
             "| suite | metric | before (median) | after (median) | ratios | median ratio |",
             "|---|---|---:|---:|---|---:|"]
    for suite, metrics in res.items():
        for name, m in metrics.items():
            lines.append(f"| {suite} | {name} | {statistics.median(m['before']):.1f} | "
                         f"{statistics.median(m['after']):.1f} | "
                         f"{', '.join(f'{r:.2f}' for r in m['ratios'])} | "
                         f"{m['median_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the old version's python/ directory")
    p.add_argument("--after", default=str(Path(__file__).resolve().parents[1] / "python"))
    p.add_argument("--suite", nargs="+", choices=["decode", "train"], default=["decode", "train"])
    p.add_argument("--rounds", type=int, default=3, help="pairs of rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="data/stdlib", help="a prepared data directory (train)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res = compare(args)
    machine = common.machine_info("cpu")
    machine["name"] = common.machine_slug(machine)
    command = "PYTHONPATH=python python benchmarks/bench_ab.py " + shlex.join(sys.argv[1:])
    stem = Path(args.out) / f"{machine['name']}-{_dt.date.today()}-ab"
    text = markdown(res, machine, command, load)
    common.write_json(stem.with_suffix(".json"), {"machine": machine, "command": command,
                                                  "load_before": load, "results": res})
    common.write_text(stem.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
