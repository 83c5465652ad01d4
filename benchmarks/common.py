"""Shared pieces of the benchmark suites: timing, the machine description, result files, plots.

Timing rules (every suite follows them; `time_round_robin` implements them, `time_fn` is its
one-function case, and no suite has a timing loop of its own):
  - warm-up calls first, never timed (allocator, caches, lazy init, compilation);
  - each call timed on its own and the *median* reported (the minimum too: on a shared machine it
    shows the undisturbed cost);
  - on a GPU, CUDA events around each call (no host round-trip inside the measurement) and one
    synchronize at the end; on the CPU, perf_counter around each call;
  - implementations compared against each other are timed in the same process, ideally
    round-robin, and reported as ratios: those hold on a noisy machine where absolute times do not.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

# -- timing -----------------------------------------------------------------------------------


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _summary(samples: list[float]) -> dict:
    # samples: every call's time in round order, for ratios taken round by round.
    return {"median_s": statistics.median(samples), "min_s": min(samples), "n": len(samples),
            "samples": samples}


def time_round_robin(fns: dict, device="cpu", warmup: int = 3, budget_s: float = 1.0,
                     min_repeats: int = 10, max_repeats: int = 400,
                     clock=time.perf_counter) -> dict:
    """{name: {median_s, min_s, n, samples}}: one call of each fn per round, rounds until the
    budget is spent.

    The one timing loop of the suites. A neighbour that slows the machine for a moment slows
    every implementation alike, so the ratios between them stay meaningful. `clock` times CPU
    calls (time.thread_time leaves out the time the thread waits for a core); on a GPU each
    call is bracketed by CUDA events instead. min_repeats == max_repeats gives a fixed count.
    "samples" holds each fn's per-round times (index i = round i), for ratios per round
    (`round_ratios`).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    cuda = str(device).startswith("cuda")
    samples: dict[str, list] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_repeats and (rounds < min_repeats or time.perf_counter() - start < budget_s):
        for k, fn in fns.items():
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                samples[k].append((s, e))
            else:
                t0 = clock()
                fn()
                samples[k].append(clock() - t0)
        rounds += 1
        if cuda and rounds % 50 == 0:
            torch.cuda.synchronize()  # keeps the budget check honest: the GPU has caught up
    sync(device)
    if cuda:
        samples = {k: [s.elapsed_time(e) * 1e-3 for s, e in v] for k, v in samples.items()}
    return {k: _summary(v) for k, v in samples.items()}


def round_ratios(times: dict, a: str, b: str) -> dict:
    """a's time over b's, round by round (time_round_robin's samples): {median,
    q1, q3}. On a busy machine the quartiles say how far a single ratio can be trusted."""
    r = [x / y for x, y in zip(times[a]["samples"], times[b]["samples"])]
    q1, _, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0], None, r[0])
    return {"median": statistics.median(r), "q1": q1, "q3": q3}


def time_fn(fn, device="cpu", warmup: int = 3, min_time: float = 0.2, min_repeats: int = 5,
            max_repeats: int = 200, clock=time.perf_counter) -> dict:
    """{median_s, min_s, n} of single calls of fn after `warmup` untimed calls: enough calls to
    fill about `min_time` seconds, between `min_repeats` and `max_repeats`."""
    return time_round_robin({"fn": fn}, device, warmup, min_time, min_repeats, max_repeats,
                            clock)["fn"]


def copy_bandwidth(device="cpu", nbytes: int = 256 << 20, min_time: float = 0.5) -> dict:
    """dst.copy_(src) of `nbytes`: {GBps (bytes read + written per second), nbytes, median_s}.

    The ceiling for a memory-bound op: an op reading R and writing W bytes in time t reaches
    (R + W) / t / GBps of it.
    """
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in once
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, min_time=min_time, min_repeats=5)
    return {"GBps": 2 * n * 4 / t["median_s"] / 1e9, "nbytes": n * 4, "median_s": t["median_s"]}


# -- the machine ------------------------------------------------------------------------------


def _cpuinfo() -> tuple[str, int | None]:
    """(CPU model name, physical cores) from /proc/cpuinfo; platform fallbacks elsewhere."""
    model, cores = None, set()
    try:
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "model name" and model is None:
                model = val
            elif key == "physical id":
                phys = val
            elif key == "core id":
                core = val
            elif not key and core is not None:
                cores.add((phys, core))
                phys = core = None
        if core is not None:
            cores.add((phys, core))
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), (len(cores) or None)


def machine_info(device="cpu") -> dict:
    """Everything a reader needs to judge the numbers: CPU, cores, threads, torch, kernels, GPU."""
    model, physical = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": physical,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu_capability": None,
        "ext": None,
        "gpu": None,
        "gpu_memory_GiB": None,
    }
    try:
        from gptmod_ext import _ext
        info["ext"] = "loaded" if _ext.AVAILABLE else f"not available: {_ext.LOAD_ERROR}"
        if _ext.AVAILABLE:
            info["cpu_capability"] = torch.ops.gptmod.cpu_capability()
            info["ext_cuda"] = _ext.CUDA_LOADED
    except Exception as e:  # noqa: BLE001  (the description must never stop a run)
        info["ext"] = f"not available: {type(e).__name__}: {e}"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
    return info


_CPU_FAMILIES = ("xeon", "epyc", "ryzen", "threadripper", "graviton", "neoverse", "core",
                 "apple", "ampere")


def machine_slug(info: dict, device="cpu") -> str:
    """A short file-name-safe name: 'gpu-h100', 'cpu-xeon-2c', 'cpu-epyc-16c'."""
    if str(device).startswith("cuda") and info.get("gpu"):
        words = re.findall(r"[a-z0-9]+", info["gpu"].lower())
        words = [w for w in words if w not in ("nvidia", "geforce", "tesla", "amd", "radeon")]
        return "gpu-" + (words[0] if words else "unknown")
    words = re.findall(r"[a-z0-9]+", (info.get("cpu_model") or "").lower())
    family = next((w for w in words if w in _CPU_FAMILIES), None)
    if family is None:
        skip = {"intel", "r", "tm", "amd", "cpu", "processor", "genuine", "authentic"}
        family = next((w for w in words if w not in skip and not w.isdigit()), "unknown")
    cores = info.get("usable_cpus") or info.get("logical_cpus") or 0
    return f"cpu-{family}-{cores}c"


# -- result files -----------------------------------------------------------------------------


def jsonable(x):
    """Plain JSON: tuples to lists, dtypes/devices to str, NaN and inf to None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return jsonable(x.item())
    return str(x)


def write_json(path: Path, obj) -> None:
    """Written atomically (gptmod_ext.common.atomic_write): a crash never leaves half a file."""
    write_text(path, json.dumps(jsonable(obj), indent=1) + "\n")


def write_text(path: Path, text: str) -> None:
    from gptmod_ext.common import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def fmt(v, kind: str = "auto") -> str:
    """One table cell. kind: 'ms', 'x' (ratio), 'pct' (fraction shown as %), 'int', 'auto'."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(e) for e in v) + "]"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v).replace("|", "\\|").replace("\n", " ")
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "pct":
        return f"{100 * v:.0f}%"
    if kind == "int" or isinstance(v, int):
        return f"{int(v):,}" if abs(v) >= 10000 else str(int(v))
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2e}"


def md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A GitHub markdown table; align holds 'l' or 'r' per column (numbers right by default)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def generic_table(rows: list[dict]) -> str:
    """Every key of every row as a column (first-seen order); constant columns are left out."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    varying = [k for k in keys if len({json.dumps(jsonable(r.get(k))) for r in rows}) > 1]
    keys = varying or keys
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows)
               for k in keys]
    return md_table(keys, [[fmt(r.get(k)) for k in keys] for r in rows],
                    ["r" if n else "l" for n in numeric])


# -- plots ------------------------------------------------------------------------------------


def plot_lines(path: Path, panels: dict, xlabel: str, ylabel: str, title: str,
               logx: bool = True, logy: bool = False) -> Path | None:
    """panels: {panel title: {line label: [(x, y), ...]}} -> one PNG with one subplot per panel.

    Returns None (and writes nothing) when matplotlib is missing or nothing is there to draw.
    """
    panels = {p: {k: sorted(v) for k, v in lines.items() if v} for p, lines in panels.items()}
    panels = {p: lines for p, lines in panels.items() if lines}
    if not panels:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(panels)
    cols = min(n, 2)
    rows_ = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(6.5 * cols, 4.2 * rows_), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for label, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
