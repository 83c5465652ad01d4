#!/usr/bin/env bash
# The GPU check in one command (issue 15), from the repository root of a machine with an NVIDIA
# GPU, in a Python environment that has a CUDA build of torch and the test dependencies:
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--skip-build] [--python PY]
#
#   1. build: pip install --no-build-isolation --no-deps . (for this GPU's architecture only,
#      CMAKE_CUDA_ARCHITECTURES=native, to keep the build short; the SASS check runs on it)
#   2. pytest -m cuda: every CUDA test
#   3. compute-sanitizer memcheck, racecheck and synccheck over the reduced decode_attention grid
#      (tests/test_decode_attention.py -k "reduced_grid or misaligned": forced splits 1/7/64,
#      Tq = 5, misaligned views, D = 96 and 250, lengths that leave whole splits empty), plus
#      the rope / swiglu CUDA tests under memcheck; PyTorch's caching allocator is off so memcheck
#      sees every allocation's real bounds
#   4. benchmarks/cuda_sass_check.py on the installed libgptmod_cuda.so
#   5. benchmarks/run.py --device cuda (every suite; results/<machine>-<date>.json/.md/.png) and
#      benchmarks/bench_prefill.py --device cuda
#   6. training: benchmarks/bench_train.py --device cuda (the modern 124M preset at 16 x 1024 in
#      bf16, our ops against HF Llama; MFU, target >= 45% on an H100) and
#      benchmarks/profile_train.py --device cuda --dtype bfloat16 (where the step's time goes)
# Every step's log goes to DIR (default benchmarks/results/gpu-check-<date>/), with summary.md
# (step, exit status, seconds). A failing step does not stop the later ones; the exit status is
# 1 if any failed. Planned to fit about 12 minutes on an H100 (the sanitizers slow kernels ~10-100x,
# hence the reduced grid). --dry-run prints the commands and runs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
SKIP_BUILD=0
PY=${PYTHON:-python}
OUT="benchmarks/results/gpu-check-$(date -u +%Y-%m-%d)"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --out) OUT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
REDUCED='reduced_grid or misaligned'
FAILED=0

# step NAME TIMEOUT_S COMMAND...: runs (or prints) one step, logging to $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  echo "+ [$name] $(printf '%q ' "$@")"
  [ "$DRY" -eq 1 ] && return 0
  local t0=$SECONDS rc
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc | $((SECONDS - t0)) |" >> "$OUT/summary.md"
  tail -n 3 "$OUT/$name.log"
  if [ "$rc" -ne 0 ]; then
    echo "gpu_check.sh: step $name failed (exit $rc), see $OUT/$name.log" >&2
    FAILED=1
  fi
}

if [ "$DRY" -eq 0 ]; then
  mkdir -p "$OUT"
  printf '# gpu_check %s\n\n| step | exit | seconds |\n|---|---|---|\n' "$(date -u +%FT%TZ)" > "$OUT/summary.md"
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; \
print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" \
    > "$OUT/device.txt" 2>&1 || { cat "$OUT/device.txt"; echo "gpu_check.sh: needs a CUDA GPU and a CUDA torch" >&2; exit 2; }
  cat "$OUT/device.txt"
fi

if [ "$SKIP_BUILD" -eq 0 ]; then
  step build-tools 300 "$PY" -m pip install -q scikit-build-core ninja "cmake>=3.26" \
    nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
  step build 900 env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install -v \
    --no-build-isolation --no-deps . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=native \
    -Ccmake.define.GPTMOD_REQUIRE_CUDA=ON
fi

# From tests/, so `import gptmod_ext` is the installed package, not the checkout's python/.
PYTEST=("$PY" -m pytest -p no:cacheprovider --rootdir .. -q)
step pytest-cuda 240 env -C tests "${PYTEST[@]}" -m cuda -ra .
step memcheck 240 env -C tests PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
  --error-exitcode 1 --leak-check no "${PYTEST[@]}" -m cuda \
  -k "$REDUCED or rope or swiglu or rms_norm or cross_entropy" test_decode_attention.py \
  test_rope.py test_swiglu.py test_rms_norm.py test_cross_entropy.py
step racecheck 240 env -C tests "$SANITIZER" --tool racecheck --error-exitcode 1 \
  "${PYTEST[@]}" -m cuda -k "$REDUCED" test_decode_attention.py
step synccheck 240 env -C tests "$SANITIZER" --tool synccheck --error-exitcode 1 \
  "${PYTEST[@]}" -m cuda -k "$REDUCED" test_decode_attention.py
CUDA_LIB='<installed gptmod_ext>/libgptmod_cuda.so'
if [ "$DRY" -eq 0 ]; then
  CUDA_LIB=$(cd tests && "$PY" -c 'import gptmod_ext._ext as e; print(e.LIB_DIR / "libgptmod_cuda.so")')
fi
step sass 120 "$PY" benchmarks/cuda_sass_check.py --json "$OUT/sass.json" "$CUDA_LIB"
step bench 420 "$PY" benchmarks/run.py --device cuda
step bench-prefill 120 "$PY" benchmarks/bench_prefill.py --device cuda --out benchmarks/results
step bench-train 300 "$PY" benchmarks/bench_train.py --device cuda --rounds 10
step profile-train 180 "$PY" benchmarks/profile_train.py --device cuda --dtype bfloat16 \
  --preset modern --batch-size 16 --steps 3

if [ "$DRY" -eq 0 ]; then
  cat "$OUT/summary.md"
  [ "$FAILED" -eq 0 ] && echo "gpu_check.sh: all steps passed" || echo "gpu_check.sh: some steps failed" >&2
fi
exit "$FAILED"
