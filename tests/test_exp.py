"""The kernels' vector exp (exp_vec in csrc/cpu/vec.h), per CPU ISA, against the exact exp.

Over the range the softmax uses it must be within 2 ulp of exp (float64 exp rounded to the
float32 grid); below -87.34 (where exp is under FLT_MIN) it returns exactly 0, so -inf scores
and very large negatives give probability 0; exp(0) is exactly 1 and NaN stays NaN.
"""

import numpy as np
import pytest

from conftest import ISAS
from fusedattn import _C

LOWEST = -87.33654  # below this the kernels flush to 0 (exp < 2**-126)
HIGHEST = 88.3762626647949  # exp overflows float32 above this


def _exp(isa, x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.frombuffer(_C._exp_floats(isa, x), dtype=np.float32)


def _floats_between(lo, hi, step):
    """Every `step`-th float32 between lo and hi (by bit pattern), both signs, with lo and hi."""
    lo, hi = np.float32(lo), np.float32(hi)
    negative = np.arange(np.float32(0).view(np.int32), np.abs(lo).view(np.int32), step, dtype=np.int64)
    positive = np.arange(0, hi.view(np.int32), step, dtype=np.int64)
    values = np.concatenate([-negative.astype(np.int32).view(np.float32), positive.astype(np.int32).view(np.float32),
                             [lo, hi]])
    return values.astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
def test_exp_within_2_ulp_over_the_range(isa):
    x = _floats_between(LOWEST, HIGHEST, 509)  # ~4.3 million inputs, dense near 0 like the bit patterns
    got = _exp(isa, x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    error = np.abs(got - exact) / ulp
    worst = int(np.argmax(error))
    assert error.max() <= 2.0, f"{isa}: exp({x[worst]!r}) = {got[worst]!r}, exact {exact[worst]!r}: {error.max():.2f} ulp"


@pytest.mark.parametrize("isa", ISAS)
def test_exp_special_inputs(isa):
    x = np.array([0.0, -0.0, -np.inf, np.nan, -87.4, -88.0, -103.0, -1e4, -1e30, -3.4e38], dtype=np.float32)
    got = _exp(isa, x)
    assert got[0] == 1.0 and got[1] == 1.0
    assert np.isnan(got[3])
    below = got[[2, 4, 5, 6, 7, 8, 9]]
    # exactly 0 where exp is under FLT_MIN (an absolute error below 2**-126); libm (scalar) gives
    # the subnormals instead
    assert np.all(below < np.finfo(np.float32).tiny) and np.all(below >= 0.0)
    if isa != "scalar":
        assert np.all(below == 0.0)


def test_exp_rejects_bad_buffers():
    with pytest.raises(ValueError, match="float32"):
        _C._exp_floats(ISAS[0], np.zeros(4, dtype=np.float64))
