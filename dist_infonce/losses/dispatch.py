"""Kernel choice: which log-sum-exp computes a loss's statistics over the pool.

``kernel="auto"`` materialises the logits while they are small and tiles above
that; ``"dense"``, ``"chunked"`` and ``"triton"`` are obeyed as given (the kernels are
in :mod:`dist_infonce.kernels`). An int ``chunk_size`` with ``"auto"`` forces the
chunked kernel. "auto" never picks triton: it becomes the CUDA default only once
the device benchmark shows it faster (issue 9).
"""

from __future__ import annotations

import torch

from dist_infonce.kernels import DEFAULT_CHUNK, chunked_lse, dense_lse
from dist_infonce.kernels.symmetric import self_lse
from dist_infonce.kernels.triton_lse import triton_lse
from dist_infonce.losses.options import LossOptions

__all__ = ["DENSE_MAX_ELEMENTS", "pool_lse", "resolve_kernel", "self_similarity_lse"]

#: ``chunk_size=None`` materialises the logits up to this many elements (16 MiB of
#: float32 per copy; dense autograd keeps about four copies) and tiles above it.
DENSE_MAX_ELEMENTS = 2048 * 2048


def resolve_kernel(rows: int, cols: int, options: LossOptions) -> str:
    """The kernel that runs for a (rows x cols) logit matrix: "dense", "chunked" or "triton"."""
    if options.kernel != "auto":
        return options.kernel
    if options.chunk_size is None and rows * cols <= DENSE_MAX_ELEMENTS:
        return "dense"
    return "chunked"


def pool_lse(
    a: torch.Tensor,
    b: torch.Tensor,
    inv_temp: torch.Tensor,
    *,
    options: LossOptions,
    extra: torch.Tensor | None = None,
    mask_idx: torch.Tensor | None = None,
    cols: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row (and with ``cols``, column) log-sum-exp of ``t * a @ b.T`` by the chosen kernel.

    The arguments are those of :func:`dist_infonce.kernels.chunked_lse`.

    Shape: a (N, D); b (M, D); inv_temp (); extra (N,); mask_idx (N,). Returns (N,)
    and (M,) or None.
    """
    kernel = resolve_kernel(a.shape[0], b.shape[0], options)
    if kernel == "triton":
        return triton_lse(
            a, b, inv_temp, extra=extra, mask_idx=mask_idx, cols=cols,
            chunk_size=options.chunk_size,
        )  # fmt: skip
    if kernel == "dense":
        return dense_lse(a, b, inv_temp, extra=extra, mask_idx=mask_idx, cols=cols)
    return chunked_lse(
        a, b, inv_temp, extra=extra, mask_idx=mask_idx, cols=cols,
        chunk_size=options.chunk_size or DEFAULT_CHUNK,
    )  # fmt: skip


def self_similarity_lse(
    z: torch.Tensor, inv_temp: torch.Tensor, *, options: LossOptions
) -> torch.Tensor | None:
    """Row log-sum-exp of ``t * z @ z.T`` without the diagonal, when the chunked kernel runs.

    The local NT-Xent matrix is symmetric: each tile then serves its rows and,
    transposed, its columns' rows (half the tiles of the general kernel). None when
    another kernel is chosen (the caller masks the diagonal through :func:`pool_lse`).

    Shape: z (M, D); inv_temp (). Returns (M,) or None.
    """
    if resolve_kernel(z.shape[0], z.shape[0], options) != "chunked":
        return None
    return self_lse(z, inv_temp, options.chunk_size or DEFAULT_CHUNK)
