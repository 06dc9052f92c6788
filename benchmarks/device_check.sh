#!/usr/bin/env bash
# The CUDA backend's check on a lent GPU machine, in ONE call of under 8 minutes:
#   1. build and install fusedattn with the CUDA module (torch and the build tools are there);
#   2. run the CUDA tests (pytest -m cuda tests/test_cuda.py);
#   3. run the GPU benchmark (benchmarks/bench_gpu.py) and print its table LAST.
# Steps 2 and 3 always run once the build succeeded; the exit status is non-zero if any step
# failed. Logs and bench_gpu.json go to $OUT (the device tool's folder) or /tmp.
#
#   bash benchmarks/device_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/fusedattn_device_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=python3
failed=()
started=$(date +%s)
elapsed() { echo "$(( $(date +%s) - started )) s"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || true

echo "== build ($(elapsed))"
if ! FUSEDATTN_CUDA=ON "$python" -m pip install --no-build-isolation --no-deps --no-index -v . > "$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"
  echo "BUILD FAILED ($(elapsed)); log: $out/build.log"
  exit 1
fi
grep -E "Compiling entry function|spill|Used [0-9]+ registers" "$out/build.log" > "$out/ptxas.txt" || true
echo "built in $(elapsed); spills: $(grep -c 'bytes spill stores' "$out/ptxas.txt" | tr -d ' ') reports," \
     "$(grep -E '[1-9][0-9]* bytes spill stores' "$out/ptxas.txt" | wc -l | tr -d ' ') with spills"

echo "== CUDA tests ($(elapsed))"
(cd tests && timeout 240 "$python" -m pytest -m cuda test_cuda.py -x -q -p no:cacheprovider) 2>&1 | tee "$out/tests.log" | tail -n 25
test_status=${PIPESTATUS[0]}
[ "$test_status" -eq 0 ] || failed+=("tests (exit $test_status)")

echo "== benchmark ($(elapsed))"
timeout 170 "$python" benchmarks/bench_gpu.py --out "$out" > "$out/bench.log" 2>&1
bench_status=$?
[ "$bench_status" -eq 0 ] || failed+=("benchmark (exit $bench_status)")
# Everything the benchmark printed before its table (smoke test, errors), then the summary,
# then the table itself as the last lines.
sed '/^(benchmark took/,$d' "$out/bench.log" | tail -n 30
echo "== done in $(elapsed): tests $([ "$test_status" -eq 0 ] && echo passed || echo FAILED)," \
     "benchmark $([ "$bench_status" -eq 0 ] && echo ok || echo FAILED)${failed:+; FAILED: ${failed[*]}}"
sed -n '/^(benchmark took/,$p' "$out/bench.log"
[ "${#failed[@]}" -eq 0 ]
