"""The GPU tooling's CPU-checkable parts: benchmarks/gpu_check.sh --dry-run prints the run it
would do and its pytest selection picks the reduced sanitizer grid; benchmarks/cuda_sass_check.py
reads cuobjdump listings right (on hand-written SASS, since this machine has no CUDA library)."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cuda_sass_check  # noqa: E402  (benchmarks/cuda_sass_check.py)


def _dry_run(out: Path | None = None) -> dict[str, list[str]]:
    extra = ["--out", str(out)] if out else []
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                        "--python", sys.executable, *extra], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {}
    for line in r.stdout.splitlines():
        assert line.startswith("+ ["), line  # nothing but the commands
        name, cmd = line[3:].split("] ", 1)
        steps[name] = shlex.split(cmd)
    return steps


def test_gpu_check_dry_run_prints_the_whole_run(tmp_path):
    steps = _dry_run(tmp_path / "out")
    assert list(steps) == ["build-tools", "build", "pytest-cuda", "memcheck", "racecheck",
                           "synccheck", "sass", "bench", "bench-prefill", "bench-train",
                           "profile-train"]
    build = steps["build"]
    assert build[build.index(sys.executable):][:7] == [
        sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps"]
    assert "pytest" in steps["pytest-cuda"] and steps["pytest-cuda"][-2:] == ["-ra", "."]
    for tool in ("memcheck", "racecheck", "synccheck"):
        cmd = steps[tool]
        assert cmd[cmd.index("--tool") + 1] == tool and "--error-exitcode" in cmd
        assert cmd[cmd.index("-m", cmd.index("pytest")) + 1] == "cuda"
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in steps["memcheck"]
    assert steps["sass"][1].endswith("cuda_sass_check.py")
    assert steps["sass"][steps["sass"].index("--json") + 1] == str(tmp_path / "out" / "sass.json")
    assert steps["bench"][1:] == ["benchmarks/run.py", "--device", "cuda"]
    assert steps["bench-train"][1:4] == ["benchmarks/bench_train.py", "--device", "cuda"]
    assert not (tmp_path / "out").exists()  # a dry run runs and writes nothing


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_gpu_check_sanitizer_selection_is_the_reduced_grid(tool):
    # Collect (not run) exactly what the sanitizer step would run: the reduced grid must be there
    # with its forced splits, Tq = 5, D = 96 / 250 and misaligned views, and nothing unmarked.
    cmd = _dry_run()[tool]
    py = cmd.index("pytest")
    args = cmd[py + 1:]
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args],
                       cwd=ROOT / "tests", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    grid = [i for i in ids if "test_cuda_reduced_grid" in i]
    assert len(grid) >= 9
    for needle in ("-ns1", "-ns7", "-ns64", "-Tq5-", "-D96-", "-D250-"):
        assert any(needle in i for i in grid), needle
    assert any("test_cuda_misaligned_views" in i for i in ids)
    assert all("cuda" in i for i in ids)
    if tool == "memcheck":
        assert any("test_rope" in i for i in ids) and any("test_swiglu" in i for i in ids)


# -- cuda_sass_check on hand-written listings (the layout cuobjdump -sass prints) -------------

_MANGLED = {
    "_Zdec": "void gptmod::(anonymous namespace)::decode_attention_split_kernel<c10::BFloat16, 64, true, 2>(gptmod::SplitParams)",
    "_Zrope": "void gptmod::(anonymous namespace)::rope_kernel<c10::BFloat16, 8, false>(c10::BFloat16 const*)",
    "_Zrope1": "void gptmod::(anonymous namespace)::rope_kernel<c10::BFloat16, 1, false>(c10::BFloat16 const*)",
    "_Zswi": "void gptmod::(anonymous namespace)::swiglu_fwd_kernel<float, 4>(float const*)",
}


def _listing(dec_lds: str, rope_stg: str) -> str:
    return f"""
Fatbin elf code:
================
arch = sm_90
	code for sm_90
		Function : _Zdec
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
        /*0010*/                   {dec_lds} R4, [R2] ;                          /* 0x0000000002047984 */
        /*0020*/                   LDS R5, [R3+0x10] ;                             /* 0x0000100003057984 */
		Function : _Zrope
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;               /* 0x0000000402047981 */
        /*0010*/                   {rope_stg} desc[UR4][R6.64], R8 ;              /* 0x0000000806007986 */
		Function : _Zrope1
        /*0000*/                   STG.E.U16 desc[UR4][R6.64], R8 ;               /* 0x0000000806007986 */
		Function : _Zswi
        /*0000*/                   STG.E.128 desc[UR4][R6.64], R8 ;               /* 0x0000000806007986 */
"""


@pytest.mark.parametrize("dec_lds,rope_stg,bad", [
    ("LDS.128", "STG.E.128", []),
    ("LDS.U16", "STG.E.128", ["decode_attention_split_kernel"]),   # main before issue 15 (bf16)
    ("LDS.64", "STG.E.128", ["decode_attention_split_kernel"]),    # main before issue 15 (fp16)
    ("LDS.128", "STG.E", ["rope_kernel<c10::BFloat16, 8"]),        # 4 x 32-bit stores per pack
])
def test_sass_check_flags_narrow_accesses(dec_lds, rope_stg, bad):
    funcs = cuda_sass_check.parse_sass(_listing(dec_lds, rope_stg))
    assert funcs[("sm_90", "_Zdec")][dec_lds] == 1 and funcs[("sm_90", "_Zdec")]["LDS"] == 1
    failures, rows = cuda_sass_check.check(funcs, _MANGLED)
    assert len(failures) == len(bad) and all(b in f for b, f in zip(bad, failures))
    # The scalar rope instance (N = 1) is not held to 16-byte stores.
    assert not any("rope_kernel<c10::BFloat16, 1" in r["kernel"] for r in rows)
    assert len(rows) == 3


def test_sass_check_refuses_a_listing_without_the_kernels():
    failures, rows = cuda_sass_check.check({("sm_90", "_Zswi"): cuda_sass_check.Counter({"STG.E.128": 1})},
                                           _MANGLED)
    assert not any("swiglu" in f for f in failures)
    assert any("no decode_attention instance" in f for f in failures)
    assert any("no rope instance" in f for f in failures)
