"""CPU ISA paths: a representative subset of the forward grid under each ISA this machine runs
(avx512 / avx2 / scalar, as fusedattn._C.available_isas() reports), the ISAs agreeing with each
other, and clear errors for a bogus or unavailable ISA (via _set_cpu_isa and FUSEDATTN_CPU_ISA).
"""

import os
import subprocess
import sys

import pytest
import torch

import fusedattn
from conftest import ISAS, check_attention, force_isa, make_qkv
from fusedattn import _C, _runtime

SUBSET = [  # dtype, head_dim, (Lq, Lk), causal, window, (Hq, Hkv), layout, strides
    (torch.float32, 1, (17, 129), True, (-1, -1), (2, 2), "bhsd", "contiguous"),
    (torch.float32, 59, (129, 17), True, (-1, -1), (4, 1), "bshd", "slice"),
    (torch.float32, 64, (129, 129), False, (10, 3), (8, 2), "bhsd", "permuted"),
    (torch.float32, 256, (1, 17), False, (-1, -1), (2, 2), "bshd", "contiguous"),
    (torch.float64, 8, (17, 17), True, (4, -1), (4, 1), "bhsd", "slice"),
    (torch.float64, 111, (129, 129), True, (-1, -1), (2, 2), "bshd", "contiguous"),
    (torch.float64, 128, (1, 1), False, (-1, -1), (4, 1), "bhsd", "contiguous"),
    (torch.float16, 40, (129, 129), True, (-1, -1), (8, 2), "bhsd", "contiguous"),
    (torch.float16, 128, (17, 129), False, (-1, 20), (2, 2), "bshd", "permuted"),
    (torch.float16, 59, (129, 17), False, (-1, -1), (4, 1), "bhsd", "slice"),
    (torch.bfloat16, 64, (129, 17), True, (-1, -1), (2, 2), "bhsd", "permuted"),
    (torch.bfloat16, 111, (17, 129), True, (30, -1), (8, 2), "bshd", "slice"),
    (torch.bfloat16, 256, (129, 129), False, (-1, -1), (4, 1), "bhsd", "contiguous"),
    (torch.bfloat16, 1, (1, 17), True, (-1, -1), (2, 2), "bhsd", "contiguous"),
]


@pytest.mark.parametrize("dtype,head_dim,seqlens,causal,window,heads,layout,strides", SUBSET)
def test_forward_under_each_isa(isa, dtype, head_dim, seqlens, causal, window, heads, layout, strides):
    assert _runtime.cpu_isa() == isa
    q, k, v = make_qkv(1, heads[0], heads[1], seqlens[0], seqlens[1], head_dim, dtype, layout, strides, k_scale=2.0)
    result = fusedattn.attention(q, k, v, causal=causal, window=window, layout=layout, return_lse=True)
    check_attention(result, q, k, v, causal=causal, window=window, layout=layout, return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_isas_agree_with_each_other(dtype):
    """All ISAs compute the same function: they differ from each other by rounding only."""
    q, k, v = make_qkv(2, 4, 2, 70, 90, 48, dtype)
    results = {}
    for name in ISAS:
        with force_isa(name):
            results[name] = fusedattn.attention(q, k, v, causal=True).double()
    atol = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    for name, out in results.items():
        torch.testing.assert_close(out, results[ISAS[0]], atol=atol, rtol=0, msg=f"{name} vs {ISAS[0]}")


def test_default_isa_is_the_best_available():
    assert ISAS and ISAS[-1] == "scalar"
    assert _runtime.cpu_isa() == ISAS[0]
    assert fusedattn.info(verbose=False)["cpu_isa"] == ISAS[0]


def test_force_isa_restores_default():
    with force_isa(ISAS[-1]):
        assert _runtime.cpu_isa() == ISAS[-1]
    assert _runtime.cpu_isa() == ISAS[0]


@pytest.mark.parametrize("name", ["bogus", "amx"])
def test_unavailable_isa_raises_value_error(name):
    if name in ISAS:
        pytest.skip(f"{name} is available on this machine")
    with pytest.raises(ValueError, match=rf"FUSEDATTN_CPU_ISA='{name}'.*available: {', '.join(ISAS)}"):
        _runtime._set_cpu_isa(name)


def test_extension_rejects_unknown_isa():
    q = torch.randn(1, 1, 4, 8)
    out = torch.full_like(q, float("nan"))
    variant = (0.3, False, 0, -1, -1, 0.0, None, None, None, 0.0, 0, 0)  # see functional._Call.variant
    with pytest.raises(ValueError, match="bogus"):
        _C.attention_forward(q, q, q, out, None, variant, "bogus", 1, ("q", "k", "v"))
    assert torch.isnan(out).all()


def _run_python(code, isa):
    env = dict(os.environ, FUSEDATTN_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_var_bogus_isa_gives_clear_error():
    code = ("import fusedattn, torch\n"
            "q = torch.randn(1, 2, 5, 8)\n"
            "fusedattn.attention(q, q, q)\n")
    proc = _run_python(code, "bogus")
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError:") and "FUSEDATTN_CPU_ISA='bogus'" in last_line, proc.stderr
    assert "available: " + ", ".join(ISAS) in last_line


def test_env_var_forces_isa():
    code = ("import fusedattn, torch\n"
            "from fusedattn.reference import attention_reference\n"
            "q = torch.randn(1, 2, 5, 8, dtype=torch.float64)\n"
            "out = fusedattn.attention(q, q, q, causal=True)\n"
            "ref, _ = attention_reference(q, q, q, causal=True)\n"
            "assert abs(out.numpy() - ref).max() < 1e-12\n"
            "print(fusedattn.info(verbose=False)['cpu_isa'])\n")
    proc = _run_python(code, ISAS[-1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ISAS[-1]
