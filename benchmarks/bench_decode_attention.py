"""decode_attention benchmark: ours vs SDPA (enable_gqa), repeat_interleave + SDPA, compiled eager.

One decode step (Tq = 1) of q [B, 1, 12, 64] over 4 KV heads, every sequence L rows long. The
baselines see only the valid prefix k_cache[:, :L] (a view, as a decode step would pass it).
Reported: median time per call, ratios (baseline time / ours; > 1 means ours is faster),
effective GB/s over the K/V bytes read (2 * B * L * Hkv * D * itemsize / time), and the copy_
bandwidth of the same bytes ((read + write) / time) as a ceiling.

    PYTHONPATH=python python benchmarks/bench_decode_attention.py [--device cuda] [--quick]
        [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import gptmod_ext  # noqa: F401  (loads the ops)

HQ, HKV, D = 12, 4, 64
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCHES = (1, 8)


def _timer(device: str):
    if device == "cuda":
        def measure(fn, iters):
            start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            for i in range(iters):
                start[i].record()
                fn()
                end[i].record()
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) * 1e-3 for s, e in zip(start, end))
    else:
        def measure(fn, iters):
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)
    return measure


def bench(fn, device: str, min_time: float = 0.2, max_iters: int = 200) -> float:
    """Median seconds per call, after warm-up; the iteration count adapts to the call's cost."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(5, min_time / one)))
    return _timer(device)(fn, iters)


def eager_attention(q, k, v, scale):
    """Plain GQA attention for one decode step: q [B, Hq, 1, D], k/v [B, Hkv, L, D]."""
    B, Hq, Tq, Dh = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, (Hq // Hkv) * Tq, Dh)
    s = (qg.float() @ k.float().transpose(-1, -2)) * scale
    p = s.softmax(-1)
    return (p @ v.float()).to(q.dtype).reshape(B, Hq, Tq, Dh)


def run(device: str = "cpu", dtypes=("float32",), quick: bool = False) -> list[dict]:
    rows = []
    lengths = (512, 4096) if quick else LENGTHS
    compiled = None
    try:
        compiled = torch.compile(eager_attention, dynamic=True)
    except Exception:  # noqa: BLE001 - no compiler on this machine: skip that column
        compiled = None
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for B in BATCHES:
            for L in lengths:
                q = torch.randn(B, 1, HQ, D, device=device, dtype=dtype)
                k = torch.randn(B, L, HKV, D, device=device, dtype=dtype)
                v = torch.randn(B, L, HKV, D, device=device, dtype=dtype)
                lens = torch.full((B,), L, dtype=torch.int32, device=device)
                scale = D ** -0.5
                qt, kt, vt = q.transpose(1, 2), k[:, :L].transpose(1, 2), v[:, :L].transpose(1, 2)
                G = HQ // HKV
                kv_bytes = 2 * k.numel() * k.element_size()
                kd, vd = torch.empty_like(k), torch.empty_like(v)

                def ours():
                    torch.ops.gptmod.decode_attention(q, k, v, lens, scale, 0.0, 0)

                def sdpa_gqa():
                    F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True)

                def sdpa_repeat():
                    F.scaled_dot_product_attention(qt, kt.repeat_interleave(G, dim=1),
                                                   vt.repeat_interleave(G, dim=1), scale=scale)

                def copy():
                    kd.copy_(k)
                    vd.copy_(v)

                row = dict(device=device, dtype=dtype_name, B=B, L=L, Hq=HQ, Hkv=HKV, D=D)
                row["ours_ms"] = bench(ours, device) * 1e3
                row["sdpa_gqa_ms"] = bench(sdpa_gqa, device) * 1e3
                row["sdpa_repeat_ms"] = bench(sdpa_repeat, device) * 1e3
                row["compile_ms"] = None
                if compiled is not None:
                    try:
                        row["compile_ms"] = bench(lambda: compiled(qt, kt, vt, scale), device) * 1e3
                    except Exception:  # noqa: BLE001 - inductor unavailable: leave it out
                        compiled = None
                row["copy_ms"] = bench(copy, device) * 1e3
                row["ours_GBps"] = kv_bytes / (row["ours_ms"] * 1e-3) / 1e9
                row["copy_GBps"] = 2 * kv_bytes / (row["copy_ms"] * 1e-3) / 1e9
                row["vs_sdpa_gqa"] = row["sdpa_gqa_ms"] / row["ours_ms"]
                row["vs_sdpa_repeat"] = row["sdpa_repeat_ms"] / row["ours_ms"]
                row["vs_compile"] = (row["compile_ms"] / row["ours_ms"]) if row["compile_ms"] else None
                rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    fmt = lambda x, f: "   n/a" if x is None else format(x, f)  # noqa: E731
    print(f"{'dtype':>8} {'B':>2} {'L':>6} | {'ours ms':>8} {'gqa ms':>8} {'rep ms':>8} "
          f"{'comp ms':>8} | {'x gqa':>6} {'x rep':>6} {'x comp':>6} | {'GB/s':>6} "
          f"{'copy GB/s':>9}")
    for r in rows:
        print(f"{r['dtype']:>8} {r['B']:>2} {r['L']:>6} | {r['ours_ms']:8.3f} "
              f"{r['sdpa_gqa_ms']:8.3f} {r['sdpa_repeat_ms']:8.3f} {fmt(r['compile_ms'], '8.3f')} | "
              f"{r['vs_sdpa_gqa']:6.2f} {r['vs_sdpa_repeat']:6.2f} {fmt(r['vs_compile'], '6.2f')} | "
              f"{r['ours_GBps']:6.1f} {r['copy_GBps']:9.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dtypes = args.dtypes or (["float32", "bfloat16"] if True else [])
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"cpu build {torch.ops.gptmod.cpu_capability()}")
    print_table(run(args.device, tuple(dtypes), args.quick))
