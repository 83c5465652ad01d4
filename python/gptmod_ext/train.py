"""Trains a GPT: `python -m gptmod_ext.train` (one process) or `torchrun ... -m gptmod_ext.train`.

With no arguments it prepares the default corpus (the Python standard library's source, into
data/stdlib/ under the current directory, once) and trains the `tiny` preset on the CPU in
about ten minutes, writing the run directory out/ (see checkpoint.py).

The loop follows nanoGPT's train.py in shape (random windows from a memmap, AdamW, warmup +
cosine decay, gradient accumulation and clipping, periodic evaluation, DDP through torchrun)
and litgpt's pretrain.py in layout: `setup` resolves the options once into a frozen Config and
builds everything a run needs (a Run), `fit` is the loop, `train_step` one optimizer step,
`validate` one evaluation, `get_lr` the schedule, and a RunLogger everything the run reports
(metrics.jsonl, loss.png, MLflow, the console). The code is our own. Choices worth knowing:
- Weight decay applies to the 2-D parameters (every matmul weight and the embedding tables),
  never to norm gains or biases, as in nanoGPT.
- The learning rate warms up linearly for --warmup-iters steps, then follows a cosine from
  --lr down to --min-lr at --max-iters.
- Data-parallel: the effective batch of N processes equals one process with N times the
  gradient accumulation. --grad-accum, when given, is the total over all processes and must be
  divisible by N; without it every process does one micro-batch per step (N in total, said in
  the banner), so `torchrun --nproc_per_node=N -m gptmod_ext.train` runs with no other flag
  (docs/design.md §6). Gradients are averaged once per step (no_sync on the other
  micro-steps). Every step draws the window starts of the whole global batch
  (grad_accum x batch_size) from one seeded sampler, identical on every rank, and rank r takes
  its own slice: the ranks see different windows, and the data stream (hence the run, up to
  float rounding) does not depend on the number of processes.
- Evaluations during training use --eval-iters fixed random batches (a cheap, steady curve).
  A finished run is evaluated once more on the whole val split (at most --final-eval-tokens
  targets, a sample of evenly spaced windows beyond that; the count is printed): that number,
  stored in metrics.jsonl as final_val_loss, is the one to quote.
- A checkpoint is written at every evaluation, at --stop-at, on Ctrl-C and at the end. A loss
  that is NaN or inf stops the run before its update is saved, so the last checkpoint stays
  the last good state.
- Exact resume: train_state.pt (checkpoint.TrainState) holds the optimizer, every RNG and the
  data sampler state; evaluation and samples draw from their own generators, so stopping at
  step k and resuming gives the same weights as never stopping (bitwise on the CPU in fp32).
- --init-from SRC starts from a trained model (finetune.py: its weights, architecture and
  tokenizer) with fine-tuning defaults (optimizer_defaults); --lora-rank trains LoRA adapters
  on its frozen weights (lora.py). A chat data set (data.py) is read as whole conversations,
  its loss on the answers only; the loop is the same.

Launching data-parallel runs (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; only rank 0 prints
and writes files):
    torchrun --standalone --nproc_per_node=4 -m gptmod_ext.train
    torchrun --standalone --nproc_per_node=4 -m gptmod_ext.train --grad-accum 8 ...
    # two machines, 8 GPUs each: run on both, with --node_rank=0 on host0 and 1 on the other
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=host0:29500 -m gptmod_ext.train --grad-accum 16 ...
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
import typing
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _ext
from . import checkpoint as ckpt
from . import data as data_mod
from . import finetune, lora
from . import prepare as prepare_mod
from . import tokenizer as tokenizer_mod
from .common import Parser, UserError, atomic_write, first_line, run_cli
from .devices import DTYPE_CHOICES, dtype_name, pick_device, pick_dtype

PROG = "python -m gptmod_ext.train"
DEFAULT_DATA = "data/stdlib"
# --lr and --weight-decay when not given: training from scratch, fine-tuning (--init-from), LoRA.
PRETRAIN_LR, FINETUNE_LR, LORA_LR = 2e-3, 1e-4, 1e-3
PRETRAIN_WEIGHT_DECAY, FINETUNE_WEIGHT_DECAY = 0.1, 0.0
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
# Evaluations in a row at which val loss rose before the run warns of overfitting (once).
OVERFIT_EVALS = 3
# Peak dense bf16 tensor FLOP/s by GPU name, for MFU (datasheet numbers, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12}


class TrainError(UserError):
    """A bad option or input; main() prints it as one line and exits with status 1."""


# -- options ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog=PROG, description="Train a GPT on prepared tokens or raw text.")
    a = p.add_argument
    a("--out-dir", default="out", help="run directory (checkpoint, metrics, plot)")
    a("--data", default=None,
      help="a prepared data directory, or raw text (file, glob, directory) to prepare first; "
           f"default: the Python stdlib source, prepared into {DEFAULT_DATA}")
    a("--preset", default="tiny", help="model preset (gptmod_ext.model.PRESETS)")
    a("--model-args", default="",
      help="GPTConfig overrides, comma separated: n_layer=2,n_embd=64,dropout=0.1")
    a("--max-iters", type=int, default=850, help="optimizer steps: the schedule's horizon")
    a("--batch-size", type=int, default=8, help="windows per micro-step per process")
    a("--block-size", type=int, default=None,
      help="window length (default and maximum: the model's block_size)")
    a("--grad-accum", type=int, default=None,
      help="micro-steps per optimizer step, in total over all DDP processes (must be "
           "divisible by their number); default: one per process")
    a("--lr", type=float, default=None, help="peak learning rate (default 2e-3; with "
      f"--init-from {FINETUNE_LR:g}, with LoRA {LORA_LR:g})")
    a("--min-lr", type=float, default=None, help="final learning rate (default lr / 10)")
    a("--warmup-iters", type=int, default=None, help="default: max_iters / 20")
    a("--weight-decay", type=float, default=None, help="default 0.1; with --init-from 0")
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.95)
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    a("--dtype", default="auto", choices=DTYPE_CHOICES,
      help="autocast dtype (weights, loss and optimizer stay fp32); auto: bfloat16 on GPUs "
           "that support it and on CPUs with native bf16 dot products where it measures "
           "faster, else float32")
    a("--backend", default="auto", choices=["auto", "ext", "torch"],
      help="ext: our compiled ops; torch: pure PyTorch; auto (default): ext where it can run, "
           "else torch with a warning that says why")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--resume", action="store_true", help="continue the run in --out-dir")
    a("--stop-at", type=int, default=None,
      help="stop at this step with a checkpoint, as an interruption would")
    a("--eval-interval", type=int, default=50, help="steps between evaluations/checkpoints")
    a("--eval-iters", type=int, default=10, help="batches per evaluation")
    a("--final-eval-tokens", type=int, default=1_000_000,
      help="the final evaluation scores the whole val split, or an evenly spaced sample of "
           "this many tokens of a larger one (0 = no final evaluation)")
    a("--log-interval", type=int, default=1, help="steps between metrics.jsonl lines")
    a("--sample-tokens", type=int, default=64, help="tokens sampled at each eval (0 = off)")
    a("--seed", type=int, default=1337)
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a("--mlflow", default=None, metavar="URI",
      help="log params and metrics to MLflow (e.g. sqlite:///mlruns.db); needs mlflow")
    a("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    a("--init-from", default=None, metavar="SRC",
      help="start from this model: a run directory, a Hugging Face Llama/GPT-2 folder, or a "
           "nanoGPT ckpt.pt / moderno model_XXXXX.pt (its tokenizer: --tokenizer-path); its "
           "architecture, weights and tokenizer (see finetune.py)")
    a("--lora-rank", type=int, default=0,
      help="with --init-from: train rank-R LoRA adapters on frozen weights (0 = off)")
    a("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default 2 x rank)")
    a("--lora-targets", default=",".join(lora.TARGETS),
      help=f"the adapted Linears, comma separated: {', '.join(lora.TARGETS)} (every Linear in "
           "the blocks, the default) and lm_head")
    prepare_mod.add_tokenizer_args(p)
    return p.parse_args(argv)


def parse_model_args(text: str) -> dict:
    """--model-args "n_layer=6,tie_embeddings=False,n_kv_head=None" -> GPTConfig overrides,
    each value parsed by its field's type: booleans take True/False/true/false/1/0, optional
    fields None/null, ints and floats their literals, strings the text. Anything else (an
    unknown field, a value of the wrong type) is a TrainError naming the field and the value:
    a value stored as the string "False" would be truthy and silently tie the embeddings."""
    from .model import GPTConfig

    types = typing.get_type_hints(GPTConfig)
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise TrainError(f"--model-args item {item!r} is not key=value")
        k, v = (s.strip() for s in item.split("=", 1))
        if k not in types:
            raise TrainError(f"--model-args: {k!r} is not a GPTConfig field; the fields are "
                             f"{', '.join(types)}")
        out[k] = _parse_field(k, v, types[k])
    return out


_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def _parse_field(name: str, text: str, typ):
    args = typing.get_args(typ)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else typ
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            return _BOOLS[text.lower()]
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is str and text:
            return text
    except (KeyError, ValueError):
        pass
    expected = {bool: "True/False/true/false/1/0", int: "an integer", float: "a number",
                str: "a non-empty string"}[base]
    raise TrainError(f"--model-args {name}={text!r}: expected {expected}"
                     f"{' or None/null' if optional else ''}")


@dataclass(frozen=True)
class Config:
    """The options of a run after resolution (defaults filled in, device, dtype and backend
    decided), made once by setup() and never changed. One field per command-line option, plus
    world_size; config.json's "train" is dataclasses.asdict(Config)."""
    out_dir: str
    data: str                 # the prepared data directory
    preset: str
    model_args: str
    max_iters: int
    batch_size: int
    block_size: int
    grad_accum: int           # micro-batches per step, in total over all processes
    lr: float
    min_lr: float
    warmup_iters: int
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    device: str
    dtype: str                # the autocast dtype
    backend: str              # 'ext' or 'torch'
    compile: bool
    resume: bool
    stop_at: int | None
    eval_interval: int
    eval_iters: int
    final_eval_tokens: int
    log_interval: int
    sample_tokens: int
    seed: int
    threads: int | None
    mlflow: str | None
    no_progress: bool
    tokenizer: str            # the tokenizer options, for preparing raw text
    vocab_size: int
    tokenizer_path: str | None
    jsonl_field: str
    errors: str
    world_size: int = 1
    init_from: str | None = None  # the model the run started from (finetune.py)
    lora_rank: int = 0            # 0: every weight trains; R: LoRA adapters only (lora.py)
    lora_alpha: float | None = None
    lora_targets: str = ""

    @property
    def micro_steps(self) -> int:
        """Micro-batches per step on each process."""
        return self.grad_accum // self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum


def tokenizer_args(opts) -> dict:
    """The options prepare.prepare takes, from the arguments or a Config."""
    return dict(tokenizer=opts.tokenizer, vocab_size=opts.vocab_size,
                tokenizer_path=opts.tokenizer_path, jsonl_field=opts.jsonl_field,
                errors=opts.errors)


def resolve_config(args, env: "Env", data_dir: Path, block_size: int, backend: str) -> Config:
    """Config from the arguments, with every default decided (see the module doc)."""
    checks = [(args.stop_at is None or args.stop_at >= 1, "--stop-at must be a positive step"),
              ((args.block_size or block_size) <= block_size,
               f"--block-size {args.block_size} is larger than the model's block_size "
               f"{block_size}")]
    for ok, msg in checks:
        if not ok:
            raise TrainError(msg)
    opt = optimizer_defaults(args)
    resolved = dict(
        data=str(data_dir), block_size=args.block_size or block_size,
        grad_accum=args.grad_accum if args.grad_accum is not None else env.world,
        min_lr=args.min_lr if args.min_lr is not None else opt["lr"] / 10, **opt,
        warmup_iters=(args.warmup_iters if args.warmup_iters is not None
                      else max(args.max_iters // 20, 1)),
        device=str(env.device), dtype=dtype_name(pick_dtype(args.dtype, env.device, training=True)),
        backend=backend, world_size=env.world)
    return Config(**{**vars(args), **resolved})


def optimizer_defaults(args) -> dict:
    """lr, weight_decay and lora_alpha as given, else their defaults: pretraining 2e-3 and 0.1;
    fine-tuning (--init-from) 1e-4 and 0, a tenth of pretraining's peak, as nanoGPT's and
    litgpt's fine-tuning recipes lower it; LoRA 1e-3 (the adapters start at zero and, being
    few, take a larger step, as in the LoRA paper and peft's examples) with alpha = 2 x rank."""
    if args.init_from is None:
        lr, wd = PRETRAIN_LR, PRETRAIN_WEIGHT_DECAY
    else:
        lr, wd = (LORA_LR if args.lora_rank else FINETUNE_LR), FINETUNE_WEIGHT_DECAY
    return dict(lr=lr if args.lr is None else args.lr,
                weight_decay=wd if args.weight_decay is None else args.weight_decay,
                lora_alpha=(2.0 * args.lora_rank if args.lora_alpha is None
                            else args.lora_alpha) if args.lora_rank else None)


# -- environment ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Env:
    """The process's place in a torchrun job (a single process: rank 0 of 1)."""
    ddp: bool
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(arg: str) -> torch.device:
    try:
        return pick_device(arg)
    except ValueError as e:
        raise TrainError(f"--device: {e}") from None


def setup_distributed(device_arg: str) -> Env:
    """The environment from torchrun's variables; joins the process group under DDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_arg)
    if world <= 1 or "RANK" not in os.environ:
        return Env(False, 0, 1, device)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(True, rank, world, device)


def resolve_data(data: str | None, tok_args: dict, env: Env, progress: bool,
                 tok=None) -> Path:
    """A prepared data directory for --data, preparing raw text (rank 0 only) when needed.
    tok: the tokenizer of --init-from's model, which prepares raw text instead of the
    tokenizer options; a prepared directory must have been made with it (finetune.py)."""
    if data is not None and data_mod.is_data_dir(data):
        if tok is not None:
            finetune.check_data(Path(data), tok)
        return Path(data)
    recipe = tok_args if tok is None else {"tokenizer_sha1": tok.describe()["sha1"]}
    if data is None:  # the default corpus; with a source's tokenizer, a directory of its own
        suffix = "" if tok is None else "-" + recipe["tokenizer_sha1"][:8]
        out, inputs = Path(DEFAULT_DATA + suffix), None
    else:
        p = Path(data)
        if not p.exists() and not any(ch in data for ch in "*?["):
            raise TrainError(f"--data {data} does not exist")
        # Raw text is prepared once into data/<name>-<hash of the inputs and tokenizer>.
        key = hashlib.sha1(json.dumps([str(p.resolve()), recipe]).encode()).hexdigest()[:8]
        out, inputs = Path("data") / f"{p.stem.strip('*') or 'corpus'}-{key}", [data]
    if data_mod.is_data_dir(out):
        meta = json.loads((out / data_mod.META).read_text())
        if tok is not None and finetune.made_with(meta, tok):
            return out
        if tok is None and {k: meta.get("args", {}).get(k) for k in tok_args} == tok_args:
            return out
    if env.is_main:
        print(f"preparing {'the default corpus (Python stdlib source)' if inputs is None else data}"
              f" into {out}", file=sys.stderr)
        try:
            meta = prepare_mod.prepare(inputs, out, **tok_args, progress=progress, tok=tok)
        except prepare_mod.PrepareError as e:
            raise TrainError(str(e)) from None
        print(prepare_mod.summary(meta, out), file=sys.stderr)
    if env.ddp:
        torch.distributed.barrier()
    return out


# -- model and optimizer ----------------------------------------------------------------------
def new_model(args, vocab_size: int):
    """A freshly initialised GPT of --preset with --model-args (seeded by the caller)."""
    from .model import GPT, GPTConfig

    try:
        config = GPTConfig.from_preset(args.preset, vocab_size=vocab_size,
                                       **parse_model_args(args.model_args))
    except (ValueError, TypeError) as e:
        raise TrainError(str(e).splitlines()[0]) from None
    return GPT(config)


def resolve_backend(requested: str, device: torch.device) -> str:
    """_ext.resolve_backend, with 'auto' falling back to torch as a warning that says why."""
    try:
        backend, reason = _ext.resolve_backend(requested, device)
    except _ext.ExtensionNotAvailable as e:
        raise TrainError(f"--backend ext: {e}") from None
    if reason is not None:
        warnings.warn(f"--backend auto: {reason} Using the torch backend.", RuntimeWarning,
                      stacklevel=2)
    return backend


def configure_optimizer(model, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D parameters only; fused where this torch supports it."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if torch.device(cfg.device).type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kw)


def get_lr(step: int, cfg: Config) -> float:
    """Linear warmup to --lr, then cosine decay to --min-lr at --max-iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if step >= cfg.max_iters:
        return cfg.min_lr
    span = max(cfg.max_iters - cfg.warmup_iters, 1)
    progress = (step - cfg.warmup_iters) / span
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# -- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, dataset, cfg: Config, device, autocast) -> dict:
    """Mean loss on --eval-iters batches of each split, drawn from a generator seeded the same
    way at every evaluation (the same windows each time, so the curve is not noise)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(cfg.seed + 10_000 + (split == "val"))
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = dataset.get_batch(split, cfg.batch_size, cfg.block_size, g, device)
            with autocast:
                _, loss = model(x, y, return_logits=False)
            losses.append(loss.item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def evaluate_split(model, tokens, block_size: int, batch_size: int, device, autocast,
                   max_targets: int | None = None) -> tuple[float, int]:
    """(mean loss in nats/token, targets scored) over a whole split: every token predicted
    once, by consecutive windows (data.covering_windows), a sample beyond max_targets."""
    offsets, skip = data_mod.covering_windows(len(tokens), block_size, max_targets)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(offsets), batch_size):
        x, y = data_mod.windows(tokens, offsets[i:i + batch_size], block_size, device)
        # Targets the window before scored: -1, the loss's ignore_index. Out of place: x and y
        # may be views of one buffer.
        done = torch.arange(block_size) < skip[i:i + batch_size, None]
        y = y.masked_fill(done.to(y.device), -1)
        n = int((~done).sum())
        with autocast:
            _, loss = model(x, y, return_logits=False)
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count, count


@torch.no_grad()
def evaluate_chat_split(model, dataset, block_size: int, batch_size: int, device,
                        autocast) -> tuple[float, int]:
    """evaluate_split for a chat data set: every val conversation once (cut to block_size + 1
    tokens, see data.py), the loss averaged over their trained targets."""
    n_conv = len(dataset.starts["val"]) - 1
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n_conv, batch_size):
        picks = torch.arange(i, min(i + batch_size, n_conv))
        x, y = dataset.batch("val", picks, block_size, device)
        n = int((y != -1).sum())
        if n:
            with autocast:
                _, loss = model(x, y, return_logits=False)
            total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1), count


@torch.no_grad()
def sample_text(model, tok, device, n_tokens: int, seed: int) -> str:
    """A short continuation of a fresh document: its start token (tokenizer.document_start),
    or a newline for a char vocabulary, which has none (nanoGPT's sampler starts there)."""
    start = tokenizer_mod.document_start(tok)
    idx = torch.tensor([[start] if start is not None else tok.encode("\n")[:1] or [0]],
                       dtype=torch.long, device=device)
    n = min(n_tokens, model.config.block_size - 1)
    ids = model.generate(idx, n, temperature=0.8, top_k=50, seed=seed)[0, 1:].tolist()
    return tok.decode(ids)


# -- what a run reports -----------------------------------------------------------------------
class RunLogger:
    """Everything a run reports, from rank 0 only (on the other ranks every method does
    nothing): metrics.jsonl, loss.png, MLflow (--mlflow) and the console (a tqdm bar, or log
    lines with --no-progress)."""

    def __init__(self, cfg: Config, enabled: bool, start_step: int, unigram: float,
                 flops_per_step: float, peak: float | None):
        self.enabled, self.cfg, self.unigram = enabled, cfg, unigram
        self.flops_per_step, self.peak = flops_per_step, peak
        self.out_dir = Path(cfg.out_dir)
        self.rows = (read_metrics(self.out_dir / METRICS_FILE, start_step)
                     if enabled and cfg.resume else [])
        self.mlflow, self.bar = None, None
        if not enabled:
            return
        if cfg.mlflow:
            self.mlflow = _start_mlflow(cfg)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.no_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.max_iters, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self.t_last = time.perf_counter()

    def print(self, msg: str) -> None:
        if self.enabled:
            self.bar.write(msg) if self.bar is not None else print(msg, file=sys.stderr)

    def add(self, row: dict) -> None:
        """A metrics row: kept for metrics.jsonl and the plot, and sent to MLflow."""
        if not self.enabled:
            return
        self.rows.append(row)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in row.items()
                                     if isinstance(v, (int, float)) and k != "step"},
                                    step=row["step"])

    def train_step(self, step: int, loss: float, lr: float, grad_norm) -> None:
        """Called after every optimizer step; a row every --log-interval steps."""
        if not self.enabled:
            return
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        tok_s = self.cfg.tokens_per_step / dt
        if step % self.cfg.log_interval == 0:
            row = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_s,
                   "time": time.time()}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if self.peak:
                row["mfu"] = self.flops_per_step / dt / self.peak / self.cfg.world_size
            self.add(row)
            if self.bar is None:
                print(f"step {step}: loss {loss:.4f}, {tok_s:,.0f} tok/s", file=sys.stderr)
            else:
                post = {"loss": f"{loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
                if self.peak:
                    post["mfu"] = f"{100 * row['mfu']:.1f}%"
                self.bar.set_postfix(post, refresh=False)
        if self.bar is not None:
            self.bar.update(1)

    def evaluation(self, step: int, losses: dict, bytes_per_token: float, text: str) -> None:
        bpb = data_mod.bits_per_byte(losses["val"], bytes_per_token)
        self.add({"step": step, "val_loss": losses["val"], "train_loss_eval": losses["train"],
                  "val_bpb": bpb, "unigram_entropy": self.unigram})
        self.print(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} "
                   f"({bpb:.3f} bits/byte; unigram entropy {self.unigram:.3f})")
        if text:
            self.print("  | " + console_text(text).replace("\n", "\n  | "))
        self._warn_overfitting(step)
        if self.enabled:
            plot_losses(self.out_dir / PLOT_FILE, self.rows, self.unigram)

    def _warn_overfitting(self, step: int) -> None:
        """Once per run (a resumed run keeps its metrics rows): val loss has risen at each of
        the last OVERFIT_EVALS evaluations, so more steps are fitting the train split only."""
        vals = [r["val_loss"] for r in self.rows if "val_loss" in r][-OVERFIT_EVALS - 1:]
        if (not self.enabled or len(vals) <= OVERFIT_EVALS
                or any(r.get("warning") == "overfitting" for r in self.rows)
                or not all(b > a for a, b in zip(vals, vals[1:]))):
            return
        msg = (f"warning: val loss has risen at {OVERFIT_EVALS} evaluations in a row "
               f"({vals[0]:.4f} -> {vals[-1]:.4f} at step {step}): the model is overfitting the "
               "train split; more data, fewer steps (--max-iters) or dropout would help")
        self.add({"step": step, "warning": "overfitting", "message": msg})
        self.print(msg)

    def write_metrics(self) -> None:
        if self.enabled:
            with atomic_write(self.out_dir / METRICS_FILE) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


def console_text(text: str) -> str:
    """A model's sample as safe console text: control characters other than newline and tab
    (NUL, ^A, ^K, ESC, CR: an early model samples them) as \\xNN escapes, so a redirected log
    stays a text file and the terminal is left alone."""
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc"
                   else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _start_mlflow(cfg: Config):
    """The mlflow module with a run started and the options logged as its params."""
    try:
        import mlflow
    except ImportError:
        raise TrainError("--mlflow needs the mlflow package: pip install mlflow (the mlflow extra)"
                         ) from None
    mlflow.set_tracking_uri(cfg.mlflow)
    mlflow.set_experiment("gptmod_ext")
    mlflow.start_run(run_name=Path(cfg.out_dir).name)
    mlflow.log_params({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})
    return mlflow


def read_metrics(path: Path, upto_step: int) -> list[dict]:
    """The metrics lines of a resumed run up to its checkpoint step (later ones were lost)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= upto_step:
            rows.append(row)
    return rows


def plot_losses(path: Path, rows: list[dict], baseline: float | None) -> None:
    """loss.png: train loss per logged step, train/val loss at evaluations, the unigram line."""
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train (per step)")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    if baseline is not None:
        ax.axhline(baseline, ls="--", c="gray", label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# -- setup: everything a run needs, built once ------------------------------------------------
@dataclass
class Run:
    """The objects fit() works on. `step` and `best_val` are the only fields that change."""
    cfg: Config
    env: Env
    dataset: data_mod.Dataset
    tok: tokenizer_mod.Tokenizer
    raw_model: torch.nn.Module     # the GPT itself: saved, evaluated, sampled from
    model: torch.nn.Module         # what the loop calls: raw_model, compiled and/or in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    sampler: torch.Generator       # the training windows (see the module doc)
    log: RunLogger
    unigram: float                 # the loss of the best context-free model: the one to beat
    step: int = 0
    best_val: float = float("inf")
    source: dict | None = None     # --init-from: config.json's "init_from" (finetune.Source)


def _read_resume(args) -> ckpt.Resumed | None:
    if not args.resume:
        return None
    try:
        return ckpt.load_for_resume(args.out_dir)
    except ckpt.CheckpointError as e:
        raise TrainError(f"--resume: {e}") from None


def _load_data(args, env: Env, resumed, source=None
               ) -> tuple[Path, data_mod.Dataset, tokenizer_mod.Tokenizer]:
    data = args.data if args.data is not None or resumed is None else resumed.config.get("data")
    if resumed is not None and resumed.config.get("init_from") and not (
            data is not None and data_mod.is_data_dir(data)):
        data = resumed.config.get("data")  # a fine-tune resumes on the data it prepared
    data_dir = resolve_data(data, tokenizer_args(args), env, progress=not args.no_progress,
                            tok=None if source is None else source.tok)
    try:
        dataset = data_mod.load(data_dir)
        tok = dataset.tokenizer()
    except (data_mod.DataError, tokenizer_mod.TokenizerError) as e:
        raise TrainError(str(e)) from None
    if resumed is not None and resumed.config["tokenizer"].get("sha1") != tok.describe()["sha1"]:
        raise TrainError(f"--resume: the tokenizer of {data_dir} is not the one the run in "
                         f"{args.out_dir} was trained with; pass its --data")
    return data_dir, dataset, tok


def _check_sizes(cfg: Config, model, dataset, vocab_size: int) -> None:
    if model.config.vocab_size < vocab_size:
        raise TrainError(f"the model's vocab_size {model.config.vocab_size} is smaller than the "
                         f"tokenizer's {vocab_size}")
    for split in ("train", "val"):
        if not dataset.chat and len(dataset.split(split)) <= cfg.block_size:
            raise TrainError(f"the {split} split of {cfg.data} has {len(dataset.split(split))} "
                             f"tokens, too few for --block-size {cfg.block_size}")


def _read_source(args, resumed) -> finetune.Source | None:
    """--init-from's model and tokenizer (finetune.load_source): for a new run, and for a LoRA
    run's --resume (its frozen base, which must be the one the run started from)."""
    if resumed is not None:
        _check_resume_options(args, resumed.config)
    if args.init_from is None:
        if args.lora_rank:
            raise TrainError("--lora-rank needs --init-from: LoRA adapts a trained model")
        return None
    finetune.check_options(args, vars(parse_args([])))
    if resumed is not None and not args.lora_rank:
        return None  # the run directory holds every weight
    source = finetune.load_source(args.init_from, args.tokenizer_path)
    if resumed is not None and source.record["sha1"] != resumed.config["init_from"]["sha1"]:
        raise TrainError(f"--resume: the weights of {args.init_from} changed since the run in "
                         f"{args.out_dir} started from them; a LoRA run resumes on the same base")
    return source


def _check_resume_options(args, config: dict) -> None:
    """A LoRA run resumes with the options it started with (its model is rebuilt from SRC and
    them); any other run's directory holds every weight it needs."""
    was = config.get("train", {})
    now = {"lora_rank": args.lora_rank, "lora_alpha": optimizer_defaults(args)["lora_alpha"],
           "lora_targets": args.lora_targets,
           "init_from": args.init_from and str(Path(args.init_from).resolve())}
    before = {"lora_rank": was.get("lora_rank", 0), "lora_alpha": was.get("lora_alpha"),
              "lora_targets": was.get("lora_targets"),
              "init_from": (config.get("init_from") or {}).get("path")}
    for key in now if (now["lora_rank"] or before["lora_rank"]) else ["lora_rank"]:
        if now[key] != before[key]:
            raise TrainError(f"--resume: the run in {args.out_dir} was trained with "
                             f"--{key.replace('_', '-')} {before[key]}, not {now[key]}; resume "
                             "it with the options it started with")


def _initial_model(args, resumed, source, tok):
    """The model a run starts from: the resumed run's, SRC's (with its LoRA adapters, read
    back on --resume), or a fresh one of --preset."""
    if source is None:
        return resumed.model if resumed is not None else new_model(args, tok.vocab_size)
    model = finetune.build_model(source, tok, parse_model_args(args.model_args))
    if args.lora_rank:
        lora.apply(model, args.lora_rank, optimizer_defaults(args)["lora_alpha"],
                   lora.parse_targets(args.lora_targets))
        if resumed is not None:
            lora.load_adapters(model, args.out_dir, resumed.state.step)
    return model


def _check_chat(run: Run) -> None:
    """A chat data set's conversations against the window: how many are cut (reported), none
    left with nothing to train (refused)."""
    if not run.dataset.chat:
        return
    for split, r in data_mod.chat_report(run.dataset, run.cfg.block_size).items():
        if r["untrainable"] is not None:
            raise TrainError(f"conversation {r['untrainable']} of the {split} split of "
                             f"{run.cfg.data} has no assistant token within --block-size "
                             f"{run.cfg.block_size} + 1 tokens; raise --block-size or shorten it")
        if r["cut"]:
            run.log.print(f"{r['cut']} of the {r['conversations']} {split} conversations are "
                          f"longer than --block-size {run.cfg.block_size} + 1 tokens: they are "
                          "cut there, and what is cut is not trained")


def _restore(run: Run, state: ckpt.TrainState) -> None:
    try:
        run.optimizer.load_state_dict(state.optimizer)
        run.sampler.set_state(state.sampler)
        ckpt.set_rng_state(state.rng)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise TrainError(f"--resume: {Path(run.cfg.out_dir) / ckpt.STATE_FILE} does not fit "
                         f"this run ({type(e).__name__}: {first_line(e)})") from None
    run.step, run.best_val = state.step, state.best_val_loss


def _wrap(model, cfg: Config, env: Env):
    """The module the loop calls: compiled (--compile), then in DDP under torchrun."""
    if cfg.compile:
        model = torch.compile(model)
    if env.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model


def setup(args, env: Env) -> Run:
    """Resolves the options into a Config and builds the run: data, model, optimizer, AMP,
    wrappers, the logger, and on --resume the saved state."""
    if args.threads:
        torch.set_num_threads(args.threads)
    resumed = _read_resume(args)
    source = _read_source(args, resumed)
    data_dir, dataset, tok = _load_data(args, env, resumed, source)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = _initial_model(args, resumed, source, tok)
    cfg = resolve_config(args, env, data_dir, model.config.block_size,
                         resolve_backend(args.backend, env.device))
    _check_sizes(cfg, model, dataset, tok.vocab_size)
    model.backend = cfg.backend
    model.to(env.device)
    dtype = pick_dtype(cfg.dtype)
    autocast = (torch.autocast(env.device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    peak = None
    if env.device.type == "cuda":
        name = torch.cuda.get_device_name(env.device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    run = Run(cfg, env, dataset, tok, model, model, configure_optimizer(model, cfg),
              torch.amp.GradScaler(env.device.type, enabled=(dtype == torch.float16)),
              autocast, torch.Generator().manual_seed(cfg.seed), None,
              data_mod.unigram_entropy(dataset.targets("train"), tok.vocab_size))
    run.source = source.record if source is not None else (
        resumed.config.get("init_from") if resumed is not None else None)
    if resumed is not None:
        _restore(run, resumed.state)
    if run.step >= cfg.max_iters:
        raise TrainError(f"the run in {cfg.out_dir} is already at step {run.step} "
                         f"(--max-iters {cfg.max_iters}); raise --max-iters to continue")
    run.model = _wrap(model, cfg, env)
    run.log = RunLogger(cfg, env.is_main, run.step, run.unigram,
                        model.flops_per_token(cfg.block_size) * cfg.tokens_per_step, peak)
    _check_chat(run)
    return run


def print_banner(run: Run, defaulted_accum: bool) -> None:
    """What is trained on what, and the tokens of one step (rank 0)."""
    cfg, m = run.cfg, run.raw_model
    if not run.env.is_main:
        return
    what = cfg.preset if cfg.init_from is None else f"from {cfg.init_from}"
    if cfg.lora_rank:
        trained = sum(p.numel() for p in m.parameters() if p.requires_grad)
        what += f" + LoRA rank {cfg.lora_rank} ({trained / 1e6:.3f}M trained)"
    run.log.print(f"model: {what} {m.num_params() / 1e6:.2f}M params, backend "
                  f"{m.backend}, {cfg.device} {cfg.dtype}{', compiled' if cfg.compile else ''}; "
                  f"data {cfg.data}: {len(run.dataset.train):,} train tokens, tokenizer "
                  f"{run.tok.name}")
    accum = ("; --grad-accum not given: one micro-batch per process"
             f" ({cfg.grad_accum} in total)" if defaulted_accum and cfg.world_size > 1 else "")
    run.log.print(f"unigram entropy of the train tokens: {run.unigram:.3f} nats/token (the loss "
                  f"to beat); {cfg.tokens_per_step:,} tokens/step ({cfg.world_size} x "
                  f"{cfg.micro_steps} x {cfg.batch_size} x {cfg.block_size}){accum}")
    epochs = cfg.max_iters * cfg.tokens_per_step / len(run.dataset.train)
    run.log.print(f"{cfg.max_iters} steps x {cfg.tokens_per_step:,} tokens = {epochs:.2f} epochs "
                  f"of the {len(run.dataset.train):,} train tokens"
                  + ("; past one epoch, watch val loss for overfitting" if epochs > 1 else ""))
    if not run.log.rows:
        run.log.add({"step": 0, "unigram_entropy": run.unigram,
                     "bytes_per_token": run.dataset.bytes_per_token("val"),
                     "params": m.num_params(), "epochs": epochs})


# -- the loop ---------------------------------------------------------------------------------
def train_step(run: Run) -> tuple[float, float, torch.Tensor | None]:
    """One optimizer step: grad_accum micro-batches over all processes, gradients averaged
    once, clipped, applied. (loss, lr, grad norm); a loss that is not finite is returned
    without applying the update (run.step stays)."""
    cfg, env = run.cfg, run.env
    lr = get_lr(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    accum = cfg.micro_steps
    loss_sum = torch.zeros((), device=env.device)
    offsets = run.dataset.draw("train", cfg.block_size, cfg.grad_accum * cfg.batch_size,
                               run.sampler)
    for micro in range(accum):
        first = (env.rank * accum + micro) * cfg.batch_size
        x, y = run.dataset.batch("train", offsets[first:first + cfg.batch_size], cfg.block_size,
                                 env.device)
        # Gradients are averaged across ranks on the last micro-step only.
        last = not env.ddp or micro == accum - 1
        with contextlib.nullcontext() if last else run.model.no_sync():
            with run.autocast:
                _, loss = run.model(x, y, return_logits=False)
            loss = loss / accum
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if env.ddp:
        torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
    loss_value = loss_sum.item()
    if not math.isfinite(loss_value):
        return loss_value, lr, None
    norm = None
    if cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss_value, lr, norm


def validate(run: Run) -> float:
    """One evaluation (and a short sample on rank 0), reported; returns the val loss."""
    env = run.env
    cuda_ids = ([env.device.index if env.device.index is not None else torch.cuda.current_device()]
                if env.device.type == "cuda" else [])
    # Evaluation and the sample must not move the training RNG (exact resume). Every rank
    # evaluates the same windows, so rank 0's numbers are the average: nothing to reduce.
    with torch.random.fork_rng(devices=cuda_ids):
        losses = evaluate(run.raw_model, run.dataset, run.cfg, env.device, run.autocast)
        text = ""
        if env.is_main and run.cfg.sample_tokens:
            text = sample_text(run.raw_model, run.tok, env.device, run.cfg.sample_tokens,
                               run.cfg.seed)
    run.best_val = min(run.best_val, losses["val"])
    run.log.evaluation(run.step, losses, run.dataset.bytes_per_token("val"), text)
    return losses["val"]


def final_evaluation(run: Run) -> float | None:
    """The finished model on the whole val split (rank 0): reported and added to the metrics."""
    if not run.env.is_main or run.cfg.final_eval_tokens <= 0:
        return None
    val = run.dataset.val
    if run.dataset.chat:
        loss, n = evaluate_chat_split(run.raw_model, run.dataset, run.cfg.block_size,
                                      run.cfg.batch_size, run.env.device, run.autocast)
        val = run.dataset.targets("val")
        scope = "the answers of every val conversation" + (
            "" if n == len(val) else f" (of {len(val):,}: the rest is cut by --block-size)")
    else:
        loss, n = evaluate_split(run.raw_model, val, run.cfg.block_size, run.cfg.batch_size,
                                 run.env.device, run.autocast, run.cfg.final_eval_tokens)
        scope = ("the whole val split" if n >= len(val) - 1 else f"an evenly spaced sample of "
                 f"the val split's {len(val) - 1:,} (--final-eval-tokens)")
    bpb = data_mod.bits_per_byte(loss, run.dataset.bytes_per_token("val"))
    run.log.add({"step": run.step, "final_val_loss": loss, "final_val_bpb": bpb,
                 "final_val_tokens": n, "val_split_tokens": len(val)})
    run.log.print(f"final evaluation: val loss {loss:.4f} ({bpb:.3f} bits/byte) over {n:,} "
                  f"tokens: {scope}")
    return loss


def save(run: Run, val_loss: float | None) -> None:
    """A checkpoint of the state after run.step updates (rank 0 writes it)."""
    if not run.env.is_main:
        return
    cfg = run.cfg
    state = ckpt.TrainState(step=run.step, optimizer=run.optimizer.state_dict(),
                            rng=ckpt.rng_state(), sampler=run.sampler.get_state(),
                            grad_accum=cfg.grad_accum, batch_size=cfg.batch_size,
                            best_val_loss=run.best_val, world_size=cfg.world_size)
    weights = None
    if cfg.lora_rank:  # the adapters first: the training state names their step
        lora.save_adapters(cfg.out_dir, run.raw_model, cfg.lora_rank, cfg.lora_alpha,
                           lora.parse_targets(cfg.lora_targets), run.step)
        weights = lora.merged_state_dict(run.raw_model)
    ckpt.save_run(cfg.out_dir, run.raw_model, run.tok, state, dataclasses.asdict(cfg),
                  {"val_loss": val_loss, "data": str(Path(cfg.data).resolve()),
                   "unigram_entropy": run.unigram, "init_from": run.source}, weights)
    run.log.write_metrics()


class StopOnSigint:
    """Ctrl-C: the first one asks the run to end at the next step boundary (with a checkpoint);
    a second one interrupts at once (KeyboardInterrupt, no save)."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


def _agreed(flag: bool, env: Env) -> bool:
    """flag on any rank, on every rank: they must stop at the same step (saving is collective)."""
    if not env.ddp:
        return flag
    t = torch.tensor([float(flag)], device=env.device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


def fit(run: Run) -> int:
    """The training loop, from run.step to --max-iters (or --stop-at); the exit status."""
    cfg, start = run.cfg, run.step
    end = cfg.max_iters if cfg.stop_at is None else min(cfg.stop_at, cfg.max_iters)
    status, val_loss, whole, saved, evaluated = 0, None, False, start, start
    run.model.train()
    stop = StopOnSigint()
    try:
        with stop:
            while True:
                if run.step % cfg.eval_interval == 0 and (run.step > start or run.step == 0):
                    val_loss, evaluated = validate(run), run.step
                    if run.step > start:
                        save(run, val_loss)
                        saved = run.step
                if run.step >= end or _agreed(stop.requested, run.env):
                    break
                loss, lr, norm = train_step(run)
                if not math.isfinite(loss):
                    status = _report_bad_loss(run, loss)
                    break
                run.log.train_step(run.step, loss, lr, norm)
        if status == 0:
            if run.step >= cfg.max_iters and evaluated != run.step:
                val_loss = validate(run)
            if saved != run.step:
                save(run, val_loss)
            if run.step >= cfg.max_iters:
                final = final_evaluation(run)
                if final is not None:
                    run.log.write_metrics()
                    val_loss, whole = final, True
    except KeyboardInterrupt:
        run.log.print(f"\ninterrupted at step {run.step}; the last checkpoint in {cfg.out_dir} "
                      "is kept")
        status = 130
    finally:
        run.log.close()
    _report_end(run, status, stop.requested, val_loss, whole)
    return status


def _report_bad_loss(run: Run, loss: float) -> int:
    run.log.print(f"{PROG}: error: the loss is {loss} at step {run.step + 1}; stopping without saving "
                  f"this state (the last checkpoint in {run.cfg.out_dir} is the last good one). "
                  "Try a lower --lr or --grad-clip.")
    return 1


def _report_end(run: Run, status: int, stopped: bool, val_loss: float | None,
                whole: bool) -> None:
    if not run.env.is_main or status != 0:
        return
    out = run.cfg.out_dir
    if stopped:
        msg = (f"stopped at step {run.step} by Ctrl-C; checkpoint saved in {out} "
               "(continue with --resume)")
    elif run.step < run.cfg.max_iters:
        msg = (f"stopped at step {run.step} (--stop-at); checkpoint saved in {out} "
               "(continue with --resume)")
    else:
        final = "" if val_loss is None else (
            f"val loss {val_loss:.4f}{' on the whole val split' if whole else ''}")
        msg = (f"done: {run.step} steps, {final} (unigram entropy {run.unigram:.3f}); "
               f"run saved in {out}")
    print(msg, file=sys.stderr)


# -- entry points -----------------------------------------------------------------------------
def train(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.grad_accum is not None and args.grad_accum % world:
        # Checked before the process group, so every rank exits fast.
        raise TrainError(f"--grad-accum {args.grad_accum} is not divisible by the "
                         f"{world} processes (it is the total over all of them)")
    env = setup_distributed(args.device)
    try:
        run = setup(args, env)
        print_banner(run, defaulted_accum=args.grad_accum is None)
        rc = fit(run)
        if env.ddp:
            # Leave together: a gloo rank whose peer tears its connections down first can abort
            # in teardown ("terminate called without an active exception").
            torch.distributed.barrier()
        return rc
    finally:
        if env.ddp:
            torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
