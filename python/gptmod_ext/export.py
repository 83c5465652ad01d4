"""Export a run directory as a Hugging Face folder (model, tokenizer, generation config).

    python -m gptmod_ext.export --ckpt out/ --out hf_dir/ [--dtype fp32|bf16|fp16] [--force]

The folder loads with transformers alone (AutoModelForCausalLM / AutoTokenizer /
pipeline("text-generation")) and with our own sampler and server (`--ckpt hf_dir`). The
Python API behind it is gptmod_ext.hf.save_hf(model, tokenizer, dir).

What it does, in the terms of the flags:
- --ckpt: a run directory written by `python -m gptmod_ext.train` (model.safetensors,
  config.json, tokenizer.json), or a nanoGPT ckpt.pt (with --tokenizer-path where its
  tokenizer is not found by itself; see checkpoint.load_model). Its weights are read on the CPU.
- --out: the folder to create. It is written under a temporary name next to it and renamed
  into place at the end, so an error leaves nothing behind. An existing non-empty folder is
  refused unless --force, which replaces it whole.
- --dtype: the weights' dtype in model.safetensors (default fp32, as trained).
- The architecture follows the model: RoPE models become LlamaForCausalLM, learned positions
  GPT2LMHeadModel; a feature neither expresses (soft-cap, QK-norm, parallel blocks, ...) is
  refused with its name.
- stdout: one line saying what was written. Errors: one line on stderr,
  `python -m gptmod_ext.export: error: ...`, exit 1 (2 for usage errors); GPTMOD_DEBUG=1 shows
  tracebacks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import Parser, run_cli

PROG = "python -m gptmod_ext.export"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Write a gptmod_ext run directory as a Hugging Face "
                "folder (config.json, model.safetensors, generation_config.json, tokenizer.json, "
                "tokenizer_config.json) that transformers loads without gptmod_ext.")
    p.add_argument("--ckpt", default="out", help="run directory, or nanoGPT ckpt.pt / "
                   "nanoGPT-moderno model_XXXXX.pt (or its directory) (default: out)")
    p.add_argument("--tokenizer-path", default=None, metavar="PATH",
                   help="for a nanoGPT checkpoint: its meta.pkl, or GPT-2's tokenizer files")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the exported weights (default: fp32)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it exists and is not empty")
    return p


def export(ckpt, out, dtype: str = "fp32", force: bool = False,
           tokenizer_path=None) -> str:
    """Exports run directory (or nanoGPT checkpoint) ckpt to out; returns a one-line
    description of what was written."""
    from . import checkpoint, hf

    ckpt_dir, out_dir = Path(ckpt).resolve(), Path(out).resolve()
    if out_dir == ckpt_dir or out_dir in ckpt_dir.parents:
        # --force would replace the run (its training state too) with the exported folder.
        raise ValueError(f"--out {out} would replace the run directory {ckpt}; choose another")
    if checkpoint.is_hf_dir(ckpt):
        raise ValueError(f"{ckpt} is already a Hugging Face folder (export reads run directories)")
    model, tok, _ = checkpoint.load_model(ckpt, device="cpu", dtype="float32", backend="torch",
                                          tokenizer_path=tokenizer_path)
    path = hf.save_hf(model, tok, out, dtype=dtype, overwrite=force)
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"wrote {path}: {arch}, {params:.2f}M parameters, {dtype}, tokenizer {tok.name} "
            f"({tok.vocab_size} ids, eos {tok.eot_id})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from .common import transformers_module

        transformers_module().utils.logging.disable_progress_bar()  # stderr is for errors only
        print(export(args.ckpt, args.out, args.dtype, args.force, args.tokenizer_path),
              flush=True)
        return 0
    # Ctrl-C mid-export: save_hf has removed its temporary folder on the way out.
    return run_cli(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
