"""Tests of gptmod::rms_norm, gptmod::add_rms_norm and gptmod::rms_norm_backward on CPU, and on
CUDA where present.

Every result is compared with float64 formulas written in this file from the contract
(rstd = 1 / sqrt(mean(s^2) + eps), out = s * rstd * weight, and their derivatives taken by
float64 autograd), not with the code under test.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gptmod_ext import ops
from helpers import run_capability_sweep

pytestmark = pytest.mark.skipif(not (ops.AVAILABLE and hasattr(torch.ops.gptmod, "rms_norm")),
                                reason="gptmod_ext ops not built")

# x shapes [..., C]: 1-D, C below, at and above a vector width, with tails, the tiny preset's.
SHAPES = [(7,), (3, 5), (4, 64), (5, 77), (2, 3, 96), (16, 256), (3, 1000)]
# (x dtype, out dtype): x's own, and the autocast case of an fp32 residual stream feeding bf16.
PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
         (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float16), (torch.float64, torch.float64)]
# (atol, rtol) against float64, by the dtype of the compared tensor.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2),
       torch.float64: (1e-12, 1e-12)}
EPS = 1e-5


def ref_rms(s, weight):
    """float64 out and rstd of x (already the sum for add_rms_norm)."""
    s = s.double()
    rstd = 1.0 / torch.sqrt((s * s).mean(-1) + EPS)
    return s * rstd[..., None] * weight.double(), rstd


def ref_grads(s, weight, dy, gres=None):
    """float64 (dx, dweight) by autograd through ref_rms."""
    sd = s.double().requires_grad_(True)
    wd = weight.double().requires_grad_(True)
    out, _ = ref_rms(sd, wd)
    dx, dw = torch.autograd.grad(out, (sd, wd), dy.double())
    return (dx if gres is None else dx + gres.double()), dw


def close(got, ref, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref, atol=atol * scale, rtol=rtol)


def sample(shape, dtype, device="cpu"):
    return (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)


def check_all(shape, x_dtype, out_dtype, device="cpu", w_dtype=None):
    # fp32 master weights, as training keeps them (fp64 ones with fp64 x, for full precision).
    w_dtype = w_dtype or (torch.float64 if x_dtype == torch.float64 else torch.float32)
    x = sample(shape, x_dtype, device)
    res = sample(shape, x_dtype, device)
    w = (torch.rand(shape[-1], device=device) + 0.5).to(w_dtype)
    out, rstd = torch.ops.gptmod.rms_norm(x, w, EPS, out_dtype)
    ref, ref_rstd = ref_rms(x, w)
    assert out.dtype == out_dtype and rstd.dtype == ops.acc_dtype(x_dtype)
    close(out, ref, out_dtype)
    close(rstd, ref_rstd, torch.float64 if x_dtype == torch.float64 else torch.float32)
    # add_rms_norm: the sum is rounded to x's dtype, then normalized.
    out2, s, rstd2 = torch.ops.gptmod.add_rms_norm(x, res, w, EPS, out_dtype)
    s_ref = (x.double() + res.double()).to(x_dtype)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
    close(out2, ref_rms(s_ref, w)[0], out_dtype)
    # Backward, with and without the residual gradient.
    dy = sample(shape, out_dtype, device)
    gres = sample(shape, x_dtype, device)
    for g in (None, gres):
        dx, dw = torch.ops.gptmod.rms_norm_backward(dy, x, w, rstd, g)
        rdx, rdw = ref_grads(x, w, dy, g)
        assert dx.dtype == x_dtype and dw.dtype == w_dtype and dw.shape == w.shape
        close(dx, rdx, x_dtype, scale=4)
        # dweight sums over every row: its error grows with the row count.
        rows = max(1, x.numel() // shape[-1])
        close(dw, rdw, w_dtype, scale=rows ** 0.5 * 4)


@pytest.mark.parametrize("x_dtype,out_dtype", PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_parity(shape, x_dtype, out_dtype):
    check_all(shape, x_dtype, out_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_weight_in_x_dtype(dtype):
    # bf16 weights (a bf16 model for inference): weight in x's dtype works too.
    check_all((4, 96), dtype, dtype, w_dtype=dtype)


def test_rms_norm_strided_views():
    big = sample((6, 5, 160), torch.float32)
    x = big[:, 1:4, :96]  # two row strides, last stride 1: no copy needed
    w = torch.rand(96) + 0.5
    out, rstd = torch.ops.gptmod.rms_norm(x, w, EPS)
    close(out, ref_rms(x, w)[0], torch.float32)
    dy = sample((6, 8, 96), torch.float32)[:, ::2][:, :3]
    dx, dw = torch.ops.gptmod.rms_norm_backward(dy, x, w, rstd)
    rdx, rdw = ref_grads(x, w, dy)
    close(dx, rdx, torch.float32, 4)
    close(dw, rdw, torch.float32, 40)


def test_rms_norm_gradcheck():
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    res = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(10, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.gptmod.rms_norm(a, b, EPS)[0], (x, w))

    def added(a, r, b):
        out, s, _ = torch.ops.gptmod.add_rms_norm(a, r, b, EPS)
        return out, s * 0.5  # both outputs used: both gradients meet in the backward

    assert torch.autograd.gradcheck(added, (x, res, w))


def test_rms_norm_autograd_autocast_dtypes():
    # fp32 x and master weight, bf16 out (as under CPU autocast): grads come back in fp32.
    x = torch.randn(8, 64, requires_grad=True)
    w = (torch.rand(64) + 0.5).requires_grad_(True)
    out, _ = torch.ops.gptmod.rms_norm(x, w, EPS, torch.bfloat16)
    dy = torch.randn(8, 64).bfloat16()
    out.backward(dy)
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    rdx, rdw = ref_grads(x.detach(), w.detach(), dy)
    close(x.grad, rdx, torch.float32, 4)
    close(w.grad, rdw, torch.float32, 12)


def opcheck_samples(device="cpu"):
    return [
        (torch.randn(4, 32, device=device, requires_grad=True),
         torch.rand(32, device=device).requires_grad_(True), None),
        (torch.randn(2, 3, 17, device=device, dtype=torch.float64, requires_grad=True),
         torch.rand(17, device=device, dtype=torch.float64).requires_grad_(True), None),
        (torch.randn(5, 40, device=device, requires_grad=True),
         torch.rand(40, device=device).requires_grad_(True), torch.bfloat16),
        (torch.randn(5, 40, device=device).bfloat16(), torch.rand(40, device=device), None),
    ]


def test_rms_norm_opcheck():
    for x, w, out_dtype in opcheck_samples():
        torch.library.opcheck(torch.ops.gptmod.rms_norm.default, (x, w, EPS, out_dtype))
        res = torch.randn_like(x).requires_grad_(x.requires_grad)
        torch.library.opcheck(torch.ops.gptmod.add_rms_norm.default, (x, res, w, EPS, out_dtype))
        _, rstd = torch.ops.gptmod.rms_norm(x.detach(), w.detach(), EPS)
        dy = torch.randn(x.shape).to(out_dtype or x.dtype)
        torch.library.opcheck(torch.ops.gptmod.rms_norm_backward.default,
                              (dy, x.detach(), w.detach(), rstd, torch.randn_like(x.detach())))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_rms_norm_compile_fullgraph(backend):
    def f(x, r, w):
        out, s, _ = torch.ops.gptmod.add_rms_norm(x * 1.5, r, w, EPS)
        return (torch.ops.gptmod.rms_norm(out, w, EPS)[0] ** 2).sum() + s.sum()

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    x, r = torch.randn(6, 40, requires_grad=True), torch.randn(6, 40, requires_grad=True)
    w = (torch.rand(40) + 0.5).requires_grad_(True)
    loss = compiled(x, r, w)
    grads = torch.autograd.grad(loss, (x, r, w))
    xs = [t.detach().double().requires_grad_(True) for t in (x, r, w)]
    s = xs[0] * 1.5 + xs[1]
    ref_loss = (ref_rms(ref_rms(s, xs[2])[0], xs[2])[0] ** 2).sum() + s.sum()
    ref_grads_ = torch.autograd.grad(ref_loss, xs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)
    for g, rg in zip(grads, ref_grads_):
        torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-4)


BAD = [  # (name, (x, weight, out_dtype), message)
    ("0-D", lambda: (torch.tensor(1.0), torch.ones(1), None),
     "rms_norm: x must have at least 1 dim"),
    ("int", lambda: (torch.ones(3, 4, dtype=torch.int64), torch.ones(4), None),
     "rms_norm: x must be float32"),
    ("weight shape", lambda: (torch.randn(3, 4), torch.ones(5), None),
     r"rms_norm: weight must be \[C\] = \[4\]"),
    ("weight dtype", lambda: (torch.randn(3, 4), torch.ones(4).double(), None),
     "rms_norm: weight must be float32 or x's dtype"),
    ("last stride", lambda: (torch.randn(4, 3).t(), torch.ones(4), None),
     "rms_norm: x must have stride 1"),
    ("out dtype", lambda: (torch.randn(3, 4).bfloat16(), torch.ones(4), torch.float32),
     "rms_norm: out_dtype must be x's dtype"),
]


@pytest.mark.parametrize("name,build,match", BAD, ids=[b[0] for b in BAD])
def test_rms_norm_bad_input(name, build, match):
    x, w, out_dtype = build()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gptmod.rms_norm(x, w, EPS, out_dtype)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.gptmod.rms_norm(fx, fw, EPS, out_dtype)


_add = torch.ops.gptmod.add_rms_norm
_bwd = torch.ops.gptmod.rms_norm_backward
_x, _w = (lambda: torch.randn(3, 4)), (lambda: torch.ones(4))
BAD_ADD_BWD = [
    ("residual shape", lambda: _add(_x(), torch.randn(2, 4), _w(), EPS),
     r"add_rms_norm: residual must be"),
    ("residual dtype", lambda: _add(_x(), _x().bfloat16(), _w(), EPS),
     "add_rms_norm: residual dtype"),
    ("rstd dtype", lambda: _bwd(_x(), _x(), _w(), torch.ones(3).double()),
     "rms_norm_backward: rstd must be"),
    ("grad_out shape", lambda: _bwd(torch.randn(3, 5), _x(), _w(), torch.ones(3)),
     "rms_norm_backward: grad_out must be"),
    ("grad_res last stride",
     lambda: _bwd(torch.randn(4, 4), torch.randn(4, 4), _w(), torch.ones(4), torch.randn(4, 4).t()),
     "rms_norm_backward: grad_res must have stride 1"),
]


@pytest.mark.parametrize("name,call,match", BAD_ADD_BWD, ids=[b[0] for b in BAD_ADD_BWD])
def test_rms_norm_bad_input_other_ops(name, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_rms_norm_bad_input_under_compile():
    f = torch.compile(lambda x, w: torch.ops.gptmod.rms_norm(x, w, EPS)[0], backend="eager",
                      fullgraph=True)
    with pytest.raises(RuntimeError, match="weight must be"):
        f(torch.randn(3, 7), torch.ones(6))


def test_rms_norm_empty():
    out, rstd = torch.ops.gptmod.rms_norm(torch.randn(0, 8), torch.ones(8), EPS)
    assert out.shape == (0, 8) and rstd.shape == (0,)
    dx, dw = torch.ops.gptmod.rms_norm_backward(torch.randn(0, 8), torch.randn(0, 8), torch.ones(8),
                                                torch.ones(0))
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))


def capability_sweep(expected):
    assert torch.ops.gptmod.cpu_capability() == expected
    for shape in [(5, 77), (16, 256), (3, 1000)]:
        for x_dtype, out_dtype in PAIRS:
            check_all(shape, x_dtype, out_dtype)


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2"])
def test_rms_norm_narrower_cpu_builds(cap):
    run_capability_sweep("test_rms_norm", cap)


# ---------------------------------------------------------------------------------------------
# CUDA (run with `pytest -m cuda` on a GPU machine; skipped elsewhere by conftest.py).

@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype,out_dtype", PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES + [(4096, 768), (2, 1001)], ids=str)
def test_rms_norm_parity_cuda(shape, x_dtype, out_dtype):
    check_all(shape, x_dtype, out_dtype, "cuda")


@pytest.mark.cuda
def test_rms_norm_opcheck_cuda():
    for x, w, out_dtype in opcheck_samples("cuda"):
        torch.library.opcheck(torch.ops.gptmod.rms_norm.default, (x, w, EPS, out_dtype))
        res = torch.randn_like(x).requires_grad_(x.requires_grad)
        torch.library.opcheck(torch.ops.gptmod.add_rms_norm.default, (x, res, w, EPS, out_dtype))


@pytest.mark.cuda
def test_rms_norm_device_mismatch_cuda():
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        torch.ops.gptmod.rms_norm(torch.randn(3, 4, device="cuda"), torch.ones(4), EPS)
