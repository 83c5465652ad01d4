"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tuning
that freezes every weight of the model and trains, for each target Linear W [out, in], two
small matrices A [r, in] and B [out, r], the layer computing x (W + (alpha / r) B A)^T.

The adapter is a parametrization of the layer's weight (torch.nn.utils.parametrize, as
PyTorch's own tutorial does low-rank layers): `layer.weight` reads as W + scale * B @ A, so
every place that reads a Linear's weight (the layers' F.linear calls, both backends, the KV
cache path) runs unchanged, and the merged weight is the same tensor a plain model would hold.
B starts at zero, so training starts from the source model exactly; A starts as nn.Linear's
own init (Kaiming-uniform), as in peft and the paper's code (ideas only; the code is ours).

What a run directory holds for a LoRA run: model.safetensors with the merged weights under
their plain names (merged_state_dict: sample, serve, export and transformers load it with no
LoRA code) and ADAPTER_FILE with A and B of every target (plus rank, alpha, targets and the
step), which --resume reads back on top of the source's weights.

The fused CPU decode step caches packed weights by identity and version (decode.py); a
parametrized weight is a new tensor at each read, so it is turned off on an adapted model (its
samples during training decode through the layers).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .common import UserError, atomic_write

# Every Linear of a block, by its name inside the block; lm_head may be added (untied only).
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_FILE = "lora.safetensors"


class LoRAError(UserError):
    """A LoRA option or adapter file that cannot be used; one line that says why."""


class LoRA(nn.Module):
    """The parametrization W -> W + scale * B @ A of one Linear weight [out, in]."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def parse_targets(text: str) -> tuple[str, ...]:
    """--lora-targets "attn.c_attn,mlp.c_fc" -> the names, checked against TARGETS + lm_head."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    known = TARGETS + ("lm_head",)
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise LoRAError(f"--lora-targets: unknown target {unknown[0] if unknown else text!r}; "
                        f"the targets are {', '.join(known)}")
    return names


def target_layers(model, targets) -> dict[str, nn.Linear]:
    """{full name: Linear} of every target layer of model."""
    out = {}
    for name in targets:
        if name == "lm_head":
            if model.config.tie_embeddings:
                raise LoRAError("--lora-targets lm_head: the output layer is tied to the token "
                                "embeddings, which stay frozen")
            out["lm_head"] = model.lm_head
            continue
        for i, block in enumerate(model.h):
            out[f"h.{i}.{name}"] = block.get_submodule(name)
    return out


def apply(model, rank: int, alpha: float, targets) -> dict[str, nn.Linear]:
    """Freezes every parameter of model and adapts the target Linears (rank, alpha: see the
    module doc); returns them by name. A rank above a target's smaller side is refused."""
    layers = target_layers(model, targets)
    if rank < 1:
        raise LoRAError(f"--lora-rank must be >= 1, got {rank}")
    for name, layer in layers.items():
        out_f, in_f = layer.weight.shape
        if rank > min(out_f, in_f):
            raise LoRAError(f"--lora-rank {rank} is larger than {name} allows: its weight is "
                            f"{out_f} x {in_f}, so the rank is at most {min(out_f, in_f)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        out_f, in_f = layer.weight.shape
        lora = LoRA(out_f, in_f, rank, alpha).to(layer.weight.device)
        parametrize.register_parametrization(layer, "weight", lora)
    model.decoder.fused = False  # see the module doc: packed weights would go stale
    return layers


def adapted(model) -> dict[str, nn.Module]:
    """{full name: module} of the parametrized (adapted) layers of model."""
    return {n: m for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")}


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """model.state_dict() under plain names, each adapted weight merged (W + scale * B @ A):
    what model.safetensors holds, loadable by a GPT with no LoRA code."""
    layers = adapted(model)
    out = {}
    for name, t in model.state_dict().items():
        owner, sep, rest = name.partition(".parametrizations.")
        if not sep:
            out[name] = t
        elif rest == "weight.original":
            out[f"{owner}.weight"] = layers[owner].weight.detach().clone()
    return out


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """{'<layer>.lora_A': A, '<layer>.lora_B': B} of every adapted layer."""
    out = {}
    for name, m in adapted(model).items():
        lora = m.parametrizations.weight[0]
        out[f"{name}.lora_A"] = lora.A.detach()
        out[f"{name}.lora_B"] = lora.B.detach()
    return out


def save_adapters(run_dir, model, rank: int, alpha: float, targets, step: int) -> Path:
    """Writes ADAPTER_FILE: A and B of every adapted layer, with rank, alpha, scale, targets
    and the step in the metadata."""
    from safetensors.torch import save_file

    path = Path(run_dir) / ADAPTER_FILE
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_tensors(model).items()}
    meta = {"rank": str(rank), "alpha": json.dumps(alpha), "scale": json.dumps(alpha / rank),
            "targets": ",".join(targets), "step": str(step)}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)
    return path


@torch.no_grad()
def load_adapters(model, run_dir, step: int) -> None:
    """Copies ADAPTER_FILE's A and B into an adapted model; LoRAError when the file is missing,
    corrupt, of another step or does not fit."""
    from safetensors import safe_open

    path = Path(run_dir) / ADAPTER_FILE
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a missing file, or safetensors' own errors for a corrupt one
        raise LoRAError(f"cannot read {path} ({str(e).splitlines()[0] if str(e) else e!r})"
                        ) from None
    if meta.get("step") != str(step):
        raise LoRAError(f"{path} holds adapters of step {meta.get('step')}, the training state "
                        f"is of step {step}")
    mine = adapter_tensors(model)
    if mine.keys() != tensors.keys() or any(mine[k].shape != tensors[k].shape for k in mine):
        raise LoRAError(f"{path} does not fit this run's --lora-rank / --lora-targets")
    for k, t in tensors.items():
        mine[k].copy_(t)
