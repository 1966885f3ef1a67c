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

One direction (no column statistic) with a gradient to come takes a shorter road:
the forward walks *row panels* (rows against the whole pool, about
``PANEL_TILES * chunk_size**2`` logits), where each row's log-sum-exp is final once its panel
is, so the softmax weights ``P = exp(S - lse)`` are known on the spot and the panel
yields ``U = P @ B`` and ``V = P^T @ (t A)`` right away: three matmul units in all
instead of four (forward, recompute, dA, dB), as torch's ``linear_cross_entropy``
does. The backward then only scales them by the upstream gradient: exactly for dA and
dt whatever it is (U is per row), and for dB when it is the same for every row
("mean", "sum"); any other recomputes the tiles once. Memory: U and V, (N + M) x D
float32, and the panel.

With a valid fixed shift C (:mod:`~dist_infonce.kernels.bounds`: every logit in
[-C, C], 2C inside the safe range) every ``exp(s)`` is itself a normal number, so the
tiles exponentiate the logits directly: the shift's role is the check, and no pass
subtracts it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dist_infonce.kernels.bounds import logit_bound, shift_if_safe

__all__ = [
    "DEFAULT_CHUNK",
    "PANEL_TILES",
    "chunked_lse",
    "compute_dtype",
    "dense_lse",
    "no_autocast",
    "panel_rows",
    "row_dots",
    "same_for_every_row",
]

# Tile edge used when the caller does not force one. Tuned with
# `python -m dist_infonce.bench --tune-chunk` on the project machine.
DEFAULT_CHUNK = 1024
#: Logits of one row panel of the one-direction forward, in tiles of chunk x chunk:
#: 2 tiles (8 MiB of float32 at the default tile; 128 rows at B = 16384). Measured side
#: by side at B = 16384 on the project machine: 1, 2, 4, 8 tiles within 6% of each
#: other in time (2 the fastest), the smaller panel the smaller peak.
PANEL_TILES = 2


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

    Every tile is a view of one (chunk, chunk) buffer (no allocation per tile): the
    caller may overwrite it in place, and is done with it when it asks for the next.
    """
    buf = at.new_empty((min(chunk, at.shape[0]), min(chunk, b.shape[0])))
    for i0 in range(0, at.shape[0], chunk):
        rows = slice(i0, i0 + chunk)
        ai = at[rows]
        mi = None if mask_idx is None else mask_idx[rows]
        for j0 in range(0, b.shape[0], chunk):
            cols = slice(j0, j0 + chunk)
            bj = b[cols]
            s = buf[: ai.shape[0], : bj.shape[0]]
            torch.mm(ai, bj.T, out=s)
            _mask_tile(s, mi, j0)
            yield rows, cols, s


def _forward_shifted(
    at: torch.Tensor,
    b: torch.Tensor,
    mask_idx: torch.Tensor | None,
    want_cols: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Bounded logits: exp(s) needs no shift (see the module docstring).
    rsum = at.new_zeros(at.shape[0])
    csum = at.new_zeros(b.shape[0] if want_cols else 0)
    for rows, cols, e in _tiles(at, b, mask_idx, chunk):
        e.exp_()
        rsum[rows] += e.sum(1)
        if want_cols:
            csum[cols] += e.sum(0)
    return rsum.log_(), csum.log_()


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(G @ B, G^T @ at)`` with G = E * (alpha_i + beta_j), E = exp(S).

    alpha_i = g_i * exp(-lse_i) <= g_i * exp(C) cannot overflow (lse_i >= -C).
    """
    alpha = g_lse * (-lse).exp()
    u = torch.zeros_like(at)
    db = torch.zeros_like(b)
    if g_clse is None:
        # Rows only: alpha is constant along a row, so apply it to the (N, D)
        # results instead of the (N, M) tiles: no elementwise pass beyond exp.
        at_alpha = at * alpha[:, None]
        for rows, cols, e in _tiles(at, b, mask_idx, chunk):
            e.exp_()
            u[rows].addmm_(e, b[cols])
            db[cols].addmm_(e.T, at_alpha[rows])
        return u.mul_(alpha[:, None]), db
    beta = g_clse * (-clse).exp()
    # alpha_i + beta_j per tile, written into one reused buffer.
    weights = at.new_empty((min(chunk, at.shape[0]), min(chunk, b.shape[0])))
    for rows, cols, e in _tiles(at, b, mask_idx, chunk):
        w = weights[: e.shape[0], : e.shape[1]]
        torch.add(alpha[rows, None], beta[None, cols], out=w)
        g = e.exp_().mul_(w)
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


def panel_rows(n: int, m: int, chunk: int) -> int:
    """Rows of one panel of the one-direction forward: about ``PANEL_TILES * chunk**2``
    logits (at least one row), never more rows than there are."""
    return max(1, min(n, PANEL_TILES * chunk * chunk // max(m, 1)))


def _forward_panels(
    a: torch.Tensor,
    t: torch.Tensor,
    b: torch.Tensor,
    mask_idx: torch.Tensor | None,
    extra: torch.Tensor | None,
    rows_per_panel: int,
    bounded: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row log-sum-exp and the gradients' factors ``U = P @ B``, ``V = P^T @ (t A)``.

    P = exp(S - lse) are the softmax weights over the pool (and ``extra``, which adds
    to lse only). Each panel holds its rows' logits against the whole pool, so lse is
    final before its weights are used. ``bounded``: exp(S) is safe as it is (a valid
    fixed shift); otherwise each row is shifted by its maximum over the panel (the
    whole row: no online merging needed). The temperature is folded into each panel's
    rows, not into a copy of A.

    Shape: a (N, D); t (); b (M, D) -> (N,), (N, D), (M, D).
    """
    n, m = a.shape[0], b.shape[0]
    lse = a.new_empty(n)
    u = a.new_empty(a.shape)
    v = torch.zeros_like(b)
    panel = a.new_empty((min(rows_per_panel, n), m))
    for i0 in range(0, n, rows_per_panel):
        rows = slice(i0, i0 + rows_per_panel)
        ap = a[rows] * t
        p = panel[: ap.shape[0]]
        torch.mm(ap, b.T, out=p)
        _mask_tile(p, None if mask_idx is None else mask_idx[rows], 0)
        if bounded:
            shift = None
        else:
            # A row with every column masked keeps max -inf: shift it by 0 instead.
            shift = p.amax(1) if m else p.new_zeros(ap.shape[0])
            shift = torch.where(torch.isfinite(shift), shift, 0.0)
            p.sub_(shift[:, None])
        p.exp_()
        row_lse = p.sum(1).log_()
        if shift is not None:
            row_lse.add_(shift)
        if extra is not None:
            row_lse = torch.logaddexp(row_lse, extra[rows].detach().to(a.dtype))
        lse[rows] = row_lse
        # P = E * w_i, w_i = exp(shift_i - lse_i); 0 for a row with an empty sum.
        w = row_lse.neg() if shift is None else shift - row_lse
        w = torch.where(torch.isfinite(row_lse), w.exp_(), 0.0)
        torch.mm(p, b, out=u[rows]).mul_(w[:, None])
        v.addmm_(p.T, ap * w[:, None])
    return lse, u, v


def same_for_every_row(g: torch.Tensor) -> bool:
    """One value for every row (one host sync): "mean" and "sum" give such gradients."""
    return g.numel() == 0 or bool((g == g[0]).all())


def row_dots(a: torch.Tensor, b: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """``(a * b).sum(1)`` a block of rows at a time: no (N, D) temporary at large N.

    Shape: a (N, D); b (N, D) -> (N,).
    """
    out = a.new_empty(a.shape[0])
    for i0 in range(0, a.shape[0], block):
        rows = slice(i0, i0 + block)
        torch.sum(a[rows] * b[rows], 1, out=out[rows])
    return out


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
        eager: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dt = compute_dtype(a.dtype)
        with no_autocast(a.device):
            t = inv_temp.detach().to(dt)
            af = a.detach().to(dt)
            bf = b.detach().to(dt)
            u = v = None
            if eager:
                shift = shift_if_safe(logit_bound(af, bf, scale=t), dt)
                rows = panel_rows(af.shape[0], bf.shape[0], chunk)
                lse, u, v = _forward_panels(af, t, bf, mask_idx, extra, rows, shift is not None)
                clse = lse.new_zeros(0)
            else:
                # Fold the temperature into A once (N x D) instead of scaling every tile.
                at = af * t
                shift = _fixed_shift(at, bf)
                if shift is not None:
                    lse, clse = _forward_shifted(at, bf, mask_idx, want_cols, chunk)
                else:
                    lse, clse = _forward_online(at, bf, mask_idx, want_cols, chunk)
                if extra is not None:
                    lse = torch.logaddexp(lse, extra.detach().to(dt))
        ctx.save_for_backward(a, b, inv_temp, extra, mask_idx, lse, clse)
        # Not saved tensors: the first backward takes them and scales them in place into
        # the gradients ((N + M) x D less at its peak); a second backward through the
        # same graph (retain_graph=True) recomputes the tiles instead.
        ctx.eager = (u, v) if eager else None
        ctx.want_cols = want_cols
        ctx.chunk = chunk
        ctx.shift = shift
        return lse, clse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, g_lse: torch.Tensor, g_clse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        a, b, inv_temp, extra, mask_idx, lse, clse = ctx.saved_tensors
        u, v = ctx.eager if ctx.eager is not None else (None, None)
        ctx.eager = None
        with no_autocast(a.device):
            return _ChunkedLSE._backward(
                ctx, g_lse, g_clse, a, b, inv_temp, extra, mask_idx, lse, clse, u, v
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
        u_eager: torch.Tensor | None,
        v_eager: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        want_cols = ctx.want_cols
        dt = lse.dtype
        t = inv_temp.detach().to(dt)
        af = a.detach().to(dt)
        g_lse = g_lse.to(dt)
        g_clse = g_clse.to(dt) if want_cols else None
        need_b = ctx.needs_input_grad[1]
        if u_eager is not None:
            # The forward's U = P @ B and V = P^T @ at: G = g_i P_ij, so G @ B = g (.) U
            # for any g, and G^T @ at = c V when every g_i is the same c.
            u = u_eager.mul_(g_lse[:, None])
            db = None
            if need_b and same_for_every_row(g_lse):
                db = v_eager.mul_(g_lse[0] if g_lse.numel() else 0.0)
            elif need_b:
                db = _ChunkedLSE._recompute(ctx, af * t, b, mask_idx, lse, clse, g_lse, None)[1]
        else:
            u, db = _ChunkedLSE._recompute(ctx, af * t, b, mask_idx, lse, clse, g_lse, g_clse)
        grad_a = grad_b = grad_t = grad_extra = None
        if ctx.needs_input_grad[2]:
            grad_t = row_dots(af, u).sum().to(inv_temp.dtype).reshape(inv_temp.shape)
        if ctx.needs_input_grad[0]:
            grad_a = u.mul_(t).to(a.dtype)  # U is not needed after dt
        if need_b:
            grad_b = db.to(b.dtype)
        if extra is not None and ctx.needs_input_grad[3]:
            grad_extra = (g_lse * (extra.detach().to(dt) - lse).exp()).to(extra.dtype)
        return grad_a, grad_b, grad_t, grad_extra, None, None, None, None

    @staticmethod
    def _recompute(
        ctx,
        at: torch.Tensor,
        b: torch.Tensor,
        mask_idx: torch.Tensor | None,
        lse: torch.Tensor,
        clse: torch.Tensor,
        g_lse: torch.Tensor,
        g_clse: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G @ B, G^T @ at)`` from recomputed tiles."""
        bf = b.detach().to(at.dtype)
        if ctx.shift is not None:
            return _backward_shifted(at, bf, mask_idx, lse, clse, g_lse, g_clse, ctx.chunk)
        return _backward_online(at, bf, mask_idx, lse, clse, g_lse, g_clse, ctx.chunk)


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
        chunk_size: tile edge; any positive int (need not divide N or M). Without
            ``cols`` and with a gradient to come, the forward's row panels hold about
            ``PANEL_TILES * chunk_size**2`` logits.

    Returns:
        ``(row_lse, col_lse)``: shapes (N,) and (M,) (``col_lse`` is None unless
        ``cols``), in float32 (float64 for float64 inputs).
    """
    # The gradient in the forward pays only when a backward will follow: grad mode on
    # and an input that wants it (the column statistic needs every row first: no).
    eager = (
        not cols
        and torch.is_grad_enabled()
        and (a.requires_grad or b.requires_grad or inv_temp.requires_grad)
    )
    lse, clse = _ChunkedLSE.apply(a, b, inv_temp, extra, mask_idx, cols, chunk_size, eager)
    return lse, (clse if cols else None)
