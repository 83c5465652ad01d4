"""Micro-benchmark of gptmod::rope and gptmod::swiglu against eager PyTorch and torch.compile.

For each op, size and dtype it times (median of many calls, warm-up excluded):
  ours     torch.ops.gptmod.*
  eager    the Hugging Face-style PyTorch code: x * cos + rotate_half(x) * sin with cos/sin
           already gathered and expanded to [B, T, 1, D] (their gather is not timed, which only
           favours eager); F.silu(gate) * up on the chunks of gate_up
  compile  torch.compile of the eager code (skipped with a note if it fails)
  copy     dst.copy_(src) moving the same number of bytes: the memory-bandwidth ceiling
and reports time, speedup vs eager, effective GB/s (bytes the op must read + write, divided by
its median time) and the fraction of copy bandwidth reached (copy time / op time). The
minimum time is printed too: on a shared machine it shows the undisturbed cost. "fwd+bwd" runs
the forward and the backward through autograd, with the gradient of the output given.

The implementations are timed round-robin (one call of each per round), so a noisy neighbour
slows all of them alike and the ratios within one run hold. On a machine with more busy threads
than cores, a parallel region stalls whenever one of its threads is descheduled, which punishes
multi-kernel eager code most: then also run `--threads 1 --clock thread` (per-thread CPU time).
Run: python benchmarks/bench_ops.py [--device cuda] [--quick] [--dtypes float32 bfloat16].
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import gptmod_ext  # noqa: F401  (loads the ops)
from common import time_round_robin
from gptmod_ext import rope_cache

ROPE_SHAPES = [(1, 128, 12, 64), (8, 512, 12, 64), (4, 1024, 16, 128)]
SWIGLU_SHAPES = [(256, 2 * 512), (4096, 2 * 1536), (8192, 2 * 2048)]
QUICK_ROPE_SHAPES = [(1, 128, 12, 64), (8, 512, 12, 64)]
QUICK_SWIGLU_SHAPES = [(256, 2 * 512), (4096, 2 * 1536)]


# perf_counter (wall time) by default. On a loaded machine, `--threads 1 --clock thread` times
# the CPU time of the calling thread instead, which does not count the time the thread waits
# for a core (it still counts memory-bandwidth contention).
CLOCK = time.perf_counter


def _time(fns: dict, device: str, budget_s: float) -> dict:
    """(median, min) seconds per call of each fn, round-robin until the budget is spent."""
    t = time_round_robin(fns, device, warmup=3, budget_s=budget_s, min_repeats=15,
                         max_repeats=400, clock=CLOCK)
    return {k: (v["median_s"], v["min_s"]) for k, v in t.items()}


def hf_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(x, cos_full, sin_full):
    return x * cos_full + hf_rotate_half(x) * sin_full


def eager_swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _try_compile(fn, x_example, *args):
    """torch.compile(fn) after a trial call; None (with the reason) if it does not work here."""
    try:
        compiled = torch.compile(fn)
        compiled(x_example, *args)
        return compiled, None
    except Exception as e:  # noqa: BLE001  (any backend failure just drops the column)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def _fwd_bwd(fn, x, grad, *args):
    def step():
        x.grad = None
        fn(x, *args).backward(grad)
    return step


def _rows(op, mode, shape, dtype, times, nbytes, note=None):
    out = []
    med = {k: v[0] for k, v in times.items()}
    copy_t = med.get("copy")
    for impl in ("ours", "eager", "compile", "copy"):
        if impl not in times:
            continue
        t = med[impl]
        out.append({
            "op": op, "mode": mode, "shape": tuple(shape),
            "dtype": str(dtype).replace("torch.", ""),
            "impl": impl, "median_ms": t * 1e3, "min_ms": times[impl][1] * 1e3,
            "speedup_vs_eager": med["eager"] / t,
            "speedup_vs_compile": med["compile"] / t if "compile" in med else None,
            "gbps": nbytes / t / 1e9,
            "frac_copy": copy_t / t if copy_t else None,
            "note": note,
        })
    return out


def _copy_fn(nbytes, dtype, device):
    # Copying n bytes reads n and writes n: half the op's traffic each way.
    n = max(1, nbytes // 2 // torch.empty((), dtype=dtype).element_size())
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in once, as a reused activation buffer would be
    return lambda: dst.copy_(src)


def bench_rope(shape, dtype, device, budget_s, with_compile):
    B, T, H, D = shape
    cos, sin = rope_cache(T, D, device=device)
    positions = torch.arange(T, device=device)[None].expand(B, T).contiguous()
    x = torch.randn(shape, device=device).to(dtype)
    # HF: cos/sin gathered per token and duplicated to D, broadcast over heads.
    cos_full = torch.cat((cos[positions], cos[positions]), dim=-1)[:, :, None, :].to(dtype)
    sin_full = torch.cat((sin[positions], sin[positions]), dim=-1)[:, :, None, :].to(dtype)
    ours = lambda x_: torch.ops.gptmod.rope(x_, cos, sin, positions)  # noqa: E731
    compiled, why = (_try_compile(hf_rope, x, cos_full, sin_full) if with_compile
                     else (None, "compile not requested"))
    nbytes = 2 * x.numel() * x.element_size()
    rows = []
    fns = {"ours": lambda: ours(x), "eager": lambda: hf_rope(x, cos_full, sin_full),
           "copy": _copy_fn(nbytes, dtype, device)}
    if compiled:
        fns["compile"] = lambda: compiled(x, cos_full, sin_full)
    rows += _rows("rope", "fwd", shape, dtype, _time(fns, device, budget_s), nbytes,
                  why)

    xg = x.clone().requires_grad_(True)
    grad = torch.randn_like(x)
    fns = {"ours": _fwd_bwd(ours, xg, grad),
           "eager": _fwd_bwd(hf_rope, xg, grad, cos_full, sin_full),
           "copy": _copy_fn(2 * nbytes, dtype, device)}
    if compiled:
        fns["compile"] = _fwd_bwd(compiled, xg, grad, cos_full, sin_full)
    rows += _rows("rope", "fwd+bwd", shape, dtype, _time(fns, device, budget_s),
                  2 * nbytes, why)
    return rows


def bench_swiglu(shape, dtype, device, budget_s, with_compile):
    rows_, two_f = shape
    gate_up = torch.randn(shape, device=device).to(dtype)
    compiled, why = (_try_compile(eager_swiglu, gate_up) if with_compile
                     else (None, "compile not requested"))
    esize = gate_up.element_size()
    fwd_bytes = rows_ * (two_f + two_f // 2) * esize  # read [rows, 2F], write [rows, F]
    rows = []
    fns = {"ours": lambda: torch.ops.gptmod.swiglu(gate_up), "eager": lambda: eager_swiglu(gate_up),
           "copy": _copy_fn(fwd_bytes, dtype, device)}
    if compiled:
        fns["compile"] = lambda: compiled(gate_up)
    rows += _rows("swiglu", "fwd", shape, dtype, _time(fns, device, budget_s),
                  fwd_bytes, why)

    # Backward: read grad_out [rows, F] and gate_up [rows, 2F], write [rows, 2F].
    bytes_total = fwd_bytes + rows_ * (two_f // 2 + 2 * two_f) * esize
    xg = gate_up.clone().requires_grad_(True)
    grad = torch.randn(rows_, two_f // 2, device=device).to(dtype)
    fns = {"ours": _fwd_bwd(torch.ops.gptmod.swiglu, xg, grad),
           "eager": _fwd_bwd(eager_swiglu, xg, grad),
           "copy": _copy_fn(bytes_total, dtype, device)}
    if compiled:
        fns["compile"] = _fwd_bwd(compiled, xg, grad)
    rows += _rows("swiglu", "fwd+bwd", shape, dtype, _time(fns, device, budget_s),
                  bytes_total, why)
    return rows


def run(device="cpu", dtypes=("float32", "bfloat16"), quick=False, with_compile=True,
        budget_s=None, clock="wall") -> list[dict]:
    """Benchmark rows, one per (op, mode, shape, dtype, impl); see the module docstring.
    clock="thread" (CPU time of this thread) is only meaningful with torch.get_num_threads() == 1.
    """
    global CLOCK
    if clock == "thread":
        if torch.get_num_threads() != 1 or device != "cpu":
            raise ValueError("clock='thread' needs device='cpu' and torch.set_num_threads(1)")
        CLOCK = time.thread_time
    else:
        CLOCK = time.perf_counter
    budget_s = budget_s if budget_s is not None else (0.3 if quick else 1.0)
    rope_shapes = QUICK_ROPE_SHAPES if quick else ROPE_SHAPES
    swiglu_shapes = QUICK_SWIGLU_SHAPES if quick else SWIGLU_SHAPES
    rows = []
    with torch.inference_mode(False):
        for name in dtypes:
            dtype = getattr(torch, name)
            for shape in rope_shapes:
                rows += bench_rope(shape, dtype, device, budget_s, with_compile)
            for shape in swiglu_shapes:
                rows += bench_swiglu(shape, dtype, device, budget_s, with_compile)
    return rows


def format_table(rows) -> str:
    head = (f"{'op':7} {'mode':8} {'shape':20} {'dtype':9} {'impl':8} {'median ms':>9} {'min ms':>8} "
            f"{'x eager':>8} {'x compile':>9} {'GB/s':>7} {'% copy':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        vs_c = f"{r['speedup_vs_compile']:.2f}" if r["speedup_vs_compile"] else "-"
        frac = f"{100 * r['frac_copy']:.0f}%" if r["frac_copy"] else "-"
        lines.append(f"{r['op']:7} {r['mode']:8} {str(r['shape']):20} {r['dtype']:9} "
                     f"{r['impl']:8} {r['median_ms']:9.3f} {r['min_ms']:8.3f} {r['speedup_vs_eager']:8.2f} "
                     f"{vs_c:>9} {r['gbps']:7.1f} {frac:>7}")
    notes = {r["note"] for r in rows if r["note"]}
    lines += [f"note: {n}" for n in sorted(notes)]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: "
                    "leave torch's default)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"cpu kernels {torch.ops.gptmod.cpu_capability()}")
    print(f"clock: {args.clock}")
    rows = run(args.device, tuple(args.dtypes), args.quick, not args.no_compile, args.budget,
               args.clock)
    print(format_table(rows))


if __name__ == "__main__":
    main()
