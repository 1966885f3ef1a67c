"""The fixed-shift policy (dist_infonce/kernels/bounds.py): one bound, one range per dtype."""

from __future__ import annotations

import pytest
import torch

from dist_infonce.kernels.bounds import (
    SAFE_EXP_RANGE,
    logit_bound,
    shift_if_safe,
    unit_vector_bound,
)


def test_bound_is_cauchy_schwarz_and_covers_every_logit() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 7, generator=g), 3 * torch.randn(11, 7, generator=g)
    t = torch.tensor(2.5)
    bound = logit_bound(a, b, scale=t)
    # The kernels' formulas before the policy moved here, to the last bit.
    assert bound == float(a.norm(dim=1).max() * b.norm(dim=1).max() * t)
    assert logit_bound(a * t, b) == float((a * t).norm(dim=1).max() * b.norm(dim=1).max())
    assert (t * a @ b.T).abs().max() <= bound
    assert logit_bound(a[:0], b) is None and logit_bound(a, b[:0]) is None


def test_half_inputs_have_their_norms_in_float32() -> None:
    a = torch.randn(9, 5).bfloat16()
    assert logit_bound(a, a, norm_dtype=torch.float32) == float(a.float().norm(dim=1).max() ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shift_only_while_twice_the_bound_fits_the_range(dtype: torch.dtype) -> None:
    edge = SAFE_EXP_RANGE[dtype] / 2  # float32: 1/temperature 32; float64: 300
    assert shift_if_safe(edge, dtype) == edge
    assert shift_if_safe(edge * (1 + 1e-6), dtype) is None
    assert shift_if_safe(None, dtype) is None


def test_unit_vectors_are_bounded_by_the_inverse_temperature() -> None:
    a = torch.nn.functional.normalize(torch.randn(20, 4, dtype=torch.float64), dim=-1)
    t = torch.tensor(7.0, dtype=torch.float64)
    assert (t * a @ a.T).abs().max() <= unit_vector_bound(t) * (1 + 1e-15)
