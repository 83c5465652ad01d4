"""GGUF export: a GPT and our tokenizer as one file that llama.cpp, ollama and LM Studio run.

  save_gguf(model, tok, path, dtype="fp32"|"bf16"|"q8_0", overwrite=False)
  (what `python -m gptmod_ext.export --format gguf` writes)

The file is written by the `gguf` package (llama.cpp's own writer, from PyPI). Architectures:
- the modern one becomes llama.cpp's `llama`: RMSNorm, SwiGLU (our fused gate|up split in two),
  GQA, tied or untied embeddings, rope_base, norm_eps, block_size as the context length. llama.cpp
  rotates adjacent pairs (2i, 2i+1) where we rotate half-split pairs (i, i + D/2), so the rows of
  each q and k head are reordered to put pair partners next to each other (the permutation
  llama.cpp's convert_hf_to_gguf.py applies to Hugging Face Llamas); a model trained with
  interleaved RoPE is already in llama.cpp's order and is written as it is;
- the GPT-2 one (learned positions, LayerNorm, the tanh GELU) becomes llama.cpp's `gpt2`, with
  zero biases where the model has none (nanoGPT's bias=False);
- anything else (a logit soft-cap, parallel blocks, QK-norm, ...) is a ValueError naming it.
Rows of the embedding and lm_head past the vocabulary (our padding to a multiple of 64) are
dropped. dtype: fp32 as trained; bf16; q8_0 in llama.cpp's block format (32 weights, one fp16
scale) for every matrix whose rows split into whole blocks, fp32 for the others. Norm weights,
biases and GPT-2's position table stay fp32, as llama.cpp's converter leaves them.

The tokenizer is llama.cpp's byte-level BPE (`tokenizer.ggml.model = "gpt2"`): every id's
bytes as GPT-2's byte-to-unicode string, the merges that make tiktoken's ranks (every split of
a token into two tokens, ordered by the token's rank), and the llama.cpp pre-tokenizer whose
split is our pattern (GPT-4's: "llama-bpe"; GPT-2's: "gpt-2"), so llama.cpp gives every text
our ids. `<|endoftext|>` is a control token, the eos (end of generation) and the bos; no bos
is added to prompts, as our sampler adds none (an empty prompt, which our sampler starts with
`<|endoftext|>`, is typed as that literal in llama.cpp).

`gguf` is optional: `pip install 'gptmod_ext[gguf]'`; it is imported only when this runs.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from .chat import template_of
from .common import atomic_write, check_writable_parent
from .model import GPT, GPTConfig
from .tokenizer import BYTES_PATTERN, EOT, GPT2_PATTERN, GPT4_PATTERN

DTYPES = ("fp32", "bf16", "q8_0")
# The pre-tokenizer llama.cpp must run for each of our split patterns (llama.cpp's regexes for
# these names are the same splits: llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3 / _GPT2).
# The bytes tokenizer has no merges: any split gives its ids.
PRE_TOKENIZERS = {GPT4_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt-2", BYTES_PATTERN: "gpt-2"}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the optional dependency `gguf`: "
                          "pip install 'gptmod_ext[gguf]' (or pip install gguf)") from e
    return gguf


# -----------------------------------------------------------------------------------------------
# Architecture


def gguf_arch(c: GPTConfig) -> str:
    """'llama' or 'gpt2': the llama.cpp architecture that runs this config; ValueError naming
    every feature that neither expresses."""
    if c.pos_emb == "learned":
        arch, checks = "gpt2", [
            (c.norm == "layernorm", "RMSNorm (llama.cpp's gpt2 uses LayerNorm)"),
            (c.mlp == "gelu", "SwiGLU (llama.cpp's gpt2 uses a GELU MLP)"),
            (c.mlp != "gelu" or c.gelu_approx == "tanh",
             "the exact (erf) GELU (llama.cpp's gpt2 uses the tanh one)"),
            (c.head_dim * c.n_head == c.n_embd, "head_dim * n_head != n_embd")]
    else:
        arch, checks = "llama", [
            (c.norm == "rmsnorm", "LayerNorm (llama.cpp's llama uses RMSNorm)"),
            (c.mlp == "swiglu", "a GELU MLP (llama.cpp's llama uses SwiGLU)"),
            (not c.bias, "biases")]
    checks += [(not c.parallel_block, "parallel blocks"),
               (c.logit_softcap == 0, "a logit soft-cap"), (not c.qk_norm, "QK-norm")]
    problems = [msg for ok, msg in checks if not ok]
    if problems:
        raise ValueError(f"GGUF: llama.cpp's {arch} cannot express " + ", ".join(problems))
    return arch


def rope_rows_to_adjacent(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The rows of a q or k projection [n_heads * D, C] reordered per head from our half-split
    RoPE pairs (i, i + D/2) to llama.cpp's adjacent pairs (2i, 2i + 1): new row 2i is old row i,
    new row 2i + 1 old row i + D/2. Attention scores are unchanged (q and k move alike)."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def _bias(sd: dict, name: str) -> torch.Tensor:
    """sd's bias of layer `name`, or zeros where the model has none (nanoGPT's bias=False):
    llama.cpp's gpt2 requires every bias, and zeros compute the same function."""
    return sd.get(name + ".bias", torch.zeros(sd[name + ".weight"].shape[0]))


def _tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's tensor names (llama-arch.cpp), vocabulary rows only."""
    c, V = model.config, model.config.vocab_size
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["wte.weight"][:V], "output_norm.weight": sd["ln_f.weight"]}
    if not c.tie_embeddings:  # absent: llama.cpp reads the output projection from token_embd
        out["output.weight"] = sd["lm_head.weight"][:V]
    if arch == "gpt2":
        out["position_embd.weight"] = sd["wpe.weight"]
        out["output_norm.bias"] = _bias(sd, "ln_f")
    Hq, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
    for i in range(c.n_layer):
        p, b = f"h.{i}.", f"blk.{i}."
        w = {"attn_norm": p + "ln_1", "ffn_norm": p + "ln_2", "attn_output": p + "attn.c_proj",
             "ffn_down": p + "mlp.c_proj"}
        if arch == "gpt2":
            w.update(attn_qkv=p + "attn.c_attn", ffn_up=p + "mlp.c_fc")
            for name, ours in w.items():
                out[f"{b}{name}.weight"] = sd[ours + ".weight"]
                out[f"{b}{name}.bias"] = _bias(sd, ours)
            continue
        for name, ours in w.items():
            out[f"{b}{name}.weight"] = sd[ours + ".weight"]
        q, k, v = sd[p + "attn.c_attn.weight"].split([Hq * D, Hkv * D, Hkv * D])
        if not c.rope_interleaved:
            q, k = rope_rows_to_adjacent(q, Hq), rope_rows_to_adjacent(k, Hkv)
        gate, up = sd[p + "mlp.c_fc.weight"].chunk(2)
        out.update({b + "attn_q.weight": q, b + "attn_k.weight": k, b + "attn_v.weight": v,
                    b + "ffn_gate.weight": gate, b + "ffn_up.weight": up})
    return out


def _add_hparams(w, c: GPTConfig, arch: str) -> None:
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.ffn_hidden)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
        return
    w.add_vocab_size(c.vocab_size)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_base)
    w.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.n_head != c.n_embd:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)


def _add_tensor(w, gguf, name: str, t: torch.Tensor, dtype: str) -> None:
    data = t.contiguous().numpy()
    Q = gguf.GGMLQuantizationType
    qtype = Q.F32
    if data.ndim == 2 and name != "position_embd.weight":
        if dtype == "bf16":
            qtype = Q.BF16
        elif dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
            qtype = Q.Q8_0
    if qtype == Q.F32:
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


# -----------------------------------------------------------------------------------------------
# Tokenizer


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters, the spelling of
    byte-level BPE tokens in llama.cpp (and Hugging Face): printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) for the characters from U+0100 on, in order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(0x100 + n) for n, b in enumerate(moved)})
    return table


def vocab_and_merges(tok) -> tuple[list[str], list[int], list[str]]:
    """(token strings by id, llama.cpp token types, merges "left right" in priority order).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, whichever way
    the concatenation splits; llama.cpp merges by the rank of the (left, right) pair. Listing
    every split of each token into two tokens, ordered by the token's rank, makes the two agree
    (the same reading of tiktoken ranks as transformers' TikTokenConverter)."""
    gguf = _gguf()
    enc = byte_to_unicode()
    spell = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    ranks = tok.mergeable_ranks
    n = tok.vocab_size
    tokens: list[Optional[str]] = [None] * n
    types = [int(gguf.TokenType.NORMAL)] * n
    for b, i in ranks.items():
        tokens[i] = spell(b)
    for name, i in tok.special_tokens.items():
        tokens[i], types[i] = name, int(gguf.TokenType.CONTROL)
    if None in tokens:
        raise ValueError(f"tokenizer {tok.name!r}: id {tokens.index(None)} has no token "
                         "(GGUF needs every id from 0 to the vocabulary size)")
    merges = []
    for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(ranks[b[:j]], ranks[b[j:]], j) for j in range(1, len(b))
                  if b[:j] in ranks and b[j:] in ranks]
        merges += [f"{spell(b[:j])} {spell(b[j:])}" for _, _, j in sorted(splits)]
    return tokens, types, merges


def _add_tokenizer(w, gguf, tok, n_vocab: int) -> None:
    if getattr(tok, "mergeable_ranks", None) is None:
        raise ValueError(f"GGUF: the tokenizer {getattr(tok, 'name', '')!r} "
                         f"({type(tok).__name__}) is not one of our byte-level BPEs (bpe, bytes, "
                         "gpt2), which are what the file can carry")
    pre = PRE_TOKENIZERS.get(tok.pattern)
    if pre is None:
        raise ValueError(f"GGUF: llama.cpp has no pre-tokenizer for the split pattern of "
                         f"tokenizer {tok.name!r} ({tok.pattern[:40]}...)")
    tokens, types, merges = vocab_and_merges(tok)
    if not merges:
        # The bytes tokenizer has none, but llama.cpp refuses a BPE without merges. One between
        # two ASCII characters is harmless: its result is no token, and llama.cpp spells a
        # symbol that is no token as its byte tokens, '!' '!' again.
        merges = ["! !"]
    # Model rows past the tokenizer's ids (a larger vocab_size than the tokenizer needs).
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [int(gguf.TokenType.UNUSED)] * (n_vocab - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eot = tok.special_tokens[EOT]
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if template_of(tok):
        w.add_chat_template(template_of(tok))


# -----------------------------------------------------------------------------------------------
# The file


def save_gguf(model: GPT, tokenizer, path, dtype: str = "fp32", overwrite: bool = False,
              name: Optional[str] = None) -> Path:
    """Writes `model` and `tokenizer` (ours) as one GGUF file llama.cpp runs on its own; returns
    its path.

    dtype: 'fp32', 'bf16' or 'q8_0'. The tokenizer's chat template (chat.py), where it has one,
    is stored as `tokenizer.chat_template` (llama.cpp, ollama and LM Studio format chats with
    it). name: `general.name` (default: the file's stem).
    The file is written to a temporary name next to `path` and renamed into place, so a failure
    leaves nothing behind; an existing `path` is a FileExistsError unless overwrite=True."""
    gguf = _gguf()

    if dtype not in DTYPES:
        raise ValueError(f"GGUF: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    c = model.config
    if tokenizer.vocab_size > c.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{c.vocab_size} embeddings")
    arch = gguf_arch(c)
    target = Path(path)
    _check_file_target(target, overwrite)
    file_type = {"fp32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with _made_parents(target), atomic_write(target) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or target.stem)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(w, c, arch)
        _add_tokenizer(w, gguf, tokenizer, c.vocab_size)
        for tname, t in _tensors(model, arch).items():
            _add_tensor(w, gguf, tname, t, dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return target


def _check_file_target(target: Path, overwrite: bool) -> None:
    """Refuses, before anything is converted, a file that cannot or may not be written."""
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory (--out is the .gguf file to write)")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (overwrite it with --force)")
    check_writable_parent(target)


@contextlib.contextmanager
def _made_parents(target: Path):
    """Creates target's missing parent folders; removes them again if no file came."""
    parent = target.absolute().parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        for p in created:
            if not target.exists():
                with contextlib.suppress(OSError):
                    p.rmdir()
