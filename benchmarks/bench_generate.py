"""End-to-end generation speed: our ext and torch backends, no-cache recompute, Hugging Face.

Engines: "gptmod ext fused" (GPT.compile_decode(): one gptmod::decode_step per token over packed
weights), "gptmod ext" (eager ext ops), "gptmod torch" (the reference backend), "gptmod no-cache",
"hf generate" (transformers). Each row also gives the dispatched ops per generated token
(torch.profiler events) and the weight bytes per step, and the first rows of each dtype the
bandwidth bound: tok/s at B=1 if every weight byte were read once per token at torch's copy_ speed.

With --llama-bench PATH: our fused B=1 decode in fp32, bf16 and int8 (where compile_decode takes
quantize="int8") against llama.cpp's llama-bench on F32, BF16 and Q8_0 GGUFs of the same weights,
written by our own GGUF export; the two take turns (pairs of rounds, a ratio per pair, the
median of the ratios). --llama-only skips the other engines.

One model (6 layers, n_embd 384, 6 query / 2 KV heads, vocab 4096: the 'small' preset), the same
weights everywhere (HF gets them through hf.to_hf), greedy decoding of exactly `new_tokens`
tokens after a random prompt of 16 tokens, for batch 1 and 8. Reports tokens/s (generated tokens
of the whole batch per second of the whole call, prefill included) and time to first token.
The no-cache run recomputes the whole prefix at every step (quadratic), so it generates a
quarter of the tokens; its row says how many.

    PYTHONPATH=python python benchmarks/bench_generate.py [--device cpu] [--dtype float32] [--quick]
    PYTHONPATH=python python benchmarks/bench_generate.py --llama-only --threads 2 --rounds 7 \
        --llama-bench ~/.cache/gptmod_ext/llama.cpp/bin/llama-bench
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

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
    model = small_model().to(dev, dt)
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


# (our dtype, llama.cpp's type in the GGUF, export --dtype, torch dtype, compile_decode quantize)
LLAMA_PAIRS = (("fp32", "F32", "fp32", torch.float32, None),
               ("bf16", "BF16", "bf16", torch.bfloat16, None),
               ("int8", "Q8_0", "q8_0", torch.float32, "int8"))


def small_model() -> GPT:
    """The benchmark's weights: the small preset, vocab 4096, seed 0, fp32."""
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("small", vocab_size=4096)).eval()


def has_int8_decode() -> bool:
    """Whether this gptmod_ext's compile_decode takes quantize="int8" (the int8 fused step)."""
    return "quantize" in inspect.signature(GPT.compile_decode).parameters


def llama_bench_tps(bench: str, gguf: Path, threads: int, new_tokens: int) -> float:
    """llama-bench's tokens/s for generating new_tokens tokens at batch 1 (one repetition after
    its own warm-up; flash attention off, as our decode step)."""
    cmd = [bench, "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-t", str(threads),
           "-r", "1", "-fa", "0", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])


def llama_pairs(bench: str, rounds: int, new_tokens: int, workdir: Path) -> list[dict]:
    """Ours against llama.cpp on the same weights, like for like: our fused B=1 decode in fp32,
    bf16 and int8 (where compile_decode has it) against llama-bench on GGUFs that our own export
    wrote in F32, BF16 and Q8_0. Both generate new_tokens tokens after one token, on
    torch.get_num_threads() threads; they take turns, llama.cpp then ours, `rounds` times, and
    each pair gives a ratio (ours / llama.cpp tok/s): a load that comes and goes hits both halves
    of a pair alike. Reports the medians of the ratios and of each side."""
    from gptmod_ext import gguf_export, tokenizer

    if not _ext.AVAILABLE:
        raise SystemExit("--llama-bench compares our fused CPU decode step: build the extension")
    base, threads = small_model(), torch.get_num_threads()
    # llama-bench feeds token ids, never text, so any tokenizer will do; the bytes one names 257
    # ids and the export fills the other rows of the 4096 with [PAD] tokens.
    tok = tokenizer.byte_tokenizer()
    prompt = torch.randint(0, 4096, (1, 1))
    rows = []
    for ours, theirs, dtype, torch_dtype, quantize in LLAMA_PAIRS:
        if quantize and not has_int8_decode():
            continue
        path = gguf_export.save_gguf(base, tok, workdir / f"small-{dtype}.gguf", dtype=dtype,
                                     overwrite=True)
        model = copy.deepcopy(base).to(torch_dtype)
        model.backend = "ext"
        model.compile_decode(**({"quantize": quantize} if quantize else {}))

        def gen(model=model):
            return model.generate(prompt, new_tokens, temperature=0)
        gen()  # warm-up (weights packed, caches allocated); llama-bench warms up on its own
        pairs = []
        for _ in range(rounds):
            them = llama_bench_tps(bench, path, threads, new_tokens)
            t = time_round_robin({"ours": gen}, warmup=0, budget_s=0.0, min_repeats=1,
                                 max_repeats=1)["ours"]["min_s"]
            pairs.append((new_tokens / t, them))
        ratios = [a / b for a, b in pairs]
        rows.append(dict(engine=f"ours {ours} vs llama.cpp {theirs}", ours=ours, llama_cpp=theirs,
                         threads=threads, batch=1, new_tokens=new_tokens, rounds=rounds,
                         ours_tok_per_s=round(statistics.median(a for a, _ in pairs), 1),
                         llama_tok_per_s=round(statistics.median(b for _, b in pairs), 1),
                         ratio=round(statistics.median(ratios), 3),
                         ratios=[round(r, 3) for r in ratios],
                         gguf_mb=round(path.stat().st_size / 1e6, 1)))
    return rows


def print_llama_pairs(rows: list[dict], bench: str) -> None:
    info = Path(bench).resolve().parent.parent / "build-info.txt"
    build = info.read_text().strip() if info.exists() else "build unknown"
    print(f"ours vs llama.cpp ({bench}; {build})")
    print(f"B=1, {rows[0]['new_tokens']} tokens after 1, {rows[0]['threads']} threads, "
          f"{rows[0]['rounds']} alternating pairs; ratio = ours / llama.cpp tok/s, median of pairs")
    print(f"{'pair':<28}{'ours tok/s':>12}{'llama tok/s':>13}{'ratio':>8}  ratios per pair")
    for r in rows:
        print(f"{r['engine']:<28}{r['ours_tok_per_s']:>12.1f}{r['llama_tok_per_s']:>13.1f}"
              f"{r['ratio']:>8.2f}  {' '.join(f'{x:.2f}' for x in r['ratios'])}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32"], help="one or more, e.g. float32 bfloat16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--llama-bench", default=None, metavar="PATH",
                    help="llama.cpp's llama-bench (benchmarks/build_llama_cpp.sh builds it): "
                         "compare our fused decode with it, alternating, on GGUFs of the same "
                         "weights")
    ap.add_argument("--rounds", type=int, default=5, help="alternating pairs per dtype (default 5)")
    ap.add_argument("--llama-only", action="store_true", help="only the llama.cpp comparison")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = 32 if args.quick else 256
    rows = []
    if not args.llama_only:
        rows = [r for dt in args.dtype for r in run(args.device, dt, args.quick, args.batches)]
        print_rows(args.device, rows)
    if args.llama_bench:
        with tempfile.TemporaryDirectory() as tmp:
            pairs = llama_pairs(args.llama_bench, args.rounds, new_tokens, Path(tmp))
        print_llama_pairs(pairs, args.llama_bench)
        rows += pairs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), f,
                      indent=1)


def print_rows(device: str, rows: list[dict]) -> None:
    print(f"device={device} threads={torch.get_num_threads()} torch {torch.__version__} "
          f"prompt={PROMPT_LEN} greedy, model: 6 x 384, 6/2 heads, vocab 4096")
    print(f"{'engine':<20}{'dtype':>10}{'batch':>6}{'tokens':>8}{'tok/s':>10}{'TTFT ms':>10}"
          f"{'vs HF':>8}{'ops/tok':>9}{'weight MB':>10}")
    nan = float("nan")
    for r in rows:
        print(f"{r['engine']:<20}{r['dtype']:>10}{r['batch']:>6}{r['new_tokens'] or 0:>8}"
              f"{r['tok_per_s']:>10.1f}{r['ttft_ms'] or nan:>10.2f}{r['vs_hf'] or nan:>8.2f}"
              f"{r['ops_per_token'] or nan:>9.1f}{r['weight_mb']:>10.1f}")

if __name__ == "__main__":
    main()
