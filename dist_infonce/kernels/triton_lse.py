"""Fused Triton log-sum-exp: the contract of :func:`~dist_infonce.kernels.chunked_lse`, on chip.

The chunked kernel makes several passes over each (chunk x chunk) tile in device
memory (matmul output, scale, exp, sums; in backward G and two more matmuls). Here
each tile lives in registers from the matmul that makes it to the sums (forward)
or to the two matmuls that consume it (backward); only the inputs, one float32
number per row and column, and the float32 gradients touch device memory. The
kernels themselves are in :mod:`dist_infonce.kernels._triton_kernels`.

Semantics are those of :func:`chunked_lse` (same arguments, same saved
statistics, same fixed-shift vs online-maximum choice, float32 statistics);
differences are in the numbers only:

- inputs: float32, bfloat16 and float16. float64 is refused (use
  ``kernel="chunked"``): the point of this kernel is the tensor cores.
- float32 inputs multiply with ``input_precision="tf32x3"`` (three TF32
  products per product, about float32 accuracy), not plain TF32 (~1e-3). The
  interpreter multiplies in float32; the CUDA tests check tf32x3 against float64.
- half inputs: the backward's gradient weights G are rounded to the input dtype
  before their two matmuls (as FlashAttention does with P); sums stay float32.
- the input gradient of the rows is summed with float32 atomics, so its last
  bits may differ from run to run on CUDA.
- with ``cols=True`` a ``mask_idx`` must not mask one column from two rows (the
  online path computes the column statistic as the transposed problem, one masked
  row per column); this is refused with a ``ValueError``.

Devices: CUDA tensors; CPU tensors only when ``TRITON_INTERPRET=1`` was set before
the kernels were first imported (Triton's interpreter, how CI checks the
numerics). triton is imported on first use, so the package works without it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from dist_infonce.kernels.bounds import logit_bound, shift_if_safe

__all__ = [
    "DEFAULT_BLOCK",
    "SUPPORTED_DTYPES",
    "check_triton_block",
    "check_triton_inputs",
    "triton_lse",
]

#: Tile edge (rows and columns) when ``chunk_size`` is None. A first guess for
#: Hopper (FlashAttention's tiles are 64-128 rows): to be tuned on the device.
DEFAULT_BLOCK = 64
#: Slice of D per ``tl.dot`` when computing a logit tile.
BLOCK_K_MAX = 64
#: Slice of D whose gradient one backward program accumulates in registers
#: (BLOCK_N x BLOCK_D float32). D above it costs one more recompute per slice.
#: ptxas for sm_90a at 64-row tiles and 8 warps (scripts/triton_compile_check.py,
#: triton 3.9): BLOCK_D 64 fits in 252 registers, 128 spills ~300 bytes, 256
#: ~1.9 KB. 128 trades a little spilling for half the recomputes of 64; the
#: device benchmark decides.
BLOCK_D_MAX = 128
#: Warps of the backward kernel; None: 8 for tiles of 64 x 64 elements or more, else 4.
#: (``python -m dist_infonce.bench --triton-variants`` sets these two per row.)
BWD_WARPS: int | None = None
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_kernels: ModuleType | None = None


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def check_triton_block(chunk_size: int | None) -> int:
    """The tile edge for ``kernel="triton"``: ``chunk_size`` or :data:`DEFAULT_BLOCK`.

    Raises:
        ValueError: ``chunk_size`` is not a power of two >= 16 (Triton's blocks
            are powers of two and ``tl.dot`` needs at least 16 rows).
    """
    if chunk_size is None:
        return DEFAULT_BLOCK
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(
            "chunk_size must be a power of two >= 16 with kernel='triton' (Triton tiles), "
            f"got {chunk_size}"
        )
    return chunk_size


def _load_kernels() -> ModuleType:
    global _kernels
    if _kernels is None:
        try:
            _kernels = importlib.import_module("dist_infonce.kernels._triton_kernels")
        except ImportError as e:
            if not (e.name or "").startswith("triton"):
                raise
            raise ImportError(
                "kernel='triton' needs the triton package (pip install triton); "
                "kernel='chunked' runs without it"
            ) from e
    return _kernels


def _interpreted(kernels: ModuleType) -> bool:
    # Triton decides at decoration time: InterpretedFunction under TRITON_INTERPRET=1.
    return type(kernels.lse_fwd_kernel).__name__ == "InterpretedFunction"


def check_triton_inputs(x: torch.Tensor) -> None:
    """Refuse inputs the fused kernel cannot take, before any work.

    Raises:
        ImportError: triton is not installed.
        ValueError: naming ``kernel``, for a dtype other than float32 / bfloat16 /
            float16, or a device that is neither CUDA nor (under the interpreter) CPU.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            "kernel='triton' takes float32, bfloat16 or float16 inputs, got "
            f"{x.dtype}; use kernel='chunked' (or 'auto') for {x.dtype}"
        )
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"kernel='triton' runs on CUDA tensors, got a tensor on {x.device}; "
            "use kernel='chunked'"
        )
    kernels = _load_kernels()
    if x.device.type == "cpu" and not _interpreted(kernels):
        why = (
            "it was set after the kernels were first imported in this process"
            if os.environ.get("TRITON_INTERPRET") == "1"
            else "it is not set"
        )
        raise ValueError(
            "kernel='triton' got CPU tensors: it runs on CUDA, or on CPU under Triton's "
            f"interpreter with TRITON_INTERPRET=1 set before triton is imported ({why}); "
            "use kernel='chunked' on CPU"
        )


class _Blocks:
    """Launch shapes for one (D, dtype, tile edge)."""

    def __init__(self, d: int, dtype: torch.dtype, block: int, interpreted: bool) -> None:
        self.m = self.n = block
        self.k = min(BLOCK_K_MAX, max(16, _next_pow2(d)))
        self.d = min(BLOCK_D_MAX, max(16, _next_pow2(d)))
        # float32 inputs: TF32 alone would cost ~1e-3 relative; "tf32x3" (three TF32
        # products, the split-precision trick) keeps float32 accuracy on tensor cores,
        # where "ieee" would fall back to FMA (and spill: 18 KB in the backward).
        self.precision = "tf32x3" if dtype == torch.float32 else "tf32"
        # Works around the interpreter's bfloat16 tl.dot (see _triton_kernels._dot).
        self.dot_f32 = interpreted and dtype == torch.bfloat16
        # The backward's (BLOCK_N x BLOCK_D) float32 accumulator wants more threads.
        self.bwd_warps = BWD_WARPS or (8 if block * self.d >= 64 * 64 else 4)


def _row_lse(
    kernels: ModuleType,
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    mask_idx: torch.Tensor | None,
    shift: float | None,
    want_col_sums: bool,
    blk: _Blocks,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward launch: row lse (N,), and with a shift the column sums of exp(s - C)."""
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    lse = torch.empty(n, dtype=torch.float32, device=a.device)
    csum = torch.zeros(m if want_col_sums else 1, dtype=torch.float32, device=a.device)
    mask = mask_idx if mask_idx is not None else lse  # placeholder pointer, never read
    kernels.lse_fwd_kernel[(_cdiv(n, blk.m),)](
        a, b, t, mask, lse, csum,
        n, m, d, a.stride(0), b.stride(0), 0.0 if shift is None else shift,
        HAS_MASK=mask_idx is not None, SHIFTED=shift is not None, COLS=want_col_sums,
        BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_K=blk.k, PRECISION=blk.precision,
        DOT_F32=blk.dot_f32,
    )  # fmt: skip
    return lse, (csum if want_col_sums else None)


def check_column_mask(mask_idx: torch.Tensor, m: int) -> None:
    """Refuse a mask that leaves two rows out of one column's statistic.

    The kernels take one masked column per row; the column statistic of the online
    path is the row statistic of the transposed problem, which then needs one
    masked row per column, i.e. a ``mask_idx`` that is injective on [0, M). Every
    caller's mask is (NT-Xent's self-similarity: distinct rows mask distinct
    columns). One host sync; only with ``cols=True`` and a mask.

    Raises:
        ValueError: naming ``mask_idx``, if two rows mask the same column.
    """
    hits = torch.bincount(_in_range(mask_idx, m), minlength=m + 1)[:m]
    if m and int(hits.max()) > 1:
        column = int(hits.argmax())
        raise ValueError(
            f"mask_idx: kernel='triton' with cols=True leaves at most one row out of each "
            f"column, but {int(hits[column])} rows mask column {column}; use "
            "kernel='chunked' for such masks"
        )


def column_mask(mask_idx: torch.Tensor, m: int) -> torch.Tensor:
    """The mask of the transposed problem: per column, the row that masks it, or -1.

    Shape: (N,) -> (M,), int64. ``mask_idx`` must be injective on [0, M)
    (:func:`check_column_mask`); indices outside [0, M) mask nothing.
    """
    n = mask_idx.shape[0]
    # Out-of-range rows write to a spare slot M, dropped after: no boolean indexing,
    # no host sync.
    inverse = torch.full((m + 1,), -1, dtype=torch.int64, device=mask_idx.device)
    rows = torch.arange(n, dtype=torch.int64, device=mask_idx.device)
    inverse.scatter_(0, _in_range(mask_idx, m), rows)
    return inverse[:m].contiguous()


def _in_range(mask_idx: torch.Tensor, m: int) -> torch.Tensor:
    """``mask_idx`` with every index outside [0, M) replaced by M."""
    inside = (mask_idx >= 0) & (mask_idx < m)
    return torch.where(inside, mask_idx, torch.full_like(mask_idx, m))


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


class _TritonLSE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        a: torch.Tensor,
        b: torch.Tensor,
        inv_temp: torch.Tensor,
        extra: torch.Tensor | None,
        mask_idx: torch.Tensor | None,
        want_cols: bool,
        block: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kernels = _load_kernels()
        n, m = a.shape[0], b.shape[0]
        ac, bc = a.detach().contiguous(), b.detach().contiguous()
        t = inv_temp.detach().to(torch.float32).reshape(1).contiguous()
        mask = None if mask_idx is None else mask_idx.contiguous()
        blk = _Blocks(a.shape[1], a.dtype, block, _interpreted(kernels))
        # Norms in float32 without a float32 copy of half inputs; the statistics are
        # float32 whatever the input dtype, so is the safe range.
        bound = logit_bound(ac, bc, scale=t, norm_dtype=torch.float32)
        shift = shift_if_safe(bound, torch.float32)
        clse = torch.full((m if want_cols else 0,), float("-inf"), device=a.device)
        if n == 0 or m == 0:
            # Empty pool: every row log-sum-exp is log(0) (as in the chunked kernel).
            lse = torch.full((n,), float("-inf"), device=a.device)
        elif shift is not None:
            lse, csum = _row_lse(kernels, ac, bc, t, mask, shift, want_cols, blk)
            if want_cols:
                clse = csum.log_().add_(shift)
        else:
            lse, _ = _row_lse(kernels, ac, bc, t, mask, None, False, blk)
            if want_cols:
                # No common shift: the column statistic is the row statistic of the
                # transposed problem, whose row j leaves out the row that masks j.
                mask_t = None if mask is None else column_mask(mask, m)
                clse, _ = _row_lse(kernels, bc, ac, t, mask_t, None, False, blk)
        if extra is not None:
            lse = torch.logaddexp(lse, extra.detach().to(torch.float32))
        ctx.save_for_backward(a, b, inv_temp, extra, mask_idx, lse, clse)
        ctx.want_cols = want_cols
        ctx.block = block
        ctx.shift = shift
        return lse, clse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, g_lse: torch.Tensor, g_clse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        a, b, inv_temp, extra, mask_idx, lse, clse = ctx.saved_tensors
        kernels = _load_kernels()
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        ac, bc = a.detach().contiguous(), b.detach().contiguous()
        t = inv_temp.detach().to(torch.float32).reshape(1).contiguous()
        blk = _Blocks(d, a.dtype, ctx.block, _interpreted(kernels))
        g_lse = g_lse.to(torch.float32).contiguous()
        cols = ctx.want_cols
        g_clse = g_clse.to(torch.float32).contiguous() if cols else None
        # U = G @ B gathers float32 atomics; dB is written once, scaled, in b's dtype.
        u = torch.zeros(n, d, dtype=torch.float32, device=a.device)
        db = torch.zeros(m, d, dtype=b.dtype, device=a.device)
        dt = torch.zeros(1, dtype=torch.float32, device=a.device)
        if n > 0 and m > 0:
            shift = ctx.shift
            if shift is not None:
                # G = exp(s - C) * (alpha_i + beta_j): one exp serves both terms;
                # alpha_i = g_i * exp(C - lse_i) <= g_i * exp(2C) cannot overflow.
                rshift, rcoef = lse, g_lse * (shift - lse).exp()
                cshift, ccoef = clse, (g_clse * (shift - clse).exp() if cols else None)
            else:
                rshift, rcoef, cshift, ccoef = lse, g_lse, clse, g_clse
            placeholder = lse
            mask = mask_idx.contiguous() if mask_idx is not None else placeholder
            dt = torch.empty(_cdiv(m, blk.n), dtype=torch.float32, device=a.device)
            grid = (_cdiv(m, blk.n), _cdiv(d, blk.d))
            kernels.lse_bwd_kernel[grid](
                ac, bc, t, mask,
                rshift.contiguous(), rcoef.contiguous(),
                cshift.contiguous() if cols else placeholder,
                ccoef.contiguous() if cols else placeholder,
                u, db, dt,
                n, m, d, ac.stride(0), bc.stride(0), 0.0 if shift is None else shift,
                HAS_MASK=mask_idx is not None, ONE_EXP=shift is not None, COLS=cols,
                BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_K=blk.k, BLOCK_D=blk.d,
                PRECISION=blk.precision, DOT_F32=blk.dot_f32, num_warps=blk.bwd_warps,
            )  # fmt: skip
        grad_a = grad_b = grad_t = grad_extra = None
        tf = t[0]
        if ctx.needs_input_grad[2]:
            grad_t = dt.sum().to(inv_temp.dtype).reshape(inv_temp.shape)
        if extra is not None and ctx.needs_input_grad[3]:
            grad_extra = (g_lse * (extra.detach().to(torch.float32) - lse).exp()).to(extra.dtype)
        if ctx.needs_input_grad[0]:
            grad_a = u.mul_(tf).to(a.dtype)  # in place: U is not needed after dt
        if ctx.needs_input_grad[1]:
            grad_b = db
        return grad_a, grad_b, grad_t, grad_extra, None, None, None


def triton_lse(
    a: torch.Tensor,
    b: torch.Tensor,
    inv_temp: torch.Tensor,
    *,
    extra: torch.Tensor | None = None,
    mask_idx: torch.Tensor | None = None,
    cols: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row (and optionally column) log-sum-exp of ``t * A @ B.T`` with fused Triton kernels.

    Args:
        a: rows. Shape: (N, D); float32, bfloat16 or float16.
        b: columns (the pool). Shape: (M, D), same dtype and device as ``a``.
        inv_temp: inverse temperature t. Shape: () (0-dim); may require grad.
        extra: one more logit per row, in the row log-sum-exp only. Shape: (N,).
        mask_idx: per row, one column to leave out of both log-sum-exps, or an
            index outside [0, M) for none. Shape: (N,), int64. With ``cols=True``
            no two rows may mask the same column (the chunked kernel allows it).
        cols: also return the column log-sum-exp (over the N rows).
        chunk_size: tile edge, a power of two >= 16; None for :data:`DEFAULT_BLOCK`.

    Returns:
        ``(row_lse, col_lse)``: shapes (N,) and (M,) (``col_lse`` None unless
        ``cols``), float32.

    Raises:
        ImportError: triton is not installed.
        ValueError: naming ``kernel`` for an unsupported dtype or device (see
            :func:`check_triton_inputs`), ``chunk_size`` that is not a power of
            two >= 16, or naming ``mask_idx`` when ``cols=True`` and two rows mask
            one column (:func:`check_column_mask`).
    """
    block = check_triton_block(chunk_size)
    check_triton_inputs(a)
    if cols and mask_idx is not None:
        # Checked on both paths, so that what is accepted does not depend on the
        # temperature (only the online path needs it).
        check_column_mask(mask_idx, b.shape[0])
    lse, clse = _TritonLSE.apply(a, b, inv_temp, extra, mask_idx, cols, block)
    return lse, (clse if cols else None)
