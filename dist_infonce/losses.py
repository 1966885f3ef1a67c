"""InfoNCE, CLIP (symmetric InfoNCE) and SimCLR's NT-Xent, local or over a global pool.

Every loss here is, per row, ``logsumexp(logits of the row) - positive logit``. The
log-sum-exp goes through :mod:`dist_infonce.kernels` (``kernel="auto"``: dense for
small problems, chunked with memory O(N + M) otherwise; ``"triton"``, the fused
kernel, on request); the positive logit is an O(N * D) dot product.

The gradient convention (DESIGN.md): with ``gather=True`` each rank computes the
loss of its own rows against the global pool, and ``reduction="mean"`` returns
``sum(local row losses) * world_size / global_rows``. The mean over ranks of the
returned values is then the global mean, and after DDP averages gradients over
ranks every parameter gradient, the temperature's included, equals that of one
process computing the mean over the concatenated global batch, also when local
batch sizes differ. Nothing here all-reduces a parameter gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from dist_infonce.dist import (
    all_reduce_logsumexp,
    gather_labels,
    gather_with_info,
    get_world_size,
    is_distributed,
)
from dist_infonce.kernels import DEFAULT_CHUNK, chunked_lse, compute_dtype, dense_lse, no_autocast
from dist_infonce.kernels.bounds import unit_vector_bound
from dist_infonce.kernels.symmetric import self_lse
from dist_infonce.kernels.triton_lse import check_triton_block, check_triton_inputs, triton_lse

__all__ = ["InfoNCE", "NTXent", "info_nce", "nt_xent"]

_REDUCTIONS = ("none", "mean", "sum")
_NEGATIVE_MODES = ("unpaired", "paired")
_KERNELS = ("auto", "dense", "chunked", "triton")
# chunk_size=None materialises the logits up to this many elements (16 MiB of
# float32 per copy; dense autograd keeps about four copies) and tiles above it.
_DENSE_MAX_ELEMENTS = 2048 * 2048
# CLIP's cap on the learnable logit scale 1 / temperature.
_MAX_LOGIT_SCALE = 100.0

Temperature = float | torch.Tensor


# --------------------------------------------------------------------------- checks


def _check_matrix(name: str, x: object, ndim: int, shape: str) -> torch.Tensor:
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


def _check_options(reduction: object, chunk_size: object, kernel: object = "auto") -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if not isinstance(kernel, str) or kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "dense" and chunk_size is not None:
        raise ValueError(
            f"chunk_size is the tile edge of the tiled kernels; kernel='dense' takes none, "
            f"got chunk_size={chunk_size}"
        )
    if kernel == "triton":
        check_triton_block(chunk_size)  # type: ignore[arg-type]


def _check_kernel_inputs(kernel: str, x: torch.Tensor) -> None:
    """Refuse, before any collective, inputs the chosen kernel cannot take."""
    if kernel == "triton":
        check_triton_inputs(x)


def _check_temperature(temperature: object) -> None:
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0 or not temperature.is_floating_point():
            raise ValueError(
                "temperature must be a positive finite float or a 0-dim floating-point "
                f"tensor, got a tensor of shape {tuple(temperature.shape)} and dtype "
                f"{temperature.dtype}"
            )
        value = float(temperature.detach())  # one host sync; a bad value is worse
    elif isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(
            "temperature must be a positive finite float or a 0-dim floating-point tensor, "
            f"got {type(temperature).__name__}"
        )
    else:
        value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be > 0 and finite, got {value}")


def _inverse_temperature(temperature: Temperature, like: torch.Tensor) -> torch.Tensor:
    """1 / temperature as a 0-dim tensor in the accumulation dtype (grad flows if a tensor)."""
    dt = compute_dtype(like.dtype)
    if isinstance(temperature, torch.Tensor):
        return (1.0 / temperature).to(device=like.device, dtype=dt)
    return torch.tensor(1.0 / temperature, dtype=dt, device=like.device)


def _check_info_nce_inputs(
    query: object,
    positive_key: object,
    negative_keys: object,
    negative_mode: object,
    symmetric: bool,
    gather: bool,
) -> None:
    if negative_mode not in _NEGATIVE_MODES:
        raise ValueError(f"negative_mode must be one of {_NEGATIVE_MODES}, got {negative_mode!r}")
    q = _check_matrix("query", query, 2, "(N, D)")
    k = _check_matrix("positive_key", positive_key, 2, "(N, D)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(
            "query and positive_key must have the same number of rows N, got "
            f"{q.shape[0]} and {k.shape[0]}"
        )
    _check_same("positive_key", k, "query", q)
    _check_rows("query", q.shape[0], gather)
    if negative_keys is None:
        return
    if symmetric:
        raise ValueError(
            "symmetric=True is the CLIP loss over in-batch negatives; negative_keys must be "
            "None with it"
        )
    if negative_mode == "unpaired":
        neg = _check_matrix(
            "negative_keys", negative_keys, 2, "(M, D) for negative_mode='unpaired'"
        )
        _check_rows("negative_keys", neg.shape[0], gather)
    else:
        neg = _check_matrix(
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


def _check_labels(
    labels: object, rows: torch.Tensor, rows_name: str, negative_keys: object
) -> None:
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


# ----------------------------------------------------------------------- internals


def _lse(
    a: torch.Tensor,
    b: torch.Tensor,
    inv_temp: torch.Tensor,
    chunk_size: int | None,
    *,
    kernel: str = "auto",
    extra: torch.Tensor | None = None,
    mask_idx: torch.Tensor | None = None,
    cols: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if kernel == "triton":
        return triton_lse(
            a, b, inv_temp, extra=extra, mask_idx=mask_idx, cols=cols, chunk_size=chunk_size
        )
    # "auto" never picks triton: it becomes the CUDA default only once the device
    # benchmark shows it faster (issue 9).
    dense = kernel == "dense" or (
        kernel == "auto" and chunk_size is None and a.shape[0] * b.shape[0] <= _DENSE_MAX_ELEMENTS
    )
    if dense:
        return dense_lse(a, b, inv_temp, extra=extra, mask_idx=mask_idx, cols=cols)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK
    return chunked_lse(
        a, b, inv_temp, extra=extra, mask_idx=mask_idx, cols=cols, chunk_size=chunk_size
    )


def _dot(a: torch.Tensor, b: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
    """Row-wise logit ``t * <a_i, b_i>``. Shape: (N,)."""
    dt = compute_dtype(a.dtype)
    return (a.to(dt) * b.to(dt)).sum(-1) * inv_temp


def _label_classes(pool_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class index of every pool row and the size of every class.

    Returns:
        ``(inverse, counts)``: Shape: (M,) and (U,), U the number of distinct labels.
    """
    _, inverse, counts = torch.unique(pool_labels, return_inverse=True, return_counts=True)
    return inverse, counts


def _class_sums(pool: torch.Tensor, inverse: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-class sums of the pool rows (differentiable). Shape: (U, D)."""
    dt = compute_dtype(pool.dtype)
    return pool.new_zeros((classes, pool.shape[1]), dtype=dt).index_add(0, inverse, pool.to(dt))


def _label_dot(
    a: torch.Tensor,
    sums: torch.Tensor,
    cls: torch.Tensor,
    counts: torch.Tensor,
    inv_temp: torch.Tensor,
) -> torch.Tensor:
    """Mean positive logit ``t * <a_i, sums[cls_i]> / counts[cls_i]``. Shape: (N,).

    The mean over P(i) of ``t * <a_i, k_p>`` is one dot product with the sum of
    P(i): O((N + M) * D) work and memory instead of an N x M mask.
    """
    dt = compute_dtype(a.dtype)
    return (a.to(dt) * sums[cls]).sum(-1) * inv_temp / counts[cls].to(dt)


def _global_count(n: int, device: torch.device, group: ProcessGroup | None) -> int:
    count = torch.tensor([n], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        count = count.to(device)
    dist.all_reduce(count, group=group)
    return int(count.item())


def _reduce(losses: torch.Tensor, reduction: str, global_rows: int, world: int) -> torch.Tensor:
    """Apply ``reduction`` with the gradient convention.

    ``losses`` are this rank's row losses. DDP averages gradients over the ``world``
    ranks, so each rank scales its sum by ``world``: the average of the returned
    values (and of their gradients) is then the global mean (or sum).
    """
    if global_rows == 0:
        raise ValueError("the global batch is empty: every rank passed 0 rows")
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "mean":
        return total * (world / global_rows)
    return total * world


def _info_nce_body(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: torch.Tensor | None,
    inv_temp: torch.Tensor,
    reduction: str,
    negative_mode: str,
    symmetric: bool,
    normalize: bool,
    chunk_size: int | None,
    gather: bool,
    group: ProcessGroup | None,
    labels: torch.Tensor | None = None,
    *,
    kernel: str = "auto",
) -> torch.Tensor:
    q, k, neg = query, positive_key, negative_keys
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        neg = None if neg is None else F.normalize(neg, dim=-1)
    distributed = gather and is_distributed(group)
    world = get_world_size(group) if distributed else 1
    n = q.shape[0]

    if neg is not None and negative_mode == "paired":
        # The positive is always the local pair: the same value as its copy in the
        # gathered pool, and its gradient stays on this rank.
        pos = _dot(q, k, inv_temp)
        # Paired negatives stay with their query; the logits (N, M) are D times
        # smaller than the negatives themselves, so there is nothing to tile.
        dt = compute_dtype(q.dtype)
        neg_logits = torch.einsum("nd,nmd->nm", q.to(dt), neg.to(dt)) * inv_temp
        losses = torch.logsumexp(torch.cat([pos[:, None], neg_logits], 1), 1) - pos
        global_rows = _global_count(n, q.device, group) if distributed else n
    elif neg is not None:
        pos = _dot(q, k, inv_temp)
        if distributed:
            neg, info = gather_with_info(neg, group, count=n)
            global_rows = sum(info.counts)
        else:
            global_rows = n
        lse, _ = _lse(q, neg, inv_temp, chunk_size, kernel=kernel, extra=pos)
        losses = lse - pos
    elif symmetric:
        losses, global_rows = _symmetric(
            q,
            k,
            inv_temp,
            chunk_size,
            distributed,
            group,
            labels,
            normalized=normalize,
            kernel=kernel,
        )
    else:
        if distributed:
            kp, info = gather_with_info(k, group)
            global_rows, offset = info.total, info.offset
        else:
            kp, global_rows, offset = k, n, 0
        lse, _ = _lse(q, kp, inv_temp, chunk_size, kernel=kernel)
        if labels is None:
            pos = _dot(q, k, inv_temp)
        else:
            # SupCon: the mean logit over every pool key with row i's label.
            pool_labels = gather_labels(labels, info) if distributed else labels
            inverse, counts = _label_classes(pool_labels)
            sums = _class_sums(kp, inverse, len(counts))
            pos = _label_dot(q, sums, inverse[offset : offset + n], counts, inv_temp)
        losses = lse - pos
    return _reduce(losses, reduction, global_rows, world)


def _symmetric(
    q: torch.Tensor,
    k: torch.Tensor,
    inv_temp: torch.Tensor,
    chunk_size: int | None,
    distributed: bool,
    group: ProcessGroup | None,
    labels: torch.Tensor | None,
    *,
    normalized: bool,
    kernel: str = "auto",
) -> tuple[torch.Tensor, int]:
    """Row losses of the CLIP loss (both directions) and the global row count.

    One block row per rank: ``q_local @ K_pool^T`` gives the query->key row
    statistics and, per key column, a partial key->query log-sum-exp over the
    local queries; :func:`all_reduce_logsumexp` completes the columns over the
    ranks (O(global rows) numbers; one all-reduce with normalised inputs and
    temperature >= 1/300, else two). Only the key tower is gathered (the query tower
    too when ``labels`` need its per-class sums), and every similarity is
    computed once in the world.
    """
    n = q.shape[0]
    if distributed and labels is not None:
        # The key->query positives average queries of the whole pool per class.
        pairs, info = gather_with_info(torch.stack([q, k], 1), group)
        qp, kp = pairs[:, 0], pairs[:, 1]
    elif distributed:
        kp, info = gather_with_info(k, group)
        qp = None
    else:
        qp, kp, info = q, k, None
    offset = info.offset if info is not None else 0
    lse_q, col_lse = _lse(q, kp, inv_temp, chunk_size, kernel=kernel, cols=True)
    if info is not None:
        # Unit vectors bound every logit by t: one all-reduce of plain sums.
        bound = unit_vector_bound(inv_temp) if normalized else None
        col_lse = all_reduce_logsumexp(col_lse, group, bound=bound)
    lse_k = col_lse[offset : offset + n]
    global_rows = info.total if info is not None else n
    if labels is None:
        return 0.5 * (lse_q + lse_k) - _dot(q, k, inv_temp), global_rows
    pool_labels = gather_labels(labels, info) if info is not None else labels
    inverse, counts = _label_classes(pool_labels)
    cls = inverse[offset : offset + n]
    pos_q = _label_dot(q, _class_sums(kp, inverse, len(counts)), cls, counts, inv_temp)
    pos_k = _label_dot(k, _class_sums(qp, inverse, len(counts)), cls, counts, inv_temp)
    return 0.5 * ((lse_q - pos_q) + (lse_k - pos_k)), global_rows


def _nt_xent_body(
    z1: torch.Tensor,
    z2: torch.Tensor,
    inv_temp: torch.Tensor,
    reduction: str,
    normalize: bool,
    chunk_size: int | None,
    gather: bool,
    group: ProcessGroup | None,
    labels: torch.Tensor | None = None,
    *,
    kernel: str = "auto",
) -> torch.Tensor:
    if normalize:
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    distributed = gather and is_distributed(group)
    world = get_world_size(group) if distributed else 1
    n = z1.shape[0]
    rows = torch.cat([z1, z2])
    if distributed:
        pairs, info = gather_with_info(torch.stack([z1, z2], 1), group)
        total, offset = info.total, info.offset
        # Pool layout: every rank's first views, then every rank's second views.
        pool = torch.cat([pairs[:, 0], pairs[:, 1]])
    else:
        total, offset, pool = n, 0, rows
    # Each view leaves out its own column (self-similarity); its pair stays in.
    own = torch.arange(offset, offset + n, device=z1.device)
    own = torch.cat([own, own + total])
    tiled = kernel == "chunked" or (
        kernel == "auto" and (chunk_size is not None or 4 * n * n > _DENSE_MAX_ELEMENTS)
    )
    if tiled and not distributed:
        # Locally the 2N x 2N matrix is symmetric: each tile serves its rows and,
        # transposed, its columns' rows (half the tiles of the general kernel).
        lse = self_lse(rows, inv_temp, chunk_size or DEFAULT_CHUNK)
    else:
        lse, _ = _lse(rows, pool, inv_temp, chunk_size, kernel=kernel, mask_idx=own)
    if labels is None:
        pos = _dot(z1, z2, inv_temp).repeat(2)
    else:
        # SupCon over 2N views: the positives of a view are the views with its label
        # (its pair included) but not itself, so take the view out of its class sum.
        pool_labels = gather_labels(labels, info) if distributed else labels
        inverse, counts = _label_classes(torch.cat([pool_labels, pool_labels]))
        sums = _class_sums(pool, inverse, len(counts))
        cls = inverse[own]
        dt = compute_dtype(rows.dtype)
        others = sums[cls] - rows.to(dt)
        pos = (rows.to(dt) * others).sum(-1) * inv_temp / (counts[cls] - 1).to(dt)
    return _reduce(lse - pos, reduction, 2 * total, world)


def _info_nce(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    with no_autocast(query.device):
        return _info_nce_body(query, *args, **kwargs)  # type: ignore[arg-type]


def _nt_xent(z1: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    with no_autocast(z1.device):
        return _nt_xent_body(z1, *args, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- public API


def info_nce(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: torch.Tensor | None = None,
    temperature: Temperature = 0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
    *,
    symmetric: bool = False,
    normalize: bool = True,
    chunk_size: int | None = None,
    kernel: str = "auto",
    gather: bool = False,
    group: ProcessGroup | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE loss; a drop-in for info-nce-pytorch's ``info_nce`` with more options.

    Row i's logits are ``<q_i, k_j> / temperature`` over its candidates; its loss is
    the cross-entropy with its positive ``k_i``. Candidates are:
    the positive keys of the batch (``negative_keys=None``, in-batch negatives); or
    ``k_i`` plus the shared ``negative_keys`` (unpaired); or ``k_i`` plus its own
    ``negative_keys[i]`` (paired).

    Args:
        query: Shape: (N, D).
        positive_key: Shape: (N, D); row i is the positive of ``query[i]``.
        negative_keys: None, Shape: (M, D) for ``negative_mode="unpaired"``, or
            (N, M, D) for ``"paired"``.
        temperature: a positive float, or a 0-dim tensor (it receives a gradient).
        reduction: "mean", "sum" or "none" (per-row losses, Shape: (N,)).
        negative_mode: "unpaired" or "paired".
        symmetric: CLIP's loss, the mean of the query->key and key->query
            cross-entropies (in-batch negatives only). With "none", row i holds the
            mean of its two directions.
        normalize: L2-normalise the inputs first (info-nce-pytorch always does).
        chunk_size: None picks the chunked kernel when the logits would not fit a
            small budget; an int forces tiles of that edge (memory O(chunk^2)).
        kernel: the log-sum-exp over the pool. "auto" (dense when small, chunked
            otherwise; an int ``chunk_size`` forces chunked), "dense" (the full
            logits, autograd), "chunked" (pure-torch tiles) or "triton" (fused
            Triton kernels; CUDA tensors of float32/bfloat16/float16, or CPU
            tensors under ``TRITON_INTERPRET=1``; ``chunk_size`` a power of two
            >= 16). All give the same result within float rounding. Paired
            negatives need no pool and ignore it.
        gather: build the pool from every rank with :func:`all_gather_with_grad`:
            positive keys (and, symmetric, queries) or unpaired negatives of all
            ranks; paired negatives stay local. Each rank returns the loss of its
            own rows; ``"mean"`` is ``sum * world_size / global_rows`` and ``"sum"``
            is ``sum * world_size`` so that DDP-averaged gradients are exact. A
            rank may hold 0 rows. At world size 1 it is the local loss.
        group: process group for ``gather`` (default the world).
        labels: None, or one int64 class label per row, Shape: (N,) (any int64
            values, hashes included, compared exactly): supervised contrastive
            loss (SupCon's L_out). Row i's loss is its log-sum-exp minus the mean
            logit over P(i), every key of the pool with label ``labels[i]`` (``k_i``
            included; with ``symmetric`` the key->query direction likewise over the
            queries). With ``gather`` the labels are pooled with their rows. Costs
            O((N + M) * D) beyond the unlabelled loss: no N x M mask.

    Returns:
        A 0-dim tensor, or Shape: (N,) for ``reduction="none"``. float32 for
        float16/bfloat16 inputs (the loss is accumulated in float32).

    Raises:
        ValueError: naming the argument, for wrong shapes or ranks, mismatched D,
            dtype or device, an empty batch, a temperature that is not a positive
            finite number, an unknown ``reduction``, ``negative_mode`` or
            ``kernel``, a bad ``chunk_size``, ``symmetric=True`` with
            ``negative_keys``, inputs ``kernel="triton"`` cannot take, or ``labels``
            that are not an int64 tensor of shape (N,) on the query's device, or
            given with ``negative_keys``.
        ImportError: ``kernel="triton"`` without triton installed.

    Example:
        >>> loss = info_nce(img_emb, txt_emb, temperature=0.07, symmetric=True, gather=True)
    """
    _check_options(reduction, chunk_size, kernel)
    _check_info_nce_inputs(query, positive_key, negative_keys, negative_mode, symmetric, gather)
    _check_labels(labels, query, "query", negative_keys)
    _check_kernel_inputs(kernel, query)
    _check_temperature(temperature)
    inv_temp = _inverse_temperature(temperature, query)
    return _info_nce(
        query, positive_key, negative_keys, inv_temp, reduction, negative_mode,
        symmetric, normalize, chunk_size, gather, group, labels, kernel=kernel,
    )  # fmt: skip


def _check_nt_xent_inputs(z1: object, z2: object, gather: bool) -> None:
    a = _check_matrix("z1", z1, 2, "(N, D)")
    b = _check_matrix("z2", z2, 2, "(N, D)")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"z1 and z2 must have the same number of rows N, got {a.shape[0]} and {b.shape[0]}"
        )
    _check_same("z2", b, "z1", a)
    _check_rows("z1", a.shape[0], gather)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: Temperature = 0.5,
    *,
    reduction: str = "mean",
    normalize: bool = True,
    chunk_size: int | None = None,
    kernel: str = "auto",
    gather: bool = False,
    group: ProcessGroup | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """SimCLR's NT-Xent loss over 2N views.

    View ``z1[i]``'s positive is ``z2[i]`` and vice versa; its negatives are the
    other 2N - 2 views (with ``gather=True``: every view of every rank but itself
    and its pair).

    Args:
        z1: first views. Shape: (N, D).
        z2: second views. Shape: (N, D).
        temperature: a positive float, or a 0-dim tensor (it receives a gradient).
        reduction: "mean" (over the 2N views), "sum" or "none" (Shape: (2N,), the
            z1 rows then the z2 rows).
        normalize: L2-normalise the views first (cosine similarity, as in SimCLR).
        chunk_size: as in :func:`info_nce`.
        kernel: as in :func:`info_nce`.
        gather: pool the views of every rank; same gradient convention as
            :func:`info_nce`.
        group: process group for ``gather``.
        labels: None, or one int64 class label per pair, Shape: (N,): SupCon over
            the 2N views. A view's positives are every view of the pool with its
            label except itself (its pair included); the denominator is unchanged.

    Returns:
        A 0-dim tensor, or Shape: (2N,) for ``reduction="none"``.

    Raises:
        ValueError: naming the argument, for bad shapes, mismatched D, dtype or
            device, an empty batch, a bad temperature, reduction, chunk_size or
            kernel, inputs ``kernel="triton"`` cannot take, or ``labels`` that are
            not an int64 tensor of shape (N,) on z1's device.
        ImportError: ``kernel="triton"`` without triton installed.

    Example:
        >>> loss = nt_xent(proj(aug1(x)), proj(aug2(x)), temperature=0.5, gather=True)
    """
    _check_options(reduction, chunk_size, kernel)
    _check_nt_xent_inputs(z1, z2, gather)
    _check_labels(labels, z1, "z1", None)
    _check_kernel_inputs(kernel, z1)
    _check_temperature(temperature)
    inv_temp = _inverse_temperature(temperature, z1)
    return _nt_xent(
        z1, z2, inv_temp, reduction, normalize, chunk_size, gather, group, labels, kernel=kernel
    )


# -------------------------------------------------------------------------- modules


class _TemperatureModule(nn.Module):
    """Holds a fixed temperature, or CLIP's learnable log-parametrised logit scale."""

    def __init__(self, temperature: Temperature, learn_temperature: bool) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.learn_temperature = learn_temperature
        if learn_temperature:
            init = (
                float(temperature.detach())
                if isinstance(temperature, torch.Tensor)
                else temperature
            )
            # log(1 / temperature): a multiplicative parametrisation keeps the
            # temperature positive and makes its steps scale-free.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init)))
            self._temperature: Temperature | None = None
        else:
            self._temperature = temperature

    @property
    def temperature(self) -> torch.Tensor:
        """The temperature used by the next forward, as a 0-dim tensor."""
        if self.learn_temperature:
            return 1.0 / self._logit_scale()
        t = self._temperature
        return t if isinstance(t, torch.Tensor) else torch.tensor(t)

    def _logit_scale(self) -> torch.Tensor:
        # Clamped in the forward (as CLIP): past 100 the gradient stops pushing.
        return self.logit_scale.clamp(max=math.log(_MAX_LOGIT_SCALE)).exp()

    def _inv_temp(self, like: torch.Tensor) -> torch.Tensor:
        if self.learn_temperature:
            return self._logit_scale().to(device=like.device, dtype=compute_dtype(like.dtype))
        _check_temperature(self._temperature)  # a user-owned tensor may have changed
        return _inverse_temperature(self._temperature, like)  # type: ignore[arg-type]


class InfoNCE(_TemperatureModule):
    """Module form of :func:`info_nce`; drop-in for info-nce-pytorch's ``InfoNCE``.

    Args:
        temperature: initial (``learn_temperature``) or fixed temperature.
        reduction, negative_mode, symmetric, normalize, chunk_size, kernel, gather,
            group: as in :func:`info_nce`.
        learn_temperature: own a learnable temperature, parametrised as
            ``logit_scale = log(1 / temperature)`` and clamped to 1/temperature <= 100
            (CLIP). Under DDP its gradient follows the same convention as every
            other parameter: no extra world-size factor.

    Shape:
        query: (N, D); positive_key: (N, D); negative_keys: None, (M, D) or (N, M, D).
        Output: () or (N,) for ``reduction="none"``.

    Example:
        >>> loss_fn = InfoNCE(temperature=0.07, symmetric=True, gather=True, learn_temperature=True)
        >>> loss = loss_fn(image_features, text_features)
    """

    def __init__(
        self,
        temperature: Temperature = 0.1,
        reduction: str = "mean",
        negative_mode: str = "unpaired",
        *,
        symmetric: bool = False,
        normalize: bool = True,
        chunk_size: int | None = None,
        kernel: str = "auto",
        gather: bool = False,
        group: ProcessGroup | None = None,
        learn_temperature: bool = False,
    ) -> None:
        super().__init__(temperature, learn_temperature)
        _check_options(reduction, chunk_size, kernel)
        if negative_mode not in _NEGATIVE_MODES:
            raise ValueError(
                f"negative_mode must be one of {_NEGATIVE_MODES}, got {negative_mode!r}"
            )
        self.reduction = reduction
        self.negative_mode = negative_mode
        self.symmetric = symmetric
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.kernel = kernel
        self.gather = gather
        self.group = group

    def forward(
        self,
        query: torch.Tensor,
        positive_key: torch.Tensor,
        negative_keys: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``query`` against ``positive_key`` (see :func:`info_nce`).

        Shape: query (N, D); positive_key (N, D); negative_keys None, (M, D) or
        (N, M, D); labels None or (N,) int64.
        """
        _check_info_nce_inputs(
            query, positive_key, negative_keys, self.negative_mode, self.symmetric, self.gather
        )
        _check_labels(labels, query, "query", negative_keys)
        _check_kernel_inputs(self.kernel, query)
        return _info_nce(
            query, positive_key, negative_keys, self._inv_temp(query), self.reduction,
            self.negative_mode, self.symmetric, self.normalize, self.chunk_size,
            self.gather, self.group, labels, kernel=self.kernel,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature.detach()):.4g}, learn_temperature={self.learn_temperature}, "
            f"reduction={self.reduction!r}, negative_mode={self.negative_mode!r}, "
            f"symmetric={self.symmetric}, chunk_size={self.chunk_size}, kernel={self.kernel!r}, "
            f"gather={self.gather}"
        )


class NTXent(_TemperatureModule):
    """Module form of :func:`nt_xent` (SimCLR), optionally with a learnable temperature.

    Shape:
        z1: (N, D); z2: (N, D). Output: () or (2N,) for ``reduction="none"``.

    Example:
        >>> loss = NTXent(temperature=0.5, gather=True)(z1, z2)
    """

    def __init__(
        self,
        temperature: Temperature = 0.5,
        *,
        reduction: str = "mean",
        normalize: bool = True,
        chunk_size: int | None = None,
        kernel: str = "auto",
        gather: bool = False,
        group: ProcessGroup | None = None,
        learn_temperature: bool = False,
    ) -> None:
        super().__init__(temperature, learn_temperature)
        _check_options(reduction, chunk_size, kernel)
        self.reduction = reduction
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.kernel = kernel
        self.gather = gather
        self.group = group

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """NT-Xent of the views (see :func:`nt_xent`).

        Shape: z1 (N, D); z2 (N, D); labels None or (N,) int64, one per pair.
        """
        _check_nt_xent_inputs(z1, z2, self.gather)
        _check_labels(labels, z1, "z1", None)
        _check_kernel_inputs(self.kernel, z1)
        return _nt_xent(
            z1, z2, self._inv_temp(z1), self.reduction, self.normalize, self.chunk_size,
            self.gather, self.group, labels, kernel=self.kernel,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature.detach()):.4g}, learn_temperature={self.learn_temperature}, "
            f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, kernel={self.kernel!r}, "
            f"gather={self.gather}"
        )
