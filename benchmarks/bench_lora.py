"""LoRA against full fine-tuning: memory and step time on the same model and batch.

One model (the 'small' preset by default: 6 layers, n_embd 384, 6 query / 2 KV heads, vocab
4096, block 256), one fixed batch, one optimizer step = forward, backward, AdamW (the trainer's
configure_optimizer: fused where torch has it), zero_grad. Two ways to train it:
  full   every weight trains: gradients and AdamW's two moments for all of them
  lora   lora.apply(rank R, alpha 2R, every Linear of the blocks): the weights frozen, only the
         adapters have gradients and optimizer state (the trainer's --lora-rank R)
Reported per way: trained parameters, the optimizer state's bytes (AdamW's exp_avg and
exp_avg_sq after a step), the gradients' bytes, the peak memory of training steps over the
memory held before them (CPU: peak RSS of a fresh process running only that way, from
getrusage, minus its RSS before the first step; GPU: torch.cuda.max_memory_allocated over the
allocated bytes before the first step), and the median step time, measured in alternating
rounds in one process (common.time_round_robin), with the ratio full / lora.

    PYTHONPATH=python python benchmarks/bench_lora.py [--preset small] [--rank 8]
        [--batch-size 8] [--block-size 256] [--device cpu|cuda] [--threads N] [--quick]

Writes results/<machine>-<date>-lora.json and .md (…-lora-quick.* with --quick), with the
machine's load average at the start and the end (a shared machine's step times are noisy; the
memory numbers are not).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shlex
import subprocess
import sys
import types
from pathlib import Path

import torch

import _paths  # noqa: E402,F401  (python/ only when gptmod_ext is not installed)
from gptmod_ext import lora  # noqa: E402
from gptmod_ext.model import GPT, GPTConfig  # noqa: E402
from gptmod_ext.train import configure_optimizer  # noqa: E402
import common  # noqa: E402
from common import fmt, md_table, time_round_robin  # noqa: E402

MODES = ("full", "lora")


def build(mode: str, args, device) -> tuple:
    """(step function, model, optimizer) of one way of training, on the same weights and batch."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset, vocab_size=4096, block_size=args.block_size)
    model = GPT(cfg).to(device)
    model.backend = "auto"
    if mode == "lora":
        lora.apply(model, args.rank, 2.0 * args.rank, lora.TARGETS)
    opt_cfg = types.SimpleNamespace(weight_decay=0.0, lr=1e-4, beta1=0.9, beta2=0.95,
                                    device=str(device))
    opt = configure_optimizer(model, opt_cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4096, (args.batch_size, args.block_size), generator=g).to(device)
    y = torch.randint(0, 4096, (args.batch_size, args.block_size), generator=g).to(device)
    model.train()

    def step():
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model, opt


def sizes(model, opt) -> dict:
    """Trained parameters, optimizer state and gradient bytes (after at least one step)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {"params": sum(p.numel() for p in model.parameters()),
            "trained_params": sum(p.numel() for p in trained),
            "optimizer_state_MB": state / 2**20,
            "grads_MB": sum(p.numel() * p.element_size() for p in trained) / 2**20}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(mode: str, args, device) -> dict:
    """Peak memory of 3 training steps over what was held before them (see the module doc)."""
    step, model, opt = build(mode, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss_bytes()
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_over_start_MB": (peak - before) / 2**20, **sizes(model, opt)}


def memory_in_fresh_process(mode: str, argv: list[str]) -> dict:
    """memory() in a new process (peak RSS is a process's whole life: one way per process)."""
    r = subprocess.run([sys.executable, __file__, *argv, "--memory-of", mode],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(args, argv: list[str]) -> list[dict]:
    device = torch.device(args.device)
    mem = {m: (memory(m, args, device) if device.type == "cuda"
               else memory_in_fresh_process(m, argv)) for m in MODES}
    steps = {m: build(m, args, device)[0] for m in MODES}
    times = time_round_robin(steps, device=device, warmup=2, budget_s=args.budget,
                             min_repeats=3 if args.quick else 10)
    return [dict(mode=m, step_ms=times[m]["median_s"] * 1e3, step_min_ms=times[m]["min_s"] * 1e3,
                 n=times[m]["n"], **mem[m]) for m in MODES]


def render(rows: list[dict], info: dict, args, command: str, load: tuple) -> str:
    full, lo = rows
    lines = [f"# LoRA vs full fine-tuning ({args.device})", "",
             f"- machine: {info.get('gpu') or info.get('cpu_model')} "
             f"({info.get('usable_cpus')} usable CPUs, {info.get('torch_threads')} torch threads); "
             f"load average {load[0]:.2f} at the start, {load[1]:.2f} at the end",
             f"- torch {info.get('torch')}, gptmod CPU build {info.get('cpu_capability')}",
             f"- model: '{args.preset}' preset, block {args.block_size}, fp32 weights; batch "
             f"{args.batch_size} x {args.block_size}; LoRA rank {args.rank}, alpha "
             f"{2 * args.rank}, every Linear of the blocks",
             f"- command: `{command}`", "",
             "Peak memory: over what the process held before the first step (CPU: peak RSS of a "
             "process running only that way; GPU: max_memory_allocated). Step times: medians of "
             "alternating rounds in one process.", ""]
    body = [[r["mode"], f"{r['trained_params']:,}", fmt(r["optimizer_state_MB"]),
             fmt(r["grads_MB"]), fmt(r["peak_over_start_MB"]), fmt(r["step_ms"]), str(r["n"])]
            for r in rows]
    body.append(["full / lora", f"{full['trained_params'] / lo['trained_params']:.0f}x",
                 f"{full['optimizer_state_MB'] / lo['optimizer_state_MB']:.0f}x",
                 f"{full['grads_MB'] / lo['grads_MB']:.0f}x",
                 f"{full['peak_over_start_MB'] / lo['peak_over_start_MB']:.2f}x",
                 f"{full['step_ms'] / lo['step_ms']:.2f}x", ""])
    lines.append(md_table(["way", "trained params", "optimizer state MB", "grads MB",
                           "peak over start MB", "step ms (median)", "rounds"], body))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing rounds")
    ap.add_argument("--quick", action="store_true", help="the 'tiny' preset, a short budget")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--memory-of", choices=MODES, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.block_size = "tiny", min(args.block_size, 128)
    args.budget = args.budget or (2.0 if args.quick else 20.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(memory(args.memory_of, args, torch.device(args.device))))
        return 0
    load0 = os.getloadavg()[0]
    rows = run(args, argv)
    load = (load0, os.getloadavg()[0])
    info = common.machine_info(args.device)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    stem = f"{common.machine_slug(info, args.device)}-{date}-lora{'-quick' if args.quick else ''}"
    command = "PYTHONPATH=python python " + shlex.join(["benchmarks/bench_lora.py", *argv])
    common.write_json(Path(args.out) / f"{stem}.json",
                      {"machine": info, "command": command, "load_average": load, "rows": rows})
    text = render(rows, info, args, command, load)
    common.write_text(Path(args.out) / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
