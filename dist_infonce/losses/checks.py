"""Argument checks of the losses: a ValueError that names the argument and what was expected.

Every check runs before the first collective, so a rank with bad input raises before
the other ranks could wait for it. Option values are checked by
:class:`~dist_infonce.losses.options.LossOptions`, the temperature by
:func:`~dist_infonce.losses.temperature.temperature_value`.
"""

from __future__ import annotations

import torch

from dist_infonce.kernels.triton_lse import check_triton_inputs
from dist_infonce.losses.options import LossOptions

__all__ = [
    "check_hard_negatives",
    "check_info_nce_inputs",
    "check_kernel_inputs",
    "check_labels",
    "check_matrix",
    "check_nt_xent_inputs",
    "check_pair",
]


def check_matrix(name: str, x: object, ndim: int, shape: str) -> torch.Tensor:
    """``x`` if it is a floating-point tensor with ``ndim`` dims and D >= 1.

    Args:
        name: the argument's name, for the message.
        x: the argument.
        ndim: the number of dimensions expected.
        shape: the expected shape as the message shows it, e.g. ``"(N, D)"``.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, shape {shape}; got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError(
            f"{name} must have an embedding dimension D >= 1, got shape {tuple(x.shape)}"
        )
    return x


def _check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name} must have the same embedding dimension as {ref_name}: "
            f"got D={x.shape[-1]} and D={ref.shape[-1]}"
        )
    if x.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(
            f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}"
        )


def _check_rows(name: str, n: int, gather: bool) -> None:
    # With gather=True a rank may hold no rows (the tail of an epoch); the global
    # count is checked after the exchange, identically on every rank.
    if n == 0 and not gather:
        raise ValueError(f"{name} must have at least one row, got 0 (empty batch)")


def check_kernel_inputs(kernel: str, x: torch.Tensor) -> None:
    """Refuse, before any collective, inputs the chosen kernel cannot take."""
    if kernel == "triton":
        check_triton_inputs(x)


def check_info_nce_inputs(
    query: object, positive_key: object, negative_keys: object, *, options: LossOptions
) -> None:
    """The inputs of :func:`~dist_infonce.info_nce` (shapes, dtypes, devices, rows).

    Shape: query (N, D); positive_key (N, D); negative_keys None, (M, D) or (N, M, D).
    """
    q = check_matrix("query", query, 2, "(N, D)")
    k = check_matrix("positive_key", positive_key, 2, "(N, D)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(
            "query and positive_key must have the same number of rows N, got "
            f"{q.shape[0]} and {k.shape[0]}"
        )
    _check_same("positive_key", k, "query", q)
    _check_rows("query", q.shape[0], options.gather)
    if negative_keys is None:
        return
    if options.symmetric:
        raise ValueError(
            "symmetric=True is the CLIP loss over in-batch negatives; negative_keys must be "
            "None with it"
        )
    if options.negative_mode == "unpaired":
        neg = check_matrix("negative_keys", negative_keys, 2, "(M, D) for negative_mode='unpaired'")
        _check_rows("negative_keys", neg.shape[0], options.gather)
    else:
        neg = check_matrix(
            "negative_keys", negative_keys, 3, "(N, M, D) for negative_mode='paired'"
        )
        if neg.shape[0] != q.shape[0]:
            raise ValueError(
                "negative_keys with negative_mode='paired' must have one set per query: "
                f"shape (N={q.shape[0]}, M, D), got {tuple(neg.shape)}"
            )
        if neg.shape[1] == 0:
            raise ValueError(
                f"negative_keys must have at least one negative per query, got {tuple(neg.shape)}"
            )
    _check_same("negative_keys", neg, "query", q)


def check_nt_xent_inputs(z1: object, z2: object, *, gather: bool) -> None:
    """The views of :func:`~dist_infonce.nt_xent`. Shape: z1 (N, D); z2 (N, D)."""
    a = check_matrix("z1", z1, 2, "(N, D)")
    b = check_matrix("z2", z2, 2, "(N, D)")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"z1 and z2 must have the same number of rows N, got {a.shape[0]} and {b.shape[0]}"
        )
    _check_same("z2", b, "z1", a)
    _check_rows("z1", a.shape[0], gather)


def check_pair(name_a: str, a: object, name_b: str, b: object, *, gather: bool) -> None:
    """Two towers of pairs (SigLIP's x and y): (N, D) each, same N, D, dtype and device.

    Shape: a (N, D); b (N, D).
    """
    ta = check_matrix(name_a, a, 2, "(N, D)")
    tb = check_matrix(name_b, b, 2, "(N, D)")
    if ta.shape[0] != tb.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same number of rows N (row i of each is a "
            f"pair), got {ta.shape[0]} and {tb.shape[0]}"
        )
    _check_same(name_b, tb, name_a, ta)
    _check_rows(name_a, ta.shape[0], gather)


def check_labels(labels: object, rows: torch.Tensor, rows_name: str, negative_keys: object) -> None:
    """``labels``: None, or int64 of shape (N,) on the rows' device, without negative_keys.

    Shape: labels (N,) for rows (N, D).
    """
    if labels is None:
        return
    if negative_keys is not None:
        raise ValueError(
            "labels define the positives among the in-batch keys; they cannot be combined "
            "with explicit negative_keys (pass negative_keys=None)"
        )
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"labels must be None or an int64 torch.Tensor of shape (N,), got "
            f"{type(labels).__name__}"
        )
    if labels.dtype != torch.int64:
        raise ValueError(
            f"labels must have dtype torch.int64 (exact integer class ids), got {labels.dtype}"
        )
    if labels.dim() != 1 or labels.shape[0] != rows.shape[0]:
        raise ValueError(
            f"labels must have shape (N,) = ({rows.shape[0]},), one label per row of "
            f"{rows_name}; got shape {tuple(labels.shape)}"
        )
    if labels.device != rows.device:
        raise ValueError(
            f"labels must be on the device of {rows_name} ({rows.device}), got {labels.device}"
        )


def check_hard_negatives(
    hard_negatives: object, query: torch.Tensor, negative_keys: object
) -> torch.Tensor | None:
    """``hard_negatives``: None, or (M, D) / (N, H, D) like ``query``, without
    ``negative_keys``. Returns them as (M, D) rows (a 3-d tensor flattened), or None.

    Shape: hard_negatives (M, D) or (N, H, D) for query (N, D). Output: (M, D) or
    (N * H, D).
    """
    if hard_negatives is None:
        return None
    if negative_keys is not None:
        raise ValueError(
            "hard_negatives join the in-batch keys as extra candidates; negative_keys "
            "replace them. Pass one of the two (negative_keys=None with hard_negatives)"
        )
    if isinstance(hard_negatives, torch.Tensor) and hard_negatives.dim() == 3:
        h = check_matrix("hard_negatives", hard_negatives, 3, "(N, H, D) or (M, D)")
        if h.shape[0] != query.shape[0]:
            raise ValueError(
                "hard_negatives of shape (N, H, D) must have one row of H negatives per "
                f"query: N={query.shape[0]}, got shape {tuple(h.shape)}"
            )
        h = h.reshape(-1, h.shape[-1])
    else:
        h = check_matrix("hard_negatives", hard_negatives, 2, "(M, D) or (N, H, D)")
    _check_same("hard_negatives", h, "query", query)
    return h
