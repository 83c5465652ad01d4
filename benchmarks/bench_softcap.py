"""What the logit soft-cap costs a training step, and what return_logits=False gives back.

The ablation grid's model (4 x 128, 4 / 2 heads, vocab 4096, 16 x 128 tokens, ext backend, one
thread per run as the grid runs two at a time on 2 cores), one optimizer step (forward, loss,
backward, fused AdamW) in three ways, round-robin in one process:
  no cap                       logit_softcap=0
  cap, logits returned         logit_softcap=15, model(x, y): the capped [B·T, V] logits made
  cap, return_logits=False     the same model as the trainer calls it: (None, loss)
Ratios are per round (common.round_ratios), against "no cap".

    PYTHONPATH=python python benchmarks/bench_softcap.py [--threads 1] [--budget 20]

Writes benchmarks/results/<machine>-<date>-softcap.{json,md} (--out).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
from pathlib import Path

import torch

import _paths  # noqa: F401  (python/ only when gptmod_ext is not installed)
import common  # noqa: E402
from gptmod_ext import GPT, GPTConfig  # noqa: E402


def make_step(cap: float, return_logits: bool, x, y):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_kv_head=2,
                    n_embd=128, logit_softcap=cap)
    model = GPT(cfg, backend="ext")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        _, loss = model(x, y, return_logits=return_logits)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timing rounds")
    p.add_argument("--rounds", type=int, default=10, help="at least this many rounds")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 4096, (16, 128), generator=g) for _ in range(2))
    fns = {"no cap": make_step(0.0, True, x, y),
           "cap, logits returned": make_step(15.0, True, x, y),
           "cap, return_logits=False": make_step(15.0, False, x, y)}
    times = common.time_round_robin(fns, warmup=1 if args.rounds < 3 else 3, budget_s=args.budget,
                                    min_repeats=args.rounds)
    info = common.machine_info("cpu")
    rows = [{"way": k, "ms_per_step": t["median_s"] * 1e3, "rounds": t["n"],
             "time_vs_no_cap": common.round_ratios(times, k, "no cap")}
            for k, t in times.items()]
    table = common.md_table(
        ["way", "ms/step (median)", "time vs no cap (q1-q3)", "rounds"],
        [[r["way"], f"{r['ms_per_step']:.1f}",
          "{median:.3f} ({q1:.3f}-{q3:.3f})".format(**r["time_vs_no_cap"]), str(r["rounds"])]
         for r in rows], ["l", "r", "r", "r"])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "\n".join([
        "# The logit soft-cap in a training step", "",
        f"- machine: {info['cpu_model']}, {info['usable_cpus']} CPUs, torch {info['torch']}, "
        f"gptmod CPU build {info['cpu_capability']}, "
        f"{args.threads} thread(s); load average at the end {load}",
        "- model: the ablation grid's (4 x 128, 4 / 2 heads, vocab 4096), batch 16 x 128, "
        "fp32, ext backend; one optimizer step per call, the three ways round-robin",
        f"- command: `PYTHONPATH=python python benchmarks/bench_softcap.py --threads "
        f"{args.threads} --budget {args.budget:g}`", "", table, ""])
    stem = Path(args.out) / f"{common.machine_slug(info)}-{_dt.date.today()}-softcap"
    common.write_json(stem.with_suffix(".json"), {"machine": info, "rows": rows})
    common.write_text(stem.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
