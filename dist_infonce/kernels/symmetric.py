"""Row log-sum-exp of a symmetric similarity matrix ``t * Z @ Z.T``, each tile once.

Local NT-Xent compares the 2N views with themselves: ``S = t * Z Z^T`` is symmetric,
so tile (J, I) is the transpose of tile (I, J). Walking only the tiles with
J >= I and using each for the row statistics of block I and (transposed) of block J
halves the matmuls and exps of :func:`dist_infonce.kernels.chunked_lse` in forward
and backward. The diagonal (self-similarity) is left out.

Backward: with ``G_ij = g_i exp(S_ij - lse_i)`` the gradient is
``dZ = t (G + G^T) Z`` and ``dt = sum_ij G_ij <z_i, z_j>``; one tile gives
``W = G_IJ + G_JI^T``, which feeds ``dZ_I += t W Z_J`` and ``dZ_J += t W^T Z_I``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dist_infonce.kernels.bounds import logit_bound, shift_if_safe
from dist_infonce.kernels.chunked import DEFAULT_CHUNK, compute_dtype, no_autocast

__all__ = ["self_lse"]


def _upper_tiles(
    at: torch.Tensor, z: torch.Tensor, chunk: int
) -> Iterator[tuple[slice, slice, bool, torch.Tensor]]:
    """Yield ``(I, J, diagonal, S[I, J])`` for J >= I; diagonal tiles have -inf on their diagonal."""
    m = z.shape[0]
    for i0 in range(0, m, chunk):
        rows = slice(i0, i0 + chunk)
        ai = at[rows]
        for j0 in range(i0, m, chunk):
            cols = slice(j0, j0 + chunk)
            s = ai @ z[cols].T
            diagonal = i0 == j0
            if diagonal:
                s.diagonal().fill_(float("-inf"))
            yield rows, cols, diagonal, s


def _forward(at: torch.Tensor, z: torch.Tensor, chunk: int, shift: float | None) -> torch.Tensor:
    m = z.shape[0]
    if shift is not None:
        rsum = at.new_zeros(m)
        for rows, cols, diagonal, e in _upper_tiles(at, z, chunk):
            e.sub_(shift).exp_()
            rsum[rows] += e.sum(1)
            if not diagonal:
                rsum[cols] += e.sum(0)
        return rsum.log_().add_(shift)
    lse = at.new_full((m,), float("-inf"))
    for rows, cols, diagonal, s in _upper_tiles(at, z, chunk):
        if not diagonal:
            torch.logaddexp(lse[cols], torch.logsumexp(s, dim=0), out=lse[cols])
        torch.logaddexp(lse[rows], torch.logsumexp(s, dim=1), out=lse[rows])
    return lse


def _backward(
    at: torch.Tensor,
    z: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    chunk: int,
    shift: float | None,
) -> torch.Tensor:
    """Returns ``V = (G + G^T) @ Z`` (without the factor t)."""
    v = torch.zeros_like(z)
    if shift is not None:
        # alpha_i = g_i exp(C - lse_i): W = E * (alpha_I + alpha_J^T), E = exp(S - C).
        alpha = g * (shift - lse).exp()
    for rows, cols, diagonal, s in _upper_tiles(at, z, chunk):
        if shift is not None:
            w = s.sub_(shift).exp_().mul_(alpha[rows, None] + alpha[None, cols])
        else:
            w = (s - lse[None, cols]).exp_().mul_(g[None, cols])
            w.addcmul_(s.sub_(lse[rows, None]).exp_(), g[rows, None])
        v[rows].addmm_(w, z[cols])
        if not diagonal:
            v[cols].addmm_(w.T, z[rows])
    return v


class _SelfLSE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z: torch.Tensor, inv_temp: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        dt = compute_dtype(z.dtype)
        with no_autocast(z.device):
            t = inv_temp.detach().to(dt)
            zf = z.detach().to(dt)
            at = zf * t
            shift = shift_if_safe(logit_bound(at, zf), at.dtype)
            lse = _forward(at, zf, chunk, shift)
        ctx.save_for_backward(z, inv_temp, lse)
        ctx.chunk = chunk
        ctx.shift = shift
        return lse

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        z, inv_temp, lse = ctx.saved_tensors
        with no_autocast(z.device):
            dt = lse.dtype
            t = inv_temp.detach().to(dt)
            zf = z.detach().to(dt)
            v = _backward(zf * t, zf, lse, g.to(dt), ctx.chunk, ctx.shift)
            grad_z = (v * t).to(z.dtype) if ctx.needs_input_grad[0] else None
            grad_t = None
            if ctx.needs_input_grad[1]:
                # sum_ij G_ij <z_i, z_j> = 0.5 * sum_i <z_i, ((G + G^T) Z)_i>
                grad_t = (0.5 * (zf * v).sum()).to(inv_temp.dtype).reshape(inv_temp.shape)
        return grad_z, grad_t, None


def self_lse(
    z: torch.Tensor, inv_temp: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Row log-sum-exp of ``t * Z @ Z.T`` without the diagonal, tile by tile.

    The same values and gradients as
    ``chunked_lse(z, z, inv_temp, mask_idx=arange(M))[0]`` at half the tiles.

    Args:
        z: the rows, which are also the columns. Shape: (M, D), M >= 2.
        inv_temp: inverse temperature t. Shape: () (0-dim); may require grad.
        chunk_size: tile edge; any positive int.

    Returns:
        Shape: (M,), float32 (float64 for float64 inputs).
    """
    return _SelfLSE.apply(z, inv_temp, chunk_size)
