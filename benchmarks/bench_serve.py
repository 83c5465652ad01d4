"""Serving throughput and latency against the number of concurrent clients.

A live `python -m gptmod_ext.serve` (continuous batching, --max-batch 32) on localhost gets the
same 32 streaming completion requests (prompts of 8-96 tokens, 32-96 new tokens each,
greedy, ignore_eos so every request produces exactly its max_tokens) from 1, 4, 8, 16 and 32
concurrent clients; each client sends its next request when the previous one has finished.
1 client is the one-request-at-a-time baseline.

Reported per concurrency: throughput (generated tokens per second of wall time), time to first
token (TTFT, p50/p99, from sending the request to the first text chunk) and inter-token
latency (ITL, p50/p99, gaps between successive text chunks of a request), failures, and the
throughput relative to one client.

The model is a random-init preset with a BPE tokenizer of 4096 ids trained on a slice of the
Python standard library (throughput does not depend on the weights): 'small' (6 x 384, block
512) by default, 'tiny' (4 x 256) with --quick. --ckpt serves an existing run directory.

    PYTHONPATH=python python benchmarks/bench_serve.py [--quick] [--preset small] [--ckpt out/]

--baseline DIR serves the same run directory with another copy of the package (DIR holds its
gptmod_ext/, e.g. `git archive <commit> python | tar -x -C /tmp/base` then /tmp/base/python),
alternating before / after runs, and reports the after/before ratios of TTFT p50/p99, ITL and
throughput per concurrency (ratios from one session hold on a noisy machine; absolute times
do not). --after-args=--compile compares this package's server with and without those
options instead (or, with --baseline, the baseline without them and this one with them).
--out writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
import _paths  # noqa: E402,F401  (python/ only when gptmod_ext is not installed)

CONCURRENCY = [1, 4, 8, 16, 32]
N_REQUESTS = 32


def make_run(run_dir: Path, preset: str) -> Path:
    import torch

    from gptmod_ext import GPT, GPTConfig, checkpoint
    from gptmod_ext import tokenizer as tokenizer_mod

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    tok = tokenizer_mod.train_bpe((f.read_text(errors="ignore") for f in files), 4096)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, vocab_size=tok.vocab_size))
    checkpoint.save_model(run_dir, model, tok)
    return run_dir


def run_dir_for(src: str, run_dir: Path) -> Path:
    """run_dir as the older package in src can read it: a copy whose config.json leaves out the
    model fields that version does not know (it refuses unknown fields), provided each holds
    its default, so both sides serve the same model; the same run_dir when nothing is missing."""
    import dataclasses
    import shutil

    from gptmod_ext import GPTConfig

    known = subprocess.run([sys.executable, "-c", "import dataclasses, json; from gptmod_ext "
                            "import GPTConfig; print(json.dumps([f.name for f in "
                            "dataclasses.fields(GPTConfig)]))"],
                           env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True,
                           check=True).stdout
    known = set(json.loads(known))
    config = json.loads((run_dir / "config.json").read_text())
    unknown = sorted(set(config["model"]) - known)
    if not unknown:
        return run_dir
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    changed = [k for k in unknown if config["model"][k] != defaults[k]]
    if changed:
        raise SystemExit(f"the package in {src} cannot serve this model: it lacks {changed}")
    old = run_dir.with_name(run_dir.name + "-before")
    shutil.copytree(run_dir, old)
    config["model"] = {k: v for k, v in config["model"].items() if k in known}
    (old / "config.json").write_text(json.dumps(config, indent=2))
    return old


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, max_batch: int, extra=(), src: str | None = None):
    """The server on a free port; src: the directory holding the gptmod_ext to serve with
    (default: the package this process imports)."""
    import httpx

    port = _free_port()
    import gptmod_ext

    pkg_parent = src or str(Path(gptmod_ext.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "gptmod_ext.serve", "--ckpt", str(run_dir),
                             "--port", str(port), "--max-batch", str(max_batch),
                             "--max-queue", "256", *extra], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.3)


def workload(vocab_size: int, block_size: int, quick: bool, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    hi_new = 48 if quick else 96
    jobs = []
    for _ in range(N_REQUESTS):
        n_prompt = rnd.randint(8, 96)
        max_tokens = min(rnd.randint(hi_new // 3, hi_new), block_size - n_prompt)
        jobs.append({"prompt": [rnd.randrange(vocab_size - 1) for _ in range(n_prompt)],
                     "max_tokens": max_tokens})
    return jobs


async def one_request(client, url: str, job: dict) -> dict:
    body = {**job, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps, usage, error = [], None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    break
                if any(c.get("text") for c in chunk["choices"]):
                    stamps.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    except Exception as e:  # counted as a failure, reported
        error = f"{type(e).__name__}: {e}"
    t1 = time.perf_counter()
    ok = error is None and usage is not None and usage["completion_tokens"] == job["max_tokens"]
    return {"ok": ok, "error": error, "tokens": usage["completion_tokens"] if usage else 0,
            "ttft": (stamps[0] - t0) if stamps else None,
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "latency": t1 - t0}


async def run_clients(url: str, jobs: list[dict], clients: int) -> dict:
    import httpx

    queue = list(range(len(jobs)))
    results = [None] * len(jobs)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                i = queue.pop(0)
                results[i] = await one_request(client, url, jobs[i])
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"wall": wall, "results": results}


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run(quick: bool = False, preset: str | None = None, ckpt: str | None = None,
        concurrency=None, threads: int | None = None, src: str | None = None,
        server_args=()) -> list[dict]:
    """Rows of {clients, requests, failed, tokens, seconds, tok_per_s, speedup, ttft_p50_ms,
    ttft_p99_ms, itl_p50_ms, itl_p99_ms}. server_args: more `serve` options (e.g. --compile)."""
    from gptmod_ext.checkpoint import read_config

    preset = preset or ("tiny" if quick else "small")
    concurrency = concurrency or CONCURRENCY
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(ckpt) if ckpt else make_run(Path(tmp) / f"bench-{preset}", preset)
        cfg = read_config(run_dir)["model"]
        jobs = workload(cfg["vocab_size"], cfg["block_size"], quick)
        extra = (("--threads", str(threads)) if threads else ()) + tuple(server_args)
        proc, url = start_server(run_dir, max_batch=max(concurrency), extra=extra, src=src)
        rows = []
        try:
            asyncio.run(run_clients(url, jobs[:4], 4))  # warm-up
            for c in concurrency:
                out = asyncio.run(run_clients(url, jobs, c))
                res = out["results"]
                ok = [r for r in res if r["ok"]]
                tokens = sum(r["tokens"] for r in ok)
                gaps = [g for r in ok for g in r["gaps"]]
                ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
                rows.append({
                    "clients": c, "requests": len(res), "failed": len(res) - len(ok),
                    "tokens": tokens, "seconds": round(out["wall"], 3),
                    "tok_per_s": round(tokens / out["wall"], 1),
                    "ttft_p50_ms": round(1000 * _pct(ttfts, 50), 1),
                    "ttft_p99_ms": round(1000 * _pct(ttfts, 99), 1),
                    "itl_p50_ms": round(1000 * _pct(gaps, 50), 2),
                    "itl_p99_ms": round(1000 * _pct(gaps, 99), 2),
                    "errors": sorted({r["error"] for r in res if r["error"]})[:3],
                })
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    base = next((r["tok_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["speedup"] = round(r["tok_per_s"] / base, 2) if base else None
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["clients", "requests", "failed", "tokens", "seconds", "tok_per_s", "speedup",
            "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    print(" | ".join(f"{c:>11}" for c in cols))
    for r in rows:
        print(" | ".join(f"{str(r[c]):>11}" for c in cols))
    for r in rows:
        if r["errors"]:
            print(f"clients={r['clients']}: errors {r['errors']}")


RATIO_COLS = ["ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tok_per_s"]


def compare(baseline: str | None, quick: bool, preset: str | None, threads: int | None,
            rounds: int = 2, concurrency=None, after_args=()) -> dict:
    """Before (baseline's package, or this one without after_args) and after (this package,
    its server given after_args) on the same run directory and workload, alternating; per
    concurrency the median over rounds and after/before ratios."""
    import statistics

    preset = preset or ("tiny" if quick else "small")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp) / f"bench-{preset}", preset)
        dirs = {"before": run_dir_for(baseline, run_dir) if baseline else run_dir,
                "after": run_dir}
        runs = {"before": [], "after": []}
        for _ in range(rounds):
            for side, src, extra in (("before", baseline, ()), ("after", None, after_args)):
                runs[side].append(run(quick, preset, str(dirs[side]), concurrency, threads, src,
                                      extra))
    med = {side: [{**rs[0][i], **{c: statistics.median(r[i][c] for r in rs) for c in RATIO_COLS}}
                  for i in range(len(rs[0]))] for side, rs in runs.items()}
    after = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                           capture_output=True, text=True).stdout.strip() or "unknown"
    ratios = [{"clients": b["clients"], **{c: round(a[c] / b[c], 3) if b[c] else None
                                           for c in RATIO_COLS}}
              for b, a in zip(med["before"], med["after"])]
    return {"preset": preset, "quick": quick, "threads": threads, "rounds": rounds,
            "before": f"the package in {baseline}" if baseline else "this checkout",
            "after": f"this checkout ({after}){''.join(' ' + a for a in after_args)}", "runs": runs,
            "median": med,
            "after_over_before": ratios}


def compare_markdown(res: dict, machine: dict) -> str:
    from common import md_table

    lines = [f"# Serving: before / after, {res['preset']} preset, {res['rounds']} alternating rounds",
             "", f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs "
             f"(absolute times vary between machines and with other load: the ratios from one "
             f"session are the result), torch {machine['torch']}, float32, CPU; server threads: "
             f"{res.get('threads') or 'torch default'}.",
             f"Workload: {N_REQUESTS} streaming greedy completions (prompts 8-96 tokens), "
             f"--max-batch 32; TTFT from sending to the first text chunk.",
             f"Before: {res['before']}; after: {res['after']}.", ""]
    for side in ("before", "after"):
        lines += [f"## {side} (median of rounds)", "",
                  md_table(["clients", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"],
                           [[str(r["clients"]), f"{r['tok_per_s']:.1f}", f"{r['ttft_p50_ms']:.1f}",
                             f"{r['ttft_p99_ms']:.1f}", f"{r['itl_p50_ms']:.2f}", f"{r['itl_p99_ms']:.2f}"]
                            for r in res["median"][side]]), ""]
    lines += ["## after / before (< 1 is faster for latencies, > 1 is faster for tok/s)", "",
              md_table(["clients"] + RATIO_COLS,
                       [[str(r["clients"])] + [f"{r[c]:.2f}" if r[c] else "-" for c in RATIO_COLS]
                        for r in res["after_over_before"]]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny preset, shorter outputs")
    p.add_argument("--preset", default=None, help="model preset (default: small; tiny with --quick)")
    p.add_argument("--ckpt", default=None, help="serve this run directory instead")
    p.add_argument("--threads", type=int, default=None,
                   help="the server's torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="compare with the gptmod_ext found in DIR (before / after ratios)")
    p.add_argument("--after-args", default="", metavar="ARGS",
                   help="compare with server options ARGS on the after side only, e.g. "
                        "--after-args=--compile (before: the same package without them, or "
                        "--baseline's)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of a comparison")
    p.add_argument("--out", default=None, help="with a comparison: write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.baseline or args.after_args:
        import common

        res = compare(args.baseline, args.quick, args.preset, args.threads, args.rounds,
                      after_args=args.after_args.split())
        machine = common.machine_info()
        text = compare_markdown(res, machine)
        print(text)
        if args.out:
            common.write_json(Path(args.out + ".json"), {"machine": machine, **res})
            common.write_text(Path(args.out + ".md"), text)
        return 0
    rows = run(quick=args.quick, preset=args.preset, ckpt=args.ckpt, threads=args.threads)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    top = max(rows, key=lambda r: r["clients"])
    bar = top["failed"] == 0 and (top["speedup"] or 0) >= 3
    print(f"{top['clients']} clients: {top['speedup']}x the throughput of one client, "
          f"{top['failed']} failed -> {'PASS' if bar else 'FAIL'} (bar: 0 failed, >= 3x)")
    return 0 if bar else 1


if __name__ == "__main__":
    sys.exit(main())
