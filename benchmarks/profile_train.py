"""Where a training step's milliseconds go, op by op (torch.profiler, CPU or GPU).

Runs the step of gptmod_ext.train (forward, cross-entropy, backward, gradient clipping, fused
AdamW, zero_grad) on random tokens, for each asked dtype (fp32 = no autocast, bf16 = autocast
with fp32 master weights, as `--dtype bfloat16` trains), and writes
results/<machine>-<date>-profile-train.json and .md: the machine, its CPU flags, torch, the
shapes, the command, the load average, and per dtype the ops sorted by self time (ms per step,
share of the step, calls per step) plus the step time split into forward / backward / optimizer.

    PYTHONPATH=python python benchmarks/profile_train.py [--dtype float32 bfloat16] [--steps 5]
        [--backend ext] [--preset tiny --batch-size 8 --block-size 256] [--device cpu]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import _paths  # noqa: F401  (python/ only when gptmod_ext is not installed)
from gptmod_ext.devices import DTYPES, dtype_name  # noqa: E402
from gptmod_ext.model import GPT, GPTConfig  # noqa: E402
from common import machine_info, machine_slug, md_table, write_json, write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("forward", "backward", "optimizer")


def cpu_flags() -> list[str]:
    """The vector and matrix flags of /proc/cpuinfo that decide which kernels can run."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    return []


def make_step(model, x, y, autocast):
    """The trainer's step, each phase in a record_function range."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95),
                            fused=True)

    def step():
        with record_function("forward"), autocast:
            _, loss = model(x, y, return_logits=False)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def profile_dtype(cfg, dtype, backend, B, T, device, steps, warmup, init) -> dict:
    model = GPT(cfg).to(device)
    model.load_state_dict(init)
    model.backend = backend
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    step = make_step(model, x, y, autocast)
    for _ in range(warmup):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    cuda = device.type == "cuda"
    events = prof.key_averages()
    phases = {e.key: (e.device_time_total if cuda else e.cpu_time_total) / 1e3 / steps
              for e in events if e.key in PHASES}
    ops = []
    for e in events:
        if e.key in PHASES or e.key.startswith("ProfilerStep"):
            continue
        self_ms = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps
        if self_ms <= 0:
            continue
        ops.append({"op": e.key, "self_ms": self_ms, "share": self_ms / (wall * 1e3),
                    "calls": e.count / steps,
                    "total_ms": (e.device_time_total if cuda else e.cpu_time_total) / 1e3 / steps})
    ops.sort(key=lambda r: -r["self_ms"])
    return {"dtype": dtype_name(dtype), "step_ms": wall * 1e3, "tokens_per_s": B * T / wall,
            "phases_ms": phases, "ops": ops}


def to_markdown(res: dict, top: int) -> str:
    m = res["machine"]
    lines = [f"# Training step profile: {res['preset']} {res['batch']} x {res['seq']}, "
             f"{res['backend']} backend, {m['cpu_model']}", "",
             f"- machine: {m['cpu_model']}, {m['usable_cpus']} CPUs, torch {m['torch']}, "
             f"{m['torch_threads']} threads, gptmod CPU build {m['cpu_capability']}",
             f"- CPU flags: {' '.join(res['cpu_flags']) or '-'}",
             f"- load average before / after: {res['load_before']} / {res['load_after']} "
             f"(the machine was {'shared' if res['load_before'][0] > 1.5 else 'about idle'})",
             f"- command: `{res['command']}`",
             f"- {res['steps']} profiled steps after {res['warmup']} warm-up steps; self time "
             "per step (time inside the op itself, children excluded); the shares are of the "
             "step's wall time", ""]
    for r in res["runs"]:
        ph = ", ".join(f"{k} {v:.1f} ms" for k, v in r["phases_ms"].items())
        lines += [f"## {r['dtype']}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s",
                  "", f"Phases: {ph}.", ""]
        rows = [[f"`{o['op']}`", f"{o['self_ms']:.2f}", f"{100 * o['share']:.1f}%",
                 f"{o['calls']:g}"] for o in r["ops"][:top]]
        lines += [md_table(["op", "self ms/step", "share", "calls/step"], rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--backend", default="ext")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=30, help="ops listed per dtype in the markdown")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="file stem under results/ (default: "
                    "<machine>-<date>-profile-train)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset)
    T = args.block_size or cfg.block_size
    init = GPT(cfg).to(device).state_dict()
    load_before = [round(v, 2) for v in os.getloadavg()]
    runs = [profile_dtype(cfg, DTYPES[d], args.backend, args.batch_size, T, device, args.steps,
                          args.warmup, init) for d in args.dtype]
    info = machine_info(device)
    res = {"machine": info, "cpu_flags": cpu_flags(), "preset": args.preset,
           "batch": args.batch_size, "seq": T, "backend": args.backend, "steps": args.steps,
           "warmup": args.warmup, "load_before": load_before,
           "load_after": [round(v, 2) for v in os.getloadavg()],
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "date": datetime.date.today().isoformat(), "runs": runs}
    stem = args.out or f"{machine_slug(info, device)}-{res['date']}-profile-train"
    write_json(RESULTS / f"{stem}.json", res)
    write_text(RESULTS / f"{stem}.md", to_markdown(res, args.top) + "\n")
    for r in runs:
        print(f"{r['dtype']}: {r['step_ms']:.1f} ms/step; " + ", ".join(
            f"{o['op']} {100 * o['share']:.0f}%" for o in r["ops"][:8]))
    print(f"wrote {RESULTS / stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
