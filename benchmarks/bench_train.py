"""Training throughput: our ext and torch backends, eager and compiled, and Hugging Face Llama.

Each engine runs the same training step as gptmod_ext.train (forward, cross-entropy, backward,
fused AdamW, zero_grad) on random tokens, from the same initial weights: the `tiny` preset at
batch 8 x 256 on the CPU, the `modern` preset (124M) at batch 16 x 1024 in bf16 autocast on a
GPU. The Hugging Face model is LlamaForCausalLM with the same shape and weights (hf.to_hf).
Reports tokens/s, ms/step and, on a GPU, MFU (model.flops_per_token() over the peak).

    PYTHONPATH=python python benchmarks/bench_train.py [--device cpu] [--quick] [--no-compile]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

import _paths  # noqa: E402,F401  (python/ only when gptmod_ext is not installed)
from gptmod_ext import _ext  # noqa: E402
from gptmod_ext.model import GPT, GPTConfig  # noqa: E402
from gptmod_ext.train import PEAK_FLOPS  # noqa: E402
from common import time_fn  # noqa: E402


def _make_step(forward, params, x, y, autocast):
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        with autocast:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run(device: str = "cpu", quick: bool = False, compile: bool = True) -> list[dict]:
    """Rows of {engine, tokens_per_s, ms_per_step, mfu, note}."""
    dev = torch.device(device)
    if dev.type == "cuda":
        preset, B, T, dtype = "modern", 16, 1024, torch.bfloat16
    else:
        preset, B, T, dtype = "tiny", 8, 256, torch.float32
    warmup, steps = (1, 2) if quick else (3, 10)
    if quick and dev.type == "cpu":
        compile = False  # inductor's first CPU compile takes minutes on a small machine
    autocast = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset)
    base = GPT(cfg).to(dev)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    flops_per_step = base.flops_per_token(T) * B * T
    peak = None
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    engines = []
    backends = (["ext"] if _ext.AVAILABLE else []) + ["torch"]
    for compiled in ([False, True] if compile else [False]):
        for backend in backends:
            engines.append((f"gptmod {backend}{' compiled' if compiled else ''}", backend, compiled))

    rows = []

    def add(name, secs, note=""):
        rows.append(dict(engine=name, tokens_per_s=round(B * T / secs, 1) if secs else None,
                         ms_per_step=round(secs * 1e3, 2) if secs else None,
                         mfu=round(flops_per_step / secs / peak, 4) if (peak and secs) else None,
                         note=note))

    for name, backend, compiled in engines:
        model = GPT(cfg).to(dev)
        model.load_state_dict(init)
        model.backend = backend
        fwd = model
        note = ""
        if compiled:
            try:
                fwd = torch.compile(model)
                t0 = time.perf_counter()
                _make_step(lambda idx: fwd(idx)[0], model.parameters(), x, y, autocast)()
                note = f"compile {time.perf_counter() - t0:.0f}s"
            except Exception as e:  # a missing compiler, an unsupported op: skip, say why
                add(name, None, f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
        step = _make_step(lambda idx: fwd(idx)[0], model.parameters(), x, y, autocast)
        add(name, time_fn(step, dev, warmup, 0.0, steps, steps)["median_s"], note)
        del model, fwd, step

    try:
        from gptmod_ext.hf import to_hf
        model = GPT(cfg).to(dev)
        model.load_state_dict(init)
        hf = to_hf(model).train()
        step = _make_step(lambda idx: hf(input_ids=idx).logits, hf.parameters(), x, y, autocast)
        add("HF LlamaForCausalLM", time_fn(step, dev, warmup, 0.0, steps, steps)["median_s"],
            f"attn={hf.config._attn_implementation}")
    except ImportError as e:
        add("HF LlamaForCausalLM", None, f"skipped: {e}")
    for r in rows:
        r.update(preset=preset, batch=B, seq=T, dtype=str(dtype).replace("torch.", ""),
                 device=str(dev))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    rows = run(args.device, args.quick, not args.no_compile)
    r0 = rows[0]
    print(f"device={args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else f'{torch.get_num_threads()} threads'}) "
          f"preset={r0['preset']} batch={r0['batch']} x {r0['seq']} {r0['dtype']}")
    print(f"{'engine':<26}{'tokens/s':>12}{'ms/step':>10}{'MFU':>8}  note")
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        print(f"{r['engine']:<26}{tps:>12}{ms:>10}{mfu:>8}  {r['note']}")


if __name__ == "__main__":
    main()
