"""The one-direction forward's row panels (:func:`dist_infonce.kernels.chunked_lse` without
``cols``, a gradient to come): the gradient is formed in the forward and only scaled in
the backward. Every path against the dense float64 log-sum-exp."""

from __future__ import annotations

import pytest
import torch

from dist_infonce.kernels import chunked_lse, dense_lse
from dist_infonce.kernels.chunked import PANEL_TILES, panel_rows
from tests.conftest import record_error


def inputs(n: int, m: int, d: int, seed: int, scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    b = scale * torch.randn(m, d, generator=g, dtype=torch.float64)
    extra = torch.randn(n, generator=g, dtype=torch.float64)
    return [a, b, extra]


def run(fn, base, t: float, *, weights: torch.Tensor | None, want: tuple[bool, ...], **kw):
    a, b, extra = (x.clone().requires_grad_(w) for x, w in zip(base, want[:3], strict=True))
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=want[3])
    lse, _ = fn(a, b, tt, extra=extra if kw.pop("with_extra", False) else None, **kw)
    w = torch.ones_like(lse) if weights is None else weights
    leaves = [x for x, on in zip([a, b, extra, tt], want, strict=True) if on]
    grads = torch.autograd.grad((lse * w).sum(), leaves, allow_unused=True)
    return [lse.detach(), *(torch.zeros(()) if g is None else g for g in grads)]


@pytest.mark.parametrize("chunk", [2, 3, 64])
@pytest.mark.parametrize("t", [10.0, 100.0], ids=["bounded", "row-max"])
@pytest.mark.parametrize("cotangent", ["uniform", "per-row"])
@pytest.mark.parametrize("masked", [False, True])
def test_panels_match_dense(chunk: int, t: float, cotangent: str, masked: bool) -> None:
    # t = 10 with unit-ish rows: a valid fixed shift (exp(s) as it is); t = 100 and
    # norms ~1.3: |s| up to ~500, each row shifted by its panel maximum. Panels of
    # PANEL_TILES * chunk^2 // M rows divide nothing (M = 13). The per-row cotangent takes the
    # backward's recompute for dB.
    n, m, d = 11, 13, 4
    base = inputs(n, m, d, seed=chunk, scale=0.35)
    weights = torch.linspace(0.5, 1.5, n, dtype=torch.float64) if cotangent == "per-row" else None
    kw: dict = {"with_extra": True}
    if masked:
        # Some rows leave one column out (two rows the same one), others none.
        kw["mask_idx"] = torch.tensor([0, 3, 3, 12, -1, 13, 5, 7, 100, 2, 1])
    want = (True, True, True, True)
    got = run(chunked_lse, base, t, weights=weights, want=want, chunk_size=chunk, **kw)
    ref = run(dense_lse, base, t, weights=weights, want=want, **kw)
    assert panel_rows(n, m, chunk) == min(n, max(1, PANEL_TILES * chunk * chunk // m))
    for name, a, e in zip(
        ["lse", "grad a", "grad b", "grad extra", "grad t"], got, ref, strict=True
    ):
        err = record_error("chunked row panels vs dense (float64)", a, e)
        assert err <= 1e-12, f"{name}: {err:.2e}"


@pytest.mark.parametrize("want", [(True, False, False, False), (False, True, False, False),
                                  (False, False, False, True)], ids=["a", "b", "t"])  # fmt: skip
def test_panels_with_one_input_wanting_a_gradient(want: tuple[bool, ...]) -> None:
    base = inputs(9, 7, 3, seed=1, scale=0.5)
    got = run(chunked_lse, base, 5.0, weights=None, want=want, chunk_size=2)
    ref = run(dense_lse, base, 5.0, weights=None, want=want)
    for a, e in zip(got, ref, strict=True):
        assert record_error("chunked row panels, one gradient", a, e) <= 1e-12


@pytest.mark.parametrize("n,m", [(0, 5), (4, 0)])
def test_panels_with_an_empty_side(n: int, m: int) -> None:
    # A rank with 0 rows, or an empty pool: log(0) rows, zero gradients, no NaN.
    a = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    lse, _ = chunked_lse(a, b, t, chunk_size=4)
    assert lse.shape == (n,) and bool(torch.isneginf(lse).all())
    loss = torch.where(lse.isfinite(), lse, 0).sum()
    ga, gb, gt = torch.autograd.grad(loss, [a, b, t])
    assert not any(bool(x.isnan().any()) for x in (ga, gb, gt))


def test_panel_graph_saves_linear_memory() -> None:
    # Saved for backward: the inputs, the statistics, and U, V ((N + M) x D): never N x M.
    n, d = 512, 8
    a = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, d, requires_grad=True)
    t = torch.tensor(10.0, requires_grad=True)
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lse, _ = chunked_lse(a, b, t, chunk_size=64)
    assert sum(saved) < 8 * n * d * 4 + 4 * n * 4, sum(saved)
    lse.sum().backward()


def test_forward_formed_gradients_survive_retain_graph() -> None:
    # The first backward turns the forward's U and V into the gradients in place; a
    # second one through the same graph recomputes them: the same gradients (softmax
    # panels and SigLIP tiles), to rounding.
    from dist_infonce import siglip_loss

    a = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    for loss in (
        chunked_lse(a, b, t, chunk_size=2)[0].sum(),
        siglip_loss(a, b, t, -2.0, kernel="chunked", chunk_size=2),
    ):
        first = torch.autograd.grad(loss, [a, b, t], retain_graph=True)
        second = torch.autograd.grad(loss, [a, b, t])
        for x, y in zip(first, second, strict=True):
            assert record_error("second backward (retain_graph) vs first", y, x) <= 1e-13
