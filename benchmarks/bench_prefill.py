"""Prefill: a whole prompt into an empty KV cache against a plain forward of the same tokens.

One model (the 'small' preset: 6 layers, n_embd 384, 6 query / 2 KV heads, vocab 4096, with
block_size 1024), batch 1, prompts of 128, 512 and 1024 tokens. Per prompt length, in one
round-robin run (so a noisy neighbour slows every column alike):
  plain           model(idx): the uncached forward, SDPA(is_causal), logits at every position
  cached          model.forward_cached(idx, new cache): the prefill path of generate / the
                  sampler / the server (SDPA(is_causal) on the new tokens + kv_cache_write)
  decode-kernel   the same cached prefill forced through decode_attention with Tq = T (what
                  every prefill did before issue 15), for comparison
for the ext backend (and cached / plain for the torch backend). `cached vs plain` is the cached
prefill's time over the plain forward's: the bar is <= 1.3 on CPU (issue 15).

    PYTHONPATH=python python benchmarks/bench_prefill.py [--device cpu|cuda] [--dtype float32]
        [--quick] [--threads N] [--out benchmarks/results]

Writes <out>/<machine>-<date>-prefill.json and .md (…-prefill-quick.* with --quick).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
from pathlib import Path

import torch

import _paths  # noqa: E402,F401  (python/ only when gptmod_ext is not installed)
from gptmod_ext import _ext  # noqa: E402
from gptmod_ext.model import GPT, GPTConfig  # noqa: E402
import common  # noqa: E402
from common import fmt, md_table, time_round_robin  # noqa: E402

LENGTHS = (128, 512, 1024)
BAR = 1.3  # cached prefill time / plain forward time, at most (CPU)


def _cases(model: GPT, idx: torch.Tensor, backend: str) -> dict:
    model.backend = backend
    cache = model.new_kv_cache(idx.size(0), idx.size(1))

    def plain():
        with torch.inference_mode():
            model(idx)

    def cached():
        cache.reset()
        model.forward_cached(idx, cache)

    fns = {"plain": plain, "cached": cached}
    if backend == "ext":
        def decode_kernel():
            cache.reset()
            # fresh=False: the layers read the (empty) cache through decode_attention, Tq = T.
            with torch.inference_mode():
                model.cached_step(idx, cache, slice(None), None, False, False)
        fns["decode-kernel"] = decode_kernel
    return fns


def run(device: str = "cpu", dtype: str = "float32", quick: bool = False,
        budget_s: float | None = None) -> list[dict]:
    """Rows of {backend, T, impl, median_ms, vs_plain} (vs_plain: this time / plain's time)."""
    dev, dt = torch.device(device), getattr(torch, dtype)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("small", vocab_size=4096, block_size=1024)).to(dev, dt).eval()
    lengths = (128, 512) if quick else LENGTHS
    budget = budget_s or (0.5 if quick else 3.0)
    rows = []
    for backend in (["ext"] if _ext.AVAILABLE else []) + ["torch"]:
        for T in lengths:
            idx = torch.randint(0, 4096, (1, T), device=dev)
            times = time_round_robin(_cases(model, idx, backend), device=dev, warmup=2,
                                     budget_s=budget, min_repeats=3 if quick else 5)
            plain = times["plain"]["median_s"]
            for impl, t in times.items():
                rows.append(dict(backend=backend, T=T, impl=impl, dtype=dtype,
                                 median_ms=t["median_s"] * 1e3, n=t["n"],
                                 vs_plain=t["median_s"] / plain))
    return rows


def render(rows: list[dict], info: dict, command: str, device: str) -> str:
    lines = [f"# Prefill: cached vs plain forward ({device})", "",
             f"- machine: {info.get('gpu') or info.get('cpu_model')} "
             f"({info.get('usable_cpus')} usable CPUs, {info.get('torch_threads')} torch threads)",
             f"- torch {info.get('torch')}, gptmod CPU build {info.get('cpu_capability')}",
             "- model: 'small' preset (6 x 384, 6 q / 2 kv heads, D 64, vocab 4096), batch 1",
             f"- dtype: {', '.join(sorted({r['dtype'] for r in rows}))}",
             f"- command: `{command}`", "",
             "`x plain` = this time / the plain forward's time, measured in the same round-robin "
             f"run (below 1: faster). Bar (CPU): cached <= {BAR}x plain.", ""]
    body = []
    for r in rows:
        verdict = ""
        if r["impl"] == "cached" and device == "cpu":
            verdict = "PASS" if r["vs_plain"] <= BAR else "**FAIL**"
        body.append([r["backend"], str(r["T"]), r["impl"], r["dtype"], fmt(r["median_ms"]),
                     f"{r['vs_plain']:.2f}x", verdict])
    lines.append(md_table(["backend", "T", "impl", "dtype", "median ms", "x plain", "bar"], body,
                          ["l", "r", "l", "l", "r", "r", "l"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--quick", action="store_true", help="128/512 tokens, short timing budget")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; 1 keeps a busy shared machine's ratios steady)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_prefill: --device cuda needs a CUDA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    rows = run(args.device, dtype, args.quick)
    info = common.machine_info(args.device)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    stem = f"{common.machine_slug(info, args.device)}-{date}-prefill{'-quick' if args.quick else ''}"
    command = "PYTHONPATH=python python " + shlex.join(["benchmarks/bench_prefill.py", *(argv or sys.argv[1:])])
    out = Path(args.out)
    common.write_json(out / f"{stem}.json", {"machine": info, "command": command, "rows": rows})
    text = render(rows, info, command, args.device)
    common.write_text(out / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
