"""The CPU decode ops: pack_linear's and pack_linear_int8's layouts, linear_packed against float64,
decode_step against the model's own `torch` backend (the readable reference) and, with int8
weights, against float64 models of the dequantized weights, opcheck, errors, the narrower CPU
builds and the bf16 / int8 paths without AVX512-BF16 / AVX512-VNNI."""
import copy

import pytest
import torch

from gptmod_ext import ops, reference
from gptmod_ext.model import GPT, GPTConfig
from helpers import run_capability_sweep

pytestmark = [pytest.mark.skipif(not ops.AVAILABLE, reason="compiled ops not built"),
              pytest.mark.skipif(ops.AVAILABLE and not hasattr(torch.ops.gptmod, "decode_step"),
                                 reason="the library was built before the decode ops: rebuild it"),
              pytest.mark.usefixtures("one_thread")]

DTYPES = [torch.float32, torch.bfloat16]
# |error| relative to the largest reference value: fp32 accumulation; bf16 rounds x and y.
TOL = {torch.float32: 2e-6, torch.bfloat16: 1.2e-2}
# (N rows, M out, K in): decode (1, 8 rows), a partial block (M % 16), odd K, an empty batch.
MATVEC_SHAPES = [(1, 640, 384), (8, 2048, 384), (3, 37, 19), (5, 16, 1), (2, 1, 64), (0, 32, 8)]


def packed_reference(w):
    """pack_linear's layout written out element by element (gptmod/decode_step.h)."""
    M, K = w.shape
    nb = -(-M // 16)
    if w.dtype == torch.bfloat16:
        P = -(-K // 2)
        out = torch.zeros(nb, P, 32, dtype=w.dtype)
        for n in range(nb):
            for j in range(16):
                if 16 * n + j < M:
                    for k in range(K):
                        out[n, k // 2, 2 * j + k % 2] = w[16 * n + j, k]
        return out
    out = torch.zeros(nb, K, 16, dtype=w.dtype)
    for n in range(nb):
        for j in range(min(16, M - 16 * n)):
            out[n, :, j] = w[16 * n + j]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 19), (16, 4), (1, 3)], ids=str)
def test_pack_linear_layout(shape, dtype):
    w = torch.randn(shape).to(dtype)
    packed = ops.pack_linear(w)
    assert tuple(packed.shape) == ops.packed_shape(*shape, dtype)
    assert torch.equal(packed, packed_reference(w))


def check_linear_packed(N, M, K, dtype):
    torch.manual_seed(N * 1000 + M + K)
    w = torch.randn(M, K).to(dtype)
    x = torch.randn(N, K).to(dtype)
    y = ops.linear_packed(x, ops.pack_linear(w), M)
    assert y.dtype == dtype and y.shape == (N, M)
    ref = x.double() @ w.double().t()
    scale = max(ref.abs().max().item(), 1.0) if N else 1.0
    assert (y.double() - ref).abs().max().item() <= TOL[dtype] * scale if N else True
    # fp32 activations with bf16 weights (the fused step's case) return fp32.
    if dtype == torch.bfloat16 and N:
        y32 = ops.linear_packed(x.float(), ops.pack_linear(w), M)
        assert y32.dtype == torch.float32
        assert (y32.double() - ref).abs().max().item() <= 8e-3 * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MATVEC_SHAPES, ids=str)
def test_linear_packed_matches_float64(shape, dtype):
    check_linear_packed(*shape, dtype)


# -- decode_step against the model's torch backend ----------------------------------------------

ARCHS = {
    "gqa": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2),
    "mha_softcap_interleaved": dict(n_layer=3, n_embd=96, n_head=3, logit_softcap=5.0,
                                    rope_interleaved=True, tie_embeddings=True),
    "mqa_d48_odd_ffn": dict(n_layer=1, n_embd=96, n_head=2, n_kv_head=1, ffn_hidden=77),
}


def make_model(arch, dtype):
    torch.manual_seed(3)
    m = GPT(GPTConfig(vocab_size=101, block_size=48, **ARCHS[arch])).to(dtype).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(10)
    return m


def check_decode_step(arch, dtype, B=3, prompt=5, steps=4):
    """Prefill with the torch backend, then decode `steps` tokens with the fused step on one
    copy of the cache and with the torch backend's own cached forward on another."""
    from gptmod_ext.decode import FusedDecode
    m = make_model(arch, dtype)
    assert FusedDecode.unsupported(m) is None
    idx = torch.randint(0, 101, (B, prompt))
    m.backend = "torch"
    ref_cache, cache = m.new_kv_cache(B, 16), m.new_kv_cache(B, 16)
    m.forward_cached(idx, ref_cache)
    m.forward_cached(idx, cache)
    fused = FusedDecode(m)
    tok = torch.randint(0, 101, (B, 1))
    for _ in range(steps):
        ref = m.forward_cached(tok, ref_cache)
        with torch.inference_mode():
            got = fused.step(m, tok, cache, slice(None))
        assert got.dtype == dtype and got.shape == ref.shape
        scale = ref.float().abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert (got.float() - ref.float()).abs().max().item() <= tol * scale, arch
        assert torch.equal(cache.seqlens, ref_cache.seqlens)
        torch.testing.assert_close(cache.buffer.float(), ref_cache.buffer.float(),
                                   rtol=tol, atol=tol)
        tok = ref.argmax(-1, keepdim=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_decode_step_matches_torch_backend(arch, dtype):
    check_decode_step(arch, dtype)


def test_decode_step_on_cache_rows():
    # A server decodes a slice of its slots: the step reads and writes only those rows.
    from gptmod_ext.decode import FusedDecode
    m = make_model("gqa", torch.float32)
    cache = m.new_kv_cache(4, 16)
    m.forward_cached(torch.randint(0, 101, (4, 3)), cache)
    before = cache.buffer.clone()
    tok = torch.randint(0, 101, (2, 1))
    ref_cache = m.new_kv_cache(4, 16)
    ref_cache.buffer.copy_(cache.buffer)
    ref_cache.seqlens.copy_(cache.seqlens)
    ref = m.forward_cached(tok, ref_cache, rows=slice(1, 3))
    with torch.inference_mode():
        got = FusedDecode(m).step(m, tok, cache, slice(1, 3))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert cache.seqlens.tolist() == [3, 4, 4, 3]
    assert torch.equal(cache.buffer[:, :, 0], before[:, :, 0])
    assert torch.equal(cache.buffer[:, :, 3], before[:, :, 3])


def test_decode_step_with_rows_riding_along():
    # The server's decode step: free and prefilling slots between decoding ones come with
    # length 0; their logits are ignored and their lengths must not move.
    from gptmod_ext.decode import FusedDecode
    m = make_model("gqa", torch.float32)
    cache, ref_cache = m.new_kv_cache(4, 16), m.new_kv_cache(4, 16)
    for c in (cache, ref_cache):
        m.forward_cached(torch.randint(0, 101, (4, 3), generator=torch.Generator().manual_seed(1)), c)
    lengths = torch.tensor([1, 0, 1, 0])
    tok = torch.randint(0, 101, (4, 1))
    m.backend = "torch"
    ref = m.forward_cached(tok, ref_cache, lengths=lengths)
    with torch.inference_mode():
        got = FusedDecode(m).step(m, tok, cache, slice(None), lengths)
    torch.testing.assert_close(got[[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-5)
    assert cache.seqlens.tolist() == ref_cache.seqlens.tolist() == [4, 3, 4, 3]
    torch.testing.assert_close(cache.buffer[:, :, :, :4], ref_cache.buffer[:, :, :, :4])


# -- int8 weights ------------------------------------------------------------------------------

GROUPS = [4, 32, 64, 128]
# (N rows, M out, K in, group): decode, a partial block, K cut inside a group, K below one group,
# many groups, an empty batch.
INT8_SHAPES = [(1, 640, 384, 64), (8, 2048, 384, 32), (3, 37, 19, 8), (5, 16, 1, 4),
               (9, 100, 200, 128), (4, 48, 1024, 1024), (0, 32, 8, 4)]


def quantize_reference(w, G):
    """Symmetric int8 per (output, group of G inputs), written out group by group in float64
    (scale = max|w| / 127 rounded to fp32, q = w / scale rounded half to even)."""
    M, K = w.shape
    q = torch.zeros(M, K, dtype=torch.int8)
    s = torch.zeros(M, -(-K // G))
    for g in range(s.size(1)):
        blk = w[:, g * G:(g + 1) * G].float()
        s[:, g] = blk.abs().amax(1) / 127
        for m in range(M):
            if s[m, g] > 0:
                q[m, g * G:(g + 1) * G] = torch.round(blk[m] / s[m, g]).to(torch.int8)
    return q, s


def int8_packed_reference(q, s, G):
    """pack_linear_int8's layout written out element by element (gptmod/decode_step.h)."""
    M, K = q.shape
    nb, Kp = -(-M // 16), -(-K // G) * G
    packed = torch.zeros(nb, Kp // 4, 64, dtype=torch.int8)
    scales = torch.zeros(nb, Kp // G, 16)
    for m in range(M):
        n, j = divmod(m, 16)
        for k in range(K):
            packed[n, k // 4, 4 * j + k % 4] = q[m, k]
        scales[n, :, j] = s[m]
    return packed, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 19, 8), (16, 64, 64), (3, 130, 32)], ids=str)
def test_pack_linear_int8_layout(shape, dtype):
    M, K, G = shape
    w = (torch.randn(M, K) * torch.rand(M, 1) * 3).to(dtype)
    w[1, :G] = 0  # an all-zero group: scale 0, q 0
    q, s = quantize_reference(w, G)
    packed, scales = ops.pack_linear_int8(w, G)
    assert tuple(packed.shape) == ops.packed_shape(M, K, torch.int8, G)
    assert tuple(scales.shape) == ops.int8_scales_shape(M, K, G)
    ref_packed, ref_scales = int8_packed_reference(q, s, G)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(scales, ref_scales)
    # The package's pure-PyTorch twin gives the same integers and scales.
    rq, rs = reference.quantize_int8(w, G)
    assert torch.equal(rq, q) and torch.equal(rs, s)


def activation_emulation(x, G):
    """x with each group of G inputs of each row quantized as the int8 matvec does (fp32 rule,
    then float64): the exact input of its integer products."""
    q, s = quantize_reference(x.float(), G)
    return q.double() * s.double().repeat_interleave(G, dim=1)[:, :x.size(1)]


def check_linear_packed_int8(N, M, K, G, x_dtype=torch.float32):
    torch.manual_seed(N * 1000 + M + K + G)
    w = torch.randn(M, K) * (1 + torch.rand(M, 1))
    x = (torch.randn(N, K) * (1 + 3 * torch.rand(N, 1))).to(x_dtype)
    packed, scales = ops.pack_linear_int8(w, G)
    y = ops.linear_packed(x, packed, M, scales)
    assert y.dtype == x_dtype and y.shape == (N, M)
    if N == 0:
        return
    q, s = quantize_reference(w, G)
    wd = q.double() * s.double().repeat_interleave(G, dim=1)[:, :K]  # the dequantized weights
    ref = x.double() @ wd.t()
    scale = max(ref.abs().max().item(), 1.0)
    # Against the dequantized weights: off by the activations' rounding to int8 (~1/254 of a
    # group's largest value per input, averaging out over K).
    assert (y.double() - ref).abs().max().item() <= 0.02 * scale
    # Against the exact integer products of the quantized activations: fp32 rounding only.
    exact = activation_emulation(x, G) @ wd.t()
    tol = 2e-6 if x_dtype == torch.float32 else 8e-3  # bf16 rounds y
    assert (y.double() - exact).abs().max().item() <= tol * scale


@pytest.mark.parametrize("shape", INT8_SHAPES, ids=str)
def test_linear_packed_int8_matches_float64(shape):
    check_linear_packed_int8(*shape)


@pytest.mark.parametrize("G", GROUPS)
def test_linear_packed_int8_groups_and_bf16_rows(G):
    check_linear_packed_int8(5, 70, 300, G, torch.bfloat16)


def decode_weights(m):
    """m's norm weights [2L + 1] and Linear weights [4L + 1] in decode_step's order."""
    norms = [n.weight for b in m.h for n in (b.ln_1, b.ln_2)] + [m.ln_f.weight]
    linears = [lin.weight for b in m.h for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc,
                                                     b.mlp.c_proj)] + [m.lm_head.weight]
    return norms, linears


def int8_linears(m, G):
    """decode_step's linears and scales for model m quantized with group G, and a copy of m whose
    Linear weights are the dequantized int8 weights (in m's dtype)."""
    linears, scales = ops.pack_decode_linears([w.detach() for w in decode_weights(m)[1]], "int8", G)
    deq = copy.deepcopy(m)
    deq.backend = "torch"
    with torch.no_grad():
        for w in decode_weights(deq)[1]:
            q, s = reference.quantize_int8(w, G)
            w.copy_(reference.dequantize_int8(q, s, G))
    return linears, scales, deq


def check_decode_step_int8(arch, dtype, G=32, B=3, prompt=5, steps=4):
    """The fused step over int8 weights against a float64 model of the dequantized weights: logits
    within the activations' int8 rounding, and the same greedy tokens (make_model gives clear
    winners)."""
    m = make_model(arch, dtype)
    linears, scales, deq = int8_linears(m, G)
    ref_model = copy.deepcopy(deq).double()
    norms = [n.detach() for n in decode_weights(m)[0]]
    c = m.config
    seq = torch.randint(0, 101, (B, prompt))
    cache = m.new_kv_cache(B, 16)
    deq.forward_cached(seq, cache)  # the prompt's keys and values from the same weights
    tok = ref_model(seq)[0][:, -1].argmax(-1, keepdim=True)
    checked = 0
    for _ in range(steps):
        seq = torch.cat([seq, tok], 1)
        ref = ref_model(seq)[0][:, -1]
        with torch.inference_mode():
            got = torch.ops.gptmod.decode_step(
                m.wte(tok.view(-1)), norms, linears, cache.buffer, cache.seqlens, m.rope_cos,
                m.rope_sin, c.n_head, c.n_kv_head, c.ffn_hidden, c.padded_vocab_size, c.norm_eps,
                c.logit_softcap, c.rope_interleaved, scales)[:, :c.vocab_size]
        cache.seqlens += 1
        assert got.dtype == dtype
        bound = (0.03 if dtype == torch.float32 else 0.06) * ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= bound, arch
        # Greedy tokens agree wherever the reference's winner leads by more than the error allows.
        top2 = ref.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * bound
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear]), arch
        checked += int(clear.sum())
        tok = ref.argmax(-1, keepdim=True)
    assert checked >= B, f"{arch}: too few clear winners to compare greedy tokens"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_decode_step_int8_matches_dequantized_float64(arch, dtype):
    check_decode_step_int8(arch, dtype)


def test_decode_step_mixed_int8_and_float_linears():
    # Each linear brings its own format: here only the MLP's are int8, the rest fp32.
    m = make_model("gqa", torch.float32)
    linears, scales, _ = int8_linears(m, 64)
    args = list(decode_step_args())
    floats = args[2]
    args[2] = [q if i % 4 in (2, 3) and i < len(linears) - 1 else f
               for i, (q, f) in enumerate(zip(linears, floats))]
    with torch.inference_mode():
        got = torch.ops.gptmod.decode_step(*args, scales)
        ref = torch.ops.gptmod.decode_step(*args[:2], floats, *args[3:])
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()
    assert not torch.equal(got, ref)


# -- opcheck, errors, narrower builds -----------------------------------------------------------

def decode_step_args(dtype=torch.float32, B=2):
    from gptmod_ext.decode import FusedDecode
    m = make_model("gqa", dtype)
    f = FusedDecode(m)
    c = m.config
    kv = m.new_kv_cache(B, 8).buffer
    kv.normal_()
    return (m.wte.weight[:B].detach().clone(), f.norms, f.linears, kv, torch.tensor([3, 0][:B], dtype=torch.int32),
            m.rope_cos, m.rope_sin, c.n_head, c.n_kv_head, c.ffn_hidden, c.padded_vocab_size,
            c.norm_eps, 0.0, False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_ops_opcheck(dtype):
    w = torch.randn(40, 24).to(dtype)
    torch.library.opcheck(torch.ops.gptmod.pack_linear.default, (w,))
    packed = ops.pack_linear(w)
    torch.library.opcheck(torch.ops.gptmod.linear_packed.default, (torch.randn(3, 24).to(dtype), packed, 40))
    torch.library.opcheck(torch.ops.gptmod.decode_step.default, decode_step_args(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_ops_opcheck(dtype):
    w = torch.randn(40, 24).to(dtype)
    torch.library.opcheck(torch.ops.gptmod.pack_linear_int8.default, (w, 8))
    packed, scales = ops.pack_linear_int8(w, 8)
    torch.library.opcheck(torch.ops.gptmod.linear_packed.default,
                          (torch.randn(3, 24).to(dtype), packed, 40, scales))
    args = decode_step_args(dtype)
    linears, scales, _ = int8_linears(make_model("gqa", dtype), 32)
    torch.library.opcheck(torch.ops.gptmod.decode_step.default, (*args[:2], linears, *args[3:], scales))


def test_decode_ops_errors():
    w = torch.randn(40, 24)
    with pytest.raises(RuntimeError, match="pack_linear: weight must be 2-D"):
        ops.pack_linear(w[0])
    with pytest.raises(RuntimeError, match="pack_linear: weight must be float32 or bfloat16"):
        ops.pack_linear(w.half())
    with pytest.raises(RuntimeError, match=r"linear_packed: packed must be a contiguous pack_linear\(\) of a \[40, 23\]"):
        ops.linear_packed(torch.randn(2, 23), ops.pack_linear(w), 40)
    args = list(decode_step_args())
    full = args[4].clone()
    full[0] = 8  # no room in an 8-row cache
    with pytest.raises(RuntimeError, match="decode_step: row 0 has 8 cached rows: no room"):
        torch.ops.gptmod.decode_step(*args[:4], full, *args[5:])
    with pytest.raises(RuntimeError, match="decode_step: expected 4L \\+ 1 linears"):
        torch.ops.gptmod.decode_step(args[0], args[1], args[2][:-1], *args[3:])
    with pytest.raises(RuntimeError, match="decode_step: n_head=5 must be a multiple"):
        torch.ops.gptmod.decode_step(*args[:7], 5, *args[8:])


def test_int8_ops_errors():
    w = torch.randn(40, 24)
    with pytest.raises(RuntimeError, match="pack_linear_int8: weight must be 2-D"):
        ops.pack_linear_int8(w[0])
    with pytest.raises(RuntimeError, match="pack_linear_int8: weight must be float32, bfloat16 or float16"):
        ops.pack_linear_int8(w.double())
    for G in (0, 6, 2048):
        with pytest.raises(RuntimeError, match="pack_linear_int8: group_size must be a positive multiple of 4"):
            ops.pack_linear_int8(w, G)
    packed, scales = ops.pack_linear_int8(w, 8)
    x = torch.randn(2, 24)
    with pytest.raises(RuntimeError, match="linear_packed: packed is int8 .* but no scales were given"):
        ops.linear_packed(x, packed, 40)
    with pytest.raises(RuntimeError, match="linear_packed: scales are for int8 weights"):
        ops.linear_packed(x, ops.pack_linear(w), 40, scales)
    with pytest.raises(RuntimeError, match="linear_packed: the scales of packed must be"):
        ops.linear_packed(x, packed, 40, scales.double())
    with pytest.raises(RuntimeError, match="not a pack_linear_int8\\(\\) of a \\[40, 30\\] weight"):
        ops.linear_packed(torch.randn(2, 30), packed, 40, scales)
    with pytest.raises(RuntimeError, match="linear_packed: x must be float32 or bfloat16 with int8 weights"):
        ops.linear_packed(x.half(), packed, 40, scales)
    args = list(decode_step_args())
    linears, scales, _ = int8_linears(make_model("gqa", torch.float32), 32)
    with pytest.raises(RuntimeError, match="decode_step: scales must hold one tensor per linear"):
        torch.ops.gptmod.decode_step(*args[:2], linears, *args[3:], scales[:-1])
    with pytest.raises(RuntimeError, match="decode_step: a linear is int8 .* but no scales were given"):
        torch.ops.gptmod.decode_step(*args[:2], linears, *args[3:])


def capability_sweep(expected):
    assert torch.ops.gptmod.cpu_capability() == expected
    for shape in MATVEC_SHAPES:
        for dtype in DTYPES:
            check_linear_packed(*shape, dtype)
    for shape in INT8_SHAPES:
        check_linear_packed_int8(*shape)
    check_linear_packed_int8(5, 70, 300, 64, torch.bfloat16)
    for dtype in DTYPES:
        check_decode_step("gqa", dtype, steps=2)
        check_decode_step_int8("gqa", dtype, steps=2)


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2"])
def test_decode_ops_narrower_cpu_builds(cap):
    run_capability_sweep("test_decode_step", cap)


def test_int8_without_avx512_vnni(monkeypatch):
    # The portable int8 path of the AVX512 build where the CPU lacks AVX512-VNNI (forced off).
    if ops.cpu_capability() != "AVX512":
        pytest.skip("needs an AVX-512 CPU")  # the sweeps above cover the narrower builds
    monkeypatch.setenv("GPTMOD_CPU_VNNI", "0")
    run_capability_sweep("test_decode_step", "AVX512")


def test_bf16_without_avx512_bf16(monkeypatch):
    # The AVX512 build's bf16 path where the CPU lacks AVX512-BF16 (forced off here).
    if ops.cpu_capability() != "AVX512":
        pytest.skip("needs an AVX-512 CPU")  # the sweeps above cover the narrower builds
    monkeypatch.setenv("GPTMOD_CPU_BF16DP", "0")
    run_capability_sweep("test_decode_step", "AVX512")
