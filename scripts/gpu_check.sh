#!/usr/bin/env bash
# GPU check, for the lent GPU machine (make gpu-check): builds tcloss._C against the torch found
# there, runs the CUDA/Triton tests, compute-sanitizer memcheck on a small forward+backward and
# the GPU benchmarks. Everything lands in $OUT (default benchmarks/results/<device>/).
# Each step has its own time limit so the whole script stays under ~7 minutes.
set -uo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
DEV=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo no_gpu)
OUT=${OUT:-benchmarks/results/$DEV}
mkdir -p "$OUT"
status=0
{ date -u; nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TCLOSS_REQUIRE_EXT=1
echo "== build"
SECONDS=0
if ! timeout 240 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  echo "full build FAILED (see build.log); retrying with the temporal_loss kernels only"; status=1
  grep -E "error" "$OUT/build.log" | head -20
  TCLOSS_EXT_ONLY=temporal_loss timeout 180 $PY setup.py build_ext --inplace > "$OUT/build_fallback.log" 2>&1 || { echo "fallback build FAILED"; tail -30 "$OUT/build_fallback.log"; exit 1; }
fi
echo "build: ${SECONDS}s"
echo "== tests (cuda)"
SECONDS=0
timeout ${TEST_TIMEOUT:-180} $PY -m pytest ${TESTS:-tests} -m cuda -q -p no:cacheprovider -o addopts="" > "$OUT/tests_cuda.log" 2>&1 || status=1
tail -15 "$OUT/tests_cuda.log"; echo "tests: ${SECONDS}s"
echo "== compute-sanitizer memcheck"
SECONDS=0
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 75 compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitize_small.py > "$OUT/memcheck.log" 2>&1 || status=1
tail -5 "$OUT/memcheck.log"; echo "memcheck: ${SECONDS}s"
# BENCH: which suites (default all; "none" skips them); each suite's GPU cases only.
BENCH=${BENCH:-benchmarks}
if [ "$BENCH" != none ]; then
echo "== benchmarks"
SECONDS=0
timeout ${BENCH_TIMEOUT:-150} $PY -m pytest $BENCH -q -p no:cacheprovider -k cuda -o python_files="bench_*.py" \
  --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1 || status=1
tail -3 "$OUT/bench.log"; echo "bench: ${SECONDS}s"
[ -f "$OUT/bench.json" ] && $PY benchmarks/render.py "$OUT/bench.json" > "$OUT/bench.md" && cat "$OUT/bench.md"
fi
echo "gpu-check status: $status"
exit $status
