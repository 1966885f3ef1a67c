"""Triton kernels of the fused sigmoid-loss sums (imported only when ``kernel="triton"`` runs).

The tile walk of :mod:`dist_infonce.kernels._triton_kernels` (whose tile helpers are
reused), with SigLIP's elementwise part: ``z = t * raw + c``, ``raw = A @ B.T``.

- forward: one program per ``BLOCK_M`` rows walks every column tile and keeps the row
  sum of ``softplus(z)`` in registers. No statistic couples the tiles: nothing is
  shared between programs, no atomics.
- backward: one program per (``BLOCK_N`` columns, ``BLOCK_D`` slice of D) walks every
  row tile: recompute ``raw``, ``G = g_i * sigmoid(z)``, then ``dB_j += G^T @ A_i`` in
  registers and ``U_i += G @ B_j`` by ``atomic_add`` into a float32 (N, D) buffer. The
  scale's gradient ``sum G * raw`` and the bias's ``sum G`` ride along (slice 0 only).

``softplus(z) = max(z, 0) + log1p(exp(-|z|))``, with log1p by Kahan's trick
``log(u) * e / (u - 1)``, ``u = 1 + e`` (``tl.log(1 + e)`` alone would lose the small
terms: SigLIP's negatives sit at z ~ -10, e ~ 5e-5).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dist_infonce.kernels._triton_kernels import _block_ptrs, _dot, _raw_tile


@triton.jit
def _softplus(z):
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    # u == 1: e is below half an ulp of 1, and log1p(e) = e to that precision.
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.maximum(z, 0.0) + log1p


@triton.jit
def sigmoid_fwd_kernel(
    a_ptr, b_ptr, t_ptr, c_ptr, out_ptr,
    N, M, D, stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Row sums of ``softplus(t * A @ B.T + c)``, Shape: (N,), float32."""
    pid = tl.program_id(0)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    t = tl.load(t_ptr).to(tl.float32)
    c = tl.load(c_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_col_tiles = tl.cdiv(M, BLOCK_N)
    for step in range(0, n_col_tiles):
        # The softmax kernel's staggered walk; the sum does not depend on the order
        # (beyond rounding), and the tile offset is a tensor also under the interpreter.
        col0 = ((step + pid) % n_col_tiles) * BLOCK_N
        cols = col0 + tl.arange(0, BLOCK_N)
        raw = _raw_tile(
            a_ptr, b_ptr, row0, col0, N, M, D, stride_a, stride_b,
            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32,
        )  # fmt: skip
        sp = _softplus(raw * t + c)
        acc += tl.sum(tl.where(cols[None, :] < M, sp, 0.0), axis=1)
    tl.store(out_ptr + rows, acc, mask=rows < N)


@triton.jit
def sigmoid_bwd_kernel(
    a_ptr, b_ptr, t_ptr, c_ptr, g_ptr,
    u_ptr, db_ptr, dt_ptr, dc_ptr,
    N, M, D, stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """``G = g_i sigmoid(z_ij)``; ``U = G @ B`` (atomics), ``t * G^T @ A``, ``sum G raw``, ``sum G``.

    U (N, D, float32) must be zeroed by the caller; ``t * dB`` (M, D) is stored in dB's
    dtype; the per-program partials of the scale's and the bias's gradients,
    (cdiv(M, BLOCK_N),) each, are written here.
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.load(t_ptr).to(tl.float32)
    c = tl.load(c_ptr).to(tl.float32)
    col_ok = cols < M
    b_d = tl.load(
        _block_ptrs(b_ptr, col0, stride_b, BLOCK_N, ds),
        mask=col_ok[:, None] & (ds[None, :] < D),
        other=0.0,
    )
    db = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dt = tl.zeros((), dtype=tl.float32)
    dc = tl.zeros((), dtype=tl.float32)
    n_row_tiles = tl.cdiv(N, BLOCK_M)
    for step in range(0, n_row_tiles):
        # Staggered start: concurrent programs add to different rows of U.
        row0 = ((step + pid_n) % n_row_tiles) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        raw = _raw_tile(
            a_ptr, b_ptr, row0, col0, N, M, D, stride_a, stride_b,
            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32,
        )  # fmt: skip
        # Rows past N read g = 0 and columns past M are masked: G is 0 outside.
        gi = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        g = tl.where(col_ok[None, :], gi[:, None] * tl.sigmoid(raw * t + c), 0.0)
        if pid_d == 0:
            dt += tl.sum(tl.sum(g * raw, axis=1), axis=0)
            dc += tl.sum(tl.sum(g, axis=1), axis=0)
        a_d = tl.load(
            _block_ptrs(a_ptr, row0, stride_a, BLOCK_M, ds),
            mask=row_ok[:, None] & (ds[None, :] < D),
            other=0.0,
        )
        # Half-precision inputs: G goes to the tensor cores in the input dtype.
        gq = g.to(a_d.dtype)
        db += _dot(tl.trans(gq), a_d, PRECISION, DOT_F32)
        u = _dot(gq, b_d, PRECISION, DOT_F32)
        tl.atomic_add(
            _block_ptrs(u_ptr, row0, D, BLOCK_M, ds),
            u,
            mask=row_ok[:, None] & (ds[None, :] < D),
            sem="relaxed",
        )
    tl.store(
        _block_ptrs(db_ptr, col0, D, BLOCK_N, ds),
        (db * t).to(db_ptr.dtype.element_ty),
        mask=col_ok[:, None] & (ds[None, :] < D),
    )
    if pid_d == 0:
        tl.store(dt_ptr + pid_n, dt)
        tl.store(dc_ptr + pid_n, dc)
