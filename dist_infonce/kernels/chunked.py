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

import torch

__all__ = ["DEFAULT_CHUNK", "chunked_lse", "compute_dtype", "dense_lse"]

# Tile edge used when the caller does not force one. Tuned with
# `python -m dist_infonce.bench --tune-chunk` on the project machine.
DEFAULT_CHUNK = 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask_tile(s: torch.Tensor, mask_idx: torch.Tensor | None, j0: int) -> None:
    """Set S[r, mask_idx[r] - j0] = -inf for the rows whose masked column is in this tile."""
    if mask_idx is None:
        return
    local = mask_idx - j0
    rows = ((local >= 0) & (local < s.shape[1])).nonzero().squeeze(1)
    if rows.numel():
        s[rows, local[rows]] = float("-inf")


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
        n, m = a.shape[0], b.shape[0]
        t = inv_temp.detach().to(dt)
        # Fold the temperature into A once (N x D) instead of scaling every tile.
        at = a.detach().to(dt) * t
        bf = b.detach().to(dt)
        lse = torch.full((n,), float("-inf"), dtype=dt, device=a.device)
        clse = torch.full((m if want_cols else 0,), float("-inf"), dtype=dt, device=a.device)
        for i0 in range(0, n, chunk):
            ai = at[i0 : i0 + chunk]
            mi = None if mask_idx is None else mask_idx[i0 : i0 + chunk]
            acc = lse[i0 : i0 + chunk]
            for j0 in range(0, m, chunk):
                s = ai @ bf[j0 : j0 + chunk].T
                _mask_tile(s, mi, j0)
                if want_cols:
                    c = clse[j0 : j0 + chunk]
                    torch.logaddexp(c, torch.logsumexp(s, dim=0), out=c)
                torch.logaddexp(acc, torch.logsumexp(s, dim=1), out=acc)
        if extra is not None:
            lse = torch.logaddexp(lse, extra.detach().to(dt))
        ctx.save_for_backward(a, b, inv_temp, extra, mask_idx, lse, clse)
        ctx.want_cols = want_cols
        ctx.chunk = chunk
        return lse, clse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, g_lse: torch.Tensor, g_clse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        a, b, inv_temp, extra, mask_idx, lse, clse = ctx.saved_tensors
        chunk, want_cols = ctx.chunk, ctx.want_cols
        dt = lse.dtype
        n, m = a.shape[0], b.shape[0]
        t = inv_temp.detach().to(dt)
        af = a.detach().to(dt)
        at = af * t
        bf = b.detach().to(dt)
        g_lse = g_lse.to(dt)
        g_clse = g_clse.to(dt) if want_cols else None
        # u = G @ B (unscaled); dA = t * u and dt = sum(A * u).
        u = torch.zeros_like(af)
        db = torch.zeros_like(bf)
        for i0 in range(0, n, chunk):
            ai = at[i0 : i0 + chunk]
            gi = g_lse[i0 : i0 + chunk, None]
            li = lse[i0 : i0 + chunk, None]
            mi = None if mask_idx is None else mask_idx[i0 : i0 + chunk]
            ui = u[i0 : i0 + chunk]
            for j0 in range(0, m, chunk):
                bj = bf[j0 : j0 + chunk]
                s = ai @ bj.T
                _mask_tile(s, mi, j0)
                if want_cols:
                    q = (s - clse[None, j0 : j0 + chunk]).exp_()
                    q.mul_(g_clse[None, j0 : j0 + chunk])
                    # G = g_row * exp(S - lse) + g_col * exp(S - clse); reuse s's buffer.
                    g = q.addcmul_(s.sub_(li).exp_(), gi)
                else:
                    g = s.sub_(li).exp_().mul_(gi)
                ui.addmm_(g, bj)
                db[j0 : j0 + chunk].addmm_(g.T, ai)
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
        cols: also return the column log-sum-exp (over the N rows).
        chunk_size: tile edge; any positive int (need not divide N or M).

    Returns:
        ``(row_lse, col_lse)``: shapes (N,) and (M,) (``col_lse`` is None unless
        ``cols``), in float32 (float64 for float64 inputs).
    """
    lse, clse = _ChunkedLSE.apply(a, b, inv_temp, extra, mask_idx, cols, chunk_size)
    return lse, (clse if cols else None)
