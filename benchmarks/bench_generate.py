"""End-to-end generation speed: our ext and torch backends, no-cache recompute, Hugging Face.

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

    engines = []
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
            def gen(n, backend=backend, use_cache=use_cache):
                model.backend = backend
                if n == 1:  # time to first token: prefill + one sampling step
                    return next(iter(model.generate_stream(prompt, 1, temperature=0,
                                                           use_cache=use_cache)))
                return model.generate(prompt, n, temperature=0, use_cache=use_cache)
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
                             vs_hf=round(tps / hf_tps, 2) if hf_tps else None))
    model.backend = "torch"
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.device, args.dtype, args.quick, args.batches)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"prompt={PROMPT_LEN} greedy, model: 6 x 384, 6/2 heads, vocab 4096")
    print(f"{'engine':<18}{'batch':>6}{'tokens':>8}{'seconds':>10}{'tok/s':>10}{'TTFT ms':>10}{'vs HF':>8}")
    for r in rows:
        print(f"{r['engine']:<18}{r['batch']:>6}{r['new_tokens']:>8}{r['seconds']:>10.3f}"
              f"{r['tok_per_s']:>10.1f}{r['ttft_ms']:>10.2f}{(r['vs_hf'] or float('nan')):>8.2f}")


if __name__ == "__main__":
    main()
