"""One entry point for every benchmark suite: runs them in one process and writes the results.

    PYTHONPATH=python python benchmarks/run.py [--suite all|ops,decode,...] [--device cpu|cuda]
        [--dtype float32,bfloat16] [--quick] [--no-compile] [--out benchmarks/results]
    PYTHONPATH=python python benchmarks/run.py --readme     # the README table from the latest results

Suites (each a module benchmarks/bench_<x>.py with run(...) -> list[dict]):
  ops       rope and swiglu (fwd, fwd+bwd) vs eager HF-style PyTorch and torch.compile, with copy_
  decode    decode_attention vs SDPA(enable_gqa), repeat_interleave + SDPA and compiled eager
  generate  model.generate tokens/s and time to first token: ext, torch, no-cache, HF generate
  train     training tokens/s: the default command (and fp32) vs HF Llama fp32 / bf16 autocast
  serve     serving throughput and latency against the number of concurrent clients

Writes <out>/<machine>-<date>.json and .md (<machine>-<date>-quick.* for --quick runs, so a quick
check never overwrites a measured run) and <machine>-<date>-<suite>.png for ops and decode.
Numbers are medians of repeated calls with warm-up excluded; compare ratios, which are measured
in the same run, rather than absolute times across machines.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import inspect
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import _paths  # noqa: E402,F401  (python/ only when gptmod_ext is not installed)

import torch  # noqa: E402

import common  # noqa: E402
from common import fmt, md_table  # noqa: E402

SUITES = {
    "ops": ("bench_ops", "rope and swiglu (fwd, fwd+bwd) vs eager HF-style and torch.compile"),
    "decode": ("bench_decode_attention", "decode_attention vs SDPA enable_gqa, repeat+SDPA, compile"),
    "generate": ("bench_generate", "generate tok/s and TTFT: ext, torch, no-cache, HF generate"),
    "train": ("bench_train", "train tokens/s: the default command vs HF Llama fp32 / bf16 "
                             "autocast; share of the matmul peak, MFU on GPU"),
    "serve": ("bench_serve", "serving throughput and latency vs concurrent clients"),
}
DEFAULT_DTYPES = {"cpu": "float32", "cuda": "bfloat16,float32"}


# -- running the suites -----------------------------------------------------------------------


@contextlib.contextmanager
def compile_disabled(disabled: bool):
    """With --no-compile, torch.compile raises: every suite already catches a failing compile and
    leaves that column out with a note, so no suite needs its own switch for it."""
    if not disabled:
        yield
        return
    real = torch.compile

    def refuse(*args, **kwargs):
        raise RuntimeError("torch.compile disabled by run.py --no-compile")

    torch.compile = refuse
    try:
        yield
    finally:
        torch.compile = real


def call_suite(mod, device: str, dtypes: list[str], quick: bool, compile: bool,
               budget: float | None = None) -> list[dict]:
    """Calls mod.run with the arguments it takes: dtypes (all at once) or dtype (one call each)."""
    params = inspect.signature(mod.run).parameters
    kw = {}
    if budget is not None and "budget_s" in params:
        kw["budget_s"] = budget
    if "device" in params:
        kw["device"] = device
    if "quick" in params:
        kw["quick"] = quick
    for name in ("with_compile", "compile"):
        if name in params:
            kw[name] = compile
    if "dtypes" in params:
        return list(mod.run(dtypes=tuple(dtypes), **kw))
    if "dtype" in params:
        rows = []
        for dt in dtypes:
            for r in mod.run(dtype=dt, **kw):
                r.setdefault("dtype", dt)
                rows.append(r)
        return rows
    return list(mod.run(**kw))  # the suite picks its own dtype (train: bf16 autocast on a GPU)


def run_suite(name: str, device: str, dtypes: list[str], quick: bool, compile: bool,
              budget: float | None = None) -> dict:
    module, _ = SUITES[name]
    out = {"module": f"benchmarks/{module}.py", "status": "ok", "message": None, "rows": []}
    if not (HERE / f"{module}.py").exists():
        out.update(status="skipped", message=f"benchmarks/{module}.py is not there yet: suite skipped")
        print(f"[{name}] SKIPPED: {out['message']}", flush=True)
        return out
    print(f"[{name}] running {module}.run ...", flush=True)
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(module)
        with compile_disabled(not compile):
            out["rows"] = call_suite(mod, device, dtypes, quick, compile, budget)
    except Exception as e:  # noqa: BLE001  (one broken suite must not lose the others' results)
        out.update(status="error", message=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc())
        print(f"[{name}] ERROR: {out['message']}\n{out['traceback']}", flush=True)
    finally:
        # Each suite starts clean: no compiled graphs or cached blocks left by the one before.
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    add_derived(name, out["rows"])
    if out["status"] == "ok":
        print(f"[{name}] {len(out['rows'])} rows in {out['seconds']} s", flush=True)
    return out


def add_derived(name: str, rows: list[dict]) -> None:
    """Ratios computed from a suite's own numbers (never a new measurement)."""
    if name == "decode":
        for r in rows:
            if r.get("ours_GBps") and r.get("copy_GBps") and "pct_copy" not in r:
                r["pct_copy"] = r["ours_GBps"] / r["copy_GBps"]
    if name == "train":
        hf = next((r.get("tokens_per_s") for r in rows if str(r.get("engine", "")).startswith("HF")), None)
        for r in rows:
            if "vs_hf" not in r:
                r["vs_hf"] = r["tokens_per_s"] / hf if (hf and r.get("tokens_per_s")) else None


# -- the bars from the issues -----------------------------------------------------------------


def _rows(results: dict, suite: str) -> list[dict]:
    return (results.get("suites", {}).get(suite) or {}).get("rows") or []


def _find(rows, **want):
    for r in rows:
        if all((list(r.get(k)) if isinstance(r.get(k), (list, tuple)) else r.get(k)) == v
               for k, v in want.items()):
            return r
    return None


def _get(r: dict, *keys):
    return next((r[k] for k in keys if r.get(k) is not None), None)


def _bar_ops(op, mode, shape):
    def measure(res):
        r = _find(_rows(res, "ops"), op=op, mode=mode, shape=list(shape), dtype="float32", impl="ours")
        return (r["speedup_vs_eager"], None) if r else (None, None)
    return measure


def _bar_decode(batch):
    def measure(res):
        r = _find(_rows(res, "decode"), dtype="float32", B=batch, L=4096)
        return (r["vs_sdpa_gqa"], None) if r else (None, None)
    return measure


def _bar_generate(res):
    r = _find(_rows(res, "generate"), engine="gptmod ext", batch=1, dtype="float32")
    if not r:
        return None, None
    note = None if r.get("new_tokens") == 256 else f"{r.get('new_tokens')} new tokens (quick), not 256"
    return r.get("vs_hf"), note


_CONC = ("concurrency", "clients", "concurrent")
_THRU = ("tok_per_s", "tokens_per_s", "throughput_tok_s", "output_tok_per_s", "req_per_s",
         "requests_per_s", "throughput")
_FAIL = ("failures", "failed", "n_failed")


def _bar_serve(res):
    rows = _rows(res, "serve")
    by_c = {_get(r, *_CONC): r for r in rows if _get(r, *_CONC) is not None}
    one, many = by_c.get(1), by_c.get(32)
    if not (one and many):
        return None, None
    t1, t32 = _get(one, *_THRU), _get(many, *_THRU)
    if not (t1 and t32):
        return None, None
    failures = sum(_get(r, *_FAIL) or 0 for r in rows)
    return t32 / t1, (None if failures == 0 else f"{failures} failed requests"), failures == 0


def _bar_train(key):
    def measure(res):
        r = _find(_rows(res, "train"), engine="gptmod default")
        if not r or r.get(key) is None:
            return None, None
        return r[key], f"default dtype {r.get('dtype')}, {r.get('rounds', '?')} alternating rounds"
    return measure


BARS = [
    ("rope [8,512,12,64] fp32 vs eager HF-style", 2.0, _bar_ops("rope", "fwd", (8, 512, 12, 64))),
    ("swiglu fwd [4096, 2x1536] fp32 vs F.silu(g)*u", 1.3, _bar_ops("swiglu", "fwd", (4096, 3072))),
    ("swiglu fwd+bwd [4096, 2x1536] fp32 vs eager autograd", 1.2,
     _bar_ops("swiglu", "fwd+bwd", (4096, 3072))),
    ("decode_attention B=1, 4096 rows, 12q/4kv, fp32 vs SDPA enable_gqa", 1.0, _bar_decode(1)),
    ("decode_attention B=8, 4096 rows, 12q/4kv, fp32 vs SDPA enable_gqa", 1.5, _bar_decode(8)),
    ("generate ext vs HF generate tok/s (6x384, 6q/2kv, V 4096, B1, 16+256, fp32)", 1.5,
     _bar_generate),
    ("serve: 32 concurrent clients vs one at a time, throughput, no failures", 3.0, _bar_serve),
    ("train: default command vs HF Llama loop fp32, tok/s (tiny, 8 x 256 on CPU)", 2.0,
     _bar_train("vs_hf_fp32")),
    ("train: default command vs HF Llama loop under bf16 autocast, tok/s", 1.3,
     _bar_train("vs_hf_bf16")),
]


def evaluate_bars(results: dict) -> list[dict]:
    out = []
    for name, required, measure in BARS:
        try:
            got = measure(results)
        except Exception as e:  # noqa: BLE001  (a renamed field: say so, never crash the report)
            got = (None, f"could not read: {type(e).__name__}: {e}")
        measured, note = got[0], got[1]
        extra_ok = got[2] if len(got) > 2 else True
        if measured is None:
            status = "not measured"
        else:
            status = "PASS" if (measured >= required and extra_ok) else "FAIL"
        out.append(dict(bar=name, required=required, measured=measured, status=status, note=note))
    return out


def bars_table(bars: list[dict]) -> str:
    return md_table(["bar", "measured", "required", "result", "note"],
                    [[b["bar"], fmt(b["measured"], "x"), f">= {b['required']:.1f}x",
                      f"**{b['status']}**" if b["status"] == "FAIL" else b["status"],
                      b["note"] or ""] for b in bars],
                    ["l", "r", "r", "l", "l"])


# -- markdown ---------------------------------------------------------------------------------


def table_ops(rows):
    cases: dict = {}
    for r in rows:
        cases.setdefault((r["op"], r["mode"], tuple(r["shape"]), r["dtype"]), {})[r["impl"]] = r
    head = ["op", "mode", "shape", "dtype", "ours ms", "eager ms", "compile ms", "copy ms",
            "ours vs eager", "ours vs compile", "ours GB/s", "% of copy"]
    body = []
    for (op, mode, shape, dtype), by in cases.items():
        ours = by.get("ours", {})
        ms = [fmt(by[i]["median_ms"]) if i in by else "-" for i in ("ours", "eager", "compile", "copy")]
        body.append([op, mode, fmt(list(shape)), dtype] + ms + [
            fmt(ours.get("speedup_vs_eager"), "x"), fmt(ours.get("speedup_vs_compile"), "x"),
            fmt(ours.get("gbps")), fmt(ours.get("frac_copy"), "pct")])
    notes = sorted({r["note"] for r in rows if r.get("note")})
    return md_table(head, body, ["l", "l", "l", "l"] + ["r"] * 8) + "".join(
        f"\n\nnote: {fmt(n)}" for n in notes)


def table_decode(rows):
    head = ["dtype", "B", "cache rows", "ours ms", "SDPA gqa ms", "repeat+SDPA ms", "compile ms",
            "vs SDPA gqa", "vs repeat", "vs compile", "ours GB/s", "copy GB/s", "% of copy"]
    body = [[r["dtype"], fmt(r["B"]), fmt(r["L"]), fmt(r["ours_ms"]), fmt(r["sdpa_gqa_ms"]),
             fmt(r["sdpa_repeat_ms"]), fmt(r.get("compile_ms")), fmt(r["vs_sdpa_gqa"], "x"),
             fmt(r["vs_sdpa_repeat"], "x"), fmt(r.get("vs_compile"), "x"), fmt(r["ours_GBps"]),
             fmt(r["copy_GBps"]), fmt(r.get("pct_copy"), "pct")] for r in rows]
    return md_table(head, body, ["l"] + ["r"] * 12)


def table_generate(rows):
    head = ["engine", "dtype", "batch", "new tokens", "seconds", "tok/s", "TTFT ms", "vs HF"]
    body = [[r["engine"], r.get("dtype", "-"), fmt(r["batch"]), fmt(r["new_tokens"]),
             fmt(r["seconds"]), fmt(r["tok_per_s"]), fmt(r["ttft_ms"]), fmt(r.get("vs_hf"), "x")]
            for r in rows]
    return md_table(head, body, ["l", "l"] + ["r"] * 6)


def table_train(rows):
    head = ["engine", "preset", "batch x seq", "dtype", "tokens/s", "ms/step", "of mm peak",
            "MFU", "vs HF fp32", "vs HF bf16", "note"]
    body = [[r["engine"], r.get("preset", "-"), f"{r.get('batch')} x {r.get('seq')}",
             r.get("dtype", "-"), fmt(r["tokens_per_s"]), fmt(r["ms_per_step"]),
             fmt(r.get("peak_frac"), "pct"), fmt(r.get("mfu"), "pct"),
             fmt(r.get("vs_hf_fp32", r.get("vs_hf")), "x"), fmt(r.get("vs_hf_bf16"), "x"),
             fmt(r.get("note") or "")] for r in rows]
    return md_table(head, body, ["l", "l", "l", "l", "r", "r", "r", "r", "r", "r", "l"])


def table_serve(rows):
    head = ["clients", "requests", "failed", "tokens", "seconds", "tok/s", "vs 1 client",
            "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors"]
    body = [[fmt(r["clients"]), fmt(r.get("requests")), fmt(r.get("failed")), fmt(r.get("tokens")),
             fmt(r["seconds"]), fmt(r["tok_per_s"]), fmt(r.get("speedup"), "x"),
             fmt(r.get("ttft_p50_ms")), fmt(r.get("ttft_p99_ms")), fmt(r.get("itl_p50_ms")),
             fmt(r.get("itl_p99_ms")), fmt("; ".join(r.get("errors") or []))] for r in rows]
    return md_table(head, body, ["r"] * 11 + ["l"])


TABLES = {"ops": table_ops, "decode": table_decode, "generate": table_generate,
          "train": table_train, "serve": table_serve}

READING = {
    "ops": "Times are medians per call. 'ours vs X' = X's time / ours (> 1: ours is faster). "
           "GB/s counts the bytes the op must read and write; '% of copy' compares it with "
           "`copy_` moving the same bytes (the memory-bandwidth ceiling).",
    "decode": "One decode step (Tq = 1), 12 query heads over 4 KV heads, D = 64, every sequence "
              "'cache rows' long. 'vs X' = X's time / ours. GB/s counts the K/V bytes read; "
              "'% of copy' divides it by the copy_ bandwidth of the same bytes.",
    "generate": "Greedy decoding after a 16-token prompt; tok/s counts the generated tokens of the "
                "whole batch over the whole call (prefill included). 'vs HF' = tok/s / HF's.",
    "train": "One optimizer step per round (forward, cross-entropy, backward, clipping, fused "
             "AdamW), engines in alternating rounds. 'vs HF X' = the median over rounds of HF "
             "Llama's step time under X / ours. 'of mm peak' = model FLOP/s over the best "
             "matrix-product FLOP/s measured here in that dtype; MFU (GPU) over the datasheet "
             "bf16 peak.",
    "serve": "A live server gets the same requests from 1..32 concurrent clients (each sends its "
             "next request when the last one finished); tok/s = generated tokens / wall time, "
             "'vs 1 client' = tok/s / the one-at-a-time tok/s. TTFT and inter-token latency (ITL) "
             "percentiles per request.",
}


def suite_section(name: str, suite: dict) -> str:
    title = f"## {name}: {SUITES[name][1]}"
    status = suite["status"]
    if status != "ok":
        return f"{title}\n\n{status.upper()}: {suite['message']}\n"
    rows = suite["rows"]
    if not rows:
        return f"{title}\n\nno rows\n"
    try:
        table = TABLES[name](rows) if name in TABLES else common.generic_table(rows)
    except (KeyError, TypeError):  # a suite changed its row fields: show them all rather than fail
        table = common.generic_table(rows)
    return (f"{title}\n\n`{suite['module']}`, {suite.get('seconds')} s. {READING.get(name, '')}\n\n"
            f"{table}\n")


def header_lines(res: dict) -> list[str]:
    info = res["info"]
    cores = f"{info.get('usable_cpus')} usable CPUs"
    if info.get("physical_cores"):
        cores += f" ({info['physical_cores']} physical cores)"
    copy = res.get("copy_bandwidth") or {}
    return [
        f"- machine: `{res['machine']}`; date: {res['date']} (started {res['started']}, "
        f"took {res.get('duration_s')} s)",
        f"- CPU: {info.get('cpu_model')}, {cores}, torch threads {info.get('torch_threads')}",
        f"- torch {info.get('torch')} (CUDA {info.get('torch_cuda') or '-'}), Python "
        f"{info.get('python')}, {info.get('platform')}",
        f"- gptmod CPU capability: {info.get('cpu_capability') or '-'}; ext: {info.get('ext')}",
        f"- GPU: {info.get('gpu') or '-'}" + (f" ({info['gpu_memory_GiB']} GiB)"
                                             if info.get("gpu_memory_GiB") else ""),
        f"- device: {res['device']}; dtype(s): {', '.join(res['dtypes'])}; "
        f"{'QUICK (smaller sizes, fewer repeats)' if res['quick'] else 'full sizes'}; "
        f"torch.compile {'on' if res['compile'] else 'off'}",
        f"- copy_ bandwidth: {fmt(copy.get('GBps'))} GB/s ({fmt((copy.get('nbytes') or 0) / 2**20)}"
        f" MiB, read + write)",
        f"- command: `{res['command']}`",
    ]


def render_markdown(res: dict) -> str:
    parts = [f"# gptmod_ext benchmarks: {res['machine']}, {res['date']}", "",
             *header_lines(res), "", "## Bars", "", bars_table(res["bars"]), ""]
    for name, suite in res["suites"].items():
        parts.append(suite_section(name, suite))
        for png in suite.get("plots", []):
            parts.append(f"![{name}]({Path(png).name})\n")
    return "\n".join(parts)


# -- plots ------------------------------------------------------------------------------------


def plot_suite(name: str, rows: list[dict], path: Path):
    if name == "ops":
        panels: dict = {}
        for r in rows:
            if r.get("gbps") is None or r.get("median_ms") is None:
                continue
            mbytes = r["gbps"] * 1e9 * r["median_ms"] * 1e-3 / 2**20
            lines = panels.setdefault(f"{r['op']} {r['mode']} {r['dtype']}", {})
            lines.setdefault(r["impl"], []).append((mbytes, r["gbps"]))
        return common.plot_lines(path, panels, "MiB moved (read + write)", "GB/s",
                                 "rope / swiglu: effective bandwidth (higher is better)")
    if name == "decode":
        panels = {}
        impls = (("ours", "ours_ms"), ("SDPA enable_gqa", "sdpa_gqa_ms"),
                 ("repeat + SDPA", "sdpa_repeat_ms"), ("compile", "compile_ms"), ("copy_", "copy_ms"))
        for r in rows:
            lines = panels.setdefault(f"{r['dtype']}, batch {r['B']}", {})
            for label, key in impls:
                if r.get(key) is not None:
                    lines.setdefault(label, []).append((r["L"], r[key]))
        return common.plot_lines(path, panels, "cache rows", "ms per decode step",
                                 "decode_attention, 12 q / 4 KV heads, D 64 (lower is better)",
                                 logy=True)
    return None


# -- the README table -------------------------------------------------------------------------


def latest_results(out_dir: Path) -> list[dict]:
    """The newest result file of each machine (full runs preferred over quick ones)."""
    found = []
    for p in sorted(Path(out_dir).glob("*.json")):
        try:
            res = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(res, dict) and "machine" in res and "suites" in res:
            res["_file"] = p.name
            found.append(res)
    best: dict = {}
    for res in found:
        key = res["machine"]
        rank = (not res.get("quick"), res.get("started", ""))
        if key not in best or rank > (not best[key].get("quick"), best[key].get("started", "")):
            best[key] = res
    return sorted(best.values(), key=lambda r: r["machine"])


def render_readme(out_dir: Path) -> str:
    results = latest_results(out_dir)
    if not results:
        return (f"No benchmark results in {out_dir}: run `PYTHONPATH=python python "
                f"benchmarks/run.py` first.\n")
    parts = []
    for res in results:
        info = res["info"]
        hw = info.get("gpu") or f"{info.get('cpu_model')}, {info.get('usable_cpus')} CPUs"
        parts += [f"**{res['machine']}** ({hw}; torch {info.get('torch')}, CPU kernels "
                  f"{info.get('cpu_capability') or '-'}; {res['date']}"
                  f"{'; quick run' if res.get('quick') else ''}; "
                  f"[full results]({res['_file'][:-5]}.md))", "",
                  bars_table(evaluate_bars(res)), ""]
    return "\n".join(parts)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Runs the gptmod_ext benchmark suites in one process and writes "
                    "<out>/<machine>-<date>.json/.md (+ plots).")
    ap.add_argument("--suite", default="all",
                    help="all, or a comma-separated list of: " + ", ".join(SUITES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None,
                    help="comma-separated dtypes (default: float32 on cpu, bfloat16,float32 on cuda)")
    ap.add_argument("--quick", action="store_true",
                    help="the suites' quick modes: fewer sizes and repeats, to check that it works")
    ap.add_argument("--no-compile", action="store_true",
                    help="leave out the torch.compile columns (default with --quick on cpu: "
                         "inductor's first CPU compile takes minutes on a small machine)")
    ap.add_argument("--compile", action="store_true", help="keep torch.compile even with --quick")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per case, for the suites that take one (ops)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results folder")
    ap.add_argument("--readme", action="store_true",
                    help="print the README benchmark table from the latest results in --out and "
                         "write <out>/LATEST.md; runs nothing")
    args = ap.parse_args(argv)
    suites = list(SUITES) if args.suite == "all" else [s.strip() for s in args.suite.split(",")]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        ap.error(f"unknown suite {', '.join(bad)}; choose from all, {', '.join(SUITES)}")
    args.suites = suites
    args.dtypes = [d.strip() for d in (args.dtype or DEFAULT_DTYPES[args.device]).split(",")]
    for d in args.dtypes:
        if not isinstance(getattr(torch, d, None), torch.dtype):
            ap.error(f"--dtype: {d!r} is not a torch dtype (e.g. float32, bfloat16, float16)")
    args.with_compile = not args.no_compile and (args.compile or not (args.quick and args.device == "cpu"))
    return args


def check_device(device: str) -> str | None:
    """None if the device can run the suites, else one sentence saying why not."""
    if device != "cuda":
        return None
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA GPU is visible")
        return (f"--device cuda: {why} (torch {torch.__version__}). Run on a GPU machine with a "
                f"CUDA build of torch, or use --device cpu.")
    from gptmod_ext import _ext
    if not _ext.AVAILABLE:
        return f"--device cuda: the gptmod ops are not loaded: {_ext.LOAD_ERROR}"
    if not _ext.CUDA_LOADED:
        return ("--device cuda: libgptmod_cuda.so was not built or not loaded, so the gptmod ops "
                f"have no CUDA kernels; build with a CUDA torch and nvcc ({_ext.REBUILD_COMMAND}).")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    if args.readme:
        text = render_readme(out_dir)
        if latest_results(out_dir):
            common.write_text(out_dir / "LATEST.md", text)
        print(text)
        return 0
    problem = check_device(args.device)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    started = _dt.datetime.now(_dt.timezone.utc)
    info = common.machine_info(args.device)
    machine = common.machine_slug(info, args.device)
    date = started.strftime("%Y-%m-%d")
    stem = f"{machine}-{date}{'-quick' if args.quick else ''}"
    command = "PYTHONPATH=python python " + shlex.join(["benchmarks/run.py", *sys.argv[1:]]) \
        if argv is None else "run.main(" + shlex.join(argv) + ")"
    print(f"{machine}: {info['cpu_model']}, {info['usable_cpus']} CPUs, torch {info['torch']}, "
          f"capability {info['cpu_capability']}, GPU {info['gpu'] or '-'}; suites "
          f"{', '.join(args.suites)}; dtypes {', '.join(args.dtypes)}"
          f"{'; quick' if args.quick else ''}; compile {'on' if args.with_compile else 'off'}",
          flush=True)

    t0 = time.perf_counter()
    res = dict(schema=1, machine=machine, date=date, started=started.isoformat(timespec="seconds"),
               command=command, device=args.device, dtypes=args.dtypes, quick=args.quick,
               compile=args.with_compile, info=info, suites={})
    res["copy_bandwidth"] = common.copy_bandwidth(
        args.device, nbytes=(32 << 20) if args.quick else (256 << 20) if args.device == "cpu"
        else (1 << 30), min_time=0.2 if args.quick else 1.0)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"

    def save():  # after every suite, so an interrupted run keeps what it measured
        res["duration_s"] = round(time.perf_counter() - t0, 1)
        res["bars"] = evaluate_bars(res)
        common.write_json(json_path, res)
        common.write_text(md_path, render_markdown(common.jsonable(res)))

    interrupted = False
    for name in args.suites:
        try:
            suite = run_suite(name, args.device, args.dtypes, args.quick, args.with_compile,
                              args.budget)
        except KeyboardInterrupt:
            res["suites"][name] = dict(module=f"benchmarks/{SUITES[name][0]}.py", rows=[],
                                       status="interrupted", message="stopped with Ctrl-C")
            interrupted = True
            save()
            break
        res["suites"][name] = suite
        if suite["rows"]:
            try:
                png = plot_suite(name, suite["rows"], out_dir / f"{stem}-{name}.png")
                suite["plots"] = [str(png)] if png else []
            except Exception as e:  # noqa: BLE001  (a plot is never worth losing the numbers)
                print(f"[{name}] plot failed: {type(e).__name__}: {e}", flush=True)
        save()
    print("\n" + bars_table(res["bars"]))
    print(f"\nwrote {json_path} and {md_path} in {res['duration_s']} s")
    if interrupted:
        print("interrupted: the files hold the suites that finished", file=sys.stderr)
        return 130
    errors = [n for n, s in res["suites"].items() if s["status"] == "error"]
    if errors:
        print(f"suites that failed: {', '.join(errors)} (see the md file)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
