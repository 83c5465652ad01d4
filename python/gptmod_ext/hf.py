"""Hugging Face interop: LlamaForCausalLM and GPT2LMHeadModel to and from GPT.

  from_hf(model_or_path) -> GPT       a transformers model object, or a local directory with
                                      config.json and *.safetensors (nothing is downloaded)
  to_hf(model) -> transformers model  LlamaForCausalLM for the modern architecture,
                                      GPT2LMHeadModel for the GPT-2 one
  to_hf_tokenizer(tok)                our tokenizer as a PreTrainedTokenizerFast, same ids
  save_hf(model, tok, dir)            both as a folder transformers loads on its own (what
                                      `python -m gptmod_ext.export` writes)
  HFTokenizer(path)                   a folder's transformers tokenizer behind our tokenizer
                                      interface (defined in tokenizer.py, with the other kinds)

The modern architecture maps onto Llama one to one: RoPE with HF's half-split convention
(rotate_half, same as ours), RMSNorm, SwiGLU (HF's separate gate/up projections become our fused
gate|up one, q/k/v our fused qkv one), GQA through num_key_value_heads. GPT-2 keeps its weights
as Conv1D [in, out], the transpose of nn.Linear's [out, in]. What a target cannot express
(soft-cap, parallel blocks, QK-norm, ...) is refused with a ValueError, never dropped silently.

transformers is optional: it is imported only when these functions run.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from . import devices
from .common import transformers_module
from .model import GPT, GPTConfig
from .tokenizer import EOT, HFTokenizer  # noqa: F401  (HFTokenizer: part of this module's API)


# -----------------------------------------------------------------------------------------------
# Configs


def _rope_theta(hf_config) -> float:
    # transformers >= 5 keeps it in rope_parameters; older releases in rope_theta.
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise ValueError(f"from_hf: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _llama_to_config(c, block_size: Optional[int]) -> GPTConfig:
    problems = []
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (only 'silu', i.e. SwiGLU)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        problems.append("attention_bias/mlp_bias (the modern architecture has no biases)")
    if getattr(c, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={c.pretraining_tp}")
    if problems:
        raise ValueError("from_hf: this Llama checkpoint cannot be expressed: " + "; ".join(problems))
    n_head = c.num_attention_heads
    return GPTConfig(
        vocab_size=c.vocab_size, block_size=block_size or c.max_position_embeddings,
        n_layer=c.num_hidden_layers, n_head=n_head,
        n_kv_head=getattr(c, "num_key_value_heads", None) or n_head, n_embd=c.hidden_size,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // n_head,
        ffn_hidden=c.intermediate_size, pos_emb="rope", rope_base=_rope_theta(c),
        rope_interleaved=False, norm="rmsnorm", norm_eps=c.rms_norm_eps, mlp="swiglu",
        parallel_block=False, bias=False, tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        logit_softcap=0.0, qk_norm=False, dropout=0.0)


# GPT-2's activation_function names for the two GELUs we have (gelu_fast is the tanh form too).
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gpt2_to_config(c, block_size: Optional[int]) -> GPTConfig:
    problems = []
    if c.activation_function not in (*_GELU_TANH, "gelu"):
        problems.append(f"activation_function={c.activation_function!r} (only the GELUs: "
                        "tanh, or exact 'gelu')")
    if not getattr(c, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if problems:
        raise ValueError("from_hf: this GPT-2 checkpoint cannot be expressed: " + "; ".join(problems))
    if block_size is not None and block_size > c.n_positions:
        raise ValueError(f"from_hf: block_size={block_size} exceeds GPT-2's n_positions={c.n_positions}")
    return GPTConfig(
        vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
        n_kv_head=c.n_head, n_embd=c.n_embd, ffn_hidden=c.n_inner or 4 * c.n_embd,
        pos_emb="learned", norm="layernorm", norm_eps=c.layer_norm_epsilon, mlp="gelu",
        gelu_approx="none" if c.activation_function == "gelu" else "tanh", parallel_block=False, bias=True, tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        logit_softcap=0.0, qk_norm=False, dropout=0.0)


# -----------------------------------------------------------------------------------------------
# Weights: HF state dict -> ours


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    out = w.new_zeros(rows, *w.shape[1:])
    out[:w.size(0)] = w
    return out


def _llama_weights(sd: dict, cfg: GPTConfig) -> dict:
    sd = _strip(sd, "model.")
    Vp = cfg.padded_vocab_size
    out = {"wte.weight": _pad_rows(sd["embed_tokens.weight"], Vp), "ln_f.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _pad_rows(sd["lm_head.weight"], Vp)
    for i in range(cfg.n_layer):
        p, q = f"layers.{i}.", f"h.{i}."
        a, m = p + "self_attn.", p + "mlp."
        out[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "attn.c_attn.weight"] = torch.cat(
            [sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]], dim=0)
        out[q + "attn.c_proj.weight"] = sd[a + "o_proj.weight"]
        out[q + "mlp.c_fc.weight"] = torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]], dim=0)
        out[q + "mlp.c_proj.weight"] = sd[m + "down_proj.weight"]
    return out


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt2_weights(sd: dict, cfg: GPTConfig) -> dict:
    sd = _strip(sd, "transformer.")
    Vp = cfg.padded_vocab_size
    out = {"wte.weight": _pad_rows(sd["wte.weight"], Vp), "wpe.weight": sd["wpe.weight"],
           "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _pad_rows(sd["lm_head.weight"], Vp)
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias",
                     "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
            out[p + name] = sd[p + name]
        for name in _CONV1D:  # Conv1D stores [in, out]
            out[p + name] = sd[p + name].t()
    return out


def _load_dir(path: Path):
    """(hf config, state dict) of a local checkpoint directory, without downloading anything."""
    transformers = transformers_module()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"from_hf: {path} has no config.json")
    hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        return hf_config, sd
    # No safetensors (e.g. pytorch_model.bin): let transformers read it.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    return model.config, model.state_dict()


def from_hf(model_or_path, block_size: Optional[int] = None, dtype: Optional[torch.dtype] = None,
            backend: str = "torch") -> GPT:
    """A GPT with the weights of a Llama or GPT-2 model from transformers.

    model_or_path: a LlamaForCausalLM / GPT2LMHeadModel object, or a local directory holding
    config.json and model*.safetensors (as written by save_pretrained).
    block_size: the longest sequence; by default the checkpoint's max_position_embeddings
    (Llama may be given a shorter one to keep the RoPE tables small; GPT-2 cannot exceed
    n_positions). dtype: by default the checkpoint's. Returns the model in eval mode.
    """
    if isinstance(model_or_path, (str, Path)):
        hf_config, sd = _load_dir(Path(model_or_path))
    else:
        hf_config, sd = model_or_path.config, model_or_path.state_dict()
    kind = getattr(hf_config, "model_type", None)
    if kind == "llama":
        cfg = _llama_to_config(hf_config, block_size)
        weights = _llama_weights(sd, cfg)
    elif kind == "gpt2":
        cfg = _gpt2_to_config(hf_config, block_size)
        weights = _gpt2_weights(sd, cfg)
    else:
        raise ValueError(f"from_hf: model_type {kind!r} is not supported (llama or gpt2)")
    src_dtype = next(iter(weights.values())).dtype
    model = GPT(cfg, backend=backend)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # A tied lm_head is the same tensor as wte: its key counts as missing here, nothing else may.
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"from_hf: weights do not match: missing {missing}, unexpected {unexpected}")
    return model.to(dtype or src_dtype).eval()


# -----------------------------------------------------------------------------------------------
# Ours -> HF


def _llama_problems(c: GPTConfig) -> list[str]:
    checks = [
        (c.pos_emb == "rope", "learned positions (Llama uses RoPE)"),
        (not c.rope_interleaved, "interleaved RoPE (HF Llama rotates half-split pairs)"),
        (c.norm == "rmsnorm", "LayerNorm (Llama uses RMSNorm)"),
        (c.mlp == "swiglu", "a GELU MLP (Llama uses SwiGLU)"),
        (not c.bias, "biases"),
        (not c.parallel_block, "parallel blocks"),
        (c.logit_softcap == 0, "a logit soft-cap"),
        (not c.qk_norm, "QK-norm"),
    ]
    return [msg for ok, msg in checks if not ok]


def _gpt2_problems(c: GPTConfig) -> list[str]:
    checks = [
        (c.pos_emb == "learned", "RoPE (GPT-2 uses learned positions)"),
        (c.norm == "layernorm", "RMSNorm (GPT-2 uses LayerNorm)"),
        (c.mlp == "gelu", "SwiGLU (GPT-2 uses a GELU MLP)"),
        (c.tie_embeddings, "untied embeddings (GPT-2 ties them)"),
        (c.n_kv_head == c.n_head, "grouped KV heads (GPT-2 is multi-head)"),
        (c.head_dim * c.n_head == c.n_embd, "head_dim * n_head != n_embd"),
        (not c.parallel_block, "parallel blocks"),
        (c.logit_softcap == 0, "a logit soft-cap"),
        (not c.qk_norm, "QK-norm"),
    ]
    return [msg for ok, msg in checks if not ok]


def _gpt2_hf_weights(sd: dict, c: GPTConfig, expected: dict) -> dict:
    """Our GPT-2-shaped state dict in GPT2LMHeadModel's names (Conv1D weights [in, out]).
    A model without biases (nanoGPT's bias=False) gets zero biases: the same function."""
    V = c.vocab_size
    hf = {"transformer.wte.weight": sd["wte.weight"][:V], "lm_head.weight": sd["wte.weight"][:V],
          "transformer.wpe.weight": sd["wpe.weight"], "transformer.ln_f.weight": sd["ln_f.weight"]}
    if "ln_f.bias" in sd:
        hf["transformer.ln_f.bias"] = sd["ln_f.bias"]
    for i in range(c.n_layer):
        p = f"h.{i}."
        for k, v in sd.items():
            if k.startswith(p):
                hf["transformer." + k] = v.t() if k[len(p):] in _CONV1D else v
    for k, t in expected.items():
        if k not in hf and k.endswith(".bias"):
            hf[k] = torch.zeros_like(t)
    return hf


def to_hf(model: GPT, arch: Optional[str] = None, **config_overrides):
    """The same network as a transformers model: LlamaForCausalLM or GPT2LMHeadModel.

    arch: 'llama' or 'gpt2'; by default picked from the architecture (RoPE -> Llama, learned
    positions -> GPT-2). A feature the target cannot express raises ValueError naming it.
    The HF config's bos/eos/pad token ids are None unless given in config_overrides (HF's
    generate would otherwise stop at Llama's default eos id 2). Returns the model in eval mode,
    on the same device and in the same dtype as `model`.
    """
    transformers = transformers_module()
    c = model.config
    arch = arch or ("gpt2" if c.pos_emb == "learned" else "llama")
    problems = {"llama": _llama_problems, "gpt2": _gpt2_problems}[arch](c)
    if problems:
        raise ValueError(f"to_hf: {arch} cannot express " + ", ".join(problems))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = c.vocab_size
    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "llama":
        hf_config = transformers.LlamaConfig(
            vocab_size=V, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden,
            num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
            num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
            max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
            tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
            hidden_act="silu", **{**ids, **config_overrides})
        Hq, Hkv, D, F = c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden
        hf = {"model.embed_tokens.weight": sd["wte.weight"][:V], "model.norm.weight": sd["ln_f.weight"],
              "lm_head.weight": sd["lm_head.weight"][:V]}
        for i in range(c.n_layer):
            p, q = f"model.layers.{i}.", f"h.{i}."
            qw, kw, vw = sd[q + "attn.c_attn.weight"].split([Hq * D, Hkv * D, Hkv * D], dim=0)
            gate, up = sd[q + "mlp.c_fc.weight"].split([F, F], dim=0)
            hf.update({p + "input_layernorm.weight": sd[q + "ln_1.weight"],
                       p + "post_attention_layernorm.weight": sd[q + "ln_2.weight"],
                       p + "self_attn.q_proj.weight": qw, p + "self_attn.k_proj.weight": kw,
                       p + "self_attn.v_proj.weight": vw,
                       p + "self_attn.o_proj.weight": sd[q + "attn.c_proj.weight"],
                       p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                       p + "mlp.down_proj.weight": sd[q + "mlp.c_proj.weight"]})
        cls = transformers.LlamaForCausalLM
    else:
        hf_config = transformers.GPT2Config(
            vocab_size=V, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, n_inner=c.ffn_hidden,
            activation_function="gelu_new" if c.gelu_approx == "tanh" else "gelu",
            layer_norm_epsilon=c.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=True, **{**ids, **config_overrides})
        cls = transformers.GPT2LMHeadModel
    hf_model = cls(hf_config)
    if arch == "gpt2":
        hf = _gpt2_hf_weights(sd, c, hf_model.state_dict())
    hf_model.load_state_dict({k: v.contiguous() for k, v in hf.items()}, strict=True)
    return hf_model.to(device=model.device, dtype=model.dtype).eval()


# -----------------------------------------------------------------------------------------------
# Export: a model and its tokenizer as a folder transformers loads on its own


def _ranks_converter():
    """transformers' TikTokenConverter (tiktoken ranks -> a byte-level `tokenizers` BPE), fed
    ranks held in memory instead of a .tiktoken file."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RanksConverter(TikTokenConverter):
        def __init__(self, ranks: dict[bytes, int], **kwargs):
            super().__init__(vocab_file=None, **kwargs)
            self.ranks = ranks

        def load_tiktoken_bpe(self, _vocab_file) -> dict[bytes, int]:
            return self.ranks

    return RanksConverter


def _char_tokenizer(tok, extra: dict):
    """A CharTokenizer as a `tokenizers` word-level vocabulary over single characters: the
    pre-tokenizer cuts the text into characters, each character is its id, and the Fuse
    decoder joins them back without spaces. No special tokens (nanoGPT's have none); a
    character outside the vocabulary fails to encode there as it does here."""
    transformers = transformers_module()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    fast = Tokenizer(models.WordLevel(vocab=dict(tok.stoi), unk_token=None))
    fast.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=fast, clean_up_tokenization_spaces=False, **extra)


def to_hf_tokenizer(tok, model_max_length: Optional[int] = None):
    """Our tokenizer (a tokenizer.Tokenizer: bpe, bytes or gpt2; or a CharTokenizer) as a
    transformers PreTrainedTokenizerFast that gives the same ids for every text, special
    tokens included; an HFTokenizer (a model loaded from a Hugging Face folder) gives back its
    own tokenizer.

    The ranks become a byte-level BPE through transformers' own tiktoken converter, split by our
    pattern; <|endoftext|> is the eos (and bos: it starts every document, as in GPT-2). Nothing
    is cleaned up on decode, so decode(encode(s)) == s. A char vocabulary becomes a word-level
    one over single characters, with no eos (see _char_tokenizer)."""
    if isinstance(tok, HFTokenizer):
        hf_tok = copy.deepcopy(tok.hf)  # the caller's tokenizer keeps its own settings
        if model_max_length is not None:
            hf_tok.model_max_length = model_max_length
            hf_tok.init_kwargs["model_max_length"] = model_max_length
        return hf_tok
    transformers = transformers_module()
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    if tok.kind == "char":
        return _char_tokenizer(tok, extra)

    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    fast = _ranks_converter()(tok.mergeable_ranks, pattern=tok.pattern,
                              extra_special_tokens=[name for name, _ in specials]).converted()
    # The converter numbers tokens by rank and appends the special tokens in the order given;
    # any other numbering (ranks with gaps, specials not right after them) would change ids.
    wrong = [name for name, i in specials if fast.token_to_id(name) != i]
    if fast.get_vocab_size() != tok.vocab_size or wrong:
        raise ValueError(f"tokenizer {tok.name!r}: the converted ids differ from ours "
                         f"({', '.join(wrong) or 'vocabulary size'})")
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=fast, bos_token=EOT, eos_token=EOT, clean_up_tokenization_spaces=False,
        **extra)
    hf_tok.chat_template = tok.chat_template  # chat.py's template (None for a base model)
    return hf_tok


def save_hf(model: GPT, tokenizer, directory, dtype=None, overwrite: bool = False) -> Path:
    """Writes `model` and `tokenizer` (ours) as a Hugging Face folder that transformers loads
    with no gptmod_ext code: config.json, model.safetensors, generation_config.json (eos =
    <|endoftext|>; none for a char vocabulary, which has no end-of-text token), tokenizer.json
    and tokenizer_config.json (with the tokenizer's chat template, when it has one, as
    chat_template). Returns the folder's path.

    The architecture is to_hf's (Llama or GPT-2; what neither can express is a ValueError).
    dtype: 'fp32', 'bf16', 'fp16' or a torch dtype; by default the model's. The folder is
    written next to `directory` under a temporary name and renamed into place, so a failure
    leaves nothing behind; an existing non-empty `directory` is a FileExistsError unless
    overwrite=True (then it is replaced whole)."""
    transformers = transformers_module()
    target = Path(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size} embeddings")
    _check_target(target, overwrite)
    eot = tokenizer.eot_id
    # Ours start documents with <|endoftext|>; a Hugging Face tokenizer may have its own BOS.
    bos = eot if getattr(tokenizer, "bos_id", None) is None else tokenizer.bos_id
    hf_model = to_hf(model, bos_token_id=bos, eos_token_id=eot)
    if dtype is not None:
        hf_model.to(devices.pick_dtype(dtype))
    # pad = eos only here: in the model config it would become the embedding's padding_idx,
    # whose row fine-tuning would then never update.
    hf_model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos, eos_token_id=eot, pad_token_id=eot)
    hf_tok = to_hf_tokenizer(tokenizer, model_max_length=model.config.block_size)
    with _staging(target) as tmp:
        hf_model.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        _for_older_readers(tmp, model.config)
    return target


def _edit_json(path: Path, **entries) -> None:
    d = json.loads(path.read_text())
    d.update(entries)
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _for_older_readers(folder: Path, c: GPTConfig) -> None:
    """Keys that transformers 5 no longer writes but earlier releases (and the tools pinned to
    them) read: the tokenizer class by its long-standing name (5 writes its new alias,
    TokenizersBackend), the chat template as tokenizer_config.json's chat_template (5 writes
    chat_template.jinja; it reads either, the same string), and Llama's rope_theta at the top
    level (5 nests it in rope_parameters; a reader that looks only at the top would fall back
    to 10000)."""
    tok_config = folder / "tokenizer_config.json"
    if json.loads(tok_config.read_text()).get("tokenizer_class") == "TokenizersBackend":
        _edit_json(tok_config, tokenizer_class="PreTrainedTokenizerFast")
    template = folder / "chat_template.jinja"
    if template.is_file():
        _edit_json(tok_config, chat_template=template.read_text())
    if c.pos_emb == "rope":
        _edit_json(folder / "config.json", rope_theta=c.rope_base)


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuses, before anything is converted, a target that cannot or may not be written."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty (overwrite it with --force)")
    base = target.absolute().parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise NotADirectoryError(f"cannot write {target}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {target}: {base} is not writable")


@contextlib.contextmanager
def _staging(target: Path):
    """A fresh directory next to target to write into; on success it replaces target."""
    target = target.absolute()
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        yield tmp
        # mkdtemp and safetensors make what they create private; a model folder is not.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old", dir=target.parent))
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents made for a folder that never came
            if not target.exists():
                with contextlib.suppress(OSError):
                    p.rmdir()
