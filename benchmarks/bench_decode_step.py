"""The fused CPU decode step (torch.ops.gptmod.decode_step) by weight format and batch, op by op.

One model (the 'small' preset: 6 x 384, 6/2 heads, vocab 4096, seed-0 random weights), its
Linears packed as fp32, bf16 and int8 (pack_linear_int8, one or more group sizes; int8 runs with
fp32 activations), one step at B rows with `--context` tokens already cached. Every variant is
timed round-robin in one process (common.time_round_robin) and reported as ratios per round
against a baseline, with quartiles: on a shared machine those hold where absolute times do not.

Rows: time per step, tokens/s (B / time), and, per format, B=8 tokens/s over B=1 tokens/s.

    PYTHONPATH=python python benchmarks/bench_decode_step.py [--groups 32 64 128] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import _paths  # noqa: F401  (python/ only when gptmod_ext is not installed)
from gptmod_ext import ops  # noqa: E402
from gptmod_ext.model import GPT, GPTConfig  # noqa: E402
from common import round_ratios, time_round_robin  # noqa: E402


def step_fn(model: GPT, fmt: str, B: int, context: int, group: int):
    """A closure running one decode_step of `model` with its Linears in format `fmt`."""
    c = model.config
    norms = [n.weight.detach() for b in model.h for n in (b.ln_1, b.ln_2)] + [model.ln_f.weight.detach()]
    weights = [lin.weight.detach() for b in model.h for lin in (b.attn.c_attn, b.attn.c_proj,
                                                                 b.mlp.c_fc, b.mlp.c_proj)]
    weights.append(model.lm_head.weight.detach())
    linears, scales = ops.pack_decode_linears(weights, "int8" if fmt == "int8" else None, group)
    kv = model.new_kv_cache(B, context + 8).buffer
    kv.copy_(torch.randn(kv.shape, generator=torch.Generator().manual_seed(B)))
    lens = torch.full((B,), context, dtype=torch.int32)  # not advanced: every call writes row `context`
    x = model.wte.weight[:B].detach().clone()

    def run():
        with torch.inference_mode():
            return torch.ops.gptmod.decode_step(
                x, norms, linears, kv, lens, model.rope_cos, model.rope_sin, c.n_head, c.n_kv_head,
                c.ffn_hidden, c.padded_vocab_size, c.norm_eps, c.logit_softcap, c.rope_interleaved,
                scales)
    return run


def run(batches: list[int], groups: list[int], context: int, budget_s: float, clock) -> dict:
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_preset("small", vocab_size=4096)).eval()
    models = {"float32": base, "bfloat16": copy.deepcopy(base).to(torch.bfloat16)}
    fns = {}
    for B in batches:
        fns[f"fp32 B={B}"] = step_fn(models["float32"], "fp32", B, context, 0)
        fns[f"bf16 B={B}"] = step_fn(models["bfloat16"], "bf16", B, context, 0)
        for g in groups:
            fns[f"int8 g{g} B={B}"] = step_fn(models["float32"], "int8", B, context, g)
    times = time_round_robin(fns, budget_s=budget_s, min_repeats=20, clock=clock)
    rows = []
    for name, t in times.items():
        fmt, B = name.rsplit(" B=", 1)
        base_name = f"fp32 B={B}"
        rows.append({"variant": fmt, "batch": int(B), "ms": t["median_s"] * 1e3,
                     "tok_per_s": int(B) / t["median_s"], "rounds": t["n"],
                     "time_vs_fp32": round_ratios(times, name, base_name)})
    scaling = {}
    if 1 in batches:
        for B in batches:
            for fmt in {r["variant"] for r in rows}:
                if B != 1:
                    r = round_ratios(times, f"{fmt} B=1", f"{fmt} B={B}")  # t1 / tB
                    scaling[f"{fmt} B={B}/B=1"] = {k: v * B for k, v in r.items()}
    return {"rows": rows, "tok_s_scaling": scaling}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--groups", type=int, nargs="+", default=[ops.INT8_GROUP],
                    help="int8 group sizes to compare")
    ap.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing rounds")
    ap.add_argument("--thread-time", action="store_true",
                    help="time with time.thread_time (CPU time of this thread: with --threads 1 it "
                         "leaves out the waits for a core on a busy machine)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.thread_time else time.perf_counter
    res = run(args.batches, args.groups, args.context, args.budget, clock)
    print(f"threads={torch.get_num_threads()} capability={ops.cpu_capability()} "
          f"bf16dp={ops.cpu_bf16dp()} vnni={ops.cpu_vnni()} context={args.context} "
          f"clock={clock.__name__}")
    print(f"{'variant':<12}{'batch':>6}{'ms':>9}{'tok/s':>10}{'time vs fp32 (q1-q3)':>26}")
    for r in res["rows"]:
        q = r["time_vs_fp32"]
        print(f"{r['variant']:<12}{r['batch']:>6}{r['ms']:>9.3f}{r['tok_per_s']:>10.1f}"
              f"{q['median']:>12.3f} ({q['q1']:.3f}-{q['q3']:.3f})")
    for k, q in res["tok_s_scaling"].items():
        print(f"tok/s {k}: {q['median']:.2f}x ({q['q1']:.2f}-{q['q3']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                           capability=ops.cpu_capability(), **res), f, indent=1)


if __name__ == "__main__":
    main()
