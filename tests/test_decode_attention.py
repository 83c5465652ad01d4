"""decode_attention and kv_cache_write: parity with float64 math, masking, splits, views, checks.

The reference here is written out in float64 (einsum + explicit causal mask per sequence), not
taken from the code under test; inputs are rounded to the tested dtype first, so the tolerance
only has to cover the kernel's fp32 math and the output rounding.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import gptmod_ext
from gptmod_ext import ops, reference

pytestmark = pytest.mark.skipif(not ops.AVAILABLE, reason="compiled ops not built")

DA = torch.ops.gptmod.decode_attention
KVW = torch.ops.gptmod.kv_cache_write

# One tolerance table per dtype: (atol, rtol) on outputs of magnitude ~1.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (3e-5, 3e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


# ---------------------------------------------------------------------------------------------
# float64 reference and input factories

def ref_decode_attention(q, k_cache, v_cache, cache_seqlens, scale, softcap=0.0):
    """float64 attention per sequence: only rows < len are sliced out, so NaN beyond is never read."""
    B, Tq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    kv_head = torch.arange(Hq, device=q.device) // G
    out = torch.empty(B, Tq, Hq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        L = int(cache_seqlens[b])
        k = k_cache[b, :L].double()[:, kv_head]  # [L, Hq, D]
        v = v_cache[b, :L].double()[:, kv_head]
        s = torch.einsum("thd,lhd->htl", q[b].double(), k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        qpos = L - Tq + torch.arange(Tq, device=q.device)  # position of query t
        allowed = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]  # [Tq, L]
        s = s.masked_fill(~allowed[None], -math.inf)
        out[b] = torch.einsum("htl,lhd->thd", s.softmax(-1), v)
    return out


def make_inputs(B, Tq, Hq, Hkv, D, S_max, lens, dtype, device="cpu", nan_fill=True):
    """q [B, Tq, Hq, D], caches [B, S_max, Hkv, D] with NaN at every row >= len."""
    q = torch.randn(B, Tq, Hq, D, dtype=torch.float64).to(dtype)
    k = torch.randn(B, S_max, Hkv, D, dtype=torch.float64).to(dtype)
    v = torch.randn(B, S_max, Hkv, D, dtype=torch.float64).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    if nan_fill:
        for b, L in enumerate(lens):
            k[b, L:] = float("nan")
            v[b, L:] = float("nan")
    return q.to(device), k.to(device), v.to(device), lens_t.to(device)


def check_close(out, want, dtype):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), "NaN reached the output"
    torch.testing.assert_close(out.double().cpu(), want.double().cpu(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Parameter grid: every group size x Hkv pair once, the other axes cycled through it, plus
# targeted cases. (B, Tq, Hq, Hkv, D, S_max, lens, softcap, dtype, num_splits)

def _grid():
    cases = []
    Ds, Tqs, caps = (64, 96, 128), (1, 2, 5), (0.0, 30.0)
    dtypes = (torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float64)
    splits = (0, 1, 2, 7)
    i = 0
    for G in (1, 2, 3, 4, 8):
        for Hkv in (1, 2, 4):
            Tq, D = Tqs[i % 3], Ds[(i // 3) % 3]
            S_max = 150 + 37 * (i % 4)  # several row blocks, never a multiple of a block
            lens = [S_max, Tq, max(Tq, S_max // 2 + 3)]  # ragged, incl. S_max and the minimum
            if Tq == 1:
                lens[1] = 1
            cases.append((3, Tq, G * Hkv, Hkv, D, S_max, lens, caps[i % 2], dtypes[i % 5],
                          splits[i % 4]))
            i += 1
    cases += [
        # length 1 everywhere, forced splits larger than the length
        (2, 1, 8, 2, 64, 16, [1, 1], 0.0, torch.float32, 7),
        # heuristic split (B * Hkv = 1 < threads) on a long sequence, fp32 and bf16, D=128
        (1, 1, 4, 1, 128, 1100, [1100], 0.0, torch.float32, 0),
        (1, 1, 8, 1, 128, 1100, [1037], 30.0, torch.bfloat16, 0),
        # splits where a short sequence leaves whole splits empty, Tq > 1
        (3, 5, 12, 4, 64, 700, [700, 5, 333], 0.0, torch.float32, 7),
        (3, 2, 6, 2, 96, 300, [2, 300, 77], 30.0, torch.float16, 2),
        (2, 1, 12, 4, 64, 513, [513, 200], 0.0, torch.float64, 7),
        # generic head dims (not 64/128): odd multiples of small vectors and a tail
        (2, 2, 4, 2, 40, 90, [90, 3], 0.0, torch.float32, 2),
        (2, 1, 3, 1, 18, 70, [70, 1], 30.0, torch.bfloat16, 0),
    ]
    return cases


GRID = _grid()


def _case_id(c):
    B, Tq, Hq, Hkv, D, S, lens, cap, dt, ns = c
    return f"B{B}-Tq{Tq}-Hq{Hq}-Hkv{Hkv}-D{D}-S{S}-cap{int(cap)}-{str(dt)[6:]}-ns{ns}"


def run_case(case, device="cpu"):
    B, Tq, Hq, Hkv, D, S_max, lens, softcap, dtype, num_splits = case
    q, k, v, lens_t = make_inputs(B, Tq, Hq, Hkv, D, S_max, lens, dtype, device)
    scale = D ** -0.5
    out = DA(q, k, v, lens_t, scale, softcap, num_splits)
    assert out.shape == (B, Tq, Hq, D) and out.is_contiguous()
    check_close(out, ref_decode_attention(q, k, v, lens_t, scale, softcap), dtype)


@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_parity_cpu(case):
    run_case(case)


@pytest.mark.parametrize("num_splits", [0, 1, 2, 7])
def test_splits_agree(num_splits):
    # Every split count gives the float64 answer on the same inputs (split/merge path).
    q, k, v, lens = make_inputs(2, 3, 8, 2, 64, 600, [600, 259], torch.float32)
    out = DA(q, k, v, lens, 0.125, 0.0, num_splits)
    check_close(out, ref_decode_attention(q, k, v, lens, 0.125), torch.float32)


def test_large_scores_stable():
    # Scores of a few hundred: the online softmax must rescale, not overflow.
    q, k, v, lens = make_inputs(1, 2, 4, 2, 64, 300, [300], torch.float32)
    out = DA(q * 8, k * 8, v, lens, 1.0, 0.0, 3)
    check_close(out, ref_decode_attention(q * 8, k * 8, v, lens, 1.0), torch.float32)


def test_strided_cache_views(device="cpu"):
    # Per-layer caches as views of one [L, B_max, S_alloc, Hkv, D] buffer, batch and S sliced;
    # everything outside the valid rows (other layers, unused batch rows, the S tail) is NaN.
    L, B_max, S_alloc, Hkv, D, Hq, Tq = 3, 4, 96, 2, 64, 6, 2
    lens = torch.tensor([80, 2], dtype=torch.int32, device=device)
    kbuf = torch.full((L, B_max, S_alloc, Hkv, D), float("nan"), device=device)
    vbuf = torch.full((L, B_max, S_alloc, Hkv, D), float("nan"), device=device)
    kc, vc = kbuf[1, :2, :90], vbuf[1, :2, :90]
    for b in range(2):
        kc[b, : lens[b]] = torch.randn(int(lens[b]), Hkv, D, device=device)
        vc[b, : lens[b]] = torch.randn(int(lens[b]), Hkv, D, device=device)
    assert not kc.is_contiguous()
    # q strided too: a [B, Tq, Hq, D] view of a [B, Tq, 3 * Hq, D] qkv-like tensor.
    q = torch.randn(2, Tq, 3 * Hq, D, device=device)[:, :, Hq:2 * Hq]
    for ns in (0, 1, 3):
        out = DA(q, kc, vc, lens, 0.2, 0.0, ns)
        check_close(out, ref_decode_attention(q, kc, vc, lens, 0.2), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_reference_matches_float64(dtype, softcap):
    # reference.decode_attention is the torch backend of the model: it must honour the contract
    # (GQA, bottom-right causality, NaN beyond the lengths, softcap) as well.
    q, k, v, lens = make_inputs(3, 3, 8, 2, 64, 40, [40, 3, 17], dtype)
    out = reference.decode_attention(q, k, v, lens, 0.125, softcap)
    check_close(out, ref_decode_attention(q, k, v, lens, 0.125, softcap), dtype)


def test_negative_softcap_is_off():
    # Both kernels treat softcap <= 0 as "no cap"; the reference (the torch backend) must too.
    q, k, v, lens = make_inputs(2, 2, 4, 2, 64, 30, [30, 7], torch.float32)
    want = ref_decode_attention(q, k, v, lens, 0.125)
    check_close(reference.decode_attention(q, k, v, lens, 0.125, -5.0), want, torch.float32)
    check_close(DA(q, k, v, lens, 0.125, -5.0, 0), want, torch.float32)


# The CUDA entry point's extra refusals (float64, D > 256, its grid limits) are repeated by the
# fake kernel, so torch.compile does not trace a call that then fails when it runs. Fake CUDA
# tensors need no GPU, so this runs everywhere; test_cuda_checks_match_fake compares the real
# kernel's words on a GPU.
CUDA_ONLY_BAD = [
    ("float64", dict(dtype=torch.float64), "q float64 is supported on CPU only"),
    ("head_dim", dict(D=258), "head dim D must be <= 256 on CUDA, got 258"),
    ("batch", dict(B=65536), "on CUDA B and Hkv must be <= 65535 .* got B=65536, Hkv=1"),
    ("kv_heads", dict(Hq=65536, Hkv=65536), "on CUDA B and Hkv .* got B=1, Hkv=65536"),
    ("rows", dict(Tq=65536, Hq=32768), r"on CUDA .* < 2\^31, got B=1, Hkv=1, Tq=65536, Hq=32768"),
    ("splits", dict(S=70000, num_splits=70000), "num_splits must be <= 65535 on CUDA, got 70000"),
]


def _cuda_call(device, B=1, Tq=1, Hq=1, Hkv=1, D=8, S=16, dtype=torch.float16, num_splits=0):
    q = torch.empty(B, Tq, Hq, D, dtype=dtype, device=device)
    k = torch.empty(B, S, Hkv, D, dtype=dtype, device=device)
    lens = torch.full((B,), min(S, Tq), dtype=torch.int32, device=device)
    return DA(q, k, k, lens, 0.3, 0.0, num_splits)


@pytest.mark.parametrize("name,kw,msg", CUDA_ONLY_BAD, ids=[c[0] for c in CUDA_ONLY_BAD])
def test_fake_repeats_cuda_checks(name, kw, msg):
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match=f"decode_attention: {msg}"):
            _cuda_call("cuda", **kw)
        # The limits are CUDA's: the same shapes trace on CPU.
        if name not in ("float64", "head_dim"):
            _cuda_call("cpu", **kw)
        # Inside the limits a CUDA call traces, and a forced split count above 65535 is capped at
        # S_max rows as the kernel caps it.
        assert _cuda_call("cuda", B=65535, Hkv=1).shape == (65535, 1, 1, 8)
        assert _cuda_call("cuda", S=100, num_splits=70000).shape == (1, 1, 1, 8)


# ---------------------------------------------------------------------------------------------
# kv_cache_write

def ref_cache_write(k_cache, v_cache, k_new, v_new, lens):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    for b in range(k_new.shape[0]):
        for t in range(k_new.shape[1]):
            k_cache[b, int(lens[b]) + t] = k_new[b, t]
            v_cache[b, int(lens[b]) + t] = v_new[b, t]
    return k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Tn", [1, 4])
def test_kv_cache_write(dtype, Tn, device="cpu"):
    B, S, Hkv, D = 3, 20, 2, 64
    kbuf = torch.randn(B + 1, S, Hkv, D).to(dtype).to(device)
    vbuf = torch.randn(B + 1, S, Hkv, D).to(dtype).to(device)
    kc, vc = kbuf[1:], vbuf[1:]  # strided views, as a per-layer cache would be
    k_new = torch.randn(B, Tn, Hkv, D).to(dtype).to(device)
    v_new = torch.randn(B, Tn, 2 * Hkv, D).to(dtype).to(device)[:, :, :Hkv]  # strided source
    lens = torch.tensor([0, 7, S - Tn], dtype=torch.int32, device=device)
    want_k, want_v = ref_cache_write(kc, vc, k_new, v_new, lens)
    before0 = kbuf[0].clone()
    KVW(kc, vc, k_new, v_new, lens)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert torch.equal(kbuf[0], before0)  # nothing outside the view touched
    # The reference backend's indexed copy agrees.
    k2, v2 = kbuf[1:].clone(), vbuf[1:].clone()
    reference.kv_cache_write(k2, v2, k_new, v_new, lens)
    assert torch.equal(k2, want_k) and torch.equal(v2, want_v)


def test_kv_cache_write_out_of_room():
    kc, vc = torch.zeros(2, 8, 1, 4), torch.zeros(2, 8, 1, 4)
    new = torch.ones(2, 3, 1, 4)
    with pytest.raises(RuntimeError, match=r"kv_cache_write: cache_seqlens\[1\]"):
        KVW(kc, vc, new, new, torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"kv_cache_write: cache_seqlens\[0\]"):
        KVW(kc, vc, new, new, torch.tensor([-1, 0], dtype=torch.int32))
    assert not kc.any()  # checked before any write


# ---------------------------------------------------------------------------------------------
# Bad input: the C++ entry point and the fake kernel fail alike, naming the argument.

def _good():
    q, k, v, lens = make_inputs(2, 1, 4, 2, 8, 6, [6, 3], torch.float32, nan_fill=False)
    return dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens)


BAD = [
    ("q_rank", lambda a: a.update(q=a["q"][0]), "q must be 4-D"),
    ("k_rank", lambda a: a.update(k_cache=a["k_cache"][0]), "k_cache must be 4-D"),
    ("v_rank", lambda a: a.update(v_cache=a["v_cache"][..., None]), "v_cache must be 4-D"),
    ("q_int", lambda a: a.update(q=a["q"].int()), "q must be float32"),
    ("k_dtype", lambda a: a.update(k_cache=a["k_cache"].double()), "k_cache dtype"),
    ("v_dtype", lambda a: a.update(v_cache=a["v_cache"].half()), "v_cache dtype"),
    ("k_stride", lambda a: a.update(k_cache=torch.randn(2, 6, 8, 2).transpose(-1, -2)),
     "k_cache must have stride 1"),
    ("q_stride", lambda a: a.update(q=torch.randn(2, 1, 8, 4).transpose(-1, -2)),
     "q must have stride 1"),
    ("kv_shapes", lambda a: a.update(v_cache=torch.randn(2, 5, 2, 8)), "k_cache .* and v_cache .* differ"),
    ("batch", lambda a: a.update(q=torch.randn(3, 1, 4, 8), cache_seqlens=torch.tensor([6, 3, 1], dtype=torch.int32)),
     "k_cache batch 2 differs from q's 3"),
    ("head_dim", lambda a: a.update(q=torch.randn(2, 1, 4, 16)), "k_cache head dim 8 differs from q's 16"),
    ("gqa", lambda a: a.update(q=torch.randn(2, 1, 3, 8)), "q heads Hq=3 must be a multiple .* Hkv=2"),
    ("lens_dtype", lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), "cache_seqlens must be int32"),
    ("lens_shape", lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), r"cache_seqlens must be \[B\]"),
]
BAD_VALUES = [
    ("too_long", [7, 3], r"cache_seqlens\[0\] = 7 must be in \[Tq, S_max\]"),
    ("shorter_than_Tq", [6, 0], r"cache_seqlens\[1\] = 0 must be in \[Tq, S_max\]"),
]


def _call(a, num_splits=0):
    return DA(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], 0.3, 0.0, num_splits)


@pytest.mark.parametrize("name,mutate,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, mutate, msg):
    a = _good()
    mutate(a)
    with pytest.raises(RuntimeError, match=f"decode_attention: {msg}"):
        _call(a)
    # The fake kernel (used while tracing) refuses the same call with the same words.
    with FakeTensorMode() as mode:
        fa = {k: mode.from_tensor(v) for k, v in a.items()}
        with pytest.raises(RuntimeError, match=f"decode_attention: {msg}"):
            _call(fa)


@pytest.mark.parametrize("name,lens,msg", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_lengths(name, lens, msg):
    a = _good()
    a["cache_seqlens"] = torch.tensor(lens, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=msg):
        _call(a)


def test_bad_num_splits():
    a = _good()
    with pytest.raises(RuntimeError, match="decode_attention: num_splits must be >= 0"):
        _call(a, num_splits=-1)
    with FakeTensorMode() as mode:
        fa = {k: mode.from_tensor(v) for k, v in a.items()}
        with pytest.raises(RuntimeError, match="decode_attention: num_splits must be >= 0"):
            _call(fa, num_splits=-1)


def test_kv_cache_write_bad_input():
    kc, vc, new = torch.zeros(2, 8, 2, 4), torch.zeros(2, 8, 2, 4), torch.ones(2, 1, 2, 4)
    lens = torch.zeros(2, dtype=torch.int32)
    bad = [
        ((kc, vc, new, new, lens.long()), "cache_seqlens must be int32"),
        ((kc, vc[:, :4], new, new, lens), "k_cache .* and v_cache .* differ"),
        ((kc, vc, torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4), lens), "k_new must be"),
        ((kc, vc, new, new.double(), lens), "v_new dtype"),
        ((kc, vc, new[0], new, lens), "k_new must be 4-D"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=f"kv_cache_write: {msg}"):
            KVW(*args)
        with FakeTensorMode() as mode:
            with pytest.raises(RuntimeError, match=f"kv_cache_write: {msg}"):
                KVW(*[mode.from_tensor(t) for t in args])


# ---------------------------------------------------------------------------------------------
# torch.library integration

def test_opcheck():
    q, k, v, lens = make_inputs(2, 2, 4, 2, 64, 40, [40, 9], torch.float32, nan_fill=False)
    torch.library.opcheck(DA, (q, k, v, lens, 0.125, 0.0, 2))
    torch.library.opcheck(DA, (q.bfloat16(), k.bfloat16(), v.bfloat16(), lens, 0.125, 30.0, 0))
    kn, vn = torch.randn(2, 2, 2, 64), torch.randn(2, 2, 2, 64)
    torch.library.opcheck(KVW, (k.clone(), v.clone(), kn, vn, torch.tensor([3, 38], dtype=torch.int32)))


def test_compile_fullgraph():
    # One decode step as the model runs it: write the new rows, then attend.
    def step(q, k_new, v_new, k_cache, v_cache, lens_before):
        torch.ops.gptmod.kv_cache_write(k_cache, v_cache, k_new, v_new, lens_before)
        lens = lens_before + q.shape[1]
        return torch.ops.gptmod.decode_attention(q, k_cache, v_cache, lens, 0.125, 0.0, 0)

    B, Tq, Hq, Hkv, D, S = 2, 1, 4, 2, 64, 32
    k_cache, v_cache = torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    lens_before = torch.tensor([5, 30], dtype=torch.int32)
    q, kn, vn = torch.randn(B, Tq, Hq, D), torch.randn(B, Tq, Hkv, D), torch.randn(B, Tq, Hkv, D)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    compiled = torch.compile(step, fullgraph=True)  # inductor: functionalized in-place write
    out = compiled(q, kn, vn, k_cache, v_cache, lens_before)
    want_k, want_v = ref_cache_write(kc2, vc2, kn, vn, lens_before)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    check_close(out, ref_decode_attention(q, want_k, want_v, lens_before + Tq, 0.125), torch.float32)


def test_backward_raises():
    q, k, v, lens = make_inputs(1, 1, 2, 1, 8, 4, [4], torch.float32)
    q.requires_grad_(True)
    out = DA(q, k, v, lens, 0.3, 0.0, 0)
    with pytest.raises(RuntimeError, match="inference-only and has no backward"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------
# The narrower CPU builds (DEFAULT, AVX2) run in a subprocess: the capability is read once.

def capability_parity(cap: str) -> None:
    """Run by the subprocess below: asserts the chosen build and checks a few grid cases."""
    assert ops.cpu_capability() == cap, (ops.cpu_capability(), cap)
    for case in (GRID[0], GRID[4], GRID[7], GRID[13], GRID[-4], GRID[-2], GRID[-1],
                 (2, 2, 8, 2, 64, 200, [200, 2], 30.0, torch.float64, 2),
                 (2, 1, 8, 4, 128, 300, [300, 40], 0.0, torch.float16, 3)):
        run_case(case)


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2"])
def test_cpu_capability_builds(cap):
    tests_dir = Path(__file__).resolve().parent
    env = dict(os.environ, GPTMOD_CPU_CAPABILITY=cap)
    # The same gptmod_ext as this process: the installed one in CI, the checkout's in development.
    pkg_parent = str(Path(gptmod_ext.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, str(tests_dir), env.get("PYTHONPATH", "")])
    code = ("import torch; torch.manual_seed(0); import test_decode_attention as t; "
            f"t.capability_parity({cap!r}); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# CUDA (run with `pytest -m cuda` on a GPU machine)

CUDA_GRID = [c for i, c in enumerate(GRID) if i % 2 == 0 or c[4] == 96] + [
    # long context, bf16, batch 1 and 8, heuristic and forced splits
    (1, 1, 32, 8, 128, 8192, [8192], 0.0, torch.bfloat16, 0),
    (8, 1, 12, 4, 64, 8192, [8192, 1, 8191, 4000, 257, 64, 65, 8000], 0.0, torch.bfloat16, 0),
    (2, 1, 12, 4, 64, 8192, [8192, 300], 30.0, torch.bfloat16, 7),
    # group sizes without a template instance (3, 6, 16) and head dims 64/128/generic
    (2, 3, 18, 3, 128, 500, [500, 3], 0.0, torch.float32, 0),
    (2, 1, 16, 1, 64, 300, [300, 1], 0.0, torch.float16, 2),
    (2, 5, 48, 8, 80, 129, [129, 5], 0.0, torch.float32, 1),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", [c for c in CUDA_GRID if c[8] != torch.float64], ids=_case_id)
def test_parity_cuda(case):
    run_case(case, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("num_splits", [0, 1, 2, 7, 64])
def test_splits_agree_cuda(num_splits):
    q, k, v, lens = make_inputs(3, 2, 8, 2, 128, 2000, [2000, 2, 999], torch.bfloat16, "cuda")
    out = DA(q, k, v, lens, 0.09, 0.0, num_splits)
    check_close(out, ref_decode_attention(q, k, v, lens, 0.09), torch.bfloat16)


@pytest.mark.cuda
def test_cuda_lengths_clamped_in_bounds():
    # Lengths outside [Tq, S_max] are not checked on the GPU (that would sync); the kernel clamps
    # them to [0, S_max] so it stays in bounds. Length S_max + 5 behaves like S_max.
    q, k, v, lens = make_inputs(2, 1, 4, 2, 64, 50, [50, 20], torch.float32, "cuda")
    out = DA(q, k, v, torch.tensor([55, 20], dtype=torch.int32, device="cuda"), 0.125, 0.0, 0)
    check_close(out, ref_decode_attention(q, k, v, lens, 0.125), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Tn", [1, 4])
def test_kv_cache_write_cuda(dtype, Tn):
    test_kv_cache_write(dtype, Tn, device="cuda")


@pytest.mark.cuda
def test_kv_cache_write_cuda_out_of_room_writes_nothing():
    # Rows that would land at or past S_max are skipped in-kernel (no value check on the GPU).
    kc = torch.zeros(2, 8, 1, 4, device="cuda")
    vc = torch.zeros(2, 8, 1, 4, device="cuda")
    new = torch.ones(2, 3, 1, 4, device="cuda")
    KVW(kc, vc, new, new, torch.tensor([6, 2], dtype=torch.int32, device="cuda"))
    assert kc[0, 6:].eq(1).all() and kc[0, :6].eq(0).all()  # rows 6, 7 written, row 8 dropped
    assert kc[1, 2:5].eq(1).all() and kc[1, 5:].eq(0).all() and kc[1, :2].eq(0).all()


@pytest.mark.cuda
def test_strided_cache_views_cuda():
    test_strided_cache_views(device="cuda")


@pytest.mark.cuda
def test_opcheck_cuda():
    q, k, v, lens = make_inputs(2, 2, 8, 2, 128, 300, [300, 9], torch.bfloat16, "cuda", nan_fill=False)
    torch.library.opcheck(DA, (q, k, v, lens, 0.1, 0.0, 0))
    torch.library.opcheck(KVW, (k.clone(), v.clone(), k[:, :2].clone(), v[:, :2].clone(),
                                torch.tensor([3, 290], dtype=torch.int32, device="cuda")))


@pytest.mark.cuda
@pytest.mark.parametrize("D,Tq", [(64, 1), (96, 5), (250, 5)])
def test_cuda_misaligned_views(D, Tq):
    # Views whose rows do not start on 16 bytes (an odd element offset) take the element-copy
    # path instead of cp.async; the result is the same. Part of the sanitizer grid.
    B, S, Hkv = 2, 100, 2
    kbuf = torch.randn(B * S * Hkv * D + 1, device="cuda", dtype=torch.bfloat16)
    vbuf = torch.randn(B * S * Hkv * D + 1, device="cuda", dtype=torch.bfloat16)
    k = kbuf[1:].view(B, S, Hkv, D)
    v = vbuf[1:].view(B, S, Hkv, D)
    q = torch.randn(B, Tq, 8, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([100, 37], dtype=torch.int32, device="cuda")
    for ns in (0, 1, 7, 64):
        check_close(DA(q, k, v, lens, 0.125, 0.0, ns), ref_decode_attention(q, k, v, lens, 0.125),
                    torch.bfloat16)


# The reduced grid that benchmarks/gpu_check.sh runs under compute-sanitizer (memcheck,
# racecheck, synccheck; -k "reduced_grid or misaligned"): every kernel path once, small enough
# for the sanitizers' slowdown. Forced splits 1 / 7 / 64, Tq = 5, D = 96 and 250 (generic
# layouts), D = 32 / 64 / 128, group sizes with and without a template instance, and lengths
# shorter than the split count (whole splits empty: 9 rows over 64 splits).
# (B, Tq, Hq, Hkv, D, S_max, lens, softcap, dtype, num_splits)
REDUCED_GRID = [
    (3, 5, 8, 2, 96, 300, [300, 5, 40], 0.0, torch.bfloat16, 1),
    (3, 5, 8, 2, 96, 300, [300, 5, 40], 30.0, torch.float16, 7),
    (3, 5, 12, 4, 96, 200, [200, 9, 64], 0.0, torch.float32, 64),
    (2, 5, 4, 1, 250, 200, [200, 5], 0.0, torch.float32, 7),
    (2, 5, 12, 4, 250, 129, [129, 6], 30.0, torch.bfloat16, 64),
    (2, 5, 16, 8, 64, 700, [700, 9], 0.0, torch.bfloat16, 64),
    (2, 5, 6, 2, 128, 300, [300, 5], 0.0, torch.float32, 1),
    (2, 5, 4, 1, 32, 100, [100, 5], 0.0, torch.bfloat16, 7),
    (2, 5, 18, 3, 64, 90, [90, 5], 0.0, torch.float16, 0),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", REDUCED_GRID, ids=_case_id)
def test_cuda_reduced_grid(case):
    run_case(case, device="cuda")


# Those whose tensors fit a GPU.
CUDA_ONLY_BAD_SMALL = [c for c in CUDA_ONLY_BAD if c[0] in ("float64", "head_dim", "batch", "splits")]


@pytest.mark.cuda
@pytest.mark.parametrize("name,kw,msg", CUDA_ONLY_BAD_SMALL, ids=[c[0] for c in CUDA_ONLY_BAD_SMALL])
def test_cuda_checks_match_fake(name, kw, msg):
    # The real kernel refuses with the fake kernel's words (test_fake_repeats_cuda_checks).
    with pytest.raises(RuntimeError, match=f"decode_attention: {msg}"):
        _cuda_call("cuda", **kw)


@pytest.mark.cuda
def test_cuda_device_mismatch():
    a = _good()
    a = {k: v.cuda() for k, v in a.items()}
    a["cache_seqlens"] = a["cache_seqlens"].cpu()
    with pytest.raises(RuntimeError, match="decode_attention: cache_seqlens is on cpu"):
        _call(a)
