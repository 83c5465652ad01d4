"""Do the plain decode step's [in, out] weight copies (decode.DecodeWeights) still pay?

Since the fused CPU decode step became the default, the plain step decodes only where the fused
one does not run: the GPT-2 architecture (LayerNorm, GELU, biases, learned positions: nanoGPT
checkpoints), the torch backend, and steps of more than 16 rows. This times one cached decode
step of those cases with the copies on and off (model.decoder.cpu_copies), round-robin in one
process, as the ratio per round of time without copies over time with them (above 1: the copies
pay), with quartiles.

    PYTHONPATH=python python benchmarks/bench_decode_copies.py [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch

import _paths  # noqa: F401  (python/ only when gptmod_ext is not installed)
from gptmod_ext import GPT, GPTConfig  # noqa: E402
from common import machine_info, machine_slug, round_ratios, time_round_robin  # noqa: E402

CASES = {  # name: (config, backend, rows)
    "gpt2-arch ext B=1": ("gpt2", "ext", 1), "gpt2-arch ext B=8": ("gpt2", "ext", 8),
    "modern torch B=1": ("small", "torch", 1), "modern ext B=32 (wide)": ("small", "ext", 32),
}


def model_for(kind: str, backend: str) -> GPT:
    torch.manual_seed(0)
    if kind == "gpt2":  # the small preset's sizes with GPT-2's architecture
        cfg = GPTConfig.from_preset("gpt2", vocab_size=4096, block_size=512, n_layer=6, n_head=6,
                                    n_embd=384)
    else:
        cfg = GPTConfig.from_preset("small", vocab_size=4096)
    return GPT(cfg, backend=backend).eval()


def step_fn(model: GPT, rows: int, copies: bool, context: int = 128):
    model = copy.deepcopy(model)  # each side its own model: turning copies off drops them
    model.decoder.cpu_copies = copies
    cache = model.new_kv_cache(rows, context + 8)
    model.forward_cached(torch.randint(0, 4096, (rows, context)), cache)
    tok = torch.randint(0, 4096, (rows, 1))

    def step():
        cache.seqlens.fill_(context)  # every call decodes position `context` again
        model.forward_cached(tok, cache)
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of rounds per case")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, (kind, backend, B) in CASES.items():
        m = model_for(kind, backend)
        assert m.decoder.choose_step(m, (B, 1)) == "plain", name
        times = time_round_robin({"copies": step_fn(m, B, True), "none": step_fn(m, B, False)},
                                 budget_s=args.budget, min_repeats=20)
        r = round_ratios(times, "none", "copies")
        rows.append({"case": name, "ms_with_copies": 1e3 * times["copies"]["median_s"],
                     "ms_without": 1e3 * times["none"]["median_s"], "ratio": r})
        print(f"{name:>24}: {rows[-1]['ms_with_copies']:.2f} ms with copies, "
              f"{rows[-1]['ms_without']:.2f} ms without: {r['median']:.2f}x "
              f"({r['q1']:.2f}-{r['q3']:.2f})")
    machine = machine_info("cpu")
    print(f"{machine_slug(machine)}, {torch.get_num_threads()} threads, load "
          f"{os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "threads": torch.get_num_threads(), "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
