"""The CUDA kernels' sources on the CPU emulator (csrc/cuda/emulation/), so that every test run pins
them without a GPU: run_selftest.sh compiles the kernels with the host C++ compiler and checks
them against an fp64 attention written on common/variant.h (the semantics the CPU tests pin),
inside NaN-filled buffers (no read outside an input, every output element written and nothing
around it). About 20 s on 2 cores. Skipped where the sources or a C++ compiler are missing (an
installed package tested away from its source tree).
"""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SELFTEST = ROOT / "csrc" / "cuda" / "emulation" / "run_selftest.sh"


@pytest.mark.skipif(not SELFTEST.exists() or shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="needs the source tree and a C++ compiler")
def test_cuda_kernels_on_the_cpu_emulator(tmp_path):
    result = subprocess.run(["bash", str(SELFTEST)], capture_output=True, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=1200)
    failures = [line for line in result.stdout.splitlines() if "FAIL" in line]
    assert result.returncode == 0 and "OK: 0 failure(s)" in result.stdout, (
        f"exit {result.returncode}; failing cases: {failures[:20]}; stderr: {result.stderr[-2000:]}")
