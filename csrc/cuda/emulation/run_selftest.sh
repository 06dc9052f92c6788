#!/usr/bin/env bash
# Builds the CUDA kernels' sources for the emulator with the host C++ compiler and runs the
# self-test (selftest.cpp) on the CPU: no GPU and no nvcc needed. Optional argument: a substring
# of the case names to run (e.g. "decode", "fp16 d64").
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
out="${TMPDIR:-/tmp}/fusedattn_emulator"
mkdir -p "$out"
cxx="${CXX:-g++}"
flags=(-std=c++17 -O2 -g -DFUSEDATTN_CUDA_EMULATION -I"$root/csrc" -Wall -Wno-unknown-pragmas)
objects=()
for source in forward_fp16 forward_bf16 decode_fp16 decode_bf16 attention_cuda; do
  "$cxx" "${flags[@]}" -x c++ -c "$root/csrc/cuda/$source.cu" -o "$out/$source.o" &
  objects+=("$out/$source.o")
done
for source in emulator selftest; do
  "$cxx" "${flags[@]}" -c "$root/csrc/cuda/emulation/$source.cpp" -o "$out/$source.o" &
  objects+=("$out/$source.o")
done
wait
"$cxx" "${objects[@]}" -o "$out/selftest"
"$out/selftest" "$@"
