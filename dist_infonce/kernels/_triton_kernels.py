"""Triton kernels of the fused log-sum-exp (imported only when ``kernel="triton"`` runs).

Kept apart from :mod:`dist_infonce.kernels.triton_lse` so that importing the package
never imports triton: this module decorates its kernels at import time, and
whether they run compiled (CUDA) or interpreted (``TRITON_INTERPRET=1``, CPU
tensors) is fixed then.

Notation as in :mod:`dist_infonce.kernels.chunked`: ``raw = A @ B.T`` (N x M, the
unscaled similarities), ``s = t * raw`` the logits, masked entries ``-inf``.
Every tile of ``raw`` is a sum over D in ``BLOCK_K`` slices of ``tl.dot`` with
float32 accumulation, so D is unbounded and never needs to divide anything.
Block offsets are int64: at B = 1M rows, ``row * D`` passes 2^31 once D > 2048.
(Block pointers, which would check bounds per block, are gone from triton 3.9;
tensor descriptors need 16-byte aligned strides: masks it is, for now.)

Grid and memory traffic (per program):

- forward: one program per ``BLOCK_M`` rows walks every column tile; the row
  statistic stays in registers. With a fixed shift C (bounded logits), one
  ``exp(s - C)`` per element serves the row sum and the column sum; column sums
  of all programs meet in a float32 (M,) buffer through ``atomic_add``, one
  BLOCK_N vector per tile. Programs start their walk at different column tiles
  so that concurrent programs rarely add to the same addresses.
- backward: one program per (``BLOCK_N`` columns, ``BLOCK_D`` slice of D) walks
  every row tile: recompute ``raw`` (all of D), form the gradient weights G,
  then ``dB_j += G^T @ A_i`` in registers and ``U_i += G @ B_j`` by
  ``atomic_add`` into a float32 (N, D) buffer (FlashAttention-2's dQ scheme).
  The temperature gradient ``sum G * raw`` rides along (slice 0 only). With
  ``BLOCK_D >= D`` that is 3 matmul units (recompute, dA, dB); each extra D slice
  costs one more recompute (D = 512 with BLOCK_D = 128: 6 units). Whether a
  wider slice (fewer recomputes, more registers) or atomics on dB pay off is a
  question for the device benchmark; nothing here is tuned on a GPU yet.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(x, y, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """``tl.dot`` with float32 accumulation; ``DOT_F32`` upcasts the operands first.

    ``DOT_F32`` exists for Triton's CPU interpreter only: its ``tl.dot`` multiplies
    bfloat16 operands as their raw 16-bit patterns (seen with triton 3.9). The
    upcast is exact and products of bfloat16 numbers are exact in float32, so the
    interpreter then computes what the tensor cores compute, up to summation order.
    """
    if DOT_F32:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, input_precision=PRECISION)


@triton.jit
def _block_ptrs(base, first, stride, BLOCK: tl.constexpr, ks):
    """Pointers to ``base[first + i, ks]`` for i < BLOCK (row-major, row stride ``stride``).

    The block's first row is offset once, in int64 (B * D passes 2^31 at B = 1M
    rows, D > 2048); the offsets inside the block stay int32, which keeps the
    per-element address arithmetic (and its registers) small.
    """
    local = tl.arange(0, BLOCK)[:, None] * stride + ks[None, :]
    return base + first.to(tl.int64) * stride + local


@triton.jit
def _raw_tile(
    a_ptr, b_ptr, row0, col0, N, M, D,
    stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """``A[row0:row0+BLOCK_M] @ B[col0:col0+BLOCK_N].T`` in float32; outside the matrices reads 0."""
    rows_ok = (row0 + tl.arange(0, BLOCK_M)) < N
    cols_ok = (col0 + tl.arange(0, BLOCK_N)) < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            _block_ptrs(a_ptr, row0, stride_a, BLOCK_M, ks),
            mask=rows_ok[:, None] & (ks[None, :] < D),
            other=0.0,
        )
        b = tl.load(
            _block_ptrs(b_ptr, col0, stride_b, BLOCK_N, ks),
            mask=cols_ok[:, None] & (ks[None, :] < D),
            other=0.0,
        )
        acc += _dot(a, tl.trans(b), PRECISION, DOT_F32)
    return acc


@triton.jit
def _logits(
    raw, t, rows, cols, mask_ptr, N, M,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """``t * raw`` with -inf outside the matrix and at each row's masked column."""
    valid = (rows[:, None] < N) & (cols[None, :] < M)
    if HAS_MASK:
        # Rows past N read an index no column has.
        midx = tl.load(mask_ptr + rows, mask=rows < N, other=-1)
        valid = valid & (cols[None, :] != midx[:, None])
    return tl.where(valid, raw * t, float("-inf"))


@triton.jit
def lse_fwd_kernel(
    a_ptr, b_ptr, t_ptr, mask_ptr, lse_ptr, csum_ptr,
    N, M, D, stride_a, stride_b, shift,
    HAS_MASK: tl.constexpr, SHIFTED: tl.constexpr, COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Row log-sum-exp of ``t * A @ B.T`` (N,), and with ``COLS`` column sums of ``exp(s - C)``.

    ``SHIFTED``: every logit lies in [-shift, shift] and 2 * shift fits float32's
    safe exponent range, so ``exp(s - shift)`` needs no running maximum and the
    row and column sums share it. Otherwise an online maximum per row (rows only).
    """
    pid = tl.program_id(0)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    t = tl.load(t_ptr).to(tl.float32)
    n_col_tiles = tl.cdiv(M, BLOCK_N)
    if SHIFTED:
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for step in range(0, n_col_tiles):
        # Staggered start: concurrent programs add to different column tiles.
        col0 = ((step + pid) % n_col_tiles) * BLOCK_N
        cols = col0 + tl.arange(0, BLOCK_N)
        raw = _raw_tile(
            a_ptr, b_ptr, row0, col0, N, M, D, stride_a, stride_b,
            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32,
        )  # fmt: skip
        s = _logits(raw, t, rows, cols, mask_ptr, N, M, HAS_MASK)
        if SHIFTED:
            e = tl.exp(s - shift)
            row_sum += tl.sum(e, axis=1)
            if COLS:
                # Relaxed: a plain sum; nothing reads it before the kernel ends.
                tl.atomic_add(csum_ptr + cols, tl.sum(e, axis=0), mask=cols < M, sem="relaxed")
        else:
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            # A row whose columns so far are all masked keeps max -inf; shift
            # by 0 there so that exp(-inf - (-inf)) never makes a NaN.
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(row_max - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
            row_max = new_max
    if SHIFTED:
        lse = tl.log(row_sum) + shift
    else:
        lse = row_max + tl.log(row_sum)
    tl.store(lse_ptr + rows, lse, mask=rows < N)


@triton.jit
def lse_bwd_kernel(
    a_ptr, b_ptr, t_ptr, mask_ptr,
    rshift_ptr, rcoef_ptr, cshift_ptr, ccoef_ptr,
    u_ptr, db_ptr, dt_ptr,
    N, M, D, stride_a, stride_b, shift,
    HAS_MASK: tl.constexpr, ONE_EXP: tl.constexpr, COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Gradient weights G = dL/ds per tile, and ``U = G @ B``, ``dB = G^T @ A``, ``sum G * raw``.

    ``G_ij = rcoef_i * exp(s_ij - rshift_i) + ccoef_j * exp(s_ij - cshift_j)``
    (the column term only with ``COLS``). With ``ONE_EXP`` both shifts are the
    scalar ``shift`` and ``G = exp(s - shift) * (rcoef_i + ccoef_j)``: one exp per
    element. U (N, D, float32) must be zeroed by the caller; ``t * dB`` (M, D) is
    stored in dB's dtype (the input dtype: no float32 copy of dB), and the
    per-program temperature partials dt (cdiv(M, BLOCK_N),) are written here.
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.load(t_ptr).to(tl.float32)
    col_ok = cols < M
    if COLS:
        ccoef = tl.load(ccoef_ptr + cols, mask=col_ok, other=0.0)
        if not ONE_EXP:
            cshift = tl.load(cshift_ptr + cols, mask=col_ok, other=0.0)
    # This program's slice of B: the operand of U += G @ B_j, loaded once.
    b_d = tl.load(
        _block_ptrs(b_ptr, col0, stride_b, BLOCK_N, ds),
        mask=col_ok[:, None] & (ds[None, :] < D),
        other=0.0,
    )
    db = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dt = tl.zeros((), dtype=tl.float32)
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
        s = _logits(raw, t, rows, cols, mask_ptr, N, M, HAS_MASK)
        rcoef = tl.load(rcoef_ptr + rows, mask=row_ok, other=0.0)
        if ONE_EXP:
            w = rcoef[:, None]
            if COLS:
                w = w + ccoef[None, :]
            g = tl.exp(s - shift) * w
        else:
            rshift = tl.load(rshift_ptr + rows, mask=row_ok, other=0.0)
            g = rcoef[:, None] * tl.exp(s - rshift[:, None])
            if COLS:
                g += ccoef[None, :] * tl.exp(s - cshift[None, :])
        # Masked and out-of-matrix entries have s = -inf, so g = 0 there and raw
        # (0 outside the matrix, finite inside) cannot make a NaN.
        if pid_d == 0:
            dt += tl.sum(tl.sum(g * raw, axis=1), axis=0)
        a_d = tl.load(
            _block_ptrs(a_ptr, row0, stride_a, BLOCK_M, ds),
            mask=row_ok[:, None] & (ds[None, :] < D),
            other=0.0,
        )
        # Half-precision inputs: G goes to the tensor cores in the input dtype
        # (as P does in FlashAttention); the sums stay float32.
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
