"""The fixed-shift policy: when one constant C may stand in for a log-sum-exp's running maximum.

Every log-sum-exp in this package sums ``exp(s)`` over logits ``s_ij = t * <a_i, b_j>``.
By Cauchy-Schwarz ``|s_ij| <= C = t * max_i |a_i| * max_j |b_j|``, so every term
``exp(s_ij - C)`` lies in ``[exp(-2C), 1]``: it cannot overflow, and while ``2C`` stays
inside the accumulation dtype's safe range (:data:`SAFE_EXP_RANGE`) no term underflows
into subnormals, so each keeps full relative precision. With such a C

- a tiled kernel needs no per-row (or per-column) maximum: one ``exp`` per element
  serves the row and the column statistics, forward and backward
  (:mod:`~dist_infonce.kernels.chunked`, :mod:`~dist_infonce.kernels.symmetric`,
  :mod:`~dist_infonce.kernels.triton_lse`);
- a collective needs one all-reduce of plain sums instead of a max, then the sums
  (:func:`dist_infonce.dist.all_reduce_logsumexp`).

Above the range every user falls back to its general (online-maximum) path, which
assumes nothing about the logits. The two paths agree to rounding; the policy only
decides which one runs, so it lives here, once.
"""

from __future__ import annotations

import torch

__all__ = ["SAFE_EXP_RANGE", "logit_bound", "shift_if_safe", "unit_vector_bound"]

#: Largest ``2C`` for which ``exp(s - C)``, ``s`` in ``[-C, C]``, stays a normal number
#: of the dtype: ``exp(-64) ~ 1.6e-28``, far above float32's smallest normal 1.2e-38;
#: ``exp(-600) ~ 2.7e-261``, far above float64's 2.2e-308. Keyed by the dtype the
#: sums are accumulated in (float32 also for float16 / bfloat16 inputs).
SAFE_EXP_RANGE: dict[torch.dtype, float] = {torch.float32: 64.0, torch.float64: 600.0}


def logit_bound(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    norm_dtype: torch.dtype | None = None,
) -> float | None:
    """The Cauchy-Schwarz bound ``C = scale * max_i |a_i| * max_j |b_j|`` on ``|scale * a @ b.T|``.

    One host sync (the kernels need C as a Python number to choose their path).

    Args:
        a: rows. Shape: (N, D).
        b: columns. Shape: (M, D).
        scale: the inverse temperature when it is not folded into ``a`` already.
            Shape: () or (1,).
        norm_dtype: dtype the row norms are computed in (``torch.float32`` for half
            inputs, without a float32 copy of them); None: the inputs' dtype.

    Returns:
        C, or None when either side is empty (no logits, nothing to bound).
    """
    if a.shape[0] == 0 or b.shape[0] == 0:
        return None
    bound = (
        torch.linalg.vector_norm(a, dim=1, dtype=norm_dtype).max()
        * torch.linalg.vector_norm(b, dim=1, dtype=norm_dtype).max()
    )
    if scale is not None:
        bound = bound * scale
    return float(bound)


def unit_vector_bound(inv_temp: torch.Tensor) -> float:
    """C for L2-normalised rows and columns: the inverse temperature itself (one host sync)."""
    return float(inv_temp.detach())


def shift_if_safe(bound: float | None, dtype: torch.dtype) -> float | None:
    """``bound`` when ``2 * bound`` fits :data:`SAFE_EXP_RANGE` of ``dtype``, else None.

    Args:
        bound: C from :func:`logit_bound` or :func:`unit_vector_bound`; None for no bound.
        dtype: the dtype the exponentials are summed in (float32 or float64).

    Returns:
        The shift to use, or None: take the general path.
    """
    if bound is None:
        return None
    return bound if 2.0 * bound <= SAFE_EXP_RANGE[dtype] else None
