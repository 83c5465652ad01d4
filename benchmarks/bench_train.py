"""Training throughput: the default training command's step against a Hugging Face Llama loop.

Each engine runs one optimizer step of the trainer's shape (forward, cross-entropy, backward,
gradient clipping at 1.0, fused AdamW, zero_grad) on random tokens, from the same initial
weights, in alternating rounds (common.time_round_robin: one step of each engine per round):

  gptmod default   our model, ext backend, the dtype `--dtype auto` picks here (devices.py:
                   bf16 autocast on GPUs and on CPUs with fast native bf16 matmuls, else fp32)
  gptmod float32   the same without autocast (left out when the default is fp32)
  HF float32       transformers' LlamaForCausalLM of the same shape and weights (hf.to_hf),
                   logits -> F.cross_entropy, as a plain training loop does
  HF bf16 autocast the same under torch.autocast(bfloat16)

The CPU shape is the default run's (`tiny`, 8 x 256); the GPU shape the `modern` 124M preset at
16 x 1024. Reported per engine: tokens/s, ms/step, the model FLOPs (model.flops_per_token) as a
fraction of this machine's measured matrix-product peak for that dtype (`peak_frac`), and on a
GPU MFU against the datasheet bf16 peak. The ratios (`vs_hf_fp32`, `vs_hf_bf16`) are taken
round by round (our step and HF's in the same round) and their median reported.

    PYTHONPATH=python python benchmarks/bench_train.py [--device cpu] [--rounds 20] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import _paths  # noqa: E402,F401  (python/ only when gptmod_ext is not installed)
from gptmod_ext import _ext  # noqa: E402
from gptmod_ext.devices import dtype_name, pick_dtype  # noqa: E402
from gptmod_ext.model import GPT, GPTConfig  # noqa: E402
from gptmod_ext.train import PEAK_FLOPS  # noqa: E402
from common import sync, time_round_robin  # noqa: E402

# Matrix products whose best FLOP/s is taken as the machine's peak for a dtype: square, and the
# training step's own shapes (tokens x width -> 3 x width, tokens x width -> vocab).
PEAK_SHAPES = {"cpu": [(1024, 1024, 1024), (2048, 256, 768), (2048, 256, 4096)],
               "cuda": [(8192, 8192, 8192), (16384, 768, 2304), (16384, 768, 50304)]}


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The best FLOP/s of torch.mm in `dtype` over PEAK_SHAPES on this device."""
    best = 0.0
    for m, k, n in PEAK_SHAPES[device.type]:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        t = time_round_robin({"mm": lambda: torch.mm(a, b)}, device, warmup=2, budget_s=0.0,
                             min_repeats=repeats, max_repeats=repeats)["mm"]["min_s"]
        best = max(best, 2.0 * m * k * n / t)
    return best


def _step(forward_loss, params):
    """One optimizer step as the trainer takes it: backward, clip, fused AdamW, zero_grad."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step():
        forward_loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _autocast(device, dtype):
    return (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
            else contextlib.nullcontext())


def engines(cfg, init, x, y, device, default, compile=False):
    """{name: (step fn, dtype, note)}, every model loaded from the same initial weights."""
    out = {}
    dtypes = [default] + ([torch.float32] if default != torch.float32 else [])
    for dt in dtypes:
        model = GPT(cfg).to(device)
        model.load_state_dict(init)
        model.backend = "ext" if _ext.AVAILABLE else "torch"
        fwd = torch.compile(model) if compile else model
        amp = _autocast(device, dt)

        def loss(fwd=fwd, amp=amp):
            with amp:
                return fwd(x, y, return_logits=False)[1]
        name = "gptmod default" if dt == default else f"gptmod {dtype_name(dt)}"
        out[name] = (_step(loss, model.parameters()), dt,
                     f"backend {model.backend}{', compiled' if compile else ''}")
    try:
        from gptmod_ext.hf import to_hf
    except ImportError as e:
        return out, f"HF skipped: {e}"
    for dt in (torch.float32, torch.bfloat16):
        model = GPT(cfg).to(device)
        model.load_state_dict(init)
        hf = to_hf(model).to(device).train()
        amp = _autocast(device, dt)

        def loss(hf=hf, amp=amp):
            with amp:
                logits = hf(input_ids=x).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        name = "HF float32" if dt == torch.float32 else "HF bf16 autocast"
        out[name] = (_step(loss, hf.parameters()), dt, f"attn={hf.config._attn_implementation}")
    return out, None


def _pair_ratio(samples, ours, hf):
    """Median over rounds of HF's step time / ours in the same round (> 1: ours is faster)."""
    if ours not in samples or hf not in samples:
        return None
    return statistics.median(h / o for o, h in zip(samples[ours], samples[hf]))


def run(device: str = "cpu", quick: bool = False, compile: bool = False,
        rounds: int | None = None) -> list[dict]:
    """Rows of {engine, dtype, tokens_per_s, ms_per_step, peak_frac, mfu, vs_hf_fp32,
    vs_hf_bf16, ...}."""
    dev = torch.device(device)
    preset, B, T = ("modern", 16, 1024) if dev.type == "cuda" else ("tiny", 8, 256)
    rounds = rounds or (3 if quick else 20)
    default = pick_dtype("auto", dev, training=True)
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset)
    init = GPT(cfg).to(dev).state_dict()
    x = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    flops_per_step = GPT(cfg).flops_per_token(T) * B * T
    if compile and quick and dev.type == "cpu":
        compile = False  # inductor's first CPU compile takes minutes on a small machine
    fns, skipped = engines(cfg, init, x, y, dev, default, compile)
    t0 = time.perf_counter()
    times = time_round_robin({k: v[0] for k, v in fns.items()}, dev, warmup=2, budget_s=0.0,
                             min_repeats=rounds, max_repeats=rounds)
    seconds = time.perf_counter() - t0
    samples = {k: v["samples"] for k, v in times.items()}
    peaks = {dt: matmul_peak(dev, dt) for dt in {v[1] for v in fns.values()}}
    datasheet = None
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        datasheet = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    rows = []
    for name, (_, dt, note) in fns.items():
        secs = times[name]["median_s"]
        achieved = flops_per_step / secs
        rows.append(dict(
            engine=name, dtype=dtype_name(dt), autocast=dt != torch.float32,
            tokens_per_s=round(B * T / secs, 1), ms_per_step=round(secs * 1e3, 2),
            peak_GFLOPs=round(peaks[dt] / 1e9, 1), peak_frac=round(achieved / peaks[dt], 4),
            mfu=round(achieved / datasheet, 4) if (datasheet and dt == torch.bfloat16) else None,
            vs_hf_fp32=_pair_ratio(samples, name, "HF float32"),
            vs_hf_bf16=_pair_ratio(samples, name, "HF bf16 autocast"),
            note=note))
    for r in rows:
        r["vs_hf"] = r["vs_hf_fp32"]
        r.update(preset=preset, batch=B, seq=T, device=str(dev), rounds=rounds,
                 default_dtype=dtype_name(default), seconds=round(seconds, 1))
        if skipped:
            r["note"] = f"{r['note']}; {skipped}"
    sync(dev)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 20)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.device, args.quick, args.compile, args.rounds)
    r0 = rows[0]
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} threads")
    print(f"device={args.device} ({where}) preset={r0['preset']} batch={r0['batch']} x "
          f"{r0['seq']}, default dtype {r0['default_dtype']}, {r0['rounds']} alternating rounds")
    print(f"{'engine':<18}{'dtype':>10}{'tokens/s':>11}{'ms/step':>10}{'of peak':>9}{'MFU':>7}"
          f"{'vs HF fp32':>12}{'vs HF bf16':>12}  note")
    pct = lambda v: f"{100 * v:.1f}%" if v else "-"  # noqa: E731
    ratio = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
    for r in rows:
        print(f"{r['engine']:<18}{r['dtype']:>10}{r['tokens_per_s']:>11,.0f}"
              f"{r['ms_per_step']:>10.1f}{pct(r['peak_frac']):>9}{pct(r['mfu']):>7}{ratio(r['vs_hf_fp32']):>12}"
              f"{ratio(r['vs_hf_bf16']):>12}  {r['note']} (peak {r['peak_GFLOPs']:,.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
