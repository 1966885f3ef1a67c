"""Tiled row sums of ``softplus(t * <a_i, b_j> + c)``: SigLIP's sigmoid loss, exact, memory O(N + M).

SigLIP's row loss is ``sum_j -log sigmoid(s_ij * z_ij)`` with ``z_ij = t <a_i, b_j> + c``
and ``s_ij = +1`` for a positive pair, ``-1`` otherwise. Since
``-log sigmoid(-z) = softplus(z)`` and ``-log sigmoid(z) = softplus(z) - z``, it is

    loss_i = sum_j softplus(z_ij) - sum_{j in P(i)} z_ij,

and the positive term is an O(N * D) dot product (with labels, with per-class sums of
the pool; :mod:`dist_infonce.losses.siglip`). This module computes the first term
without ever holding the N x M matrix. Unlike the softmax there is no row statistic:
every tile is final on its own, and so is its gradient,

    dL/dz_ij = g_i * sigmoid(z_ij),
    da = t * g (.) (sigmoid(Z) @ B),  db = sigmoid(Z)^T @ (t * g (.) A),
    dt = sum_i g_i <a_i, (sigmoid(Z) @ B)_i>,  dc = sum_i g_i * sum_j sigmoid(z_ij).

When a gradient will be wanted, the forward therefore computes it on the spot, tile by
tile: ``U = sigmoid(Z) @ B`` (N x D), ``V = sigmoid(Z)^T @ (t A)`` (M x D) and the row
sums of ``sigmoid(Z)``, three matmul units in all instead of the four of a forward plus
a recomputing backward. Every term but ``db`` is a per-row scaling of these, exact for
any upstream gradient g; ``db`` is exact from ``V`` when g is the same for every row
(``"mean"`` and ``"sum"``), and otherwise the backward recomputes the tiles once for it.
Memory: the inputs, ``U`` and ``V`` (float32, (N + M) x D) and three tiles; the first
backward turns U and V into the gradients in place.

Accumulation is in float32 (float64 for float64 inputs), also for float16 / bfloat16.
``softplus`` needs no shift and cannot overflow: ``softplus(z) = max(z, 0) + log1p(e)``
with ``e = exp(-|z|)`` in (0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dist_infonce.kernels.chunked import (
    DEFAULT_CHUNK,
    compute_dtype,
    no_autocast,
    row_dots,
    same_for_every_row,
)

__all__ = ["chunked_sigmoid_sums", "dense_sigmoid_sums", "softplus_threshold"]


def softplus_threshold(dtype: torch.dtype) -> float:
    """Above this ``F.softplus`` returns z itself; ``exp(-threshold)`` is below half an ulp
    of the threshold in ``dtype`` (float32: 20, torch's default; float64: 40)."""
    return 40.0 if dtype == torch.float64 else 20.0


def dense_sigmoid_sums(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Reference path: materialise ``Z = t * A @ B.T + c`` and let autograd differentiate.

    Same contract as :func:`chunked_sigmoid_sums`; memory O(N * M).
    """
    dt = compute_dtype(a.dtype)
    with no_autocast(a.device):
        z = (a.to(dt) @ b.to(dt).T) * scale + bias
        return F.softplus(z, threshold=softplus_threshold(dt)).sum(1)


class _Scratch:
    """Two (chunk x chunk) buffers reused by every tile: no allocation per tile."""

    def __init__(self, chunk: int, like: torch.Tensor) -> None:
        self.e = like.new_empty((chunk, chunk))
        self.w = like.new_empty((chunk, chunk))

    def views(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.e[:rows, :cols], self.w[:rows, :cols]


def _add_softplus_rows(z: torch.Tensor, out: torch.Tensor, scratch: _Scratch) -> None:
    """``out += sum_j softplus(z_ij)``; ``z`` is left as it is.

    ``log1p(e) = 2 atanh(e / (2 + e))``: as accurate as log1p (2.1e-7 relative in
    float32 over z in [-40, 40]) and vectorised, where torch's float32 log1p on the CPU
    runs about 15 times slower than the tile's matmul.
    """
    e, w = scratch.views(*z.shape)
    torch.abs(z, out=e)
    e.neg_().exp_()
    torch.add(e, 2.0, out=w)
    e.div_(w).atanh_()
    torch.clamp(z, min=0.0, out=w)
    out.add_(e.sum(1), alpha=2.0).add_(w.sum(1))


def _tiles(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, chunk: int
) -> Iterator[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, cols, t * A[rows], Z[rows, cols] without the bias)``.

    The scale is folded into each row block (chunk x D), not into a copy of A; the
    tile is one buffer, overwritten by the next one.
    """
    buf = a.new_empty((chunk, chunk))
    for i0 in range(0, a.shape[0], chunk):
        rows = slice(i0, i0 + chunk)
        at = a[rows] * scale
        for j0 in range(0, b.shape[0], chunk):
            cols = slice(j0, j0 + chunk)
            bj = b[cols]
            z = buf[: at.shape[0], : bj.shape[0]]
            torch.mm(at, bj.T, out=z)
            yield rows, cols, at, z


def _forward(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: float,
    chunk: int,
    want_u: bool,
    want_v: bool,
    want_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Row sums of softplus(Z); with the flags also U, V and the row sums of sigmoid(Z)."""
    sums = a.new_zeros(a.shape[0])
    u = torch.zeros_like(a) if want_u else None
    v = torch.zeros_like(b) if want_v else None
    srow = a.new_zeros(a.shape[0]) if want_rows else None
    scratch = _Scratch(chunk, a)
    grads = want_u or want_v or want_rows
    for rows, cols, at, z in _tiles(a, b, scale, chunk):
        z.add_(bias)
        _add_softplus_rows(z, sums[rows], scratch)
        if not grads:
            continue
        p = z.sigmoid_()
        if srow is not None:
            srow[rows] += p.sum(1)
        if u is not None:
            u[rows].addmm_(p, b[cols])
        if v is not None:
            v[cols].addmm_(p.T, at)
    return sums, u, v, srow


def _weighted_v(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: float, g: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``sigmoid(Z)^T @ (g (.) t A)``: the gradient of B for a per-row cotangent g."""
    v = torch.zeros_like(b)
    for rows, cols, at, z in _tiles(a, b, scale, chunk):
        v[cols].addmm_(z.add_(bias).sigmoid_().T, at * g[rows, None])
    return v


class _SigmoidSums(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        chunk: int,
        wants: tuple[bool, bool, bool, bool],
    ) -> torch.Tensor:
        dt = compute_dtype(a.dtype)
        want_a, want_b, want_scale, want_bias = wants
        with no_autocast(a.device):
            af, bf = a.detach().to(dt), b.detach().to(dt)
            t = scale.detach().to(dt)
            c = float(bias.detach())
            sums, u, v, srow = _forward(
                af, bf, t, c, chunk,
                want_u=want_a or want_scale, want_v=want_b, want_rows=want_bias,
            )  # fmt: skip
        ctx.save_for_backward(a, b, scale, bias)
        # Not saved tensors: the first backward takes them and turns them into the
        # gradients in place (2 x (N + M) x D less at its peak); a second backward
        # through the same graph (retain_graph=True) recomputes them.
        ctx.eager = (u, v, srow)
        ctx.chunk = chunk
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        a, b, scale, bias = ctx.saved_tensors
        need_a, need_b, need_scale, need_bias = ctx.needs_input_grad[:4]
        with no_autocast(a.device):
            dt = compute_dtype(a.dtype)
            g = g.to(dt)
            t = scale.detach().to(dt)
            c = float(bias.detach())
            af = a.detach().to(dt)
            bf = b.detach().to(dt)
            u, v, srow = ctx.eager if ctx.eager is not None else (None, None, None)
            ctx.eager = None
            if (need_a or need_scale) and u is None:
                u = _forward(af, bf, t, c, ctx.chunk, True, False, False)[1]
            if need_bias and srow is None:
                srow = _forward(af, bf, t, c, ctx.chunk, False, False, True)[3]
            grad_a = grad_b = grad_scale = grad_bias = None
            if need_scale:
                grad_scale = row_dots(af, u).mul_(g).sum().to(scale.dtype).reshape(scale.shape)
            if need_bias:
                grad_bias = (g * srow).sum().to(bias.dtype).reshape(bias.shape)
            if need_a:
                grad_a = u.mul_((g * t)[:, None]).to(a.dtype)
            if need_b:
                # One cotangent for every row ("mean", "sum"): V scaled is exact. Any
                # other (reduction="none" with weights) recomputes the tiles once.
                if v is not None and same_for_every_row(g):
                    grad_b = v.mul_(g[0] if g.numel() else 0.0).to(b.dtype)
                else:
                    grad_b = _weighted_v(af, bf, t, c, g, ctx.chunk).to(b.dtype)
        return grad_a, grad_b, grad_scale, grad_bias, None, None


def chunked_sigmoid_sums(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Row sums of ``softplus(scale * A @ B.T + bias)``, tile by tile, exact gradients.

    Args:
        a: rows. Shape: (N, D).
        b: columns (the pool). Shape: (M, D), same dtype and device as ``a``.
        scale: the multiplier t. Shape: () (0-dim); may require grad.
        bias: the bias c. Shape: () (0-dim); may require grad.
        chunk_size: tile edge; any positive int (need not divide N or M).

    Returns:
        Shape: (N,), float32 (float64 for float64 inputs).
    """
    wants = (
        torch.is_grad_enabled() and a.requires_grad,
        torch.is_grad_enabled() and b.requires_grad,
        torch.is_grad_enabled() and scale.requires_grad,
        torch.is_grad_enabled() and bias.requires_grad,
    )
    return _SigmoidSums.apply(a, b, scale, bias, chunk_size, wants)
