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

import torch
import torch.nn.functional as F

import gptmod_ext  # noqa: F401  (loads the ops)
from common import time_round_robin

HQ, HKV, D = 12, 4, 64
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCHES = (1, 8)


def eager_attention(q, k, v, scale):
    """Plain GQA attention for one decode step: q [B, Hq, 1, D], k/v [B, Hkv, L, D]."""
    B, Hq, Tq, Dh = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, (Hq // Hkv) * Tq, Dh)
    s = (qg.float() @ k.float().transpose(-1, -2)) * scale
    p = s.softmax(-1)
    return (p @ v.float()).to(q.dtype).reshape(B, Hq, Tq, Dh)


def run(device: str = "cpu", dtypes=("float32",), quick: bool = False,
        threads: int | None = None) -> list[dict]:
    """One row per (dtype, B, L): medians in ms, ratios baseline / ours, GB/s."""
    if threads:
        torch.set_num_threads(threads)
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
                fns = {"ours": ours, "sdpa_gqa": sdpa_gqa, "sdpa_repeat": sdpa_repeat, "copy": copy}
                if compiled is not None:
                    try:
                        compiled(qt, kt, vt, scale)
                        fns["compile"] = lambda: compiled(qt, kt, vt, scale)
                    except Exception:  # noqa: BLE001 - inductor unavailable: leave the column out
                        compiled = None
                t = {k: v["median_s"] for k, v in time_round_robin(
                    fns, device, warmup=2, budget_s=0.3, min_repeats=7, max_repeats=100).items()}
                for name in ("ours", "sdpa_gqa", "sdpa_repeat", "copy"):
                    row[f"{name}_ms"] = t[name] * 1e3
                row["compile_ms"] = t["compile"] * 1e3 if "compile" in t else None
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
    ap.add_argument("--quick", action="store_true", help="L in (512, 4096) only")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    dtypes = args.dtypes or ["float32", "bfloat16"]
    rows = run(args.device, tuple(dtypes), args.quick, args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"cpu build {torch.ops.gptmod.cpu_capability()}; ratios = baseline time / ours; GB/s over "
          f"the K/V bytes (copy: read + write)")
    print_table(rows)
