"""End-to-end generation speed: our ext and torch backends, no-cache recompute, Hugging Face.

Engines: "gptmod ext fused" (GPT.compile_decode(): one gptmod::decode_step per token over packed
weights), "gptmod ext" (eager ext ops), "gptmod torch" (the reference backend), "gptmod no-cache",
"hf generate" (transformers), and, with --llama-bench PATH --gguf PATH..., llama.cpp's
llama-bench on a GGUF of the same weights (--export-hf DIR writes them as a Hugging Face folder
for llama.cpp's convert_hf_to_gguf.py). Each row also gives the dispatched ops per generated
token (torch.profiler events) and the weight bytes per step, and the first rows of each dtype the
bandwidth bound: tok/s at B=1 if every weight byte were read once per token at torch's copy_ speed.

One model (6 layers, n_embd 384, 6 query / 2 KV heads, vocab 4096: the 'small' preset), the same
weights everywhere (HF gets them through hf.to_hf), greedy decoding of exactly `new_tokens`
tokens after a random prompt of 16 tokens, for batch 1 and 8. Reports tokens/s (generated tokens
of the whole batch per second of the whole call, prefill included) and time to first token.
The no-cache run recomputes the whole prefix at every step (quadratic), so it generates a
quarter of the tokens; its row says how many.

    PYTHONPATH=python python benchmarks/bench_generate.py [--device cpu] [--dtype float32] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess

import torch

import _paths  # noqa: E402,F401  (python/ only when gptmod_ext is not installed)
from gptmod_ext import _ext  # noqa: E402
from gptmod_ext.model import GPT, GPTConfig  # noqa: E402
from common import time_round_robin  # noqa: E402

PROMPT_LEN = 16


def run(device: str = "cpu", dtype: str = "float32", quick: bool = False,
        batches: list[int] | None = None) -> list[dict]:
    """Rows of {engine, batch, new_tokens, seconds, tok_per_s, ttft_ms, vs_hf}."""
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    new_tokens = 32 if quick else 256
    batches = batches or ([1] if quick else [1, 8])
    repeats = 1 if quick else 3
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("small", vocab_size=4096)).to(dev, dt).eval()
    hf_model = None
    try:
        from gptmod_ext.hf import to_hf
        hf_model = to_hf(model)
    except ImportError:
        pass

    fused = None
    if _ext.AVAILABLE:
        fused = copy.deepcopy(model)
        fused.backend = "ext"
        fused.compile_decode()
    engines = []
    if fused is not None:
        engines.append(("gptmod ext fused", "ext", True))
    if _ext.AVAILABLE:
        engines.append(("gptmod ext", "ext", True))
    engines.append(("gptmod torch", "torch", True))
    engines.append(("gptmod no-cache", "ext" if _ext.AVAILABLE else "torch", False))

    rows = []
    for B in batches:
        prompt = torch.randint(0, 4096, (B, PROMPT_LEN), device=dev)
        # engine name -> (generate n tokens, use_cache or None for HF)
        runs = {}
        for name, backend, use_cache in engines:
            def gen(n, backend=backend, use_cache=use_cache, m=fused if "fused" in name else model):
                m.backend = backend
                if n == 1:  # time to first token: prefill + one sampling step
                    return next(iter(m.generate_stream(prompt, 1, temperature=0,
                                                       use_cache=use_cache)))
                return m.generate(prompt, n, temperature=0, use_cache=use_cache)
            runs[name] = gen
        if hf_model is not None:
            def hf_gen(n):
                with torch.inference_mode():
                    return hf_model.generate(prompt, do_sample=False, max_new_tokens=n,
                                             min_new_tokens=n, pad_token_id=0,
                                             attention_mask=torch.ones_like(prompt))
            runs["hf generate"] = hf_gen
        # Recomputing the whole prefix every step is quadratic: it gets a quarter of the tokens.
        counts = {name: new_tokens // 4 if name == "gptmod no-cache" else new_tokens for name in runs}
        for gen in runs.values():
            gen(8)  # warm-up
        # Engines take turns, best of `repeats`: other load on the machine hits all of them alike.
        # The no-cache run is slow and only a point of reference: timed once.
        secs, ttft = {}, {}
        slow = [n for n in runs if n == "gptmod no-cache"]
        for names, reps in (([n for n in runs if n not in slow], repeats), (slow, 1)):
            def best(n_tokens, reps):
                t = time_round_robin({n: (lambda n=n: runs[n](n_tokens or counts[n])) for n in names},
                                     dev, warmup=0, budget_s=0.0, min_repeats=reps, max_repeats=reps)
                return {n: v["min_s"] for n, v in t.items()}
            secs.update(best(None, reps))
            ttft.update(best(1, 2 * reps))
        hf_tps = B * counts["hf generate"] / secs["hf generate"] if "hf generate" in secs else None
        for name in runs:
            tps = B * counts[name] / secs[name]
            rows.append(dict(engine=name, device=device, dtype=dtype, threads=torch.get_num_threads(),
                             batch=B, new_tokens=counts[name],
                             seconds=round(secs[name], 4), tok_per_s=round(tps, 1),
                             ttft_ms=round(ttft[name] * 1e3, 2),
                             vs_hf=round(tps / hf_tps, 2) if hf_tps else None,
                             ops_per_token=None if name == "gptmod no-cache" else ops_per_token(runs[name]),
                             weight_mb=round(weight_bytes(model) / 1e6, 1)))
    model.backend = "torch"
    if 1 in batches:
        rows.append(bandwidth_row(model, device, dtype))
    return rows


def weight_bytes(model) -> int:
    """Bytes of every matrix a decode step reads (all Linear weights and lm_head)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def ops_per_token(gen, n: int = 16) -> float:
    """Profiler events (dispatched ops) per generated token: generate(n + 1) minus generate(1)."""
    from torch.profiler import ProfilerActivity, profile

    def count(k):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gen(k)
        return sum(e.count for e in prof.key_averages())
    return round((count(n + 1) - count(1)) / n, 1)


def bandwidth_row(model, device, dtype) -> dict:
    """The B=1 bound: weight bytes per token over torch's copy_ bandwidth for a buffer that size
    (read + write, so bytes moved = 2x; the weights stay resident in cache between tokens where
    the cache holds them, as they do for the small preset)."""
    nbytes = weight_bytes(model)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_round_robin({"copy": lambda: dst.copy_(src)}, device, budget_s=0.3)["copy"]["min_s"]
    gbs = 2 * nbytes / t / 1e9
    return dict(engine="bandwidth bound", device=device, dtype=dtype, threads=torch.get_num_threads(),
                batch=1, new_tokens=None, seconds=None, tok_per_s=round(gbs * 1e9 / nbytes, 1),
                ttft_ms=None, vs_hf=None, ops_per_token=None, weight_mb=round(nbytes / 1e6, 1),
                copy_gb_s=round(gbs, 1))


def llama_rows(bench: str, ggufs: list[str], threads: int, new_tokens: int) -> list[dict]:
    """llama.cpp's llama-bench on each GGUF (text generation of new_tokens tokens, batch 1,
    flash attention off, as our step): one row per file, its type from llama-bench's report."""
    rows = []
    for path in ggufs:
        cmd = [bench, "-m", path, "-p", "0", "-n", str(new_tokens), "-t", str(threads), "-r", "3",
               "-fa", "0", "-o", "json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-500:]}")
        for r in json.loads(out.stdout):
            rows.append(dict(engine="llama.cpp",
                             device="cpu", dtype=r.get("model_type", "?"), threads=threads, batch=1,
                             new_tokens=new_tokens, seconds=None, tok_per_s=round(r["avg_ts"], 1),
                             ttft_ms=None, vs_hf=None, ops_per_token=None,
                             weight_mb=round(r.get("model_size", 0) / 1e6, 1), gguf=path))
    return rows


def export_hf(directory: str) -> None:
    """The benchmark's exact weights (seed 0) as a Hugging Face folder, for convert_hf_to_gguf.py."""
    from gptmod_ext.hf import to_hf
    torch.manual_seed(0)
    to_hf(GPT(GPTConfig.from_preset("small", vocab_size=4096)).eval()).save_pretrained(directory)
    print(f"wrote {directory}: add a 4096-piece sentencepiece tokenizer.model, then convert")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32"], help="one or more, e.g. float32 bfloat16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench binary")
    ap.add_argument("--gguf", nargs="+", default=[], help="GGUF files of the same weights (F32, BF16, Q8_0...)")
    ap.add_argument("--export-hf", default=None, metavar="DIR", help="write the weights and exit")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if args.export_hf:
        return export_hf(args.export_hf)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for dt in args.dtype for r in run(args.device, dt, args.quick, args.batches)]
    if args.llama_bench:
        rows += llama_rows(args.llama_bench, args.gguf, torch.get_num_threads(), 32 if args.quick else 256)
    print(f"device={args.device} threads={torch.get_num_threads()} torch {torch.__version__} "
          f"prompt={PROMPT_LEN} greedy, model: 6 x 384, 6/2 heads, vocab 4096")
    print(f"{'engine':<20}{'dtype':>10}{'batch':>6}{'tokens':>8}{'tok/s':>10}{'TTFT ms':>10}"
          f"{'vs HF':>8}{'ops/tok':>9}{'weight MB':>10}")
    nan = float("nan")
    for r in rows:
        print(f"{r['engine']:<20}{r['dtype']:>10}{r['batch']:>6}{r['new_tokens'] or 0:>8}"
              f"{r['tok_per_s']:>10.1f}{r['ttft_ms'] or nan:>10.2f}{r['vs_hf'] or nan:>8.2f}"
              f"{r['ops_per_token'] or nan:>9.1f}{r['weight_mb']:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
