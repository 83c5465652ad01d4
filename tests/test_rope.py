"""Tests of gptmod::rope and gptmod::rope_ (docs/design.md section 2) on CPU, and on CUDA where present.

Every result is compared with `ref_rope` below: float64 math written for this file from the
contract (pair indices and the rotation formula), not the code under test.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import gptmod_ext
from gptmod_ext import ops
from helpers import run_capability_sweep

pytestmark = pytest.mark.skipif(not ops.AVAILABLE, reason="gptmod_ext ops not built")

# x shapes [B, T, H, D]: odd B/T, H = 1, D in {32, 64, 96, 128}, D = 56 (main loop, one-vector
# step and scalar tail for 8-wide vectors), and tiny D (scalar tail only).
SHAPES = [(1, 1, 1, 32), (2, 7, 3, 64), (3, 5, 1, 96), (1, 9, 4, 128), (2, 3, 2, 56),
          (2, 3, 2, 2), (1, 4, 3, 6)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# None = position t; "T32"/"T64" = [T] int32/int64; "BT32"/"BT64" = [B, T].
POSITIONS = [None, "T32", "BT32", "BT64"]
# (atol, rtol) against the float64 reference: a little above one rounding of the output.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float64: (1e-12, 1e-12),
}
MAX_POS = 64


def ref_rope(x, cos, sin, positions=None, interleaved=False, inverse=False):
    """float64 rotation of the pairs of x [B, T, H, D] by the table rows of each token."""
    B, T, H, D = x.shape
    x = x.double()
    if positions is None:
        pos = torch.arange(T, device=x.device).expand(B, T)
    else:
        pos = positions.long().expand(B, T)
    c = cos.double()[pos][:, :, None, :]  # [B, T, 1, D/2]
    s = sin.double()[pos][:, :, None, :] * (-1.0 if inverse else 1.0)
    i = torch.arange(D // 2, device=x.device)
    i1, i2 = (2 * i, 2 * i + 1) if interleaved else (i, i + D // 2)
    x1, x2 = x[..., i1], x[..., i2]
    y = torch.empty_like(x)
    y[..., i1] = x1 * c - x2 * s
    y[..., i2] = x2 * c + x1 * s
    return y


def make_positions(kind, B, T, device="cpu", max_pos=MAX_POS):
    if kind is None:
        return None
    dtype = torch.int32 if kind.endswith("32") else torch.int64
    shape = (T,) if kind.startswith("T") else (B, T)
    return torch.randint(0, max_pos, shape, dtype=dtype, device=device)


def tables(D, device="cpu", dtype=torch.float32):
    cos, sin = gptmod_ext.rope_cache(MAX_POS, D, device=device)
    return cos.to(dtype), sin.to(dtype)


def assert_close(y, ref, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)


def check_parity(shape, dtype, pos_kind, interleaved, inverse, device="cpu"):
    B, T, H, D = shape
    x = torch.randn(shape, device=device).to(dtype)
    cos, sin = tables(D, device)
    positions = make_positions(pos_kind, B, T, device)
    y = torch.ops.gptmod.rope(x, cos, sin, positions, interleaved, inverse)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, ref_rope(x, cos, sin, positions, interleaved, inverse), dtype)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pos_kind", POSITIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_parity(shape, dtype, pos_kind, interleaved, inverse):
    check_parity(shape, dtype, pos_kind, interleaved, inverse)


def test_rope_positions_t_int64_and_float64_tables():
    B, T, H, D = 2, 5, 3, 64
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    cos, sin = tables(D, dtype=torch.float64)
    positions = make_positions("T64", B, T)
    y = torch.ops.gptmod.rope(x, cos, sin, positions)
    assert_close(y, ref_rope(x, cos, sin, positions), torch.float64)


def test_rope_random_tables():
    # Arbitrary table values (not a rotation): every element of cos and sin must land where the
    # formula says, which sincos-shaped tables could hide.
    B, T, H, D = 2, 6, 3, 96
    x = torch.randn(B, T, H, D)
    cos, sin = torch.randn(MAX_POS, D // 2), torch.randn(MAX_POS, D // 2)
    positions = make_positions("BT64", B, T)
    for interleaved in (False, True):
        y = torch.ops.gptmod.rope(x, cos, sin, positions, interleaved, False)
        assert_close(y, ref_rope(x, cos, sin, positions, interleaved), torch.float32)


def strided_views(B, T, H, D, dtype, device="cpu"):
    """Non-contiguous x with last-dim stride 1: q/k slices of fused qkv, a transposed [B, H, T, D]
    tensor, and a row-padded tensor whose strides are odd."""
    qkv = torch.randn(B, T, 3 * H * D, device=device).to(dtype).view(B, T, 3 * H, D)
    bhtd = torch.randn(B, H, T, D, device=device).to(dtype)
    padded = torch.randn(B, T, H, D + 3, device=device).to(dtype)
    return {
        "q_of_qkv": qkv[:, :, :H],
        "k_of_qkv": qkv[:, :, H:2 * H],
        "transposed": bhtd.transpose(1, 2),
        "padded": padded[..., :D],
    }


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_strided_input(dtype, interleaved):
    B, T, H, D = 3, 5, 2, 64
    cos, sin = tables(D)
    positions = make_positions("BT32", B, T)
    for name, x in strided_views(B, T, H, D, dtype).items():
        assert not x.is_contiguous() and x.stride(-1) == 1, name
        y = torch.ops.gptmod.rope(x, cos, sin, positions, interleaved, False)
        assert y.is_contiguous(), name
        assert_close(y, ref_rope(x, cos, sin, positions, interleaved), dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_inplace_on_strided_view(dtype, interleaved):
    B, T, H, D = 2, 7, 3, 96
    cos, sin = tables(D)
    positions = make_positions("T64", B, T)
    qkv = torch.randn(B, T, 3 * H, D).to(dtype)
    before = qkv.clone()
    k = qkv[:, :, H:2 * H]
    expected = ref_rope(k, cos, sin, positions, interleaved)
    out = ops.rope_(k, cos, sin, positions, interleaved)
    assert out is k
    assert_close(qkv[:, :, H:2 * H], expected, dtype)
    # Only the k slice was written.
    assert torch.equal(qkv[:, :, :H], before[:, :, :H])
    assert torch.equal(qkv[:, :, 2 * H:], before[:, :, 2 * H:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_round_trip(interleaved):
    B, T, H, D = 2, 9, 3, 128
    x = torch.randn(B, T, H, D)
    cos, sin = tables(D)
    positions = make_positions("BT64", B, T)
    y = torch.ops.gptmod.rope(x, cos, sin, positions, interleaved, False)
    back = torch.ops.gptmod.rope(y, cos, sin, positions, interleaved, True)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    # A rotation keeps each pair's norm.
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pos_kind", [None, "BT64"])
def test_rope_gradcheck(pos_kind, interleaved):
    B, T, H, D = 2, 3, 2, 8
    x = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(D)
    positions = make_positions(pos_kind, B, T, max_pos=8)
    assert torch.autograd.gradcheck(
        lambda t: torch.ops.gptmod.rope(t, cos, sin, positions, interleaved, False), (x,))
    # The gradient is the inverse rotation of the incoming gradient.
    g = torch.randn(B, T, H, D, dtype=torch.float64)
    (dx,) = torch.autograd.grad(torch.ops.gptmod.rope(x, cos, sin, positions, interleaved), x, g)
    torch.testing.assert_close(dx, ref_rope(g, cos, sin, positions, interleaved, inverse=True))


def opcheck_samples(device="cpu"):
    B, T, H, D = 2, 5, 3, 32
    cos, sin = tables(D, device)
    views = strided_views(B, T, H, D, torch.float32, device)
    pos = make_positions("BT64", B, T, device)
    return [
        (torch.randn(B, T, H, D, device=device), cos, sin, None, False, False),
        (views["q_of_qkv"], cos, sin, pos, True, False),
        (views["transposed"], cos, sin, make_positions("T32", B, T, device), False, True),
        (torch.randn(B, T, H, D, device=device, dtype=torch.float64, requires_grad=True),
         cos, sin, pos, False, False),
        (torch.randn(B, T, H, D, device=device).bfloat16(), cos, sin, None, True, True),
    ]


def test_rope_opcheck():
    for args in opcheck_samples():
        torch.library.opcheck(torch.ops.gptmod.rope.default, args)
        x = args[0].detach().clone()
        torch.library.opcheck(torch.ops.gptmod.rope_.default, (x, *args[1:]))


def hf_style_rope(x, cos, sin, positions):
    """The eager Hugging Face formulation: x * cos + rotate_half(x) * sin."""
    c = torch.cat((cos[positions], cos[positions]), dim=-1)[:, :, None, :]
    s = torch.cat((sin[positions], sin[positions]), dim=-1)[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * s


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_rope_compile_fullgraph(backend):
    B, T, H, D = 2, 6, 2, 32
    cos, sin = tables(D)
    positions = make_positions("BT64", B, T)

    def f(x):
        y = torch.ops.gptmod.rope(x * 2.0, cos, sin, positions)
        return (y * y).sum()

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    x = torch.randn(B, T, H, D, requires_grad=True)
    loss = compiled(x)
    (dx,) = torch.autograd.grad(loss, x)
    x_ref = x.detach().double().requires_grad_(True)
    ref_loss = hf_style_rope(x_ref * 2.0, cos.double(), sin.double(), positions).pow(2).sum()
    (dx_ref,) = torch.autograd.grad(ref_loss, x_ref)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-4)


# (description, builder of (x, cos, sin, positions), regex the message must match).
def _bad(x=None, cos=None, sin=None, positions=None, D=8):
    def build():
        xx = torch.randn(2, 3, 2, D) if x is None else x()
        c, s = tables(D)
        return (xx, c if cos is None else cos(), s if sin is None else sin(),
                None if positions is None else positions())
    return build


BAD_INPUTS = [
    ("x 3-D", _bad(x=lambda: torch.randn(2, 3, 8)), r"x must be 4-D"),
    ("x int", _bad(x=lambda: torch.ones(2, 3, 2, 8, dtype=torch.int32)), r"x must be float32"),
    ("odd head dim", _bad(x=lambda: torch.randn(2, 3, 2, 7)), r"x head dim D must be even"),
    ("x last stride", _bad(x=lambda: torch.randn(2, 3, 8, 2).transpose(2, 3)), r"x must have stride 1"),
    ("cos width", _bad(cos=lambda: torch.randn(16, 3)), r"cos must be \[max_pos, D/2\]"),
    ("sin rank", _bad(sin=lambda: torch.randn(16 * 4)), r"sin must be \[max_pos, D/2\]"),
    ("cos/sin rows", _bad(cos=lambda: torch.randn(16, 4)), r"cos .* and sin .* differ"),
    ("cos fp16", _bad(cos=lambda: torch.randn(MAX_POS, 4).half()), r"cos must be float32"),
    ("sin fp64 with fp32 x", _bad(sin=lambda: torch.randn(MAX_POS, 4).double()), r"sin must be float32"),
    ("cos last stride", _bad(cos=lambda: torch.randn(4, MAX_POS).t()), r"cos must have stride 1"),
    ("T past max_pos", _bad(x=lambda: torch.randn(1, MAX_POS + 1, 1, 8)), r"x has T=65 tokens but cos/sin"),
    ("positions float", _bad(positions=lambda: torch.zeros(3)), r"positions must be int32 or int64"),
    ("positions shape", _bad(positions=lambda: torch.zeros(4, dtype=torch.long)), r"positions must be \[T\] or \[B, T\]"),
    ("positions [B, T] shape", _bad(positions=lambda: torch.zeros(3, 2, dtype=torch.long)), r"positions must be \[T\] or \[B, T\]"),
]
# Values are seen only by the real kernel (a fake tensor has none).
BAD_VALUES = [
    ("position = max_pos", _bad(positions=lambda: torch.tensor([0, MAX_POS, 1])), r"positions must be in \[0, max_pos"),
    ("negative position", _bad(positions=lambda: torch.tensor([[0, 1, 2], [0, -1, 2]], dtype=torch.int32)), r"positions must be in \[0, max_pos"),
]


@pytest.mark.parametrize("op", ["rope", "rope_"])
@pytest.mark.parametrize("name,build,match", BAD_INPUTS + BAD_VALUES,
                         ids=[b[0] for b in BAD_INPUTS + BAD_VALUES])
def test_rope_bad_input(op, name, build, match):
    x, cos, sin, positions = build()
    with pytest.raises(RuntimeError, match=f"{op}: {match}"):
        getattr(torch.ops.gptmod, op)(x, cos, sin, positions)


@pytest.mark.parametrize("name,build,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_rope_bad_input_fake(name, build, match):
    x, cos, sin, positions = build()
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) if t is not None else None for t in (x, cos, sin, positions)]
        with pytest.raises(RuntimeError, match=f"rope: {match}"):
            torch.ops.gptmod.rope(*args)


def test_rope_inplace_refuses_overlapping_x():
    cos, sin = tables(8)
    x = torch.randn(1, 3, 1, 8).expand(2, 3, 2, 8)
    with pytest.raises(RuntimeError, match="internal overlap|single memory location"):
        torch.ops.gptmod.rope_(x, cos, sin)


def test_rope_bad_input_under_compile():
    cos, sin = tables(8)
    f = torch.compile(lambda x: torch.ops.gptmod.rope(x, cos, sin), backend="eager",
                      fullgraph=True)
    with pytest.raises(RuntimeError, match="x head dim D must be even"):
        f(torch.randn(2, 3, 2, 7))


def test_rope_empty():
    cos, sin = tables(8)
    x = torch.randn(0, 3, 2, 8)
    assert torch.ops.gptmod.rope(x, cos, sin).shape == x.shape


# The narrower CPU builds (DEFAULT = no SIMD extensions, AVX2) must be as right as the widest one:
# a subprocess capped by GPTMOD_CPU_CAPABILITY runs this sweep.
def capability_sweep(expected):
    assert torch.ops.gptmod.cpu_capability() == expected
    for shape in [(2, 5, 3, 64), (1, 3, 2, 96), (2, 3, 2, 56), (2, 2, 1, 6)]:
        for dtype in DTYPES:
            for interleaved in (False, True):
                check_parity(shape, dtype, "BT64", interleaved, interleaved)
    for name, x in strided_views(2, 5, 2, 64, torch.bfloat16).items():
        cos, sin = tables(64)
        y = x.clone()
        torch.ops.gptmod.rope_(x, cos, sin, None, False, False)
        assert_close(x, ref_rope(y, cos, sin), torch.bfloat16)


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2"])
def test_rope_narrower_cpu_builds(cap):
    run_capability_sweep("test_rope", cap)


# ---------------------------------------------------------------------------------------------
# CUDA (run with `pytest -m cuda` on a GPU machine; skipped elsewhere by conftest.py).

@pytest.mark.cuda
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pos_kind", POSITIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4, 33, 5, 128), (1, 1000, 2, 64)])
def test_rope_parity_cuda(shape, dtype, pos_kind, interleaved):
    check_parity(shape, dtype, pos_kind, interleaved, inverse=False, device="cuda")
    check_parity(shape, dtype, pos_kind, interleaved, inverse=True, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_strided_cuda(dtype, interleaved):
    B, T, H, D = 3, 5, 2, 64
    cos, sin = tables(D, "cuda")
    positions = make_positions("BT32", B, T, "cuda")
    for name, x in strided_views(B, T, H, D, dtype, "cuda").items():
        y = torch.ops.gptmod.rope(x, cos, sin, positions, interleaved, False)
        assert_close(y, ref_rope(x, cos, sin, positions, interleaved), dtype)
        expected = ref_rope(x, cos, sin, positions, interleaved)
        torch.ops.gptmod.rope_(x, cos, sin, positions, interleaved, False)
        assert_close(x, expected, dtype)


@pytest.mark.cuda
def test_rope_opcheck_cuda():
    for args in opcheck_samples("cuda"):
        torch.library.opcheck(torch.ops.gptmod.rope.default, args)
        torch.library.opcheck(torch.ops.gptmod.rope_.default, (args[0].detach().clone(), *args[1:]))


@pytest.mark.cuda
def test_rope_bad_positions_cuda_never_reads_out_of_bounds():
    # On CUDA positions are not range-checked (that needs a host sync): the token gets NaN and
    # the rest of the output is right.
    B, T, H, D = 1, 3, 2, 32
    x = torch.randn(B, T, H, D, device="cuda")
    cos, sin = tables(D, "cuda")
    positions = torch.tensor([0, 10**9, 2], device="cuda")
    y = torch.ops.gptmod.rope(x, cos, sin, positions)
    torch.cuda.synchronize()
    assert torch.isnan(y[:, 1]).all()
    ok = torch.tensor([0, 2])
    assert_close(y[:, ok], ref_rope(x[:, ok], cos, sin, positions[ok]), torch.float32)


@pytest.mark.cuda
def test_rope_device_mismatch_cuda():
    x = torch.randn(1, 2, 1, 8, device="cuda")
    cos, sin = tables(8)
    with pytest.raises(RuntimeError, match="cos is on cpu but x is on cuda"):
        torch.ops.gptmod.rope(x, cos, sin)
