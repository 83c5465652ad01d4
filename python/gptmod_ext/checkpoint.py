"""The run directory: saving and loading a trained model with everything needed to use it.

A run directory (out/ by default) holds
    model.safetensors  the weights only (no pickle), fp32 as trained; tied weights stored once
    config.json        {"model": GPTConfig fields, "tokenizer": description, "train": the
                        training arguments, "step": ..., "val_loss": ...}
    tokenizer.json     the tokenizer the model was trained with (see tokenizer.py); a run
                        fine-tuned from a Hugging Face folder keeps that folder's tokenizer
                        as hf_tokenizer/ (save_pretrained) instead
    lora.safetensors   a LoRA run's adapters (lora.py); model.safetensors holds the merged
                        weights, so nothing else needs LoRA code
    train_state.pt     TrainState: optimizer, step, RNG states, data sampler state, best val
                        loss (for exact --resume), loaded with torch.load(weights_only=True)
    metrics.jsonl, loss.png   written by the trainer
Every file is written through common.atomic_write (a temporary name, then os.replace), so a crash
mid-save leaves the previous file whole (docs/design.md §4). The trainer writes a checkpoint
with save_run and continues one with load_for_resume.

For the sampler, server, exporter and trainer, one loader for run directories, Hugging Face
folders and nanoGPT / nanoGPT-moderno checkpoints (nanogpt.py):
    model, tok, info = checkpoint.load_model("out/", device="auto", dtype="auto", backend="auto")
raises CheckpointError (a one-line message) for a missing directory, a directory without a
model, corrupt or truncated weights, a config that does not match the weights, and a foreign
.pt file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import tokenizer as tokenizer_mod
from .common import UserError, atomic_write, first_line

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
FORMAT = "gptmod_ext.run/1"


class CheckpointError(UserError):
    """A run directory cannot be used; the message is one line that says why."""


# -- helpers ----------------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (.module) and torch.compile (._orig_mod) wrappers, so saved
    keys never carry their prefixes."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Groups of keys that share storage (tied embeddings), in state_dict order."""
    groups: dict[tuple, list[str]] = {}
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        groups.setdefault(key, []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def model_config_dict(model: torch.nn.Module) -> dict:
    cfg = unwrap(model).config
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


# -- saving -----------------------------------------------------------------------------------
def save_model(run_dir: str | os.PathLike, model: torch.nn.Module,
               tokenizer: tokenizer_mod.Tokenizer, train_args: dict | None = None,
               extra: dict | None = None, state: dict | None = None) -> None:
    """Writes model.safetensors, config.json and the tokenizer (tokenizer.json, or a Hugging
    Face tokenizer's folder) into run_dir. state: the weights to write, by their plain names
    (a LoRA run's merged weights, lora.merged_state_dict); default: the model's state_dict."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    module = unwrap(model)
    state = module.state_dict() if state is None else state
    # safetensors refuses tensors that share memory; a tied weight is stored under its first
    # name only, and loading puts it back into every name of the group.
    tied = {}
    for group in _alias_groups(state):
        for k in group[1:]:
            tied[k] = group[0]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k not in tied}
    meta = {"format": FORMAT, "tied": json.dumps(tied)}
    with atomic_write(run_dir / MODEL_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # safetensors creates the file private; the run directory is not
    config = {"format": FORMAT, "model": model_config_dict(module),
              "tokenizer": tokenizer.describe(), "train": train_args or {}}
    config.update(extra or {})
    with atomic_write(run_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save(run_dir)


@dataclasses.dataclass
class TrainState:
    """What train_state.pt holds besides the weights: everything an exact --resume needs.
    The file's keys are defined here and nowhere else (to_dict / from_dict)."""
    step: int                    # optimizer updates done
    optimizer: dict              # optimizer.state_dict()
    rng: dict                    # rng_state(): Python, numpy, torch, CUDA
    sampler: torch.Tensor        # the data sampler's generator state (data.random_offsets)
    grad_accum: int              # micro-batches per step, in total over all processes
    batch_size: int
    best_val_loss: float = float("inf")
    world_size: int = 1

    def to_dict(self) -> dict:
        """Tensors and plain Python values only, for torch.load(weights_only=True)."""
        return {"step": self.step, "optimizer": self.optimizer, "rng": self.rng,
                "data": {"sampler": self.sampler, "grad_accum": self.grad_accum,
                         "batch_size": self.batch_size},
                "best_val_loss": self.best_val_loss, "world_size": self.world_size}

    @classmethod
    def from_dict(cls, d: dict, where: str = STATE_FILE) -> "TrainState":
        try:
            data = d["data"]
            return cls(step=int(d["step"]), optimizer=d["optimizer"], rng=d["rng"],
                       sampler=data["sampler"], grad_accum=int(data["grad_accum"]),
                       batch_size=int(data["batch_size"]),
                       best_val_loss=float(d.get("best_val_loss", float("inf"))),
                       world_size=int(d.get("world_size", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where} does not fit this run ({type(e).__name__}: "
                                  f"{first_line(e)})") from None


def save_run(run_dir: str | os.PathLike, model: torch.nn.Module,
             tokenizer: tokenizer_mod.Tokenizer, state: TrainState,
             train_args: dict | None = None, extra: dict | None = None,
             weights: dict | None = None) -> None:
    """A training checkpoint: train_state.pt, then the weights (`weights`, else the model's
    state_dict: see save_model), config.json (whose "step" is state.step) and the tokenizer.
    Each file is atomic; load_for_resume refuses a directory whose weights and state disagree
    (a crash between the two files)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / STATE_FILE) as tmp:
        torch.save(state.to_dict(), str(tmp))
    save_model(run_dir, model, tokenizer, train_args, {**(extra or {}), "step": state.step},
               state=weights)


# -- loading ----------------------------------------------------------------------------------
def read_config(run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"checkpoint directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise CheckpointError(f"checkpoint {run_dir} is not a directory")
    if not (run_dir / MODEL_FILE).is_file():
        raise CheckpointError(f"{run_dir} holds no {MODEL_FILE} (not a run directory, or the "
                              "run never saved a checkpoint)")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} holds no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise ValueError("no 'model' section")
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None
    return config


def read_weights(run_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by name, tied names {dropped: kept}) from model.safetensors, on the CPU."""
    from safetensors import safe_open

    path = Path(run_dir) / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tied = json.loads(meta.get("tied", "{}"))
    except Exception as e:  # safetensors raises its own error types for bad headers and sizes
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is corrupt or truncated ({msg})") from None
    return tensors, tied


def model_from_config(model_config: dict):
    """GPT(GPTConfig(**model_config)), with unknown or invalid fields as CheckpointError."""
    from .model import GPT, GPTConfig

    names = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(model_config) - names)
    if unknown:
        raise CheckpointError(f"config.json has model fields this version does not know: "
                              f"{', '.join(unknown)}")
    try:
        return GPT(GPTConfig.from_dict(model_config))
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"config.json describes an invalid model ({e})") from None


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                 tied: dict[str, str], where: str = "") -> None:
    """Copies tensors into model, checking that names and shapes match exactly."""
    module = unwrap(model)
    expected = module.state_dict()
    groups = _alias_groups(expected)
    aliased = {k for g in groups for k in g}
    missing = [k for k in expected if k not in tensors
               and not (k in tied and tied[k] in tensors) and k not in aliased]
    # A key of a tied group may be absent when another key of its group is present.
    for g in groups:
        present = [k for k in g if k in tensors]
        if not present:
            missing.append(g[0])
        elif len(present) > 1 and not all(torch.equal(tensors[present[0]], tensors[k])
                                           for k in present[1:]):
            raise CheckpointError(f"config.json does not match the weights{where}: the config "
                                  f"ties {', '.join(g)} but the weights differ")
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"config.json does not match the weights{where}: "
                              + "; ".join(parts))
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"config.json does not match the weights{where}: {k} has "
                                  f"shape {tuple(t.shape)}, the config gives "
                                  f"{tuple(expected[k].shape)}")
    module.load_state_dict(tensors, strict=False)


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face model folder: config.json written by transformers (model_type /
    architectures at the top level; ours nests the model under "model")."""
    try:
        cfg = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What load_model read, besides the model and the tokenizer."""
    kind: str                   # 'run' (a run directory), 'hf' (a Hugging Face folder),
    #                             'nanogpt' or 'moderno' (their .pt checkpoints)
    path: Path                  # the directory, or the .pt file read
    config: dict                # the folder's config.json as read; for a .pt, its model_args,
    #                             step, val_loss and the source's own config (nanogpt.read)
    backend_note: str | None    # why backend='auto' chose torch; None when nothing was given up


class LoadedModel(NamedTuple):
    model: Any       # GPT in eval mode, on the device and dtype asked for, backend set
    tokenizer: Any   # tokenizer.Tokenizer / CharTokenizer (runs, .pt files), hf.HFTokenizer
    info: ModelInfo


def _load_hf(path: Path):
    from . import hf

    try:
        tok = hf.HFTokenizer(path)  # first: a folder without one fails before the weights load
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    try:
        model = hf.from_hf(path)
    except ImportError:  # transformers missing: its own message says what to install
        raise
    except Exception as e:  # unsupported architecture, corrupt or missing weights
        raise CheckpointError(f"cannot load the Hugging Face model in {path}: "
                              f"{first_line(e)}") from None
    return model, tok, json.loads((path / CONFIG_FILE).read_text())


def _load_run_dir(path: Path):
    config = read_config(path)
    try:
        tok = tokenizer_mod.load(path)
    except tokenizer_mod.TokenizerError as e:
        raise CheckpointError(str(e)) from None
    tensors, tied = read_weights(path)
    model = model_from_config(config["model"])
    load_weights(model, tensors, tied, f" in {path}")
    return model, tok, config


def _load_pt(path: Path, tokenizer_path):
    """A nanoGPT / nanoGPT-moderno checkpoint file: (model, tokenizer, source info, kind)."""
    from . import nanogpt
    from .model import GPT

    try:
        ck = nanogpt.read(path)
        tok = nanogpt.find_tokenizer(ck, tokenizer_path)
    except ValueError as e:
        raise CheckpointError(first_line(e)) from None
    model = GPT(ck.config)
    load_weights(model, ck.weights, {}, f" in {path}")
    return model, tok, ck.source, ck.kind


def _source_kind(path: Path) -> tuple[str, Path]:
    """('hf' | 'run' | 'pt', the path to read): a .pt file, or a directory that holds one
    and no run, is a nanoGPT / moderno checkpoint; anything else is read as a run directory
    (whose reader says what is missing)."""
    if path.is_file():
        return "pt", path
    if path.is_dir():
        if is_hf_dir(path):
            return "hf", path
        if not (path / MODEL_FILE).is_file():
            from .nanogpt import find_file

            found = find_file(path)
            if found is not None:
                return "pt", found
    return "run", path


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, backend: str = "auto",
               tokenizer_path: str | os.PathLike | None = None,
               quantize: str | None = None) -> LoadedModel:
    """The one model loader: a run directory, a Hugging Face folder (Llama, GPT-2), or a
    nanoGPT ckpt.pt / nanoGPT-moderno model_XXXXX.pt (the file or its directory).

    device and dtype go through devices.pick_device / pick_dtype (None means 'auto': a GPU
    when there is one, bfloat16 there, float32 on the CPU), backend through
    _ext.resolve_backend ('auto': ext where it can run). tokenizer_path: for a .pt checkpoint
    only, the tokenizer's files (a meta.pkl, or GPT-2's, see nanogpt.find_tokenizer); runs
    and Hugging Face folders carry their own. quantize='int8': the fused CPU decode step reads
    int8 weights, quantized once here (model.compile_decode(quantize='int8'); prefill keeps the
    float weights). Returns (model, tokenizer, info); every problem
    with the folder, the device or the backend is a one-line CheckpointError (transformers
    missing stays an ImportError).
    """
    from . import _ext
    from .devices import pick_device, pick_dtype

    path = Path(path)
    try:  # before reading anything: a backend that cannot run fails fast
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        backend, note = _ext.resolve_backend(backend, device)
    except (_ext.ExtensionNotAvailable, ValueError) as e:
        raise CheckpointError(str(e)) from None
    kind, path = _source_kind(path)
    if kind == "pt":
        model, tok, config, kind = _load_pt(path, tokenizer_path)
    elif tokenizer_path is not None:
        if kind == "run":
            read_config(path)  # a missing or empty directory says so first
        raise CheckpointError(f"a tokenizer path is for nanoGPT checkpoints; {path} holds its "
                              "own tokenizer")
    else:
        model, tok, config = (_load_hf if kind == "hf" else _load_run_dir)(path)
    try:
        model.to(device=device, dtype=dtype)
    except (RuntimeError, AssertionError) as e:  # e.g. a CUDA device on a CPU-only torch
        raise CheckpointError(f"cannot put the model on {device}: {first_line(e)}") from None
    model.backend = backend
    model.eval()
    if quantize is not None:
        try:
            model.compile_decode(quantize=quantize)
        except ValueError as e:
            raise CheckpointError(f"--quantize {quantize}: {e}") from None
    return LoadedModel(model, tok, ModelInfo(kind, path, config, note))


def _read_train_state(run_dir: Path) -> TrainState:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: nothing to resume")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a training state")
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{path} is corrupt ({first_line(e)})") from None
    return TrainState.from_dict(state, str(path))


class Resumed(NamedTuple):
    model: Any          # GPT on the CPU with the saved weights (fp32, backend 'torch')
    config: dict        # config.json: "model", "tokenizer", "train", "step", "data", ...
    state: TrainState


def load_for_resume(run_dir: str | os.PathLike) -> Resumed:
    """What --resume continues from; CheckpointError (one line) when any part is missing,
    corrupt, or from another step than the rest."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    state = _read_train_state(run_dir)
    tensors, tied = read_weights(run_dir)
    if config.get("step") != state.step:
        raise CheckpointError(f"{run_dir} holds weights of step {config.get('step')} but a "
                              f"training state of step {state.step}")
    model = model_from_config(config["model"])
    load_weights(model, tensors, tied, f" in {run_dir}")
    return Resumed(model, config, state)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states in weights_only-loadable form."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
