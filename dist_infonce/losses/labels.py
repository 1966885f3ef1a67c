"""Labels: several positives per row (SupCon's L_out), without an N x M mask.

Row i's positive term is the mean logit over P(i), the pool rows sharing its label.
The mean over P(i) of ``t * <a_i, k_p>`` is one dot product with the sum of P(i), so
the per-class sums of the pool cost O((N + M) * D) work and memory.
"""

from __future__ import annotations

import torch

from dist_infonce.kernels import compute_dtype

__all__ = ["class_sums", "label_classes", "mean_positive_logit"]


def label_classes(pool_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class index of every pool row and the size of every class.

    Labels are compared exactly (any int64 values, hashes included).

    Returns:
        ``(inverse, counts)``: Shape: (M,) and (U,), U the number of distinct labels.
    """
    _, inverse, counts = torch.unique(pool_labels, return_inverse=True, return_counts=True)
    return inverse, counts


def class_sums(pool: torch.Tensor, inverse: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-class sums of the pool rows (differentiable). Shape: (M, D) -> (U, D)."""
    dt = compute_dtype(pool.dtype)
    return pool.new_zeros((classes, pool.shape[1]), dtype=dt).index_add(0, inverse, pool.to(dt))


def mean_positive_logit(
    a: torch.Tensor,
    sums: torch.Tensor,
    cls: torch.Tensor,
    counts: torch.Tensor,
    inv_temp: torch.Tensor,
) -> torch.Tensor:
    """Mean positive logit ``t * <a_i, sums[cls_i]> / counts[cls_i]``.

    Shape: a (N, D); sums (U, D); cls (N,); counts (U,) -> (N,).
    """
    dt = compute_dtype(a.dtype)
    return (a.to(dt) * sums[cls]).sum(-1) * inv_temp / counts[cls].to(dt)
