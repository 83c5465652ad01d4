"""nanoGPT and nanoGPT-moderno checkpoints: recognise them, rebuild their architecture as a
GPTConfig with their weights in our layout, and find their tokenizer.

    nanoGPT (karpathy/nanoGPT)             out_dir/ckpt.pt   'nanogpt'
    nanoGPT-moderno (BayesTheory/GPT2-Mod-Arch, the code of rianagario/GPT2-Mod-Arch)
                                           log_dir/model_XXXXX.pt (or latest.pt)   'moderno'

checkpoint.load_model calls read() for such a file (or a directory holding one) and
find_tokenizer() for its tokenizer; every problem is a one-line ValueError. What the formats
hold, as read from the two projects' public model.py and train.py (nothing is copied):

- Both save a dict: 'model' (the state dict; keys start with '_orig_mod.' when the model was
  torch.compile'd, 'module.' under DDP), 'model_args' (the keyword arguments of their
  GPTConfig), and 'iter_num' / 'best_val_loss' / 'config' (nanoGPT) or 'step' / 'val_loss'
  (moderno), beside the optimizer state. Missing model_args fall back to the source's own
  GPTConfig defaults, as its GPTConfig(**model_args) would; unknown ones are refused (a fork
  with another architecture must not load with wrong logits).
- nanoGPT: GPT-2's layout (transformer.wte/wpe/h.{i}/ln_f, attn.c_attn as one nn.Linear
  [3C, C] of q|k|v), sequential pre-LN blocks, LayerNorm eps 1e-5 with biases in every Linear
  and LayerNorm or in none ('bias'), nn.GELU() (exact erf), lm_head tied to wte. Older torch
  builds saved each layer's causal mask as attn.bias [1, 1, T, T]; it is dropped.
- moderno: attn.Wq [H·D, C], Wk/Wv [Hkv·D, C], attn.c_proj; SwiGLU mlp.w1 (gate), w3 (up)
  [F, C] and w2 [C, F] with F = int(2·4C/3), or classic c_fc/c_proj with exact GELU
  (use_swiglu False); RMSNorm (weight only, eps 1e-6, computed in fp32) or nn.LayerNorm
  (eps 1e-5, always with a bias); biases in the Linears unless no_bias; the parallel block
  x + attn(ln_1(x)) + mlp(ln_2(x)); RoPE on interleaved pairs (2i, 2i+1), base 10000, head dim
  C / n_head, or learned positions (transformer.wpe) without it; query head h reads KV head
  h // (H / Hkv); lm_head tied to wte; the logit soft-cap only on logits returned without
  targets (its loss is uncapped): our softcap_in_loss=False.

Tokenizers: nanoGPT's char-level runs keep their vocabulary in the data directory's meta.pkl
(read by tokenizer.from_meta_pkl, which runs no code from the file); other nanoGPT runs and
moderno use GPT-2's BPE (tiktoken's 'gpt2', here from local files only).
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from . import tokenizer as tokenizer_mod
from .model import GPTConfig

GPT2_VOCAB = 50257
# The sources' GPTConfig defaults (nanoGPT model.py, moderno model.py).
NANOGPT_ARGS = dict(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768,
                    dropout=0.0, bias=True)
MODERNO_ARGS = dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768,
                    n_kv_head=None, use_rope=True, use_rmsnorm=True, use_swiglu=True,
                    no_bias=True, logit_soft_cap=50.0)
_PREFIXES = ("_orig_mod.", "module.")


@dataclasses.dataclass
class Checkpoint:
    """A nanoGPT or moderno checkpoint, converted."""
    kind: str                         # 'nanogpt' | 'moderno'
    path: Path                        # the .pt file read
    config: GPTConfig                 # the source's architecture in our flags
    weights: dict[str, torch.Tensor]  # our state dict names (wte padded to padded_vocab_size)
    source: dict                      # model_args, step, val_loss and the source's config


# -- finding and reading the file ---------------------------------------------------------------
def find_file(directory: Path) -> Optional[Path]:
    """The checkpoint a directory holds: nanoGPT's ckpt.pt, else moderno's newest
    model_XXXXX.pt, else its latest.pt; None when there is none."""
    if (directory / "ckpt.pt").is_file():
        return directory / "ckpt.pt"
    steps = [(int(m.group(1)), p) for p in directory.glob("model_*.pt")
             if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)) and p.is_file()]
    if steps:
        return max(steps)[1]
    return directory / "latest.pt" if (directory / "latest.pt").is_file() else None


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: not for the user
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, an object the safe load refuses, ...
        text = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:
            raise ValueError(f"{path} holds a Python object of class {unsafe.group(1)}, which a "
                             "safe load (torch.load weights_only=True) refuses; nanoGPT and "
                             "moderno save only tensors and plain values") from None
        first = (text.strip().splitlines() or [type(e).__name__])[0]
        if first.startswith("Weights only load failed"):  # a pickle, but not one of torch.save
            first = "not a torch.save file"
        raise ValueError(f"{path} is corrupt, truncated or not a PyTorch checkpoint "
                         f"({first})") from None


def _state_dict(ckpt: Any, where: str) -> dict[str, torch.Tensor]:
    sd = ckpt.get("model") if isinstance(ckpt, dict) else None
    tensors = isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values())
    if not tensors:
        raise ValueError(f"{where} is not a nanoGPT or nanoGPT-moderno checkpoint (no 'model' "
                         "state dict of tensors)")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:  # torch.compile's and DDP's wrappers
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _kind(sd: dict, where: str) -> str:
    if any(k.endswith(".attn.Wq.weight") for k in sd):
        return "moderno"
    if "transformer.wpe.weight" in sd and any(k.endswith(".attn.c_attn.weight") for k in sd):
        return "nanogpt"
    raise ValueError(f"{where} is not a nanoGPT or nanoGPT-moderno checkpoint (its state dict "
                     f"has neither attn.c_attn with transformer.wpe nor attn.Wq; first key "
                     f"{next(iter(sd))!r})")


def _model_args(ckpt: dict, defaults: dict, where: str, source: str) -> dict:
    given = ckpt.get("model_args") or {}
    if not isinstance(given, dict):
        raise ValueError(f"{where}: model_args is not a dict")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: model_args has fields {source} does not know "
                         f"({', '.join(map(str, unknown))}): a checkpoint of another program")
    return {**defaults, **given}


def _number(x) -> Optional[float]:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x)
    return float(x) if isinstance(x, (int, float)) else None


def read(path: Path) -> Checkpoint:
    """The checkpoint at path (a .pt file), converted; ValueError (one line) otherwise."""
    where = str(path)
    ckpt = _torch_load(path)
    sd = _state_dict(ckpt, where)
    kind = _kind(sd, where)
    if kind == "nanogpt":
        args = _model_args(ckpt, NANOGPT_ARGS, where, "nanoGPT")
        config = _config(where, _nanogpt_config, args)
        weights = _Weights(sd, where).nanogpt(config)
        step, loss = ckpt.get("iter_num"), ckpt.get("best_val_loss")
    else:
        args = _model_args(ckpt, MODERNO_ARGS, where, "nanoGPT-moderno")
        config = _config(where, _moderno_config, args)
        weights = _Weights(sd, where).moderno(config)
        step, loss = ckpt.get("step"), ckpt.get("val_loss")
    cfg = ckpt.get("config")
    source = {"format": kind, "model_args": dict(ckpt.get("model_args") or {}),
              "step": int(step) if isinstance(step, int) else None, "val_loss": _number(loss),
              "config": cfg if isinstance(cfg, dict) else None}
    return Checkpoint(kind, path, config, weights, source)


# -- architectures -----------------------------------------------------------------------------
def _config(where: str, build, args: dict) -> GPTConfig:
    try:
        return build(args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: model_args describe no model we can build "
                         f"({str(e).splitlines()[0]})") from None


def _nanogpt_config(a: dict) -> GPTConfig:
    C = a["n_embd"]
    return GPTConfig(
        vocab_size=a["vocab_size"], block_size=a["block_size"], n_layer=a["n_layer"],
        n_head=a["n_head"], n_kv_head=a["n_head"], n_embd=C, ffn_hidden=4 * C,
        pos_emb="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu", gelu_approx="none",
        parallel_block=False, bias=bool(a["bias"]), tie_embeddings=True, logit_softcap=0.0,
        # nanoGPT takes dropout from the command line, not the checkpoint, when it resumes.
        dropout=0.0)


def _moderno_config(a: dict) -> GPTConfig:
    C, H = a["n_embd"], a["n_head"]
    rms, swiglu = bool(a["use_rmsnorm"]), bool(a["use_swiglu"])
    if C % H:
        raise ValueError(f"n_embd={C} is not a multiple of n_head={H}")
    return GPTConfig(
        vocab_size=a["vocab_size"], block_size=a["block_size"], n_layer=a["n_layer"], n_head=H,
        n_kv_head=a["n_kv_head"] or H, n_embd=C, head_dim=C // H,
        ffn_hidden=int(2 * 4 * C / 3) if swiglu else 4 * C,  # int(), not rounded up
        pos_emb="rope" if a["use_rope"] else "learned", rope_base=10000.0, rope_interleaved=True,
        norm="rmsnorm" if rms else "layernorm", norm_eps=1e-6 if rms else 1e-5, norm_bias=True,
        mlp="swiglu" if swiglu else "gelu", gelu_approx="none",
        parallel_block=True, parallel_norms=2, bias=not a["no_bias"], tie_embeddings=True,
        logit_softcap=float(a["logit_soft_cap"] or 0.0), softcap_in_loss=False, dropout=0.0)


class _Weights:
    """Takes the source's tensors by name, checking each shape against the config, into our
    names; whatever is left over at the end is an error (another architecture)."""

    def __init__(self, sd: dict[str, torch.Tensor], where: str):
        self.sd, self.where, self.out = dict(sd), where, {}

    def take(self, name: str, *shape: int) -> torch.Tensor:
        t = self.sd.pop(name, None)
        if t is None:
            raise ValueError(f"{self.where}: the state dict has no {name} (model_args describe "
                             "another model than the weights)")
        if tuple(t.shape) != shape:
            raise ValueError(f"{self.where}: {name} has shape {tuple(t.shape)}, model_args give "
                             f"{shape}")
        return t.float()

    def put(self, ours: str, theirs: str, *shape: int) -> None:
        self.out[ours] = self.take(theirs, *shape)

    def linear(self, ours: str, theirs: list[str], rows: list[int], cols: int, bias: bool) -> None:
        """Our Linear `ours` from the source's Linears `theirs` stacked by rows (q|k|v, gate|up)."""
        self.out[ours + ".weight"] = torch.cat(
            [self.take(f"{t}.weight", r, cols) for t, r in zip(theirs, rows)])
        if bias:
            self.out[ours + ".bias"] = torch.cat(
                [self.take(f"{t}.bias", r) for t, r in zip(theirs, rows)])

    def norm(self, ours: str, theirs: str, C: int, bias: bool) -> None:
        self.put(ours + ".weight", theirs + ".weight", C)
        if bias:
            self.put(ours + ".bias", theirs + ".bias", C)

    def embeddings(self, c: GPTConfig) -> None:
        wte = self.take("transformer.wte.weight", c.vocab_size, c.n_embd)
        lm_head = self.sd.pop("lm_head.weight", None)  # tied: the same tensor, saved twice
        if lm_head is not None and not torch.equal(lm_head.float(), wte):
            raise ValueError(f"{self.where}: lm_head.weight differs from transformer.wte.weight, "
                             "but the architecture ties them")
        padded = wte.new_zeros(c.padded_vocab_size, c.n_embd)  # rows past vocab_size stay 0
        padded[:c.vocab_size] = wte
        self.out["wte.weight"] = padded
        if c.pos_emb == "learned":
            self.put("wpe.weight", "transformer.wpe.weight", c.block_size, c.n_embd)

    def done(self) -> dict[str, torch.Tensor]:
        if self.sd:
            extra = sorted(self.sd)
            raise ValueError(f"{self.where}: unexpected tensors {', '.join(extra[:4])}"
                             f"{' ...' if len(extra) > 4 else ''} (model_args describe another "
                             "model than the weights)")
        return self.out

    def nanogpt(self, c: GPTConfig) -> dict[str, torch.Tensor]:
        C, b = c.n_embd, c.bias
        self.embeddings(c)
        for i in range(c.n_layer):
            p, q = f"transformer.h.{i}.", f"h.{i}."
            mask = self.sd.get(p + "attn.bias")
            if mask is not None and mask.dim() == 4:  # the causal mask buffer of torch < 2.0
                del self.sd[p + "attn.bias"]
            self.norm(q + "ln_1", p + "ln_1", C, b)
            self.linear(q + "attn.c_attn", [p + "attn.c_attn"], [3 * C], C, b)
            self.linear(q + "attn.c_proj", [p + "attn.c_proj"], [C], C, b)
            self.norm(q + "ln_2", p + "ln_2", C, b)
            self.linear(q + "mlp.c_fc", [p + "mlp.c_fc"], [4 * C], C, b)
            self.linear(q + "mlp.c_proj", [p + "mlp.c_proj"], [C], 4 * C, b)
        self.norm("ln_f", "transformer.ln_f", C, b)
        return self.done()

    def moderno(self, c: GPTConfig) -> dict[str, torch.Tensor]:
        C, F, b, ln = c.n_embd, c.ffn_hidden, c.bias, c.norm == "layernorm"
        q_rows, kv_rows = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        self.embeddings(c)
        for i in range(c.n_layer):
            p, q = f"transformer.h.{i}.", f"h.{i}."
            self.norm(q + "ln_1", p + "ln_1", C, ln)
            self.norm(q + "ln_2", p + "ln_2", C, ln)
            a = p + "attn."
            self.linear(q + "attn.c_attn", [a + "Wq", a + "Wk", a + "Wv"],
                        [q_rows, kv_rows, kv_rows], C, b)
            self.linear(q + "attn.c_proj", [a + "c_proj"], [C], q_rows, b)
            m = p + "mlp."
            if c.mlp == "swiglu":  # w1 is the gate, w3 the up projection: our [gate | up]
                self.linear(q + "mlp.c_fc", [m + "w1", m + "w3"], [F, F], C, b)
                self.linear(q + "mlp.c_proj", [m + "w2"], [C], F, b)
            else:
                self.linear(q + "mlp.c_fc", [m + "c_fc"], [F], C, b)
                self.linear(q + "mlp.c_proj", [m + "c_proj"], [C], F, b)
        self.norm("ln_f", "transformer.ln_f", C, ln)
        return self.done()


# -- tokenizers --------------------------------------------------------------------------------
def _meta_candidates(ck: Checkpoint) -> list[Path]:
    """Where a nanoGPT run's meta.pkl may be: next to the checkpoint, or at
    data/<dataset>/meta.pkl (nanoGPT's sample.py reads it there, from its repository root:
    the working directory, or the out_dir's parent)."""
    found = [ck.path.parent / "meta.pkl"]
    dataset = (ck.source.get("config") or {}).get("dataset")
    if isinstance(dataset, str) and dataset:
        found += [Path("data") / dataset / "meta.pkl",
                  ck.path.parent.parent / "data" / dataset / "meta.pkl"]
    return found


def find_tokenizer(ck: Checkpoint, tokenizer_path=None):
    """The tokenizer of a converted checkpoint: tokenizer_path when given (a meta.pkl, a
    tokenizer.json of ours, or GPT-2's files as prepare --tokenizer-path takes them), else a
    nanoGPT run's meta.pkl, else GPT-2's BPE from tiktoken's cache. ValueError (one line) when
    there is none or it does not fit the model."""
    vocab = ck.config.vocab_size
    try:
        if tokenizer_path is not None:
            p = Path(tokenizer_path)
            if p.suffix == ".pkl":
                tok = tokenizer_mod.from_meta_pkl(p)
            elif p.name == tokenizer_mod.FILENAME or (p / tokenizer_mod.FILENAME).is_file():
                tok = tokenizer_mod.load(p)
            else:
                tok = tokenizer_mod.gpt2(p)
        else:
            places = _meta_candidates(ck) if ck.kind == "nanogpt" else []
            meta = next((m for m in places if m.is_file()), None)
            if meta is not None:
                tok = tokenizer_mod.from_meta_pkl(meta)
            elif ck.kind == "nanogpt" and vocab < GPT2_VOCAB:
                raise ValueError(f"{ck.path} is a char-level run ({vocab} tokens) and its "
                                 f"meta.pkl is missing (looked at "
                                 f"{', '.join(map(str, places))}); copy it next to "
                                 "the checkpoint or pass --tokenizer-path PATH/meta.pkl")
            else:
                tok = tokenizer_mod.gpt2(None)
    except tokenizer_mod.TokenizerError as e:
        raise ValueError(str(e)) from None
    if tok.vocab_size > vocab:
        raise ValueError(f"the tokenizer ({tok.vocab_size} tokens) does not fit {ck.path}, whose "
                         f"model has {vocab} embeddings: not the run's tokenizer")
    return tok
