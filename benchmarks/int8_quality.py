"""What int8 decoding costs in quality: a run's whole-val-split loss through the real decode path.

The fused CPU decode step is the only place int8 weights are read (prefill stays in the weights'
dtype), so this scores every val token as a decode step: the split is cut into the trainer's
covering windows (data.covering_windows, every target once), and each window is fed one token
per step through `forward_cached`, --rows windows side by side, so every logit comes out of
`gptmod::decode_step`. The same is done with the run's float weights through the same fused step
(`fused fp32`), and once with a plain forward (`forward`, the trainer's own final evaluation),
which the fused fp32 numbers must match. Reports loss (nats/token), bits/byte, the int8 loss's
change relative to fp32, and the largest logit difference of int8 against fp32 relative to the
largest logit, over the first windows.

    PYTHONPATH=python python benchmarks/int8_quality.py --ckpt out/ [--rows 8] [--max-tokens N]

Writes benchmarks/results/<machine>-<date>-int8-quality.{json,md} (--out).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import shlex
import sys
import time
from pathlib import Path

import torch

import _paths  # noqa: F401  (python/ only when gptmod_ext is not installed)
from gptmod_ext import checkpoint, data as data_mod  # noqa: E402
import common  # noqa: E402


def decode_scores(model, windows: torch.Tensor, skip: torch.Tensor, rows: int,
                  keep_logits: int = 0) -> tuple[float, int, list]:
    """(summed loss, targets scored, logits of the first keep_logits windows [T, V] each):
    each window fed one token per step, `rows` windows at a time."""
    total, count, kept = 0.0, 0, []
    T = windows.size(1) - 1
    for i in range(0, windows.size(0), rows):
        x = windows[i:i + rows]
        b = x.size(0)
        cache = model.new_kv_cache(b, T)
        steps = []
        for t in range(T):
            steps.append(model.forward_cached(x[:, t:t + 1], cache).float())
        logits = torch.stack(steps, 1)  # [b, T, V]
        lp = logits.log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0]
        for r in range(b):
            s = int(skip[i + r])
            total -= lp[r, s:].double().sum().item()
            count += T - s
            if len(kept) < keep_logits:
                kept.append(logits[r])
    return total, count, kept


def forward_scores(model, windows, skip) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(windows.size(0)):
            x = windows[i:i + 1]
            logits = model(x[:, :-1])[0].float()
            lp = logits.log_softmax(-1).gather(-1, x[:, 1:, None])[0, :, 0]
            s = int(skip[i])
            total -= lp[s:].double().sum().item()
            count += lp.numel() - s
    return total, count


def run(args) -> dict:
    model, tok, info = checkpoint.load_model(args.ckpt, device="cpu", dtype="float32",
                                             backend="ext")
    config = info.config
    dataset = data_mod.load(args.data or config["data"])
    val = dataset.val
    T = model.config.block_size if args.block_size is None else args.block_size
    offsets, skip = data_mod.covering_windows(len(val), T, args.max_tokens)
    x, y = data_mod.windows(val, offsets, T)
    windows = torch.cat([x, y[:, -1:]], 1)  # [n, T + 1]: inputs then the last target
    bpt = dataset.bytes_per_token("val")
    rows = {}
    t0 = time.perf_counter()
    total, n = forward_scores(model, windows, skip)
    rows["forward"] = dict(loss=total / n, seconds=time.perf_counter() - t0)
    for name, quantize in (("fused fp32", None), ("fused int8", "int8")):
        m, _, _ = checkpoint.load_model(args.ckpt, device="cpu", dtype="float32", backend="ext",
                                        quantize=quantize)
        assert m.decoder.choose_step(m, (args.rows, 1)) == "fused"
        t0 = time.perf_counter()
        total, n, kept = decode_scores(m, windows, skip, args.rows, keep_logits=4)
        rows[name] = dict(loss=total / n, seconds=time.perf_counter() - t0, logits=kept)
    for r in rows.values():
        r["bpb"] = data_mod.bits_per_byte(r["loss"], bpt)
    ref, q = rows["fused fp32"].pop("logits"), rows["fused int8"].pop("logits")
    err = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref, q))
    return {"run": str(args.ckpt), "targets": n, "val_split_tokens": len(val), "block": T,
            "rows": rows, "int8_vs_fp32_loss": rows["fused int8"]["loss"] / rows["fused fp32"]["loss"] - 1,
            "int8_logits_max_err_rel": err,
            "fused_fp32_vs_forward": rows["fused fp32"]["loss"] - rows["forward"]["loss"]}


def markdown(res: dict, machine: dict, command: str) -> str:
    lines = ["# int8 decoding: whole-val-split loss through the decode path", "",
             f"Machine: {machine['name']} ({machine.get('cpu_model')}, kernels "
             f"{machine.get('cpu_capability')}), torch {machine.get('torch')}."
             f" Command: `{command}`", "",
             f"Run `{res['run']}`: {res['targets']:,} targets of the val split's "
             f"{res['val_split_tokens']:,} tokens, windows of {res['block']}.", "",
             "| path | loss (nats/token) | bits/byte | seconds |", "|---|---:|---:|---:|"]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['loss']:.5f} | {r['bpb']:.4f} | {r['seconds']:.1f} |")
    lines += ["", f"int8 loss vs fp32: {100 * res['int8_vs_fp32_loss']:+.3f}% (target: within 0.5%); "
              f"largest int8 logit error / largest logit: {100 * res['int8_logits_max_err_rel']:.2f}%; "
              f"fused fp32 minus plain forward: {res['fused_fp32_vs_forward']:+.2e} nats."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out", help="a run directory (default: out)")
    p.add_argument("--data", default=None, help="its data directory (default: the run's own)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--rows", type=int, default=8, help="windows decoded side by side")
    p.add_argument("--max-tokens", type=int, default=None, help="score a sample of the split")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args)
    machine = common.machine_info("cpu")
    machine["name"] = common.machine_slug(machine)
    command = "PYTHONPATH=python python benchmarks/int8_quality.py " + shlex.join(sys.argv[1:])
    stem = Path(args.out) / f"{machine['name']}-{_dt.date.today()}-int8-quality"
    common.write_json(stem.with_suffix(".json"), {"machine": machine, "command": command, **res})
    common.write_text(stem.with_suffix(".md"), markdown(res, machine, command))
    print(markdown(res, machine, command))
    return 0 if math.isfinite(res["int8_vs_fp32_loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
