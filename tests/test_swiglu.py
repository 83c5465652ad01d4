"""Tests of gptmod::swiglu and gptmod::swiglu_backward (docs/design.md section 2) on CPU, and on CUDA
where present.

Every result is compared with the float64 formulas below, written for this file from the contract
(sigma computed as 1 / (1 + exp(-g)) in float64), not with the code under test.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gptmod_ext import ops
from helpers import run_capability_sweep

pytestmark = pytest.mark.skipif(not ops.AVAILABLE, reason="gptmod_ext ops not built")

# gate_up shapes [..., 2F]: 1-D, odd rows, F below and above a vector width and with tails.
SHAPES = [(2,), (1, 2), (5, 2 * 3), (7, 2 * 64), (3, 2 * 77), (2, 3, 2 * 96), (4, 2 * 1536),
          (2, 1, 3, 2 * 33)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (atol, rtol) against the float64 reference: a little above one rounding of the output.
TOL = {
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float64: (1e-12, 1e-12),
}


def _sig(g):
    return 1.0 / (1.0 + torch.exp(-g))


def ref_swiglu(gate_up):
    gu = gate_up.double()
    F = gu.shape[-1] // 2
    g, u = gu[..., :F], gu[..., F:]
    return g * _sig(g) * u


def ref_swiglu_backward(grad_out, gate_up):
    gu, dy = gate_up.double(), grad_out.double()
    F = gu.shape[-1] // 2
    g, u = gu[..., :F], gu[..., F:]
    s = _sig(g)
    return torch.cat((dy * u * s * (1 + g * (1 - s)), dy * g * s), dim=-1)


def sample(shape, dtype, device="cpu", scale=4.0):
    # Scale 4 reaches the saturated ends of sigma, where a poor exp shows.
    return (torch.randn(shape, device=device) * scale).to(dtype)


def assert_close(y, ref, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)


def check_forward(gate_up, dtype):
    y = torch.ops.gptmod.swiglu(gate_up)
    assert y.dtype == dtype and y.is_contiguous()
    assert y.shape == (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    assert_close(y, ref_swiglu(gate_up), dtype)


def check_backward(grad_out, gate_up, dtype):
    d = torch.ops.gptmod.swiglu_backward(grad_out, gate_up)
    assert d.dtype == dtype and d.shape == gate_up.shape and d.is_contiguous()
    ref = ref_swiglu_backward(grad_out, gate_up)
    if dtype == torch.float32:
        # d_gate is a product of four factors, each rounded once in fp32.
        torch.testing.assert_close(d.double(), ref, atol=1e-5, rtol=4e-6)
    else:
        assert_close(d, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_parity(shape, dtype):
    gate_up = sample(shape, dtype)
    check_forward(gate_up, dtype)
    grad_out = sample((*shape[:-1], shape[-1] // 2), dtype, scale=1.0)
    check_backward(grad_out, gate_up, dtype)


def check_fp32_accuracy_of_exp():
    # fp32 results within ~1e-6 relative of float64 over the whole useful range of gate values.
    g = torch.linspace(-30, 30, 20001)
    gate_up = torch.cat((g, torch.ones_like(g)))[None]
    y = torch.ops.gptmod.swiglu(gate_up)[0].double()
    ref = ref_swiglu(gate_up)[0]
    big = ref.abs() > 1e-30
    rel = ((y - ref).abs()[big] / ref.abs()[big]).max().item()
    assert rel < 1e-6, rel


def test_swiglu_fp32_accuracy_of_exp():
    check_fp32_accuracy_of_exp()


def strided_gate_ups(dtype, device="cpu"):
    """Row-strided views (last stride 1) that must not need a copy, and a fully general one."""
    big = sample((6, 5, 2 * 40 + 24), dtype, device)
    return {
        "2d_row_padded": sample((9, 2 * 48 + 8), dtype, device)[:, : 2 * 48],
        "3d_slice_of_batch": big[:, 1:4, : 2 * 40],  # two row strides
        "3d_transposed": sample((5, 6, 2 * 32), dtype, device).transpose(0, 1),
        "4d_general": sample((3, 4, 5, 2 * 16 + 6), dtype, device)[:, 1:, ::2, : 2 * 16],
        "odd_row_stride": sample((7, 2 * 20 + 3), dtype, device)[:, : 2 * 20],
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_strided_input(dtype):
    for name, gate_up in strided_gate_ups(dtype).items():
        assert not gate_up.is_contiguous() and gate_up.stride(-1) == 1, name
        check_forward(gate_up, dtype)
        F = gate_up.shape[-1] // 2
        # A strided grad_out too: every other row of a taller tensor.
        big = sample((*gate_up.shape[:-1], 2 * F), dtype, scale=1.0)
        check_backward(big[..., :F], gate_up, dtype)


def test_swiglu_gradcheck():
    gate_up = torch.randn(3, 5, 2 * 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.gptmod.swiglu, (gate_up,))
    view = torch.randn(4, 2 * 9 + 2, dtype=torch.float64)[:, :18].requires_grad_(True)
    assert torch.autograd.gradcheck(torch.ops.gptmod.swiglu, (view,))
    # The registered backward equals the formula on its own.
    dy = torch.randn(3, 5, 7, dtype=torch.float64)
    (dx,) = torch.autograd.grad(torch.ops.gptmod.swiglu(gate_up), gate_up, dy)
    torch.testing.assert_close(dx, ref_swiglu_backward(dy, gate_up))


def opcheck_samples(device="cpu"):
    views = strided_gate_ups(torch.float32, device)
    return [
        torch.randn(4, 2 * 24, device=device, requires_grad=True),
        torch.randn(2, 3, 2 * 17, device=device, dtype=torch.float64, requires_grad=True),
        views["3d_slice_of_batch"].detach().requires_grad_(True),
        views["4d_general"],
        torch.randn(5, 2 * 40, device=device).bfloat16(),
    ]


def test_swiglu_opcheck():
    for gate_up in opcheck_samples():
        torch.library.opcheck(torch.ops.gptmod.swiglu.default, (gate_up,))
        grad_out = torch.randn(*gate_up.shape[:-1], gate_up.shape[-1] // 2).to(gate_up.dtype)
        torch.library.opcheck(torch.ops.gptmod.swiglu_backward.default,
                              (grad_out, gate_up.detach()))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_swiglu_compile_fullgraph(backend):
    def f(gate_up):
        return (torch.ops.gptmod.swiglu(gate_up * 1.5) ** 2).sum()

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    gate_up = torch.randn(6, 2 * 40, requires_grad=True)
    loss = compiled(gate_up)
    (dx,) = torch.autograd.grad(loss, gate_up)
    ref_in = gate_up.detach().double().requires_grad_(True)
    ref_loss = (ref_swiglu(ref_in * 1.5) ** 2).sum()
    (dx_ref,) = torch.autograd.grad(ref_loss, ref_in)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-5)


BAD_FORWARD = [
    ("0-D", lambda: torch.tensor(1.0), r"gate_up must have at least 1 dim"),
    ("int", lambda: torch.ones(3, 4, dtype=torch.int64), r"gate_up must be float32"),
    ("odd last dim", lambda: torch.randn(3, 5), r"gate_up last dim must be even"),
    ("last stride", lambda: torch.randn(4, 3).t(), r"gate_up must have stride 1"),
]
BAD_BACKWARD = [
    ("grad_out shape", lambda: (torch.randn(3, 3), torch.randn(3, 4)), r"grad_out must be [(\[]3, 2[)\]], got"),
    ("grad_out dtype", lambda: (torch.randn(3, 2).double(), torch.randn(3, 4)), r"grad_out dtype"),
    ("grad_out last stride", lambda: (torch.randn(2, 3).t(), torch.randn(3, 4)), r"grad_out must have stride 1"),
    ("gate_up odd", lambda: (torch.randn(3, 2), torch.randn(3, 5)), r"gate_up last dim must be even"),
]


@pytest.mark.parametrize("name,build,match", BAD_FORWARD, ids=[b[0] for b in BAD_FORWARD])
def test_swiglu_bad_input(name, build, match):
    with pytest.raises(RuntimeError, match=f"swiglu: {match}"):
        torch.ops.gptmod.swiglu(build())
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(build())
        with pytest.raises(RuntimeError, match=f"swiglu: {match}"):
            torch.ops.gptmod.swiglu(fake)


@pytest.mark.parametrize("name,build,match", BAD_BACKWARD, ids=[b[0] for b in BAD_BACKWARD])
def test_swiglu_backward_bad_input(name, build, match):
    grad_out, gate_up = build()
    with pytest.raises(RuntimeError, match=f"swiglu_backward: {match}"):
        torch.ops.gptmod.swiglu_backward(grad_out, gate_up)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (grad_out, gate_up)]
        with pytest.raises(RuntimeError, match=f"swiglu_backward: {match}"):
            torch.ops.gptmod.swiglu_backward(*fakes)


def test_swiglu_bad_input_under_compile():
    f = torch.compile(torch.ops.gptmod.swiglu, backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="gate_up last dim must be even"):
        f(torch.randn(3, 7))


def test_swiglu_empty():
    assert torch.ops.gptmod.swiglu(torch.randn(0, 8)).shape == (0, 4)
    assert torch.ops.gptmod.swiglu(torch.randn(3, 0)).shape == (3, 0)
    assert torch.ops.gptmod.swiglu_backward(torch.randn(0, 4), torch.randn(0, 8)).shape == (0, 8)


# The narrower CPU builds (DEFAULT = no SIMD extensions, AVX2) must be as right as the widest one:
# a subprocess capped by GPTMOD_CPU_CAPABILITY runs this sweep.
def capability_sweep(expected):
    assert torch.ops.gptmod.cpu_capability() == expected
    check_fp32_accuracy_of_exp()
    for shape in [(3, 2 * 77), (2, 3, 2 * 96), (4, 2 * 1536)]:
        for dtype in DTYPES:
            gate_up = sample(shape, dtype)
            check_forward(gate_up, dtype)
            check_backward(sample((*shape[:-1], shape[-1] // 2), dtype, scale=1.0), gate_up, dtype)
    for name, gate_up in strided_gate_ups(torch.bfloat16).items():
        check_forward(gate_up, torch.bfloat16)


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2"])
def test_swiglu_narrower_cpu_builds(cap):
    run_capability_sweep("test_swiglu", cap)


# ---------------------------------------------------------------------------------------------
# CUDA (run with `pytest -m cuda` on a GPU machine; skipped elsewhere by conftest.py).

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 2 * 1536), (3, 2 * 1001)], ids=str)
def test_swiglu_parity_cuda(shape, dtype):
    gate_up = sample(shape, dtype, "cuda")
    check_forward(gate_up, dtype)
    check_backward(sample((*shape[:-1], shape[-1] // 2), dtype, "cuda", 1.0), gate_up, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_strided_cuda(dtype):
    for name, gate_up in strided_gate_ups(dtype, "cuda").items():
        check_forward(gate_up, dtype)
        F = gate_up.shape[-1] // 2
        big = sample((*gate_up.shape[:-1], 2 * F), dtype, "cuda", 1.0)
        check_backward(big[..., :F], gate_up, dtype)


@pytest.mark.cuda
def test_swiglu_opcheck_cuda():
    for gate_up in opcheck_samples("cuda"):
        torch.library.opcheck(torch.ops.gptmod.swiglu.default, (gate_up,))
        grad_out = torch.randn(*gate_up.shape[:-1], gate_up.shape[-1] // 2,
                               device="cuda").to(gate_up.dtype)
        torch.library.opcheck(torch.ops.gptmod.swiglu_backward.default,
                              (grad_out, gate_up.detach()))


@pytest.mark.cuda
def test_swiglu_device_mismatch_cuda():
    with pytest.raises(RuntimeError, match="grad_out is on cpu but gate_up is on cuda"):
        torch.ops.gptmod.swiglu_backward(torch.randn(3, 2), torch.randn(3, 4, device="cuda"))
