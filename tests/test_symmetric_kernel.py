"""The symmetric-tile kernel of local NT-Xent equals the general chunked kernel."""

from __future__ import annotations

import pytest
import torch

from dist_infonce import nt_xent
from dist_infonce.kernels import chunked_lse
from dist_infonce.kernels.symmetric import self_lse
from tests.conftest import record_error


@pytest.mark.parametrize(
    "m,chunk,temperature,scale",
    # one tile; tiles that divide nothing; the online path (t = 100, |s| <= 100);
    # unnormalised rows; a tile per row.
    [(6, 8, 0.2, 1.0), (11, 4, 0.2, 1.0), (13, 5, 0.01, 1.0), (9, 2, 0.5, 3.0), (5, 1, 0.1, 1.0)],
)
def test_self_lse_matches_chunked_lse_with_the_diagonal_masked(
    m: int, chunk: int, temperature: float, scale: float
) -> None:
    g = torch.Generator().manual_seed(m)
    z = torch.randn(m, 7, generator=g, dtype=torch.float64)
    z = (scale * torch.nn.functional.normalize(z, dim=1)).requires_grad_()
    t = torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)
    w = torch.linspace(0.5, 1.5, m, dtype=torch.float64)
    got = self_lse(z, t, chunk)
    ref = chunked_lse(z, z, t, mask_idx=torch.arange(m), chunk_size=chunk)[0]
    got_grads = torch.autograd.grad((got * w).sum(), [z, t])
    ref_grads = torch.autograd.grad((ref * w).sum(), [z, t])
    assert record_error("symmetric tiles vs chunked kernel", got, ref) <= 1e-12
    for a, b in zip(got_grads, ref_grads, strict=True):
        assert record_error("symmetric tiles vs chunked kernel", a, b) <= 1e-12


def test_local_nt_xent_uses_the_symmetric_tiles_when_tiled() -> None:
    z1, z2 = torch.randn(10, 4, requires_grad=True), torch.randn(10, 4)

    def names(loss: torch.Tensor) -> set[str]:
        out, stack = set(), [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is not None:
                out.add(type(fn).__name__)
                stack.extend(f for f, _ in fn.next_functions)
        return out

    assert any("SelfLSE" in n for n in names(nt_xent(z1, z2, chunk_size=4)))
    assert not any("SelfLSE" in n for n in names(nt_xent(z1, z2)))  # small: dense
