"""Trains a GPT: `python -m gptmod_ext.train` (one process) or `torchrun ... -m gptmod_ext.train`.

With no arguments it prepares the default corpus (the Python standard library's source, into
data/stdlib/ under the current directory, once) and trains the `tiny` preset on the CPU in
about ten minutes, writing the run directory out/ (see checkpoint.py).

The loop follows nanoGPT's train.py in shape (random windows from a memmap, AdamW, warmup +
cosine decay, gradient accumulation and clipping, periodic evaluation, DDP through torchrun);
the code is our own. Choices worth knowing:
- Weight decay applies to the 2-D parameters (every matmul weight and the embedding tables),
  never to norm gains or biases, as in nanoGPT.
- The learning rate warms up linearly for --warmup-iters steps, then follows a cosine from
  --lr down to --min-lr at --max-iters.
- Data-parallel: the effective batch of N processes equals one process with N times the
  gradient accumulation: --grad-accum is the total over all processes and must be divisible
  by N; each process does grad_accum / N micro-steps and gradients are averaged once per step
  (no_sync on the others). Every step draws the window starts of the whole global batch
  (grad_accum x batch_size) from one seeded sampler, identical on every rank, and rank r takes
  its own slice: the ranks see different windows, and the data stream (hence the run, up to
  float rounding) does not depend on the number of processes.
- A checkpoint is written at every evaluation, at --stop-at, on Ctrl-C and at the end. A loss
  that is NaN or inf stops the run before its update is saved, so the last checkpoint stays
  the last good state.
- Exact resume: train_state.pt holds the optimizer, every RNG and each rank's data sampler
  state; evaluation and samples draw from their own generators, so stopping at step k and
  resuming gives the same weights as never stopping (bitwise on the CPU in fp32).

Launching data-parallel runs (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; only rank 0 prints
and writes files):
    torchrun --standalone --nproc_per_node=4 -m gptmod_ext.train --grad-accum 8 ...
    # two machines, 8 GPUs each: run on both, with --node_rank=0 on host0 and 1 on the other
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=host0:29500 -m gptmod_ext.train --grad-accum 16 ...
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from . import _ext
from . import checkpoint as ckpt
from . import data as data_mod
from . import prepare as prepare_mod
from . import tokenizer as tokenizer_mod
from .devices import DTYPE_CHOICES, pick_device, pick_dtype

DEFAULT_DATA = "data/stdlib"
# Peak dense bf16 tensor FLOP/s by GPU name, for MFU (datasheet numbers, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12}


class TrainError(Exception):
    """A bad option or input; main() prints it as one line and exits with status 1."""


# -- options ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptmod_ext.train",
                                description="Train a GPT on prepared tokens or raw text.")
    a = p.add_argument
    a("--out-dir", default="out", help="run directory (checkpoint, metrics, plot)")
    a("--data", default=None,
      help="a prepared data directory, or raw text (file, glob, directory) to prepare first; "
           f"default: the Python stdlib source, prepared into {DEFAULT_DATA}")
    a("--preset", default="tiny", help="model preset (gptmod_ext.model.PRESETS)")
    a("--model-args", default="",
      help="GPTConfig overrides, comma separated: n_layer=2,n_embd=64,dropout=0.1")
    a("--max-iters", type=int, default=800, help="optimizer steps: the schedule's horizon")
    a("--batch-size", type=int, default=8, help="windows per micro-step per process")
    a("--block-size", type=int, default=None,
      help="window length (default and maximum: the model's block_size)")
    a("--grad-accum", type=int, default=1,
      help="micro-steps per optimizer step, in total over all DDP processes (must be "
           "divisible by their number)")
    a("--lr", type=float, default=2e-3, help="peak learning rate")
    a("--min-lr", type=float, default=None, help="final learning rate (default lr / 10)")
    a("--warmup-iters", type=int, default=None, help="default: max_iters / 20")
    a("--weight-decay", type=float, default=0.1)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.95)
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    a("--dtype", default="auto", choices=DTYPE_CHOICES,
      help="autocast dtype; auto: bfloat16 on GPUs that support it, else float32")
    a("--backend", default="auto", choices=["auto", "ext", "torch"],
      help="ext: our compiled ops; torch: pure PyTorch; auto (default): ext where it can run, "
           "else torch with a warning that says why")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--resume", action="store_true", help="continue the run in --out-dir")
    a("--stop-at", type=int, default=None,
      help="stop at this step with a checkpoint, as an interruption would")
    a("--eval-interval", type=int, default=50, help="steps between evaluations/checkpoints")
    a("--eval-iters", type=int, default=10, help="batches per evaluation")
    a("--log-interval", type=int, default=1, help="steps between metrics.jsonl lines")
    a("--sample-tokens", type=int, default=64, help="tokens sampled at each eval (0 = off)")
    a("--seed", type=int, default=1337)
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a("--mlflow", default=None, metavar="URI",
      help="log params and metrics to MLflow (e.g. sqlite:///mlruns.db); needs mlflow")
    a("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    prepare_mod.add_tokenizer_args(p)
    return p.parse_args(argv)


def parse_model_args(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise TrainError(f"--model-args item {item!r} is not key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v  # a bare string, e.g. norm=layernorm
    return out


# -- environment ------------------------------------------------------------------------------
def setup_distributed(device_arg: str):
    """(ddp, rank, local_rank, world_size, device) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return False, 0, 0, 1, resolve_device(device_arg)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True, rank, local_rank, world, device


def resolve_device(arg: str) -> torch.device:
    try:
        return pick_device(arg)
    except ValueError as e:
        raise TrainError(f"--device: {e}") from None


def resolve_data(args, is_main: bool, ddp: bool) -> Path:
    """A prepared data directory for --data, preparing raw text (rank 0 only) when needed."""
    tok_args = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                    tokenizer_path=args.tokenizer_path, jsonl_field=args.jsonl_field,
                    errors=args.errors)
    if args.data is not None and data_mod.is_data_dir(args.data):
        return Path(args.data)
    if args.data is None:
        out, inputs = Path(DEFAULT_DATA), None
    else:
        p = Path(args.data)
        if not p.exists() and not any(ch in args.data for ch in "*?["):
            raise TrainError(f"--data {args.data} does not exist")
        # Raw text is prepared once into data/<name>-<hash of the inputs and tokenizer>.
        key = hashlib.sha1(json.dumps([str(p.resolve()), tok_args]).encode()).hexdigest()[:8]
        out, inputs = Path("data") / f"{p.stem.strip('*') or 'corpus'}-{key}", [args.data]
    if data_mod.is_data_dir(out):
        meta = json.loads((out / data_mod.META).read_text())
        wanted = {k: v for k, v in tok_args.items()}
        have = {k: meta.get("args", {}).get(k) for k in wanted}
        if have == wanted:
            return out
    if is_main:
        print(f"preparing {'the default corpus (Python stdlib source)' if inputs is None else args.data}"
              f" into {out}", file=sys.stderr)
        try:
            meta = prepare_mod.prepare(inputs, out, **tok_args, progress=not args.no_progress)
        except prepare_mod.PrepareError as e:
            raise TrainError(str(e)) from None
        print(prepare_mod.summary(meta, out), file=sys.stderr)
    if ddp:
        torch.distributed.barrier()
    return out


# -- model and optimizer ----------------------------------------------------------------------
def build_model(args, vocab_size: int, resume_config: dict | None, device: torch.device):
    from .model import GPT, GPTConfig

    try:
        if resume_config is not None:
            config = GPTConfig.from_dict(resume_config)
        else:
            config = GPTConfig.from_preset(args.preset, vocab_size=vocab_size,
                                           **parse_model_args(args.model_args))
    except (ValueError, TypeError) as e:
        raise TrainError(str(e).splitlines()[0]) from None
    if config.vocab_size < vocab_size:
        raise TrainError(f"the model's vocab_size {config.vocab_size} is smaller than the "
                         f"tokenizer's {vocab_size}")
    model = GPT(config)
    try:
        backend, reason = _ext.resolve_backend(args.backend, device)
    except _ext.ExtensionNotAvailable as e:
        raise TrainError(f"--backend ext: {e}") from None
    if reason is not None:
        warnings.warn(f"--backend auto: {reason} Using the torch backend.", RuntimeWarning,
                      stacklevel=2)
    model.backend = backend
    return model


def configure_optimizer(model, args, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D parameters only; fused where this torch supports it."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8)
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kw)


def lr_at(step: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to --min-lr at --max-iters."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    if step >= args.max_iters:
        return args.min_lr
    span = max(args.max_iters - args.warmup_iters, 1)
    progress = (step - args.warmup_iters) / span
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


# -- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, dataset, args, device, autocast) -> dict:
    """Mean loss on --eval-iters batches of each split, drawn from a generator seeded the same
    way at every evaluation (the same windows each time, so the curve is not noise)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(args.seed + 10_000 + (split == "val"))
        losses = []
        for _ in range(args.eval_iters):
            x, y = data_mod.get_batch(dataset.split(split), args.batch_size, args.block_size,
                                      g, device)
            with autocast:
                _, loss = model(x, y)
            losses.append(loss.item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def sample_text(model, tok, device, n_tokens: int, seed: int) -> str:
    """A short continuation of the end-of-text token (a fresh document)."""
    idx = torch.tensor([[tok.eot_id]], dtype=torch.long, device=device)
    n = min(n_tokens, model.config.block_size - 1)
    ids = model.generate(idx, n, temperature=0.8, top_k=50, seed=seed)[0, 1:].tolist()
    return tok.decode(ids)


# -- metrics and plot -------------------------------------------------------------------------
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


def write_metrics(path: Path, rows: list[dict]) -> None:
    ckpt._atomic_write(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))


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
    ckpt._atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


class MLflowLogger:
    """Params and metrics to MLflow when --mlflow is given (mlflow is an optional extra)."""

    def __init__(self, uri: str | None, args, out_dir: Path):
        self.run = None
        if not uri:
            return
        try:
            import mlflow
        except ImportError:
            raise TrainError("--mlflow needs the mlflow package: pip install 'gptmod_ext[mlflow]'"
                             ) from None
        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("gptmod_ext")
        self.run = mlflow.start_run(run_name=out_dir.name)
        mlflow.log_params({k: v for k, v in vars(args).items() if v is not None})

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                     if isinstance(v, (int, float)) and k != "step"}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.mlflow.end_run()


# -- the run ----------------------------------------------------------------------------------
def train(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.grad_accum % world:  # checked before the process group, so every rank exits fast
        raise TrainError(f"--grad-accum {args.grad_accum} is not divisible by the "
                         f"{world} processes (it is the total over all of them)")
    ddp, rank, local_rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    try:
        rc = _train(args, ddp, rank, world, device, is_main)
        if ddp:
            # Leave together: a gloo rank whose peer tears its connections down first can abort
            # in teardown ("terminate called without an active exception").
            torch.distributed.barrier()
        return rc
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


def _train(args, ddp, rank, world, device, is_main) -> int:

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    accum = args.grad_accum // world
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.warmup_iters is None:
        args.warmup_iters = max(args.max_iters // 20, 1)
    if args.stop_at is not None and args.stop_at < 1:
        raise TrainError("--stop-at must be a positive step")

    # Resume: the model config, the step and the training state come from the run directory.
    state, resume_config = None, None
    if args.resume:
        try:
            config = ckpt.read_config(out_dir)
            state = ckpt.load_train_state(out_dir)
            tensors, tied = ckpt.read_weights(out_dir)
        except ckpt.CheckpointError as e:
            raise TrainError(f"--resume: {e}") from None
        if config.get("step") != state["step"]:
            raise TrainError(f"--resume: {out_dir} holds weights of step {config.get('step')} "
                             f"but a training state of step {state['step']}")
        resume_config = config["model"]
        if args.data is None and config.get("data"):
            args.data = config["data"]

    data_dir = resolve_data(args, is_main, ddp)
    try:
        dataset = data_mod.load(data_dir)
        tok = dataset.tokenizer()
    except (data_mod.DataError, tokenizer_mod.TokenizerError) as e:
        raise TrainError(str(e)) from None

    if state is not None and config["tokenizer"].get("sha1") != tok.describe()["sha1"]:
        raise TrainError(f"--resume: the tokenizer of {data_dir} is not the one the run in "
                         f"{out_dir} was trained with; pass its --data")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args, tok.vocab_size, resume_config, device)
    if args.block_size is None:
        args.block_size = model.config.block_size
    if args.block_size > model.config.block_size:
        raise TrainError(f"--block-size {args.block_size} is larger than the model's "
                         f"block_size {model.config.block_size}")
    for split in ("train", "val"):
        if len(dataset.split(split)) <= args.block_size:
            raise TrainError(f"the {split} split of {data_dir} has {len(dataset.split(split))} "
                             f"tokens, too few for --block-size {args.block_size}")
    if state is not None:
        try:
            ckpt.load_weights(model, tensors, tied, f" in {out_dir}")
        except ckpt.CheckpointError as e:
            raise TrainError(f"--resume: {e}") from None
    model.to(device)

    optimizer = configure_optimizer(model, args, device)
    start_step, best_val = 0, float("inf")
    # One sampler for the global batch, seeded alike on every rank (see the module doc).
    sampler = torch.Generator().manual_seed(args.seed)
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            start_step, best_val = int(state["step"]), float(state.get("best_val_loss", best_val))
            sampler.set_state(state["data"]["sampler"])
            ckpt.set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise TrainError(f"--resume: {out_dir / ckpt.STATE_FILE} does not fit this run "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                             ) from None
    if start_step >= args.max_iters:
        raise TrainError(f"the run in {out_dir} is already at step {start_step} "
                         f"(--max-iters {args.max_iters}); raise --max-iters to continue")

    dtype = pick_dtype(args.dtype, device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # The unigram entropy of the train tokens: the loss of the best context-free model.
    unigram = data_mod.unigram_entropy(dataset.train, tok.vocab_size)
    bytes_per_token = dataset.bytes_per_token("val")
    tokens_per_step = args.batch_size * args.block_size * accum * world
    flops_per_step = raw_model.flops_per_token(args.block_size) * tokens_per_step
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    metrics_path = out_dir / "metrics.jsonl"
    rows = read_metrics(metrics_path, start_step) if state is not None else []
    train_args = {**vars(args), "backend": raw_model.backend}
    tracker = MLflowLogger(args.mlflow, args, out_dir) if is_main else MLflowLogger(None, args, out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"model: {args.preset} {raw_model.num_params() / 1e6:.2f}M params, backend "
              f"{raw_model.backend}, {device} {str(dtype).replace('torch.', '')}"
              f"{', compiled' if args.compile else ''}; data {data_dir}: "
              f"{len(dataset.train):,} train tokens, tokenizer {tok.name}", file=sys.stderr)
        print(f"unigram entropy of the train tokens: {unigram:.3f} nats/token (the loss to beat); "
              f"{tokens_per_step:,} tokens/step ({world} x {accum} x {args.batch_size} x "
              f"{args.block_size})", file=sys.stderr)
        if not rows:
            rows.append({"step": 0, "unigram_entropy": unigram, "bytes_per_token": bytes_per_token,
                         "params": raw_model.num_params()})

    def save(step: int, val_loss: float | None) -> None:
        """A checkpoint of the state after `step` updates (collective under DDP)."""
        if not is_main:
            return
        ckpt.save_train_state(out_dir, {
            "step": step, "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state(),
            "data": {"sampler": sampler.get_state(), "grad_accum": args.grad_accum,
                     "batch_size": args.batch_size}, "best_val_loss": best_val, "world_size": world,
        })
        ckpt.save_model(out_dir, raw_model, tok, train_args,
                        {"step": step, "val_loss": val_loss, "data": str(data_dir.resolve()),
                         "unigram_entropy": unigram})
        write_metrics(metrics_path, rows)

    def run_eval(step: int) -> float:
        nonlocal best_val
        cuda_ids = ([device.index if device.index is not None else torch.cuda.current_device()]
                    if device.type == "cuda" else [])
        # Evaluation and the sample must not move the training RNG (exact resume).
        with torch.random.fork_rng(devices=cuda_ids):
            losses = evaluate(raw_model, dataset, args, device, autocast)
            text = ""
            if is_main and args.sample_tokens:
                text = sample_text(raw_model, tok, device, args.sample_tokens, args.seed)
        if ddp:  # the average over ranks would equal rank 0's (same windows), so no reduce
            pass
        best_val = min(best_val, losses["val"])
        if is_main:
            bpb = data_mod.bits_per_byte(losses["val"], bytes_per_token)
            row = {"step": step, "val_loss": losses["val"], "train_loss_eval": losses["train"],
                   "val_bpb": bpb, "unigram_entropy": unigram}
            rows.append(row)
            tracker.log(row, step)
            msg = (f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} "
                   f"({bpb:.3f} bits/byte; unigram entropy {unigram:.3f})")
            bar.write(msg) if bar is not None else print(msg, file=sys.stderr)
            if text:
                sample = text.replace("\n", "\n  | ")
                (bar.write if bar is not None else print)(f"  | {sample}")
            plot_losses(out_dir / "loss.png", rows, unigram)
        return losses["val"]

    # Ctrl-C: the first one ends the run at the next step boundary with a checkpoint; a second
    # one interrupts at once (KeyboardInterrupt, no save).
    stop_requested = False

    def on_sigint(signum, frame):
        nonlocal stop_requested
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    bar = None
    if is_main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.max_iters, initial=start_step, unit="step", dynamic_ncols=True,
                   file=sys.stderr)

    end = args.max_iters if args.stop_at is None else min(args.stop_at, args.max_iters)
    step, status, val_loss = start_step, 0, None
    saved_step, evaluated_step = start_step, start_step
    model.train()
    t_last = time.perf_counter()
    try:
        while True:
            if step % args.eval_interval == 0 and (step > start_step or step == 0):
                val_loss = run_eval(step)
                evaluated_step = step
                if step > start_step:
                    save(step, val_loss)
                    saved_step = step
            stop = stop_requested
            if ddp:  # every rank must stop at the same step (the save is collective)
                flag = torch.tensor([float(stop)], device=device)
                torch.distributed.all_reduce(flag)
                stop = bool(flag.item())
            if step >= end or stop:
                break

            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            offsets = data_mod.random_offsets(len(dataset.train), args.block_size,
                                              args.grad_accum * args.batch_size, sampler)
            for micro in range(accum):
                first = (rank * accum + micro) * args.batch_size
                x, y = data_mod.windows(dataset.train, offsets[first:first + args.batch_size],
                                        args.block_size, device)
                # Gradients are averaged across ranks on the last micro-step only.
                sync = contextlib.nullcontext() if (not ddp or micro == accum - 1) else model.no_sync()
                with sync:
                    with autocast:
                        _, loss = model(x, y)
                    loss = loss / accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if ddp:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                msg = (f"error: the loss is {loss_value} at step {step + 1}; stopping without "
                       f"saving this state (the last checkpoint in {out_dir} is the last good "
                       "one). Try a lower --lr or --grad-clip.")
                if is_main:
                    print(msg, file=sys.stderr)
                status = 1
                break
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            else:
                norm = None
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            now = time.perf_counter()
            dt, t_last = now - t_last, now
            tok_s = tokens_per_step / dt
            if is_main and step % args.log_interval == 0:
                row = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tok_s,
                       "time": time.time()}
                if norm is not None:
                    row["grad_norm"] = float(norm)
                if peak:
                    row["mfu"] = flops_per_step / dt / peak / world
                rows.append(row)
                tracker.log(row, step)
                if bar is not None:
                    post = {"loss": f"{loss_value:.3f}", "tok/s": f"{tok_s:,.0f}"}
                    if peak:
                        post["mfu"] = f"{100 * row['mfu']:.1f}%"
                    bar.set_postfix(post, refresh=False)
                else:
                    print(f"step {step}: loss {loss_value:.4f}, {tok_s:,.0f} tok/s", file=sys.stderr)
            if bar is not None:
                bar.update(1)
        if status == 0:
            if step >= args.max_iters and evaluated_step != step:
                val_loss = run_eval(step)  # the final evaluation
            if saved_step != step:
                save(step, val_loss)
    except KeyboardInterrupt:
        if is_main:
            print(f"\ninterrupted at step {step}; the last checkpoint in {out_dir} is kept",
                  file=sys.stderr)
        status = 130
    finally:
        signal.signal(signal.SIGINT, old_handler)
        if bar is not None:
            bar.close()
        tracker.close()
    if is_main and status == 0:
        if stop_requested:
            print(f"stopped at step {step} by Ctrl-C; checkpoint saved in {out_dir} "
                  "(continue with --resume)", file=sys.stderr)
        elif step < args.max_iters:
            print(f"stopped at step {step} (--stop-at); checkpoint saved in {out_dir} "
                  "(continue with --resume)", file=sys.stderr)
        else:
            final = f"val loss {val_loss:.4f}" if val_loss is not None else ""
            print(f"done: {step} steps, {final} (unigram entropy {unigram:.3f}); "
                  f"run saved in {out_dir}", file=sys.stderr)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except (TrainError, ckpt.CheckpointError, data_mod.DataError,
            tokenizer_mod.TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
