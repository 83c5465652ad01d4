"""devices.pick_device / pick_dtype and _ext.resolve_backend: the one answer to 'which device,
which dtype, which backend', and the same answer from the trainer, the sampler and the loader."""
import pytest
import torch

from gptmod_ext import GPT, GPTConfig, _ext, checkpoint, devices, sample, tokenizer


@pytest.fixture
def cuda_build_missing(monkeypatch):
    """A machine whose torch sees a GPU, with a gptmod_ext build that has only CPU kernels."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "AVAILABLE", True)
    monkeypatch.setattr(_ext, "LOAD_ERROR", None)
    monkeypatch.setattr(_ext, "CUDA_LOADED", False)


def test_dtype_auto_rule(monkeypatch):
    assert devices.pick_dtype("auto", "cpu") == torch.float32
    assert devices.pick_dtype(None, "mps") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.pick_dtype("auto", "cuda") == torch.bfloat16
    assert devices.pick_dtype("auto", "cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devices.pick_dtype("auto", "cuda") == torch.float32  # never float16 on its own
    assert devices.pick_dtype("BF16") is torch.bfloat16 and devices.pick_dtype("half") is torch.float16
    assert devices.pick_dtype(torch.float64) is torch.float64
    for name in devices.DTYPE_CHOICES[1:]:
        assert devices.pick_dtype(name) is getattr(torch, name)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        devices.pick_dtype("float8")



def test_training_dtype_auto_on_cpus(monkeypatch):
    # The rule: bf16 autocast only where a bf16 matrix product measured BF16_MIN_SPEEDUP faster.
    assert not devices.cpu_trains_faster_in_bf16(None)  # no native bf16: never measured
    assert not devices.cpu_trains_faster_in_bf16(0.3)   # emulated bf16 (AVX2): slower
    assert not devices.cpu_trains_faster_in_bf16(devices.BF16_MIN_SPEEDUP - 0.01)
    assert devices.cpu_trains_faster_in_bf16(2.7)       # AVX512-BF16: ~400 vs ~100 GFLOP/s
    monkeypatch.setattr(devices, "cpu_bf16_matmul_speedup", lambda threads=None: 2.7)
    assert devices.pick_dtype("auto", "cpu", training=True) == torch.bfloat16
    assert devices.pick_dtype("auto", "cpu") == torch.float32  # inference weights stay fp32
    assert devices.pick_dtype("float32", "cpu", training=True) == torch.float32
    monkeypatch.setattr(devices, "cpu_bf16_matmul_speedup", lambda threads=None: None)
    assert devices.pick_dtype("auto", "cpu", training=True) == torch.float32


def test_cpu_bf16_probe_on_this_machine():
    # cpuid flags decide whether the child-process probe runs at all; when it runs, it returns a
    # measured ratio. Either way the answer is the same on every call (cached per process).
    devices.cpu_bf16_matmul_speedup.cache_clear()
    speedup = devices.cpu_bf16_matmul_speedup(1)
    flags = devices.cpu_bf16_flags()
    if not flags:
        assert speedup is None
        assert devices.pick_dtype("auto", "cpu", training=True) == torch.float32
    else:
        assert speedup is None or speedup > 0
    assert devices.cpu_bf16_matmul_speedup(1) == speedup

def test_device_names():
    assert devices.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        devices.pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            devices.pick_device("cuda:0")


def test_resolve_backend_on_the_cpu(monkeypatch):
    assert _ext.resolve_backend("torch", "cpu") == ("torch", None)
    with pytest.raises(ValueError, match="'ext' or 'torch'"):
        _ext.resolve_backend("cuda", "cpu")
    if _ext.AVAILABLE:  # the CPU library has every CPU kernel
        assert _ext.resolve_backend("auto", "cpu") == ("ext", None)
        assert _ext.resolve_backend("ext", torch.device("cpu")) == ("ext", None)
    monkeypatch.setattr(_ext, "AVAILABLE", False)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "ops missing: build them")
    assert _ext.resolve_backend("auto", "cpu") == ("torch", "ops missing: build them")
    with pytest.raises(_ext.ExtensionNotAvailable, match="cannot run on cpu: ops missing"):
        _ext.resolve_backend("ext", "cpu")


def test_resolve_backend_cuda_needs_the_cuda_library(monkeypatch):
    monkeypatch.setattr(_ext, "AVAILABLE", True)
    monkeypatch.setattr(_ext, "LOAD_ERROR", None)
    monkeypatch.setattr(_ext, "CUDA_LOADED", False)
    name, reason = _ext.resolve_backend("auto", "cuda")
    assert name == "torch" and "no CUDA kernels" in reason
    with pytest.raises(_ext.ExtensionNotAvailable, match="cannot run on cuda:1: .*no CUDA kernels"):
        _ext.resolve_backend("ext", "cuda:1")
    name, reason = _ext.resolve_backend("auto", "mps")
    assert name == "torch" and "mps" in reason
    monkeypatch.setattr(_ext, "CUDA_LOADED", True)
    assert _ext.resolve_backend("ext", "cuda") == ("ext", None)


@pytest.mark.parametrize("archs,capability,fits", [
    ("80,86,89,90", (7, 5), False), ("80,86,89,90", (8, 0), True), ("80,86,89,90", (12, 0), True),
    ("90", (8, 9), False), ("86-real", (8, 9), True), ("86-real", (9, 0), False),
    ("80-virtual", (9, 0), True), ("90a", (9, 0), True), ("90a", (10, 0), False),
    ("native", (7, 0), True), ("75,80-real", (7, 5), True),
])
def test_cuda_archs_fit(archs, capability, fits):
    assert _ext.cuda_archs_fit(capability, archs) is fits


def test_auto_backend_falls_back_on_a_gpu_outside_the_built_architectures(monkeypatch):
    # A Colab T4 (sm_75) with the default build (sm 80..90): auto picks torch and says why; an
    # explicit ext is left to the first op's own error (with the rebuild command). No GPU needed:
    # the capability and the built list are stubbed.
    monkeypatch.setattr(_ext, "AVAILABLE", True)
    monkeypatch.setattr(_ext, "LOAD_ERROR", None)
    monkeypatch.setattr(_ext, "CUDA_LOADED", True)
    monkeypatch.setattr(_ext, "CUDA_ARCHS", "80,86,89,90")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    name, reason = _ext.resolve_backend("auto", "cuda:0")
    assert name == "torch"
    for words in ("cuda:0 (Tesla T4) is sm_75", "built for sm 80,86,89,90",
                  'CMAKE_CUDA_ARCHITECTURES="75"'):
        assert words in reason
    assert _ext.resolve_backend("ext", "cuda:0") == ("ext", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _ext.resolve_backend("auto", "cuda:0") == ("ext", None)


def test_model_backend_setter_asks_resolve_backend(monkeypatch):
    m = GPT(GPTConfig.from_preset("tiny", vocab_size=64, n_layer=1, n_embd=32, n_head=2,
                                  n_kv_head=1, block_size=8))
    m.backend = "auto"
    assert m.backend == ("ext" if _ext.AVAILABLE else "torch")
    monkeypatch.setattr(_ext, "AVAILABLE", False)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "ops missing")
    m.backend = "auto"
    assert m.backend == "torch"


def test_cpu_only_build_with_device_cuda_is_one_error_everywhere(cuda_build_missing, tmp_path,
                                                                 capsys):
    tok = tokenizer.byte_tokenizer()
    checkpoint.save_model(tmp_path, GPT(GPTConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
        block_size=16)), tok)
    want = "backend 'ext' cannot run on cuda: this gptmod_ext build has no CUDA kernels"
    with pytest.raises(checkpoint.CheckpointError, match=want):
        checkpoint.load_model(tmp_path, device="cuda", dtype="float32", backend="ext")
    assert sample.main(["--ckpt", str(tmp_path), "--device", "cuda", "--dtype", "float32",
                        "--backend", "ext", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert want in err and len(err.strip().splitlines()) == 1
