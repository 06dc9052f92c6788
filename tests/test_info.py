"""Package surface: import, the public names, fusedattn.info() and `python -m fusedattn info`."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

import fusedattn
from conftest import ISAS


def test_public_api():
    for name in ("attention", "scaled_dot_product_attention", "flash_attn_func", "get_num_threads",
                 "set_num_threads", "info", "__version__"):
        assert hasattr(fusedattn, name), name
        assert name in fusedattn.__all__
    assert fusedattn.__version__ == importlib.metadata.version("fusedattn")


def test_info_dict():
    report = fusedattn.info(verbose=False)
    assert {"version", "cpu_isa", "cpu_isas_available", "num_threads", "cuda_compiled", "gpus"} <= set(report)
    assert report["version"] == fusedattn.__version__
    assert report["cpu_isas_available"] == ISAS and "scalar" in ISAS
    assert report["cpu_isa"] == ISAS[0]
    assert report["num_threads"] == fusedattn.get_num_threads() >= 1
    assert isinstance(report["cuda_compiled"], bool)
    assert isinstance(report["gpus"], list)


def test_info_verbose_prints(capsys):
    report = fusedattn.info()
    printed = capsys.readouterr().out
    assert f"fusedattn {report['version']}" in printed
    assert "CPU ISA" in printed and report["cpu_isa"] in printed


def _run(args, **env):
    return subprocess.run([sys.executable, *args], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=120)


def test_python_m_fusedattn_info():
    proc = _run(["-m", "fusedattn", "info"])
    assert proc.returncode == 0, proc.stderr
    assert "CPU ISA" in proc.stdout and ISAS[0] in proc.stdout


def test_info_reports_a_bad_env_isa_instead_of_crashing():
    proc = _run(["-m", "fusedattn", "info"], FUSEDATTN_CPU_ISA="bogus")
    assert proc.returncode == 0, proc.stderr
    assert "FUSEDATTN_CPU_ISA='bogus'" in proc.stdout


def test_import_without_torch():
    """numpy users never pay for torch: importing fusedattn does not import it."""
    code = "import sys, fusedattn; assert 'torch' not in sys.modules; print(fusedattn.__version__)"
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == fusedattn.__version__


@pytest.mark.cuda
def test_info_lists_the_gpus():
    report = fusedattn.info(verbose=False)
    assert report["cuda_compiled"] and report["gpus"]
    assert all("error" not in gpu for gpu in report["gpus"]), report["gpus"]
