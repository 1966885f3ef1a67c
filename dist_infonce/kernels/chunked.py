"""Tiled log-sum-exp over a similarity matrix, exact in forward and backward.

Every InfoNCE-family loss in this package is ``lse_i - positive_i`` per row, where
``lse_i = log(exp(extra_i) + sum_j exp(t * <a_i, b_j>))`` over a pool of columns
(minus at most one masked column per row), and, for symmetric losses, the same
over columns. The positive logit costs O(N * D) and goes through ordinary autograd;
this module computes the log-sum-exp without ever holding the N x M matrix.

Forward walks (chunk x chunk) tiles, combining per-tile log-sum-exps with
``logaddexp`` (an online log-sum-exp), and saves only its inputs and one number
per row (and per column). Backward recomputes each tile and forms the softmax
weights from the saved statistics:

    G_ij = g_row_i * exp(S_ij - lse_i) + g_col_j * exp(S_ij - clse_j)
    dA = t * G @ B,   dB = t * G^T @ A,   dt = sum_i <a_i, (G @ B)_i>

so the temperature gradient costs no extra pass over the matrix. Accumulation is
in float32 (float64 for float64 inputs), also for float16/bfloat16 inputs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dist_infonce.kernels.bounds import logit_bound, shift_if_safe

__all__ = ["DEFAULT_CHUNK", "chunked_lse", "compute_dtype", "dense_lse", "no_autocast"]

# Tile edge used when the caller does not force one. Tuned with
# `python -m dist_infonce.bench --tune-chunk` on the project machine.
DEFAULT_CHUNK = 1024


def no_autocast(device: torch.device) -> torch.autocast:
    """Autocast off: under bf16/fp16 autocast a float32 matmul would run (and round
    the logits) in half precision. Like autocast's own policy for cross_entropy,
    the loss keeps its logits and log-sum-exps in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask_tile(s: torch.Tensor, mask_idx: torch.Tensor | None, j0: int) -> None:
    """Set S[r, mask_idx[r] - j0] = -inf for the rows whose masked column is in this tile."""
    if mask_idx is None:
        return
    # gather / where / scatter rather than boolean indexing: no host sync per
    # tile on CUDA. Rows whose masked column lies elsewhere write back their
    # own value.
    local = mask_idx - j0
    inside = (local >= 0) & (local < s.shape[1])
    col = local.clamp(0, s.shape[1] - 1)[:, None]
    keep = s.gather(1, col)
    s.scatter_(1, col, torch.where(inside[:, None], float("-inf"), keep))


def _fixed_shift(at: torch.Tensor, b: torch.Tensor) -> float | None:
    """One shift C valid for every logit of ``at @ b.T`` (the temperature is folded into
    ``at``), or None: the policy of :mod:`dist_infonce.kernels.bounds`.

    With a shift, one exp per tile serves the row and the column statistics (and both
    gradient directions) instead of one exp per direction with per-row / per-column
    maxima. With L2-normalised inputs C = 1/temperature: the fast path holds for
    temperature >= 1/32 in float32.
    """
    return shift_if_safe(logit_bound(at, b), at.dtype)


def _tiles(
    at: torch.Tensor, b: torch.Tensor, mask_idx: torch.Tensor | None, chunk: int
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield ``(rows, cols, S[rows, cols])`` tile by tile, S = at @ b.T, masked entries -inf.

    Each tile is a fresh (chunk, chunk) buffer the caller may overwrite in place.
    """
    for i0 in range(0, at.shape[0], chunk):
        rows = slice(i0, i0 + chunk)
        ai = at[rows]
        mi = None if mask_idx is None else mask_idx[rows]
        for j0 in range(0, b.shape[0], chunk):
            cols = slice(j0, j0 + chunk)
            s = ai @ b[cols].T
            _mask_tile(s, mi, j0)
            yield rows, cols, s


def _forward_shifted(
    at: torch.Tensor,
    b: torch.Tensor,
    mask_idx: torch.Tensor | None,
    want_cols: bool,
    chunk: int,
    shift: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    rsum = at.new_zeros(at.shape[0])
    csum = at.new_zeros(b.shape[0] if want_cols else 0)
    for rows, cols, e in _tiles(at, b, mask_idx, chunk):
        e.sub_(shift).exp_()
        rsum[rows] += e.sum(1)
        if want_cols:
            csum[cols] += e.sum(0)
    return rsum.log_().add_(shift), csum.log_().add_(shift)


def _forward_online(
    at: torch.Tensor,
    b: torch.Tensor,
    mask_idx: torch.Tensor | None,
    want_cols: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # General case: per-tile log-sum-exps (each with its own max) merged with
    # logaddexp, so no logit range is assumed.
    lse = at.new_full((at.shape[0],), float("-inf"))
    clse = at.new_full((b.shape[0] if want_cols else 0,), float("-inf"))
    for rows, cols, s in _tiles(at, b, mask_idx, chunk):
        if want_cols:
            torch.logaddexp(clse[cols], torch.logsumexp(s, dim=0), out=clse[cols])
        torch.logaddexp(lse[rows], torch.logsumexp(s, dim=1), out=lse[rows])
    return lse, clse


def _backward_shifted(
    at: torch.Tensor,
    b: torch.Tensor,
    mask_idx: torch.Tensor | None,
    lse: torch.Tensor,
    clse: torch.Tensor,
    g_lse: torch.Tensor,
    g_clse: torch.Tensor | None,
    chunk: int,
    shift: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(G @ B, G^T @ at)`` with G = E * (alpha_i + beta_j), E = exp(S - C).

    alpha_i = g_i * exp(C - lse_i) <= g_i * exp(2C) cannot overflow (lse_i >= -C).
    """
    alpha = g_lse * (shift - lse).exp()
    u = torch.zeros_like(at)
    db = torch.zeros_like(b)
    if g_clse is None:
        # Rows only: alpha is constant along a row, so apply it to the (N, D)
        # results instead of the (N, M) tiles: no elementwise pass beyond exp.
        at_alpha = at * alpha[:, None]
        for rows, cols, e in _tiles(at, b, mask_idx, chunk):
            e.sub_(shift).exp_()
            u[rows].addmm_(e, b[cols])
            db[cols].addmm_(e.T, at_alpha[rows])
        return u.mul_(alpha[:, None]), db
    beta = g_clse * (shift - clse).exp()
    for rows, cols, e in _tiles(at, b, mask_idx, chunk):
        g = e.sub_(shift).exp_().mul_(alpha[rows, None] + beta[None, cols])
        u[rows].addmm_(g, b[cols])
        db[cols].addmm_(g.T, at[rows])
    return u, db


def _backward_online(
    at: torch.Tensor,
    b: torch.Tensor,
    mask_idx: torch.Tensor | None,
    lse: torch.Tensor,
    clse: torch.Tensor,
    g_lse: torch.Tensor,
    g_clse: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(G @ B, G^T @ at)`` with G = g_i exp(S - lse_i) + g_j exp(S - clse_j)."""
    u = torch.zeros_like(at)
    db = torch.zeros_like(b)
    for rows, cols, s in _tiles(at, b, mask_idx, chunk):
        if g_clse is not None:
            g = (s - clse[None, cols]).exp_().mul_(g_clse[None, cols])
            g.addcmul_(s.sub_(lse[rows, None]).exp_(), g_lse[rows, None])
        else:
            g = s.sub_(lse[rows, None]).exp_().mul_(g_lse[rows, None])
        u[rows].addmm_(g, b[cols])
        db[cols].addmm_(g.T, at[rows])
    return u, db


def dense_lse(
    a: torch.Tensor,
    b: torch.Tensor,
    inv_temp: torch.Tensor,
    *,
    extra: torch.Tensor | None = None,
    mask_idx: torch.Tensor | None = None,
    cols: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference path: materialise the (N, M) logits and let autograd differentiate.

    Same contract as :func:`chunked_lse`; faster for small N * M, memory O(N * M).
    """
    dt = compute_dtype(a.dtype)
    with no_autocast(a.device):
        s = (a.to(dt) @ b.to(dt).T) * inv_temp
        if mask_idx is not None:
            keep = torch.arange(b.shape[0], device=a.device)[None, :] != mask_idx[:, None]
            s = s.masked_fill(~keep, float("-inf"))
        col_lse = torch.logsumexp(s, dim=0) if cols else None
        if extra is not None:
            s = torch.cat([extra.to(dt)[:, None], s], dim=1)
        return torch.logsumexp(s, dim=1), col_lse


class _ChunkedLSE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        a: torch.Tensor,
        b: torch.Tensor,
        inv_temp: torch.Tensor,
        extra: torch.Tensor | None,
        mask_idx: torch.Tensor | None,
        want_cols: bool,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dt = compute_dtype(a.dtype)
        with no_autocast(a.device):
            t = inv_temp.detach().to(dt)
            # Fold the temperature into A once (N x D) instead of scaling every tile.
            at = a.detach().to(dt) * t
            bf = b.detach().to(dt)
            shift = _fixed_shift(at, bf)
            if shift is not None:
                lse, clse = _forward_shifted(at, bf, mask_idx, want_cols, chunk, shift)
            else:
                lse, clse = _forward_online(at, bf, mask_idx, want_cols, chunk)
            if extra is not None:
                lse = torch.logaddexp(lse, extra.detach().to(dt))
        ctx.save_for_backward(a, b, inv_temp, extra, mask_idx, lse, clse)
        ctx.want_cols = want_cols
        ctx.chunk = chunk
        ctx.shift = shift
        return lse, clse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, g_lse: torch.Tensor, g_clse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        a, b, inv_temp, extra, mask_idx, lse, clse = ctx.saved_tensors
        with no_autocast(a.device):
            return _ChunkedLSE._backward(
                ctx, g_lse, g_clse, a, b, inv_temp, extra, mask_idx, lse, clse
            )

    @staticmethod
    def _backward(
        ctx,
        g_lse: torch.Tensor,
        g_clse: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        inv_temp: torch.Tensor,
        extra: torch.Tensor | None,
        mask_idx: torch.Tensor | None,
        lse: torch.Tensor,
        clse: torch.Tensor,
    ) -> tuple[torch.Tensor | None, ...]:
        chunk, want_cols = ctx.chunk, ctx.want_cols
        dt = lse.dtype
        t = inv_temp.detach().to(dt)
        af = a.detach().to(dt)
        at = af * t
        bf = b.detach().to(dt)
        g_lse = g_lse.to(dt)
        g_clse = g_clse.to(dt) if want_cols else None
        if ctx.shift is not None:
            u, db = _backward_shifted(at, bf, mask_idx, lse, clse, g_lse, g_clse, chunk, ctx.shift)
        else:
            u, db = _backward_online(at, bf, mask_idx, lse, clse, g_lse, g_clse, chunk)
        grad_a = grad_b = grad_t = grad_extra = None
        if ctx.needs_input_grad[0]:
            grad_a = (u * t).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = db.to(b.dtype)
        if ctx.needs_input_grad[2]:
            grad_t = (af * u).sum().to(inv_temp.dtype).reshape(inv_temp.shape)
        if extra is not None and ctx.needs_input_grad[3]:
            grad_extra = (g_lse * (extra.detach().to(dt) - lse).exp()).to(extra.dtype)
        return grad_a, grad_b, grad_t, grad_extra, None, None, None


def chunked_lse(
    a: torch.Tensor,
    b: torch.Tensor,
    inv_temp: torch.Tensor,
    *,
    extra: torch.Tensor | None = None,
    mask_idx: torch.Tensor | None = None,
    cols: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row (and optionally column) log-sum-exp of ``t * A @ B.T``, tile by tile.

    Args:
        a: rows. Shape: (N, D).
        b: columns (the pool). Shape: (M, D), same dtype and device as ``a``.
        inv_temp: inverse temperature t. Shape: () (0-dim); may require grad.
        extra: one more logit per row, included in the row log-sum-exp only (the
            positive logit when negatives are explicit). Shape: (N,).
        mask_idx: per row, one column to leave out of both log-sum-exps, or an index
            outside [0, M) for none (NT-Xent's self-similarity). Shape: (N,), int64.
            Several rows may mask one column (its statistic leaves them all out).
        cols: also return the column log-sum-exp (over the N rows).
        chunk_size: tile edge; any positive int (need not divide N or M).

    Returns:
        ``(row_lse, col_lse)``: shapes (N,) and (M,) (``col_lse`` is None unless
        ``cols``), in float32 (float64 for float64 inputs).
    """
    lse, clse = _ChunkedLSE.apply(a, b, inv_temp, extra, mask_idx, cols, chunk_size)
    return lse, (clse if cols else None)
