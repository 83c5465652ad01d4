"""Tests of gptmod::cross_entropy and gptmod::cross_entropy_backward on CPU, and on CUDA where
present.

Every result is compared with float64 math written in this file from the contract
(z = cap * tanh(raw / cap), lse = log sum exp z, loss = mean of lse - z_target over the targets
that are not ignore_index; the gradient by float64 autograd through that), not with the code
under test.
"""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gptmod_ext import ops
from helpers import run_capability_sweep

pytestmark = pytest.mark.skipif(
    not (ops.AVAILABLE and hasattr(torch.ops.gptmod, "cross_entropy")),
    reason="gptmod_ext ops not built")

# logits [..., V]: V below and above a vector width, with tails; the tiny preset's 4096.
SHAPES = [(1, 5), (7, 33), (4, 100), (2, 3, 257), (16, 4096)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CAPS = [0.0, 15.0]
# (atol, rtol) of the loss and the gradient against float64, by logits dtype. The loss is an
# fp32 sum of lse - z_t, so low-precision logits only change it by their own rounding, which
# the reference sees too (it starts from the same rounded logits).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-4), torch.float16: (1e-4, 1e-4),
       torch.float64: (1e-12, 1e-12)}
GRAD_TOL = {torch.float32: (1e-7, 1e-5), torch.bfloat16: (1e-4, 1.6e-2),
            torch.float16: (1e-5, 2e-3), torch.float64: (1e-15, 1e-12)}


def ref_loss(logits, targets, cap, ignore=-1):
    z = logits.double()
    if cap > 0:
        z = cap * torch.tanh(z / cap)
    lse = torch.logsumexp(z, dim=-1)
    keep = targets != ignore
    zt = torch.gather(z, -1, targets.clamp(min=0)[..., None])[..., 0]
    return (lse - zt)[keep].sum() / keep.sum(), lse


def ref_grad(logits, targets, cap, grad_loss=1.0):
    raw = logits.double().requires_grad_(True)
    loss, _ = ref_loss(raw, targets, cap)
    (g,) = torch.autograd.grad(loss * grad_loss, raw)
    return g


def sample(shape, dtype, device="cpu", ignore_some=True):
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], device=device)
    if ignore_some and targets.numel() > 2:
        targets.view(-1)[::3] = -1
    return logits, targets


def check(shape, dtype, cap, device="cpu"):
    logits, targets = sample(shape, dtype, device)
    loss, lse = torch.ops.gptmod.cross_entropy(logits, targets, cap, -1)
    want, want_lse = ref_loss(logits, targets, cap)
    acc = ops.acc_dtype(dtype)
    assert loss.dtype == acc and loss.shape == () and lse.dtype == acc and lse.shape == shape[:-1]
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss.double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), want_lse, atol=atol * 10, rtol=rtol)
    g = torch.tensor(0.7, device=device, dtype=acc)
    grad = torch.ops.gptmod.cross_entropy_backward(g, logits, targets, lse, cap, -1)
    assert grad.dtype == dtype and grad.shape == logits.shape
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), ref_grad(logits, targets, cap, 0.7), atol=atol,
                               rtol=rtol)
    assert (grad[targets == -1] == 0).all()


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cross_entropy_parity(shape, dtype, cap):
    check(shape, dtype, cap)


def test_cross_entropy_matches_torch_loss():
    # The model's torch-backend loss, F.cross_entropy(ignore_index=-1), on the same logits.
    logits, targets = sample((64, 4096), torch.float32)
    loss, _ = torch.ops.gptmod.cross_entropy(logits, targets)
    want = torch.nn.functional.cross_entropy(logits.double(), targets, ignore_index=-1)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)


def test_cross_entropy_extreme_logits():
    # Large logits (no overflow of exp), -inf logits (masked vocab entries), a saturated cap.
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [-math.inf, 2.0, 1.0], [80.0, 79.0, -50.0]])
    targets = torch.tensor([0, 1, 2])
    for cap in (0.0, 30.0):
        loss, lse = torch.ops.gptmod.cross_entropy(logits, targets, cap)
        want, _ = ref_loss(logits, targets, cap)
        torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
        grad = torch.ops.gptmod.cross_entropy_backward(torch.tensor(1.0), logits, targets, lse, cap)
        assert torch.isfinite(grad).all()


def test_cross_entropy_all_ignored_is_nan():
    logits = torch.randn(4, 10)
    loss, _ = torch.ops.gptmod.cross_entropy(logits, torch.full((4,), -1))
    assert math.isnan(loss.item())  # as F.cross_entropy gives (0 / 0)


def test_cross_entropy_strided_logits():
    # The model's logits: a [N, V] slice of the padded [N, Vp] lm_head output (row stride Vp).
    full = torch.randn(12, 4160) * 3
    logits = full[:, :4100]
    targets = torch.randint(0, 4100, (12,))
    for cap in CAPS:
        loss, lse = torch.ops.gptmod.cross_entropy(logits, targets, cap)
        torch.testing.assert_close(loss.double(), ref_loss(logits, targets, cap)[0], atol=1e-5,
                                   rtol=1e-5)
        grad = torch.ops.gptmod.cross_entropy_backward(torch.tensor(1.0), logits, targets, lse, cap)
        torch.testing.assert_close(grad.double(), ref_grad(logits, targets, cap), atol=1e-7,
                                   rtol=1e-5)


def test_cross_entropy_gradcheck():
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -1
    for cap in CAPS:
        assert torch.autograd.gradcheck(
            lambda x: torch.ops.gptmod.cross_entropy(x, targets, cap, -1)[0], (logits,))


def opcheck_samples(device="cpu"):
    out = []
    for dtype, cap in ((torch.float32, 0.0), (torch.float64, 10.0), (torch.bfloat16, 0.0)):
        logits, targets = sample((6, 70), dtype, device)
        out.append((logits.requires_grad_(dtype != torch.bfloat16), targets, cap))
    full = torch.randn(5, 80, device=device)
    out.append((full[:, :64].requires_grad_(False), torch.randint(0, 64, (5,), device=device), 5.0))
    return out


def test_cross_entropy_opcheck():
    for logits, targets, cap in opcheck_samples():
        torch.library.opcheck(torch.ops.gptmod.cross_entropy.default, (logits, targets, cap, -1))
        _, lse = torch.ops.gptmod.cross_entropy(logits.detach(), targets, cap, -1)
        torch.library.opcheck(torch.ops.gptmod.cross_entropy_backward.default,
                              (torch.tensor(1.0), logits.detach(), targets, lse, cap, -1))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cross_entropy_compile_fullgraph(backend):
    def f(x, t):
        return torch.ops.gptmod.cross_entropy(x * 2.0, t, 15.0, -1)[0] * 3.0

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    logits, targets = sample((24, 300), torch.float32)
    logits.requires_grad_(True)
    loss = compiled(logits, targets)
    (g,) = torch.autograd.grad(loss, logits)
    raw = logits.detach().double().requires_grad_(True)
    want = ref_loss(raw * 2.0, targets, 15.0)[0] * 3.0
    (want_g,) = torch.autograd.grad(want, raw)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), want_g, atol=1e-6, rtol=1e-4)


BAD = [
    ("0-D", lambda: (torch.tensor(1.0), torch.tensor(0)), "logits must be"),
    ("int logits", lambda: (torch.ones(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.long)),
     "logits must be float32"),
    ("targets dtype", lambda: (torch.randn(3, 4), torch.zeros(3, dtype=torch.int32)),
     "targets must be int64"),
    ("targets shape", lambda: (torch.randn(3, 4), torch.zeros(4, dtype=torch.long)),
     "targets must be"),
    ("last stride", lambda: (torch.randn(4, 3).t(), torch.zeros(3, dtype=torch.long)),
     "logits must have stride 1"),
]


@pytest.mark.parametrize("name,build,match", BAD, ids=[b[0] for b in BAD])
def test_cross_entropy_bad_input(name, build, match):
    logits, targets = build()
    with pytest.raises(RuntimeError, match=f"cross_entropy: {match}"):
        torch.ops.gptmod.cross_entropy(logits, targets)
    with FakeTensorMode() as mode:
        fl, ft = mode.from_tensor(logits), mode.from_tensor(targets)
        with pytest.raises(RuntimeError, match=f"cross_entropy: {match}"):
            torch.ops.gptmod.cross_entropy(fl, ft)


def test_cross_entropy_bad_values_and_backward_args():
    with pytest.raises(RuntimeError, match=r"cross_entropy: targets must be in \[0, 4\)"):
        torch.ops.gptmod.cross_entropy(torch.randn(2, 4), torch.tensor([1, 4]))
    with pytest.raises(RuntimeError, match="cross_entropy: softcap must be >= 0"):
        torch.ops.gptmod.cross_entropy(torch.randn(2, 4), torch.tensor([1, 2]), -1.0)
    with pytest.raises(RuntimeError, match="cross_entropy_backward: lse must be"):
        torch.ops.gptmod.cross_entropy_backward(torch.tensor(1.0), torch.randn(2, 4),
                                                torch.tensor([1, 2]), torch.zeros(3))
    with pytest.raises(RuntimeError, match="cross_entropy_backward: grad_loss must be a 0-d"):
        torch.ops.gptmod.cross_entropy_backward(torch.ones(2), torch.randn(2, 4),
                                                torch.tensor([1, 2]), torch.zeros(2))


def test_cross_entropy_bad_input_under_compile():
    f = torch.compile(lambda x, t: torch.ops.gptmod.cross_entropy(x, t)[0], backend="eager",
                      fullgraph=True)
    with pytest.raises(RuntimeError, match="targets must be"):
        f(torch.randn(3, 7), torch.zeros(2, dtype=torch.long))


def capability_sweep(expected):
    assert torch.ops.gptmod.cpu_capability() == expected
    for shape in [(7, 33), (2, 3, 257), (16, 4096)]:
        for dtype in DTYPES:
            for cap in CAPS:
                check(shape, dtype, cap)


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2"])
def test_cross_entropy_narrower_cpu_builds(cap):
    run_capability_sweep("test_cross_entropy", cap)


# ---------------------------------------------------------------------------------------------
# CUDA (run with `pytest -m cuda` on a GPU machine; skipped elsewhere by conftest.py).

@pytest.mark.cuda
@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(64, 50304)], ids=str)
def test_cross_entropy_parity_cuda(shape, dtype, cap):
    check(shape, dtype, cap, "cuda")


@pytest.mark.cuda
def test_cross_entropy_opcheck_cuda():
    for logits, targets, cap in opcheck_samples("cuda"):
        torch.library.opcheck(torch.ops.gptmod.cross_entropy.default, (logits, targets, cap, -1))


@pytest.mark.cuda
def test_cross_entropy_device_mismatch_cuda():
    with pytest.raises(RuntimeError, match="targets is on cpu but logits is on cuda"):
        torch.ops.gptmod.cross_entropy(torch.randn(3, 4, device="cuda"),
                                       torch.zeros(3, dtype=torch.long))
