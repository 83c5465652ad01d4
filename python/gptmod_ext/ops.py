"""Python registrations for the gptmod ops: fake (meta) kernels and autograd.

The schemas and the CPU/CUDA kernels are C++ (csrc/ops.cpp, csrc/cpu, csrc/cuda). Here each op
gets a fake kernel, so torch.compile can trace through it, and rope, swiglu, rms_norm,
add_rms_norm and cross_entropy get autograd. The fake
kernels run the same checks as the C++ entry points (ranks, sizes, dtypes, devices), so a bad call
fails the same way while tracing.
"""
from __future__ import annotations

import torch

from . import _ext

AVAILABLE = _ext.AVAILABLE

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


def _check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    _check(t.dim() == 0 or t.stride(-1) == 1 or t.size(-1) == 1,
           f"{op}: {name} must have stride 1 in its last dim, got strides {tuple(t.stride())}")


def check_rope_args(op, x, cos, sin, positions):
    _check(x.dim() == 4, f"{op}: x must be 4-D [B, T, H, D], got {x.dim()}-D")
    _check(x.dtype in _FLOATS, f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    D = x.size(3)
    _check(D % 2 == 0, f"{op}: x head dim D must be even, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check(t.dim() == 2 and t.size(1) == D // 2,
               f"{op}: {name} must be [max_pos, D/2] = [*, {D // 2}], got {tuple(t.shape)}")
        want = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
        _check(t.dtype in want, f"{op}: {name} must be float32 (or float64 with float64 x), got {t.dtype}")
        _check(t.device == x.device, f"{op}: {name} is on {t.device} but x is on {x.device}")
        _check_last_dim_contiguous(op, name, t)
    _check(cos.shape == sin.shape, f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    _check(cos.dtype == sin.dtype, f"{op}: cos ({cos.dtype}) and sin ({sin.dtype}) dtypes differ")
    _check_last_dim_contiguous(op, "x", x)
    if positions is None:
        _check(x.size(1) <= cos.size(0),
               f"{op}: x has T={x.size(1)} tokens but cos/sin only cover {cos.size(0)} positions")
        return
    _check(positions.dtype in (torch.int32, torch.int64),
           f"{op}: positions must be int32 or int64, got {positions.dtype}")
    _check(positions.device == x.device,
           f"{op}: positions is on {positions.device} but x is on {x.device}")
    ok = (positions.dim() == 1 and positions.size(0) == x.size(1)) or (
        positions.dim() == 2 and tuple(positions.shape) == (x.size(0), x.size(1)))
    _check(ok, f"{op}: positions must be [T] or [B, T] = [{x.size(0)}, {x.size(1)}], "
               f"got {tuple(positions.shape)}")


def check_swiglu_args(op, gate_up, grad_out=None):
    _check(gate_up.dim() >= 1, f"{op}: gate_up must have at least 1 dim")
    _check(gate_up.dtype in _FLOATS,
           f"{op}: gate_up must be float32, float16, bfloat16 or float64, got {gate_up.dtype}")
    _check(gate_up.size(-1) % 2 == 0,
           f"{op}: gate_up last dim must be even (2F), got {gate_up.size(-1)}")
    _check_last_dim_contiguous(op, "gate_up", gate_up)
    if grad_out is not None:
        want = (*gate_up.shape[:-1], gate_up.size(-1) // 2)
        _check(tuple(grad_out.shape) == want,
               f"{op}: grad_out must be {want}, got {tuple(grad_out.shape)}")
        _check(grad_out.dtype == gate_up.dtype,
               f"{op}: grad_out dtype {grad_out.dtype} differs from gate_up's {gate_up.dtype}")
        _check(grad_out.device == gate_up.device,
               f"{op}: grad_out is on {grad_out.device} but gate_up is on {gate_up.device}")
        _check_last_dim_contiguous(op, "grad_out", grad_out)


def check_decode_attention_args(op, q, k_cache, v_cache, cache_seqlens):
    _check(q.dim() == 4, f"{op}: q must be 4-D [B, Tq, Hq, D], got {q.dim()}-D")
    _check(k_cache.dim() == 4, f"{op}: k_cache must be 4-D [B, S_max, Hkv, D], got {k_cache.dim()}-D")
    _check(v_cache.dim() == 4, f"{op}: v_cache must be 4-D [B, S_max, Hkv, D], got {v_cache.dim()}-D")
    _check(q.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
           f"{op}: q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(t.dtype == q.dtype, f"{op}: {name} dtype {t.dtype} differs from q's {q.dtype}")
        _check(t.device == q.device, f"{op}: {name} is on {t.device} but q is on {q.device}")
        _check_last_dim_contiguous(op, name, t)
    _check_last_dim_contiguous(op, "q", q)
    B, Tq, Hq, D = q.shape
    _check(tuple(k_cache.shape) == tuple(v_cache.shape),
           f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _check(k_cache.size(0) == B, f"{op}: k_cache batch {k_cache.size(0)} differs from q's {B}")
    _check(k_cache.size(3) == D, f"{op}: k_cache head dim {k_cache.size(3)} differs from q's {D}")
    Hkv = k_cache.size(2)
    _check(Hkv > 0 and Hq % Hkv == 0,
           f"{op}: q heads Hq={Hq} must be a multiple of the cache's KV heads Hkv={Hkv}")
    _check(cache_seqlens.dtype == torch.int32,
           f"{op}: cache_seqlens must be int32, got {cache_seqlens.dtype}")
    _check(cache_seqlens.dim() == 1 and cache_seqlens.size(0) == B,
           f"{op}: cache_seqlens must be [B] = [{B}], got {tuple(cache_seqlens.shape)}")
    _check(cache_seqlens.device == q.device,
           f"{op}: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if q.device.type == "cuda":
        _check(q.dtype != torch.float64,
               f"{op}: q float64 is supported on CPU only, not on {q.device}")
        _check(D <= 256, f"{op}: head dim D must be <= 256 on CUDA, got {D}")


def check_decode_attention_cuda_sizes(q, k_cache, num_splits):
    """The CUDA entry point's grid limits (csrc/cuda/decode_attention.cu), in its order and words:
    a call that traces must not fail when it runs."""
    B, Tq, Hq, _ = q.shape
    S_max, Hkv = k_cache.size(1), k_cache.size(2)
    _check(B <= 65535 and Hkv <= 65535 and B * Hq * Tq < 2 ** 31,
           f"decode_attention: on CUDA B and Hkv must be <= 65535 and B * Tq * Hq < 2^31, got "
           f"B={B}, Hkv={Hkv}, Tq={Tq}, Hq={Hq}")
    # A forced count is capped at S_max rows (the heuristic stays far below the limit).
    splits = min(num_splits, max(S_max, 1))
    _check(splits <= 65535, f"decode_attention: num_splits must be <= 65535 on CUDA, got {splits}")


def check_kv_cache_write_args(op, k_cache, v_cache, k_new, v_new, cache_seqlens):
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        _check(t.dim() == 4, f"{op}: {name} must be 4-D, got {t.dim()}-D")
        _check(t.dtype == k_cache.dtype, f"{op}: {name} dtype {t.dtype} differs from k_cache's {k_cache.dtype}")
        _check(t.device == k_cache.device, f"{op}: {name} is on {t.device} but k_cache is on {k_cache.device}")
        _check_last_dim_contiguous(op, name, t)
    _check(tuple(k_cache.shape) == tuple(v_cache.shape),
           f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _check(tuple(k_new.shape) == tuple(v_new.shape),
           f"{op}: k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} differ")
    B, _, Hkv, D = k_cache.shape
    _check(k_new.size(0) == B and k_new.size(2) == Hkv and k_new.size(3) == D,
           f"{op}: k_new must be [{B}, Tn, {Hkv}, {D}], got {tuple(k_new.shape)}")
    _check(cache_seqlens.dtype == torch.int32 and tuple(cache_seqlens.shape) == (B,),
           f"{op}: cache_seqlens must be int32 [{B}], got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    _check(cache_seqlens.device == k_cache.device,
           f"{op}: cache_seqlens is on {cache_seqlens.device} but k_cache is on {k_cache.device}")


# The default group size of pack_linear_int8 (inputs per scale); README "int8 weights" has the
# measurements behind it.
INT8_GROUP = 64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rms_norm's rstd and cross_entropy's loss/lse come in: fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rms_out_dtype_ok(x_dtype, out_dtype) -> bool:
    return out_dtype == x_dtype or (x_dtype == torch.float32
                                    and out_dtype in (torch.bfloat16, torch.float16))


def check_rms_norm_args(op, x, weight, eps):
    _check(x.dim() >= 1, f"{op}: x must have at least 1 dim")
    _check(x.dtype in _FLOATS,
           f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    _check(weight.dim() == 1 and weight.size(0) == x.size(-1),
           f"{op}: weight must be [C] = [{x.size(-1)}], got {tuple(weight.shape)}")
    _check(weight.dtype in (x.dtype, torch.float32),
           f"{op}: weight must be float32 or x's dtype {x.dtype}, got {weight.dtype}")
    _check(weight.device == x.device, f"{op}: weight is on {weight.device} but x is on {x.device}")
    _check(eps >= 0, f"{op}: eps must be >= 0, got {eps}")
    _check_last_dim_contiguous(op, "x", x)
    _check_last_dim_contiguous(op, "weight", weight)


def check_rms_like_x(op, name, t, x, any_out_dtype):
    _check(t.shape == x.shape,
           f"{op}: {name} must be {tuple(x.shape)} like x, got {tuple(t.shape)}")
    ok = _rms_out_dtype_ok(x.dtype, t.dtype) if any_out_dtype else t.dtype == x.dtype
    _check(ok, f"{op}: {name} dtype {t.dtype} does not go with x's {x.dtype}")
    _check(t.device == x.device, f"{op}: {name} is on {t.device} but x is on {x.device}")
    _check_last_dim_contiguous(op, name, t)


def rms_out_dtype(op, x, out_dtype):
    out = x.dtype if out_dtype is None else out_dtype
    _check(_rms_out_dtype_ok(x.dtype, out), f"{op}: out_dtype must be x's dtype {x.dtype} (or "
           f"bfloat16 / float16 for a float32 x), got {out}")
    return out


def check_rms_norm_backward_args(grad_out, x, weight, rstd, grad_res):
    op = "rms_norm_backward"
    check_rms_norm_args(op, x, weight, 0.0)
    check_rms_like_x(op, "grad_out", grad_out, x, True)
    want = acc_dtype(x.dtype)
    _check(rstd.shape == x.shape[:-1] and rstd.dtype == want,
           f"{op}: rstd must be {want} {tuple(x.shape[:-1])}, got {rstd.dtype} {tuple(rstd.shape)}")
    _check(rstd.device == x.device, f"{op}: rstd is on {rstd.device} but x is on {x.device}")
    if grad_res is not None:
        check_rms_like_x(op, "grad_res", grad_res, x, False)


def check_cross_entropy_args(op, logits, targets, softcap):
    _check(logits.dim() >= 1 and logits.size(-1) > 0,
           f"{op}: logits must be [..., V] with V > 0, got {tuple(logits.shape)}")
    _check(logits.dtype in _FLOATS,
           f"{op}: logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    _check_last_dim_contiguous(op, "logits", logits)
    _check(targets.dtype == torch.int64, f"{op}: targets must be int64, got {targets.dtype}")
    _check(targets.shape == logits.shape[:-1], f"{op}: targets must be "
           f"{tuple(logits.shape[:-1])} (logits' leading dims), got {tuple(targets.shape)}")
    _check(targets.device == logits.device,
           f"{op}: targets is on {targets.device} but logits is on {logits.device}")
    _check(softcap >= 0, f"{op}: softcap must be >= 0 (0 = off), got {softcap}")


def check_cross_entropy_backward_args(grad_loss, logits, targets, lse, softcap):
    op = "cross_entropy_backward"
    check_cross_entropy_args(op, logits, targets, softcap)
    _check(grad_loss.dim() == 0 and grad_loss.dtype in _FLOATS,
           f"{op}: grad_loss must be a 0-d float tensor, got {grad_loss.dtype} "
           f"{tuple(grad_loss.shape)}")
    _check(grad_loss.device == logits.device,
           f"{op}: grad_loss is on {grad_loss.device} but logits is on {logits.device}")
    want = acc_dtype(logits.dtype)
    _check(lse.shape == logits.shape[:-1] and lse.dtype == want,
           f"{op}: lse must be {want} {tuple(logits.shape[:-1])}, got {lse.dtype} "
           f"{tuple(lse.shape)}")
    _check(lse.device == logits.device,
           f"{op}: lse is on {lse.device} but logits is on {logits.device}")


def packed_shape(out_features: int, in_features: int, dtype: torch.dtype, group_size: int = 0) -> tuple:
    """The shape pack_linear gives a [out_features, in_features] weight (csrc/include/gptmod/
    decode_step.h): 16-output blocks, bf16 inputs in pairs; for int8 (pack_linear_int8's first
    result) inputs in quads, padded to a multiple of group_size."""
    blocks = -(-out_features // 16)
    if dtype == torch.int8:
        return (blocks, -(-in_features // group_size) * group_size // 4, 64)
    if dtype == torch.bfloat16:
        return (blocks, -(-in_features // 2), 32)
    return (blocks, in_features, 16)


def int8_scales_shape(out_features: int, in_features: int, group_size: int) -> tuple:
    """The shape of pack_linear_int8's scales: [blocks of 16 outputs, groups, 16] float32."""
    return (-(-out_features // 16), -(-in_features // group_size), 16)


def int8_group(op: str, name: str, packed, scales, out_features: int, in_features: int) -> int:
    """The group size of an int8 pack (from its scales), checked as csrc/cpu/decode_step.cpp does."""
    blocks = -(-out_features // 16)
    _check(scales.dtype == torch.float32 and scales.dim() == 3 and scales.size(0) == blocks
           and scales.size(1) > 0 and scales.size(2) == 16,
           f"{op}: the scales of {name} must be the contiguous float32 CPU scales [{blocks}, groups, 16] "
           f"of pack_linear_int8, got {scales.dtype} {tuple(scales.shape)}")
    groups, P = scales.size(1), packed.size(1) if packed.dim() == 3 else 0
    G = P * 4 // groups
    _check(G > 0 and G * groups == P * 4 and G % 4 == 0 and -(-in_features // G) == groups,
           f"{op}: {name} {tuple(packed.shape)} and its scales {tuple(scales.shape)} are not a "
           f"pack_linear_int8() of a [{out_features}, {in_features}] weight")
    return G


def check_group_size(op: str, group_size: int) -> None:
    _check(group_size > 0 and group_size % 4 == 0 and group_size <= 1024,
           f"{op}: group_size must be a positive multiple of 4 and at most 1024, got {group_size}")


def _last_unit_stride(t):
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()


def _register_training_autograd():
    """Autograd of rms_norm, add_rms_norm and cross_entropy: each backward is its own op, fed
    what the forward saved (rstd, lse), so nothing is recomputed but cheap elementwise math."""

    def rms_setup(ctx, inputs, output):
        x, weight = inputs[0], inputs[1]
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    def rms_backward(ctx, grad_out, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.gptmod.rms_norm_backward(_last_unit_stride(grad_out), x, weight, rstd)
        return dx, dw, None, None

    torch.library.register_autograd("gptmod::rms_norm", rms_backward, setup_context=rms_setup)

    # The norm's input is the sum, so the sum is what is saved; x and residual share its gradient.
    def add_rms_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], inputs[2], output[2])
        ctx.mark_non_differentiable(output[2])

    def add_rms_backward(ctx, grad_out, grad_sum, _grad_rstd):
        s, weight, rstd = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(s)
        grad_sum = None if grad_sum is None else _last_unit_stride(grad_sum)
        ds, dw = torch.ops.gptmod.rms_norm_backward(_last_unit_stride(grad_out), s, weight, rstd,
                                                    grad_sum)
        return ds, ds, dw, None, None

    torch.library.register_autograd("gptmod::add_rms_norm", add_rms_backward,
                                    setup_context=add_rms_setup)

    def ce_setup(ctx, inputs, output):
        logits, targets, softcap, ignore_index = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.softcap, ctx.ignore_index = softcap, ignore_index
        ctx.mark_non_differentiable(output[1])

    def ce_backward(ctx, grad_loss, _grad_lse):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.ops.gptmod.cross_entropy_backward(grad_loss, logits, targets, lse,
                                                       ctx.softcap, ctx.ignore_index)
        return grad, None, None, None

    torch.library.register_autograd("gptmod::cross_entropy", ce_backward, setup_context=ce_setup)


if AVAILABLE:

    @torch.library.register_fake("gptmod::rope")
    def _rope_fake(x, cos, sin, positions=None, interleaved=False, inverse=False):
        check_rope_args("rope", x, cos, sin, positions)
        # The kernels return a new contiguous tensor whatever x's strides (empty_like would keep
        # a transposed x's layout and disagree with them).
        return x.new_empty(x.shape)

    @torch.library.register_fake("gptmod::rope_")
    def _rope_inplace_fake(x, cos, sin, positions=None, interleaved=False, inverse=False):
        check_rope_args("rope_", x, cos, sin, positions)

    @torch.library.register_fake("gptmod::swiglu")
    def _swiglu_fake(gate_up):
        check_swiglu_args("swiglu", gate_up)
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.size(-1) // 2))

    @torch.library.register_fake("gptmod::swiglu_backward")
    def _swiglu_backward_fake(grad_out, gate_up):
        check_swiglu_args("swiglu_backward", gate_up, grad_out)
        return gate_up.new_empty(gate_up.shape)

    @torch.library.register_fake("gptmod::decode_attention")
    def _decode_attention_fake(q, k_cache, v_cache, cache_seqlens, scale, softcap=0.0, num_splits=0):
        check_decode_attention_args("decode_attention", q, k_cache, v_cache, cache_seqlens)
        _check(num_splits >= 0, f"decode_attention: num_splits must be >= 0, got {num_splits}")
        if q.device.type == "cuda":
            check_decode_attention_cuda_sizes(q, k_cache, num_splits)
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("gptmod::kv_cache_write")
    def _kv_cache_write_fake(k_cache, v_cache, k_new, v_new, cache_seqlens):
        check_kv_cache_write_args("kv_cache_write", k_cache, v_cache, k_new, v_new, cache_seqlens)

    # A library built before the decode ops (an old GPTMOD_EXT_LIB_DIR) lacks their schemas.
    if hasattr(torch.ops.gptmod, "decode_step"):

        @torch.library.register_fake("gptmod::pack_linear")
        def _pack_linear_fake(weight):
            _check(weight.dim() == 2, f"pack_linear: weight must be 2-D [out, in], got {weight.dim()}-D")
            _check(weight.dtype in (torch.float32, torch.bfloat16),
                   f"pack_linear: weight must be float32 or bfloat16, got {weight.dtype}")
            return weight.new_empty(packed_shape(*weight.shape, weight.dtype))

        @torch.library.register_fake("gptmod::linear_packed")
        def _linear_packed_fake(x, packed, out_features, scales=None):
            op = "linear_packed"
            _check(x.dim() == 2, f"{op}: x must be 2-D [N, in], got {x.dim()}-D")
            int8 = packed.dtype == torch.int8
            _check(out_features > 0, f"{op}: out_features must be positive, got {out_features}")
            _check(int8 or scales is None, f"{op}: scales are for int8 weights (pack_linear_int8), "
                                           f"but packed is {packed.dtype}")
            group = 0
            if int8:
                _check(scales is not None, f"{op}: packed is int8 (pack_linear_int8) but no scales were given")
                group = int8_group(op, "packed", packed, scales, out_features, x.size(1))
            want = packed_shape(out_features, x.size(1), packed.dtype, group)
            _check(tuple(packed.shape) == want,
                   f"{op}: packed must be a contiguous {'pack_linear_int8' if int8 else 'pack_linear'}() "
                   f"of a [{out_features}, {x.size(1)}] weight, shape {want}, got {tuple(packed.shape)}")
            return x.new_empty((x.size(0), out_features))

    if hasattr(torch.ops.gptmod, "pack_linear_int8"):

        @torch.library.register_fake("gptmod::pack_linear_int8")
        def _pack_linear_int8_fake(weight, group_size=INT8_GROUP):
            op = "pack_linear_int8"
            _check(weight.dim() == 2, f"{op}: weight must be 2-D [out, in], got {weight.dim()}-D")
            _check(weight.dtype in (torch.float32, torch.bfloat16, torch.float16),
                   f"{op}: weight must be float32, bfloat16 or float16, got {weight.dtype}")
            check_group_size(op, group_size)
            M, K = weight.shape
            return (weight.new_empty(packed_shape(M, K, torch.int8, group_size), dtype=torch.int8),
                    weight.new_empty(int8_scales_shape(M, K, group_size), dtype=torch.float32))

    if hasattr(torch.ops.gptmod, "decode_step"):

        @torch.library.register_fake("gptmod::decode_step")
        def _decode_step_fake(x, norms, linears, kv, seqlens, cos, sin, n_head, n_kv_head,
                              ffn_hidden, vocab, eps, softcap=0.0, interleaved=False, scales=None):
            _check(x.dim() == 2, f"decode_step: x must be [B, C], got {tuple(x.shape)}")
            _check(len(linears) == 4 * (len(norms) - 1) // 2 + 1 and len(norms) % 2 == 1,
                   f"decode_step: expected 4L + 1 linears and 2L + 1 norms, got {len(linears)} "
                   f"and {len(norms)}")
            _check(scales is None or len(scales) == len(linears),
                   f"decode_step: scales must hold one tensor per linear (4L + 1 = {len(linears)}), "
                   f"got {len(scales) if scales is not None else 0}")
            _check(kv.dim() == 6 and kv.size(2) == x.size(0) and kv.dtype == x.dtype,
                   f"decode_step: kv must be [L, 2, B, S, Hkv, D] in x's dtype, got "
                   f"{tuple(kv.shape)} {kv.dtype}")
            return x.new_empty((x.size(0), vocab))

    # A library built before the training ops (an old GPTMOD_EXT_LIB_DIR) lacks their schemas.
    if hasattr(torch.ops.gptmod, "rms_norm"):

        @torch.library.register_fake("gptmod::rms_norm")
        def _rms_norm_fake(x, weight, eps, out_dtype=None):
            check_rms_norm_args("rms_norm", x, weight, eps)
            out = rms_out_dtype("rms_norm", x, out_dtype)
            rstd = x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))
            return x.new_empty(x.shape, dtype=out), rstd

        @torch.library.register_fake("gptmod::add_rms_norm")
        def _add_rms_norm_fake(x, residual, weight, eps, out_dtype=None):
            check_rms_norm_args("add_rms_norm", x, weight, eps)
            check_rms_like_x("add_rms_norm", "residual", residual, x, False)
            out = rms_out_dtype("add_rms_norm", x, out_dtype)
            return (x.new_empty(x.shape, dtype=out), x.new_empty(x.shape),
                    x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype)))

        @torch.library.register_fake("gptmod::rms_norm_backward")
        def _rms_norm_backward_fake(grad_out, x, weight, rstd, grad_res=None):
            check_rms_norm_backward_args(grad_out, x, weight, rstd, grad_res)
            return x.new_empty(x.shape), weight.new_empty(weight.shape)

        @torch.library.register_fake("gptmod::cross_entropy")
        def _cross_entropy_fake(logits, targets, softcap=0.0, ignore_index=-1):
            check_cross_entropy_args("cross_entropy", logits, targets, softcap)
            acc = acc_dtype(logits.dtype)
            return logits.new_empty((), dtype=acc), logits.new_empty(targets.shape, dtype=acc)

        @torch.library.register_fake("gptmod::cross_entropy_backward")
        def _cross_entropy_backward_fake(grad_loss, logits, targets, lse, softcap=0.0,
                                         ignore_index=-1):
            check_cross_entropy_backward_args(grad_loss, logits, targets, lse, softcap)
            return logits.new_empty(logits.shape)

        _register_training_autograd()

    # rope is linear in x, an orthogonal rotation: its gradient is the inverse rotation.
    def _rope_setup_context(ctx, inputs, output):
        _, cos, sin, positions, interleaved, inverse = inputs
        ctx.save_for_backward(cos, sin, positions)
        ctx.interleaved, ctx.inverse = interleaved, inverse

    def _rope_backward(ctx, grad):
        cos, sin, positions = ctx.saved_tensors
        dx = torch.ops.gptmod.rope(grad.contiguous(), cos, sin, positions, ctx.interleaved,
                                   not ctx.inverse)
        return dx, None, None, None, None, None

    torch.library.register_autograd("gptmod::rope", _rope_backward,
                                    setup_context=_rope_setup_context)

    # Only gate_up is saved: the backward recomputes sigmoid(gate) instead of storing it.
    def _swiglu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _swiglu_backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        return torch.ops.gptmod.swiglu_backward(grad.contiguous(), gate_up)

    torch.library.register_autograd("gptmod::swiglu", _swiglu_backward,
                                    setup_context=_swiglu_setup_context)

    def _decode_attention_setup_context(ctx, inputs, output):
        pass

    def _decode_attention_backward(ctx, grad):
        raise RuntimeError("decode_attention is inference-only and has no backward; use the "
                           "model's training forward (or the torch backend) for gradients")

    torch.library.register_autograd("gptmod::decode_attention", _decode_attention_backward,
                                    setup_context=_decode_attention_setup_context)


def _require():
    _ext.require()


def rope(x, cos, sin, positions=None, interleaved=False, inverse=False):
    _require()
    return torch.ops.gptmod.rope(x, cos, sin, positions, interleaved, inverse)


def rope_(x, cos, sin, positions=None, interleaved=False, inverse=False):
    _require()
    torch.ops.gptmod.rope_(x, cos, sin, positions, interleaved, inverse)
    return x


def swiglu(gate_up):
    _require()
    return torch.ops.gptmod.swiglu(gate_up)


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale, softcap=0.0, num_splits=0):
    _require()
    return torch.ops.gptmod.decode_attention(q, k_cache, v_cache, cache_seqlens, scale, softcap,
                                             num_splits)


def kv_cache_write(k_cache, v_cache, k_new, v_new, cache_seqlens):
    _require()
    torch.ops.gptmod.kv_cache_write(k_cache, v_cache, k_new, v_new, cache_seqlens)


def rms_norm(x, weight, eps=1e-5, out_dtype=None):
    """(out, rstd): see the rms_norm schema in csrc/ops.cpp."""
    _require()
    return torch.ops.gptmod.rms_norm(x, weight, eps, out_dtype)


def add_rms_norm(x, residual, weight, eps=1e-5, out_dtype=None):
    """(out, sum, rstd) with sum = x + residual and out = rms_norm(sum)."""
    _require()
    return torch.ops.gptmod.add_rms_norm(x, residual, weight, eps, out_dtype)


def cross_entropy(logits, targets, softcap=0.0, ignore_index=-1):
    """(mean loss, lse) of raw logits [..., V], soft-capped inside when softcap > 0."""
    _require()
    return torch.ops.gptmod.cross_entropy(logits, targets, softcap, ignore_index)


def pack_linear(weight):
    _require()
    return torch.ops.gptmod.pack_linear(weight)


def pack_linear_int8(weight, group_size=INT8_GROUP):
    """(packed, scales): weight [out, in] quantized to int8 in groups of group_size inputs, one
    fp32 scale per output and group (reference.quantize_int8 is the same rounding in PyTorch),
    in the blocked layout of the int8 matvec. CPU."""
    _require()
    return torch.ops.gptmod.pack_linear_int8(weight, group_size)


def linear_packed(x, packed, out_features, scales=None):
    """x [N, in] @ W^T for W = pack_linear(W), or W = pack_linear_int8(W) -> (packed, scales)."""
    _require()
    return torch.ops.gptmod.linear_packed(x, packed, out_features, scales)


def pack_decode_linears(weights, quantize=None, group_size=INT8_GROUP):
    """The `linears` (and `scales`) arguments of decode_step from the 4L + 1 Linear weights in
    its order (c_attn, attn c_proj, c_fc, mlp c_proj per layer, then lm_head):
    quantize=None packs them in their own dtype -> (linears, None); quantize="int8" quantizes
    them -> (linears, scales), to pass as decode_step(..., scales=scales)."""
    if quantize is None:
        return [pack_linear(w) for w in weights], None
    _check(quantize == "int8", f"pack_decode_linears: quantize must be None or 'int8', got {quantize!r}")
    packs = [pack_linear_int8(w, group_size) for w in weights]
    return [p for p, _ in packs], [s for _, s in packs]


def cpu_bf16dp() -> bool:
    """Whether bf16 decode matvecs run on AVX512-BF16 (vdpbf16ps) on this CPU."""
    _require()
    return torch.ops.gptmod.cpu_bf16dp()


def cpu_vnni() -> bool:
    """Whether int8 decode matvecs run on AVX512-VNNI (vpdpbusd) on this CPU."""
    _require()
    return torch.ops.gptmod.cpu_vnni()


def cpu_capability() -> str:
    _require()
    return torch.ops.gptmod.cpu_capability()
