"""The GPT model: config and presets, modules, the model, the KV cache and generation.

Read top to bottom, as nanoGPT's model.py: GPTConfig and PRESETS, the building blocks (norm,
attention, MLP, block), GPT (forward, the cached forward the server drives), then generation.

Every architectural choice is a config flag, so one class covers GPT-2 (learned positions,
LayerNorm, tanh-GELU, biases, tied embeddings), nanoGPT (the same with exact GELU, biases
optional), a modern decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases,
optional logit soft-cap and QK-norm) and nanoGPT-moderno (parallel blocks with two norms).

Two backends run the same weights and can be switched at any time with `model.backend = ...`:
  'torch'  pure PyTorch, the readable reference: reference.rope, F.silu(g) * u,
           F.scaled_dot_product_attention for training/evaluation, reference.decode_attention and
           an indexed copy for cached generation. Works without the compiled extension.
  'ext'    our ops: torch.ops.gptmod.rope, .swiglu, .rms_norm / .add_rms_norm (with autograd)
           in training and prefill, .cross_entropy for the training loss, .kv_cache_write and
           .decode_attention in cached generation. Attention in the
           uncached (training) forward is SDPA in both backends: decode_attention has no backward.

Generation keeps a static KV cache (KVCache, written in place); the residual stream is kept
2-D [B·T, C] (plain matmuls). Every layer's forward takes x and one Context (sizes, backend, RoPE
tables, and for the cached forward the cache rows and lengths). How a cached forward runs (the
fused CPU decode step, torch.compile, or these layers) is not the model's business: decode.py
decides it (`model.decoder`), and GPT.cached_step is the plain step it falls back to.

Ideas from nanoGPT (init, layout), litgpt (config flags), gpt-fast (static KV cache) and Hugging
Face's modeling_llama (RoPE convention, GQA head mapping); no code is copied.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _ext, decode, reference, sampling

# -----------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class GPTConfig:
    """Every architectural switch of the model. Sizes left at None are derived in __post_init__."""
    vocab_size: int = 50304
    block_size: int = 1024          # the longest sequence (prompt + generated tokens)
    n_layer: int = 12
    n_head: int = 12                # query heads
    n_kv_head: Optional[int] = None  # key/value heads (GQA); None = n_head (MHA); 1 = MQA
    n_embd: int = 768
    head_dim: Optional[int] = None  # None = n_embd // n_head
    ffn_hidden: Optional[int] = None  # None: 4·n_embd (gelu), or 8/3·n_embd up to a multiple of 64 (swiglu)
    pos_emb: str = "rope"           # 'rope' | 'learned'
    rope_base: float = 10000.0
    rope_interleaved: bool = False  # False: half-split pairs (i, i + D/2) as Llama/HF; True: (2i, 2i+1)
    norm: str = "rmsnorm"           # 'rmsnorm' | 'layernorm'
    norm_eps: float = 1e-5
    norm_bias: Optional[bool] = None  # LayerNorm biases; None = as `bias` (RMSNorm has none)
    mlp: str = "swiglu"             # 'swiglu' (one fused gate|up projection) | 'gelu'
    gelu_approx: str = "tanh"       # the GELU: 'tanh' (GPT-2, HF gelu_new) | 'none' (exact erf, nanoGPT)
    parallel_block: bool = False    # x + attn(norm(x)) + mlp(norm(x)) with one shared norm (GPT-J, PaLM)
    parallel_norms: int = 1         # 2: x + attn(ln_1(x)) + mlp(ln_2(x)) (GPT-NeoX, nanoGPT-moderno)
    bias: bool = False              # biases in every Linear (and LayerNorm, unless norm_bias says)
    tie_embeddings: bool = False    # lm_head shares the token embedding matrix
    logit_softcap: float = 0.0      # > 0: logits = cap·tanh(logits / cap) (Gemma 2); 0 = off
    softcap_in_loss: bool = True    # False: the loss (forward with targets) sees uncapped logits
    qk_norm: bool = False           # RMSNorm of each query/key head before RoPE (OLMo 2, Qwen 3)
    dropout: float = 0.0
    pad_vocab_multiple: int = 64    # embedding / lm_head rows padded up to a multiple of this

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}; "
                                 f"set head_dim explicitly")
            self.head_dim = self.n_embd // self.n_head
        if self.ffn_hidden is None:
            if self.mlp == "swiglu":  # same parameter count as a 4x GELU MLP (LLaMA's rule)
                self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.ffn_hidden = 4 * self.n_embd
        checks = [
            (self.pos_emb in ("rope", "learned"), f"pos_emb must be 'rope' or 'learned', got {self.pos_emb!r}"),
            (self.norm in ("rmsnorm", "layernorm"), f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}"),
            (self.mlp in ("swiglu", "gelu"), f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}"),
            (self.gelu_approx in ("tanh", "none"),
             f"gelu_approx must be 'tanh' or 'none', got {self.gelu_approx!r}"),
            (self.parallel_norms in (1, 2), f"parallel_norms must be 1 or 2, got {self.parallel_norms}"),
            (self.n_kv_head > 0 and self.n_head % self.n_kv_head == 0,
             f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"),
            (self.pos_emb != "rope" or self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}"),
            (self.logit_softcap >= 0, f"logit_softcap must be >= 0, got {self.logit_softcap}"),
            (min(self.vocab_size, self.block_size, self.n_layer, self.n_embd, self.pad_vocab_multiple) > 0,
             "vocab_size, block_size, n_layer, n_embd and pad_vocab_multiple must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")

    @property
    def layernorm_bias(self) -> bool:
        """Whether LayerNorms have a bias: norm_bias, or `bias` when that is None."""
        return self.bias if self.norm_bias is None else self.norm_bias

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return m * math.ceil(self.vocab_size / m)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """GPTConfig.from_preset('tiny', vocab_size=4096): a named preset with fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """The inverse of to_dict; unknown keys raise (a config from a different program)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {unknown}")
        return cls(**d)


# The modern architecture (the dataclass defaults): RoPE, RMSNorm, SwiGLU, GQA, no biases,
# untied embeddings (as Llama; maps 1:1 onto LlamaForCausalLM). Only sizes differ between them.
_GPT2_ARCH = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True,
                  tie_embeddings=True, parallel_block=False, norm_eps=1e-5)
PRESETS: dict[str, dict] = {
    # GPT-2 124M exactly (Radford et al. 2019; HF "gpt2").
    # n_kv_head and ffn_hidden follow n_head (MHA) and 4·n_embd when sizes are overridden.
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                 **_GPT2_ARCH),
    # The default: the modern architecture at GPT-2 124M's size (12 x 768, 12 query / 4 KV heads).
    "modern": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_kv_head=4,
                   n_embd=768),
    # Learns something in the default ~10 minute CPU training run (about 3M non-embedding params).
    "tiny": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256),
    # The benchmark size: 6 x 384, 6 query / 2 KV heads (about 9.4M non-embedding params).
    "small": dict(vocab_size=4096, block_size=512, n_layer=6, n_head=6, n_kv_head=2, n_embd=384),
    # GPT-2 medium's size (24 x 1024, 350M class) with the modern architecture.
    "medium": dict(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_kv_head=4,
                   n_embd=1024),
}
PRESETS["modern-124m"] = PRESETS["modern"]


# -----------------------------------------------------------------------------------------------
# Building blocks


class Norm(nn.Module):
    """RMSNorm (weight only) or LayerNorm (weight, and bias when config.bias)."""

    def __init__(self, dim: int, kind: str, eps: float, bias: bool):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if (bias and kind == "layernorm") else None

    def forward(self, x, backend: str = "torch"):
        if self.kind == "rmsnorm" and backend == "ext":
            # One pass each way (gptmod::rms_norm); under autocast it writes the next matmul's
            # dtype itself, so no cast follows it.
            return torch.ops.gptmod.rms_norm(x, self.weight, self.eps, self._out_dtype(x))[0]
        if self.kind == "rmsnorm":
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def add_forward(self, x, h, backend: str = "torch"):
        """(norm(x + h), x + h): the residual add and this norm in one pass (gptmod::add_rms_norm)
        for RMSNorm on the ext backend when x and h share a dtype (not under autocast, where h
        comes out of a bf16 matmul)."""
        if self.kind == "rmsnorm" and backend == "ext" and h.dtype == x.dtype:
            out, s, _ = torch.ops.gptmod.add_rms_norm(x, h, self.weight, self.eps,
                                                      self._out_dtype(x))
            return out, s
        s = x + h
        return self(s, backend), s

    @staticmethod
    def _out_dtype(x):
        amp = torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32
        return torch.get_autocast_dtype(x.device.type) if amp else None


def _dropout(x, p: float, training: bool):
    # A function, not nn.Dropout: no call at all when it is off (always, in generation).
    return F.dropout(x, p, True) if (training and p > 0) else x


class KVCache:
    """Static K/V buffers for cached generation, allocated once and written in place.

    k[layer], v[layer]: [B, S_max, Hkv, D], the layout decode_attention reads (views of one
    buffer [L, 2, B, S_max, Hkv, D]). seqlens: int32 [B], how many rows of each sequence hold
    valid keys/values; rows at or past a sequence's length may hold anything. Rows of the batch
    are independent slots: a server can reset one (`reset(rows)`) and refill it with another
    request while the others keep decoding. Build it with GPT.new_kv_cache.
    """

    def __init__(self, n_layer, batch_size, max_seq_len, n_kv_head, head_dim, device, dtype):
        self.buffer = torch.zeros(n_layer, 2, batch_size, max_seq_len, n_kv_head, head_dim,
                                  device=device, dtype=dtype)
        self.k = [self.buffer[i, 0] for i in range(n_layer)]
        self.v = [self.buffer[i, 1] for i in range(n_layer)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    @property
    def batch_size(self) -> int:
        return self.buffer.size(2)

    @property
    def max_seq_len(self) -> int:
        return self.buffer.size(3)

    def reset(self, rows: Union[None, int, slice] = None) -> None:
        """Empties rows (all by default): their lengths go to 0; stale K/V are never read."""
        self.seqlens[_as_slice(rows)] = 0

    def copy_prefix(self, src: int, dst: Sequence[int], length: int) -> None:
        """Gives rows dst the first `length` K/V positions of row src, and that length: a
        prompt prefilled once serves several sequences (n choices of one request)."""
        for row in dst:
            self.buffer[:, :, row, :length] = self.buffer[:, :, src, :length]
            self.seqlens[row] = length


def _as_slice(rows) -> slice:
    if rows is None:
        return slice(None)
    if isinstance(rows, int):
        return slice(rows, rows + 1)
    if isinstance(rows, slice):
        return rows
    raise TypeError(f"rows must be None, an int or a slice (views of the cache), got {type(rows)}")


def _packing(lengths: Optional[torch.Tensor], T: int, device) -> Optional[torch.Tensor]:
    """Rows of ragged length (lengths [b] real tokens of T each, right padded): the indices
    of the real tokens in the flattened b·T grid, so the linear layers, norms and MLPs of the
    forward run on those N tokens alone (as vLLM packs varlen batches). None when nothing is
    padded or nothing is real, or for one token per row (decode), where the index ops cost
    more than they save. A batch of prompts of 8..96 tokens pads to nearly twice its tokens."""
    if lengths is None or T == 1:
        return None
    real = torch.arange(T, device=device) < lengths.to(device).view(-1, 1)
    pack = real.view(-1).nonzero().view(-1)  # a host sync; prefill syncs once anyway
    return None if pack.numel() in (0, real.numel()) else pack


@dataclass
class Context:
    """What the layers of one forward pass share besides the residual stream x [B·T, C]
    (or [N, C], the real tokens alone, when `pack` is set).

    The training/evaluation forward sets only the first fields. The cached forward adds the
    cache: layer i writes its new keys/values at rows lens_before[b] + t of cache rows `rows`,
    then its queries attend to rows < lens_after[b] (see CausalSelfAttention.cached_attention).
    """
    B: int                                   # sequences
    T: int                                   # new tokens of each
    backend: str                             # 'ext' | 'torch'
    cos: Optional[torch.Tensor] = None       # RoPE tables [block_size, D/2], fp32 (None: learned)
    sin: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None  # int [B, T] absolute positions; None: 0..T-1
    cache: Optional["KVCache"] = None        # None: the uncached (training) forward
    rows: slice = dataclasses.field(default_factory=lambda: slice(None))  # their cache rows
    lens_before: Optional[torch.Tensor] = None  # int32 [B]: cached rows before this forward
    lens_after: Optional[torch.Tensor] = None   # lens_before + T
    fresh: bool = False                      # every row was empty before: nothing cached to read
    # Ragged prefill: x holds only the real tokens, rows `pack` [N] of the padded B·T grid
    # (see _packing); attention alone works on the grid.
    pack: Optional[torch.Tensor] = None

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V caches [B, S_max, Hkv, D] for this forward's rows."""
        if self.rows == slice(None):
            return self.cache.k[layer], self.cache.v[layer]
        # One indexing of the buffer, not a view of the view cache.k[layer]: inductor replays
        # a view chain of one buffer's aliases wrongly (v came out with 0 rows under compile).
        buf = self.cache.buffer
        return buf[layer, 0, self.rows], buf[layer, 1, self.rows]

    def to_grid(self, x):
        """x [N, W] of the packed real tokens -> [B·T, W], zeros at the padding."""
        grid = x.new_zeros(self.B * self.T, x.size(-1))
        return grid.index_copy_(0, self.pack, x)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with grouped K/V heads: query head h reads KV head h // (Hq / Hkv)."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # which of the KV cache's layers this one reads and writes
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.use_rope = config.pos_emb == "rope"
        self.interleaved = config.rope_interleaved
        self.dropout = config.dropout
        # One fused projection for q|k|v: one matmul instead of three.
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                                bias=config.bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm = Norm(self.head_dim, "rmsnorm", config.norm_eps, False)
            self.k_norm = Norm(self.head_dim, "rmsnorm", config.norm_eps, False)
        else:
            self.q_norm = self.k_norm = None

    def _rope(self, x, ctx: Context):
        if ctx.backend == "ext":
            return torch.ops.gptmod.rope(x, ctx.cos, ctx.sin, ctx.positions, self.interleaved, False)
        return reference.rope(x, ctx.cos, ctx.sin, ctx.positions, self.interleaved)

    def forward(self, x, ctx: Context):
        """x [B·T, C] (the 2-D residual stream of B sequences of T tokens; [N, C] when packed)
        -> the same shape: causal over the T tokens of x (SDPA), or, in the cached forward, over
        the cache as well."""
        B, T = ctx.B, ctx.T
        Hq, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)
        if ctx.pack is not None:
            qkv = ctx.to_grid(qkv)
        # One split, not two slices: its backward is one concatenation, where each slice's
        # backward zero-fills a whole [B·T, (Hq + 2·Hkv)·D] gradient and copies into it.
        qk, v = qkv.split([(Hq + Hkv) * D, Hkv * D], dim=-1)
        v = v.view(B, T, Hkv, D)
        if self.q_norm is not None:
            q = self.q_norm(qk[..., :Hq * D].view(B, T, Hq, D))
            k = self.k_norm(qk[..., Hq * D:].view(B, T, Hkv, D))
            if self.use_rope:
                q, k = self._rope(q, ctx), self._rope(k, ctx)
        else:
            # q and k heads side by side, [B, T, Hq + Hkv, D]: one RoPE call rotates both.
            qk = qk.view(B, T, Hq + Hkv, D)
            if self.use_rope:
                qk = self._rope(qk, ctx)
            q, k = qk.split([Hq, Hkv], dim=2)

        if ctx.cache is None:
            y = self.causal_attention(q, k, v)
        else:
            y = self.cached_attention(q, k, v, ctx)
        y = y.reshape(B * T, Hq * D)
        if ctx.pack is not None:
            y = y.index_select(0, ctx.pack)
        y = self.c_proj(y)
        return _dropout(y, self.dropout, self.training)

    def causal_attention(self, q, k, v):
        """q [B, T, Hq, D], k, v [B, T, Hkv, D] -> [B, T, Hq, D]: causal over these T tokens."""
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        return y.transpose(1, 2)

    def cached_attention(self, q, k, v, ctx: Context):
        """q [B, T, Hq, D], the new k, v [B, T, Hkv, D] -> y [B, T, Hq, D]: appends k, v to this
        layer's cache at rows lens_before[b] + t, then attends over rows < lens_after[b]."""
        k_cache, v_cache = ctx.kv(self.layer)
        ext = ctx.backend == "ext"
        (torch.ops.gptmod.kv_cache_write if ext else reference.kv_cache_write)(
            k_cache, v_cache, k, v, ctx.lens_before)
        if ctx.fresh:
            # Prefill into empty rows (generate, the sampler, a new request): the cache holds
            # nothing else, so causal attention over the new tokens, by a kernel made for many
            # queries (flash / efficient attention on GPU). Right padding of ragged rows comes
            # after their real tokens, so causality keeps it out. decode_attention is for few
            # queries over a long cache: decode steps and chunks appended to a non-empty row.
            return self.causal_attention(q, k, v)
        scale = 1.0 / math.sqrt(self.head_dim)
        if ext:
            return torch.ops.gptmod.decode_attention(q, k_cache, v_cache, ctx.lens_after, scale, 0.0, 0)
        return reference.decode_attention(q, k_cache, v_cache, ctx.lens_after, scale)


class MLP(nn.Module):
    """SwiGLU with one fused gate|up projection [2F] (our swiglu op), or GELU: the tanh form of
    GPT-2 or the exact erf form of nanoGPT's nn.GELU() (config.gelu_approx)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        self.gelu_approx = config.gelu_approx
        width = 2 * config.ffn_hidden if self.kind == "swiglu" else config.ffn_hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, ctx: Context):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate=self.gelu_approx)
        elif ctx.backend == "ext":
            h = torch.ops.gptmod.swiglu(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        h = self.c_proj(h)
        return _dropout(h, self.dropout, self.training)


def _norm(config: GPTConfig) -> Norm:
    return Norm(config.n_embd, config.norm, config.norm_eps, config.layernorm_bias)


class Block(nn.Module):
    """Pre-norm transformer block: sequential (GPT-2, Llama), or parallel with one shared norm
    (GPT-J, PaLM) or with one norm per branch (GPT-NeoX, nanoGPT-moderno)."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.parallel = config.parallel_block
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config, layer)
        # A shared-norm parallel block feeds one normalized input to both branches.
        shared = self.parallel and config.parallel_norms == 1
        self.ln_2 = None if shared else _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, ctx: Context):
        if self.parallel:
            h = self.ln_1(x, ctx.backend)
            h2 = h if self.ln_2 is None else self.ln_2(x, ctx.backend)
            return x + self.attn(h, ctx) + self.mlp(h2, ctx)
        h, x = self.ln_2.add_forward(x, self.attn(self.ln_1(x, ctx.backend), ctx), ctx.backend)
        return x + self.mlp(h, ctx)


# -----------------------------------------------------------------------------------------------
# The model

Prompts = Union[torch.Tensor, Sequence[Sequence[int]]]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend: str = "torch"):
        super().__init__()
        self.config = config
        Vp = config.padded_vocab_size  # rows past vocab_size are never looked up nor returned
        self.wte = nn.Embedding(Vp, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, Vp, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.pos_emb == "rope":
            cos, sin = reference.rope_cache(config.block_size, config.head_dim, config.rope_base)
        else:
            cos = sin = None
        # Not saved in checkpoints (derived from the config); kept fp32 by _apply below.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._backend = "torch"
        self.backend = backend
        # How cached forward calls run (the fused CPU step, torch.compile or the plain layers)
        # is decided by decode.py, which keeps what it needs there, not in the model.
        self.decoder = decode.Decoder()
        self.reset_parameters()

    # -- backend ----------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """'ext' (our compiled ops) or 'torch' (pure PyTorch); switch at any time."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        # 'auto' picks ext when it can run on the model's device; an 'ext' that cannot raises
        # ExtensionNotAvailable with the reason (_ext.resolve_backend decides, for everyone).
        self._backend = _ext.resolve_backend(name, self.device).name

    # -- init, sizes ------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02) everywhere, residual output projections N(0, 0.02/sqrt(2L))
        (each block adds two of them to the residual stream), zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, Norm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=std)
        V = self.config.vocab_size
        self.wte.weight[V:].zero_()
        self.lm_head.weight[V:].zero_()

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) casts every floating buffer; the RoPE tables must stay fp32 (the ops
        # require it, and bf16 angles would blur positions), so rebuild them after a cast.
        super()._apply(fn, recurse)
        if self.rope_cos is not None and self.rope_cos.dtype != torch.float32:
            c = self.config
            self.rope_cos, self.rope_sin = reference.rope_cache(
                c.block_size, c.head_dim, c.rope_base, device=self.rope_cos.device)
        return self

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (tied weights once). exclude_embeddings drops the token and
        position tables and an untied lm_head (Kaplan et al.'s non-embedding count)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6·N + 12·L·H·D·T,
        N the parameters used in matmuls (non-embedding + lm_head), T the sequence length
        (block_size by default). Divide achieved FLOP/s by peak for MFU."""
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        n_matmul = self.num_params(exclude_embeddings=True) + self.lm_head.weight.numel()
        return 6.0 * n_matmul + 12.0 * c.n_layer * c.n_head * c.head_dim * T

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    # -- forward ----------------------------------------------------------------------------

    def _embed(self, idx, positions=None):
        """Token (+ learned position) embeddings of idx [B, T] as the residual stream [B·T, C].

        The stream stays 2-D through the blocks so every Linear is one plain matmul with no
        reshapes around it: decoding a token at a time on a CPU is bound by per-op overhead."""
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.size(1), device=idx.device) if positions is None
                             else positions)
        return _dropout(x.view(-1, x.size(-1)), self.config.dropout, self.training)

    def _logits(self, x, ctx: Context, capped: bool = True):
        logits = self.lm_head(self.ln_f(x, ctx.backend))
        if logits.size(-1) != self.config.vocab_size:  # a slice's backward zero-fills [B·T, V]
            logits = logits[..., :self.config.vocab_size]
        cap = self.config.logit_softcap
        if cap > 0 and capped:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_logits: bool = True):
        """idx [B, T] token ids -> (logits [B, T, vocab_size], loss or None).

        loss is the mean cross-entropy against targets [B, T] (computed in fp32); targets equal
        to -1 are ignored. Causal attention over the T tokens; T <= block_size.
        The soft-cap applies alike with and without targets, except with softcap_in_loss=False
        (nanoGPT-moderno's rule): then the logits and loss of a call with targets are uncapped.
        return_logits=False with targets gives (None, loss): a training step that only needs
        the loss skips the capped copy of the logits (a tanh over [B·T, V], about a fifth of a
        soft-capped step on a CPU).
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size="
                             f"{self.config.block_size}")
        ctx = Context(B, T, self._backend, self.rope_cos, self.rope_sin)
        x = self._embed(idx)
        for block in self.h:
            x = block(x, ctx)
        cap = self.config.logit_softcap if self.config.softcap_in_loss else 0.0
        if targets is not None and self._backend == "ext":
            # gptmod::cross_entropy caps the raw logits itself and keeps no [B·T, V] fp32 copy.
            raw = self._logits(x, ctx, capped=False)
            loss = torch.ops.gptmod.cross_entropy(raw, targets.reshape(-1), cap, -1)[0]
            if not return_logits:
                return None, loss
            logits = raw if cap == 0 else cap * torch.tanh(raw / cap)
            return logits.view(B, T, -1), loss
        capped = targets is None or self.config.softcap_in_loss
        logits = self._logits(x, ctx, capped).view(B, T, -1)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return (logits if return_logits or targets is None else None), loss

    # -- KV cache: the low-level API for generation and the server ------------------------

    def new_kv_cache(self, batch_size: int, max_seq_len: Optional[int] = None, device=None,
                     dtype=None) -> KVCache:
        """An empty KVCache for batch_size sequences of up to max_seq_len tokens (block_size by
        default) on the model's device and dtype unless given."""
        max_seq_len = self.config.block_size if max_seq_len is None else max_seq_len
        if max_seq_len > self.config.block_size:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds block_size={self.config.block_size}")
        c = self.config
        return KVCache(c.n_layer, batch_size, max_seq_len, c.n_kv_head, c.head_dim,
                       device or self.device, dtype or self.dtype)

    @torch.inference_mode()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache, rows: Union[None, int, slice] = None,
                       lengths: Optional[torch.Tensor] = None,
                       all_logits: bool = False) -> torch.Tensor:
        """Appends idx [b, T] to cache rows `rows` and returns next-token logits [b, vocab_size].

        rows: None (every row, b = cache.batch_size), an int or a slice of the cache's rows
        (a contiguous range, so the cache is used through views). Each selected row i receives
        its tokens at its own current length cache.seqlens[i] onwards (prefill with a whole
        prompt, then one token per step; both go through this call).
        lengths: int [b] or None. Row i's real tokens are idx[i, :lengths[i]] (right padding
        after them); its logits are taken at position lengths[i] - 1 and its length advances
        by lengths[i], so the next call overwrites the padding. None means all T are real.
        all_logits: return logits [b, T, vocab_size] for every position instead (prompt
        logprobs from the one prefill pass); padding positions hold arbitrary values.
        Raises ValueError if a row would pass cache.max_seq_len. Runs under inference_mode.
        """
        rows = _as_slice(rows)
        T = idx.size(1)
        longest = int(cache.seqlens[rows].max())  # the one host sync of the call
        if longest + T > cache.max_seq_len:
            raise ValueError(f"forward_cached: {T} more tokens do not fit the cache "
                             f"(max_seq_len={cache.max_seq_len}, longest row {longest})")
        return self.decoder.bind(self)(idx, cache, rows, lengths, all_logits, longest == 0)

    def compile_decode(self, quantize: Optional[str] = None) -> "GPT":
        """Switches cached decoding (forward_cached, generate, the server's engine) to its
        fastest path on the current device: on CPUs with the ext backend the fused decode step
        (the default there already), elsewhere the cached step through torch.compile (our ops
        through their fake kernels). quantize='int8': the fused step reads int8 weights
        (quantized once, here; a ValueError where it cannot run). See decode.py; greedy tokens
        stay those of the plain step (of the int8-rounded weights with quantize), and calling it
        again changes nothing."""
        self.decoder.compile(self, quantize)
        return self

    def cached_step(self, idx, cache: KVCache, rows: slice, lengths=None, all_logits=False,
                    fresh=False, pack=True):
        """The plain cached forward through the layers: forward_cached's body with no size
        check (generate checks the sizes once, up front), the step decode.py runs when it does
        not run its fused one. fresh: the caller knows every row was empty (Context.fresh), so
        no layer has to ask the device. pack=False never
        packs ragged rows (a torch.compile'd step: a pack's size would recompile per batch)."""
        b, T = idx.shape
        pack = _packing(lengths, T, idx.device) if pack else None
        lens_before = cache.seqlens if rows == slice(None) else cache.seqlens[rows]
        lens_after = lens_before + T
        if T == 1:
            positions = lens_before.view(b, 1)
        else:
            positions = lens_before.view(b, 1) + torch.arange(T, device=idx.device, dtype=torch.int32)
        ctx = Context(b, T, self._backend, self.rope_cos, self.rope_sin, positions, cache, rows,
                      lens_before, lens_after, fresh, pack)
        x = self._embed(idx, positions)
        if pack is not None:
            x = x.index_select(0, pack)
        for block in self.h:
            x = block(x, ctx)
        if lengths is None:
            if T > 1 and not all_logits:
                x = x.view(b, T, -1)[:, -1]
            lens_before.copy_(lens_after)
        else:
            lengths = lengths.to(device=idx.device)
            if not all_logits and pack is None:
                x = x.view(b, T, -1)[torch.arange(b, device=idx.device), lengths.long() - 1]
            elif not all_logits:  # each row's last real token in the packed stream (any for length 0)
                x = x[(lengths.long().cumsum(0) - 1).clamp(min=0)]
            lens_before.add_(lengths.to(torch.int32))
        logits = self._logits(x, ctx)
        if not all_logits:
            return logits
        return (logits if pack is None else ctx.to_grid(logits)).view(b, T, -1)

    # -- generation -------------------------------------------------------------------------

    def _prepare_prompts(self, idx: Prompts):
        """Prompts as a right-padded LongTensor [B, T_max] on the model's device, plus the true
        lengths (LongTensor [B], or None when all are T_max long) and the longest length."""
        if isinstance(idx, torch.Tensor):
            if idx.dim() != 2 or idx.size(1) == 0:
                raise ValueError(f"idx must be a LongTensor [B, T] with T >= 1, got shape {tuple(idx.shape)}")
            return idx.to(self.device, torch.long), None, idx.size(1)
        prompts = [list(p) for p in idx]
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        T = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts])
        if bool((lengths == T).all()):
            lengths = None
        return tokens.to(self.device), (None if lengths is None else lengths.to(self.device)), T

    @torch.inference_mode()
    def generate_stream(self, idx: Prompts, max_new_tokens: int,
                        params: Optional[sampling.SamplingParams] = None,
                        eos_id: Optional[int] = None, use_cache: bool = True,
                        **settings) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (tokens, finished) once per step: tokens LongTensor [B], the new token of each
        row (eos_id for rows that finished earlier); finished BoolTensor [B], the rows that have
        produced eos_id (at this step or before). Stops after max_new_tokens steps, or as soon
        as every row has finished. Arguments as in generate()."""
        params = sampling.SamplingParams(**settings) if params is None \
            else dataclasses.replace(params, **settings)
        tokens, lengths, T = self._prepare_prompts(idx)
        B = tokens.size(0)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} = "
                             f"{T + max_new_tokens} exceeds block_size {self.config.block_size}; "
                             f"shorten the prompt or ask for fewer tokens")
        if max_new_tokens == 0:
            return
        generator = sampling.make_generator(params.seed, self.device)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        tracker = (sampling.PenaltyTracker(params, tokens, lengths, self.config.vocab_size)
                   if params.penalized else None)
        if use_cache:
            cache = self.new_kv_cache(B, T + max_new_tokens)
            run_step = self.decoder.bind(self)
            logits = run_step(tokens, cache, slice(None), lengths, False, True)  # fresh
        else:
            # Every step reruns the whole (right-padded) sequences: causal attention means the
            # padding after a row's last real token never changes that token's logits.
            buf = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=self.device)
            buf[:, :T] = tokens
            cur = torch.full((B,), T, device=self.device) if lengths is None else lengths.clone()
            rows = torch.arange(B, device=self.device)
        for step in range(max_new_tokens):
            if not use_cache:
                logits = self(buf[:, :T + step])[0][rows, cur - 1]
            if tracker is not None:
                logits = tracker.apply(logits)
            nxt = sampling.sample(logits, params.temperature, params.top_k, params.top_p,
                                  params.min_p, generator)
            if tracker is not None:
                tracker.update(nxt)
            if eos_id is not None:
                nxt.masked_fill_(finished, eos_id)
                finished |= nxt == eos_id
            yield nxt, finished.clone()
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                return
            if use_cache:
                logits = run_step(nxt.view(B, 1), cache, slice(None), None)
            else:
                buf[rows, cur] = nxt
                cur += 1

    def generate(self, idx: Prompts, max_new_tokens: int,
                 params: Optional[sampling.SamplingParams] = None, eos_id: Optional[int] = None,
                 use_cache: bool = True, **settings):
        """Continues each prompt by up to max_new_tokens tokens.

        idx: LongTensor [B, T], or a list of token lists of different lengths (ragged; they are
        right-padded internally and no padding is ever attended to).
        params: a sampling.SamplingParams, and/or its fields as keywords (temperature=0.8,
        top_k=50, seed=0, presence_penalty=0.5, ...; keywords replace the record's fields), the
        one record of sampling settings the sampler and the server take too. temperature 0 is
        greedy; otherwise penalties and logit bias, temperature, top_k, top_p, min_p shape the
        distribution (sampling.py) and a torch.Generator seeded with `seed` draws (same seed,
        same tokens; the global RNG is never used). Its text fields (stop, logprobs, n, ...)
        and max_tokens are the sampler's and the server's: here max_new_tokens counts.
        eos_id: a row that produces it is finished: its later positions hold eos_id while the
        other rows go on; generation stops early once every row has finished.
        use_cache=False recomputes the whole prefix at every step (greedy results are equal).
        Context rule: prompt length + max_new_tokens must be <= block_size, otherwise
        ValueError (nothing is cropped silently). Call model.eval() first if dropout > 0.

        Returns for a tensor idx: LongTensor [B, T + n], the prompts followed by the n <=
        max_new_tokens generated steps (n < max_new_tokens only when every row hit eos_id).
        For a list: a list of token lists, each prompt followed by its generated tokens, up to
        and including its first eos_id.
        """
        steps = [tok for tok, _ in self.generate_stream(idx, max_new_tokens, params, eos_id,
                                                          use_cache, **settings)]
        new = (torch.stack(steps, dim=1) if steps
               else torch.zeros(len(idx), 0, dtype=torch.long, device=self.device))
        if isinstance(idx, torch.Tensor):
            return torch.cat([idx.to(new.device, torch.long), new], dim=1)
        out = []
        for prompt, row in zip(idx, new.tolist()):
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            out.append(list(prompt) + row)
        return out
