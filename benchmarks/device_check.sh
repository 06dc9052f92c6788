#!/usr/bin/env bash
# The CUDA backend's check on a lent GPU machine, in ONE call of under 8 minutes:
#   1. build and install fusedattn with the CUDA module (torch and the build tools are there),
#      for the GPU's own architecture only (sm_90 on an H100/H200), which halves the nvcc time;
#   2. run the CUDA tests (pytest -m cuda tests/test_cuda.py), all of them: a failure does not
#      stop the run, so one call shows every failing case (each test has 60 s at most);
#   3. run the GPU benchmark (benchmarks/bench_gpu.py) and print its table LAST;
#   4. with --sanitize: compute-sanitizer memcheck (out-of-bounds / misaligned accesses, each
#      torch tensor its own allocation) and racecheck (shared-memory races) over small test
#      cases, then the table again.
# Steps 2-4 always run once the build succeeded; the exit status is non-zero if any step
# failed. Logs and bench_gpu.json go to $OUT (the device tool's folder) or /tmp.
#
#   bash benchmarks/device_check.sh [--sanitize]     (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/fusedattn_device_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=python3
sanitize=0
[ "${1:-}" = "--sanitize" ] && sanitize=1
failed=()
started=$(date +%s)
elapsed() { echo "$(( $(date +%s) - started )) s"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || true

echo "== build ($(elapsed))"
arch=$("$python" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null || echo "80;90")
if ! FUSEDATTN_CUDA=ON "$python" -m pip install --no-build-isolation --no-deps --no-index -v \
       -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" . > "$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"
  echo "BUILD FAILED ($(elapsed)); log: $out/build.log"
  exit 1
fi
grep -E "Compiling entry function|spill|Used [0-9]+ registers" "$out/build.log" > "$out/ptxas.txt" || true
echo "built in $(elapsed); spills: $(grep -c 'bytes spill stores' "$out/ptxas.txt" | tr -d ' ') reports," \
     "$(grep -E '[1-9][0-9]* bytes spill stores' "$out/ptxas.txt" | wc -l | tr -d ' ') with spills"

echo "== CUDA tests ($(elapsed))"
per_test=""
"$python" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=60"
(cd tests && timeout 240 "$python" -m pytest -m cuda test_cuda.py -q -rfE --maxfail=60 $per_test \
   -p no:cacheprovider) 2>&1 | tee "$out/tests.log" | grep -E "^(FAILED|ERROR)|passed|failed|error" | tail -n 45
test_status=${PIPESTATUS[0]}
[ "$test_status" -eq 0 ] || failed+=("tests (exit $test_status)")

echo "== benchmark ($(elapsed))"
timeout 170 "$python" benchmarks/bench_gpu.py --out "$out" > "$out/bench.log" 2>&1
bench_status=$?
[ "$bench_status" -eq 0 ] || failed+=("benchmark (exit $bench_status)")
# Everything the benchmark printed before its table (smoke test, errors), then the summary,
# then the table itself as the last lines.
sed '/^(benchmark took/,$d' "$out/bench.log" | tail -n 30

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
            /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
if [ "$sanitize" -eq 1 ] && [ -z "$sanitizer" ]; then
  echo "== compute-sanitizer not found: memcheck and racecheck skipped"
  failed+=("sanitizer (not found)")
elif [ "$sanitize" -eq 1 ]; then
  # Small cases of every kernel family. Without the caching allocator each tensor is its own
  # cudaMalloc, so memcheck sees a read or write one element past a tensor.
  cases="test_decode or test_varlen_head_dims or test_kvcache_append or test_merge or test_attn_mask or test_window"
  echo "== memcheck ($(elapsed))"
  (cd tests && PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 110 "$sanitizer" --tool memcheck --error-exitcode 99 \
     "$python" -m pytest -m cuda test_cuda.py -q -x -p no:cacheprovider -k "$cases") > "$out/memcheck.log" 2>&1
  memcheck_status=$?
  grep -E "=========|passed|failed" "$out/memcheck.log" | head -n 25
  [ "$memcheck_status" -eq 0 ] || failed+=("memcheck (exit $memcheck_status)")
  echo "== racecheck ($(elapsed))"
  (cd tests && timeout 60 "$sanitizer" --tool racecheck --error-exitcode 99 \
     "$python" -m pytest -m cuda test_cuda.py -q -x -p no:cacheprovider -k "test_decode or test_window") \
     > "$out/racecheck.log" 2>&1
  racecheck_status=$?
  grep -E "=========|passed|failed" "$out/racecheck.log" | head -n 25
  [ "$racecheck_status" -eq 0 ] || failed+=("racecheck (exit $racecheck_status)")
fi
echo "== done in $(elapsed): tests $([ "$test_status" -eq 0 ] && echo passed || echo FAILED)," \
     "benchmark $([ "$bench_status" -eq 0 ] && echo ok || echo FAILED)${failed:+; FAILED: ${failed[*]}}"
sed -n '/^(benchmark took/,$p' "$out/bench.log"
[ "${#failed[@]}" -eq 0 ]
