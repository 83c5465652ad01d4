"""Pure-PyTorch implementations of every gptmod op.

They serve as the `torch` backend of the model (readable, no extension needed) and as a second
opinion in the tests. Each follows the contract of docs/design.md section 2 exactly; they compute in
the input dtype like eager PyTorch code would (tests feed them float64 for a reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rope_cache(max_pos: int, head_dim: int, base: float = 10000.0, device=None):
    """cos, sin tables [max_pos, head_dim // 2] in fp32: angle[p, i] = p * base^(-2i / head_dim)."""
    if head_dim % 2:
        raise ValueError(f"rope_cache: head_dim must be even, got {head_dim}")
    # float64 angles, rounded once: positions in the tens of thousands keep full fp32 accuracy.
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(max_pos, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def _gather_angles(table: torch.Tensor, positions: torch.Tensor | None, T: int) -> torch.Tensor:
    """cos or sin rows for each token, shaped to broadcast over x [B, T, H, D/2]."""
    if positions is None:
        return table[:T][None, :, None, :]
    rows = table[positions.long()]  # [T, D/2] or [B, T, D/2]
    return rows[None, :, None, :] if positions.dim() == 1 else rows[:, :, None, :]


def rope(x, cos, sin, positions=None, interleaved=False, inverse=False):
    """Rotates pairs of x [B, T, H, D]: (i, i + D/2) by default, (2i, 2i + 1) if interleaved."""
    c = _gather_angles(cos, positions, x.shape[1]).to(x.dtype)
    s = _gather_angles(sin, positions, x.shape[1]).to(x.dtype)
    if inverse:
        s = -s
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    if interleaved:
        return torch.stack((y1, y2), dim=-1).flatten(-2)
    return torch.cat((y1, y2), dim=-1)


def swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(grad_out, gate_up):
    g, u = gate_up.chunk(2, dim=-1)
    s = torch.sigmoid(g)
    d_up = grad_out * g * s
    d_gate = grad_out * u * s * (1 + g * (1 - s))
    return torch.cat((d_gate, d_up), dim=-1)


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale, softcap=0.0, num_splits=0):
    """Causal (bottom-right) GQA attention of q [B, Tq, Hq, D] over ragged caches [B, S, Hkv, D]."""
    B, Tq, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    lens = cache_seqlens.to(torch.long)
    pos = torch.arange(S, device=q.device)
    q_pos = lens[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :]  # [B, Tq]
    allowed = pos[None, None, :] <= q_pos[:, :, None]  # [B, Tq, S]
    # Rows past a sequence's length may hold NaN; masking alone would let NaN * 0 through.
    valid = (pos[None, :] < lens[:, None])[:, :, None, None]
    k = torch.where(valid, k_cache, 0).transpose(1, 2)  # [B, Hkv, S, D]
    v = torch.where(valid, v_cache, 0).transpose(1, 2)
    qt = q.transpose(1, 2)  # [B, Hq, Tq, D]
    if softcap <= 0:  # 0 or negative: off, as in both kernels
        out = F.scaled_dot_product_attention(qt, k, v, attn_mask=allowed[:, None], scale=scale,
                                             enable_gqa=True)
    else:
        G = Hq // Hkv
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        # fp32 scores for half types (as the kernels), fp64 kept for fp64 inputs.
        scores = (qt @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~allowed[:, None], -math.inf)
        out = (scores.softmax(dim=-1).to(v.dtype) @ v)
    return out.transpose(1, 2).contiguous()


def kv_cache_write(k_cache, v_cache, k_new, v_new, cache_seqlens):
    """Writes k_new/v_new [B, Tn, Hkv, D] at rows cache_seqlens[b] + t of each sequence, in place."""
    B, Tn = k_new.shape[:2]
    rows = cache_seqlens.to(torch.long)[:, None] + torch.arange(Tn, device=k_new.device)[None, :]
    batch = torch.arange(B, device=k_new.device)[:, None].expand(B, Tn)
    k_cache[batch, rows] = k_new
    v_cache[batch, rows] = v_new


def quantize_int8(weight, group_size: int):
    """(q [out, in] int8, scales [out, ceil(in / group_size)] fp32): the int8 weights of
    pack_linear_int8 before its layout. Symmetric, per output and group of group_size inputs:
    scale = max|w| / 127, q = round(w / scale) (half to even), 0 where a group is all zeros.
    The activations of an int8 matvec are quantized by the same rule, per row."""
    M, K = weight.shape
    Kp = -(-K // group_size) * group_size
    w = F.pad(weight.float(), (0, Kp - K)).view(M, Kp // group_size, group_size)
    scales = w.abs().amax(-1) / 127
    s = scales[..., None]
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1)), 0)
    return q.to(torch.int8).view(M, Kp)[:, :K], scales


def dequantize_int8(q, scales, group_size: int):
    """q * scale, in fp32: the weight an int8 Linear stands for."""
    M, K = q.shape
    return (q.float() * scales.repeat_interleave(group_size, dim=1)[:, :K])


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x, weight, eps, out_dtype=None):
    """(out, rstd) as gptmod::rms_norm: math in fp32 (fp64 for fp64), out in out_dtype."""
    xa = x.to(_acc(x.dtype))
    rstd = torch.rsqrt(xa.pow(2).mean(-1) + eps)
    out = xa * rstd[..., None] * weight.to(xa.dtype)
    return out.to(out_dtype or x.dtype), rstd


def add_rms_norm(x, residual, weight, eps, out_dtype=None):
    """(out, sum, rstd) as gptmod::add_rms_norm: the sum rounded to x's dtype, then normalized."""
    s = x + residual
    out, rstd = rms_norm(s, weight, eps, out_dtype)
    return out, s, rstd


def cross_entropy(logits, targets, softcap=0.0, ignore_index=-1):
    """(mean loss, lse) as gptmod::cross_entropy: soft-cap, then log-softmax in fp32 (fp64)."""
    z = logits.to(_acc(logits.dtype))
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    loss = F.cross_entropy(z.reshape(-1, z.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)
    return loss, lse
